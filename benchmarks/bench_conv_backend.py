"""U-Net forward and training-step times with XLA's convolutions vs oneDNN's (synthseg_jax/nn/conv.py).

    python benchmarks/bench_conv_backend.py [--repeats N] [--cases fwd-2.0-96,step-cpu-64,...]

Cases: ``fwd-2.0-96``, ``fwd-2.0-160`` (inference forward of the published 2.0 U-Net: 24 features,
5 levels, 33 labels, batch 1), ``step-2.0-96`` and ``step-cpu-64`` (one training step of the
published network at 96^3 and of configs/model/cpu_2.0.yaml's 8-feature network at 64^3: soft-Dice
loss, backward, Adam update, through synthseg_jax.training.step.Trainer on one device, on a fixed
random batch). Each (case, backend) runs in its own process with SYNTHSEG_JAX_CONV set; the first
call (compilation included) is reported apart and the median of the further calls is the time
(``--repeats`` of them, by default 3, 1, 2 and 3 for the four cases above). Prints a markdown
table with the load average; the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NETWORKS = {  # name -> (nb_features, nb_levels, n_labels)
    "2.0": (24, 5, 33),
    "cpu": (8, 5, 33),
}
# case -> timed calls after the first (fewer for the slowest, to keep the run near 15 min loaded)
CASES = {"fwd-2.0-96": 3, "fwd-2.0-160": 1, "step-2.0-96": 2, "step-cpu-64": 3}


def measure(case: str, repeats: int) -> dict:
    import jax
    import numpy as np

    from synthseg_jax.nn.conv import resolve_backend
    from synthseg_jax.nn.unet import UNet, UNetConfig
    from synthseg_jax.training.losses import segmentation_loss
    from synthseg_jax.training.step import Trainer, create_state, init_variables, make_optimizer

    kind, net, size = case.split("-")
    size = int(size)
    features, levels, labels = NETWORKS[net]
    module = UNet(UNetConfig(prefix="unet", n_labels=labels, nb_features=features, nb_levels=levels))
    variables = init_variables(module, 1, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, size, 1), dtype=np.float32)

    if kind == "fwd":
        fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
        run = lambda: jax.block_until_ready(fn(variables, x))  # noqa: E731
    else:
        y = rng.integers(0, labels, (1, size, size, size)).astype(np.int32)
        tx = make_optimizer(1e-4)
        trainer = Trainer(module, tx, lambda phase, out, tgt: segmentation_loss("dice", out, tgt))
        box = [trainer.place_state(create_state(variables, tx, seed=0))]
        x, y = trainer.place_batch(x), trainer.place_batch(y)

        def run():
            box[0], metrics = trainer.step("dice", box[0], x, y)
            jax.block_until_ready(metrics["loss"])

    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"case": case, "backend": resolve_backend(), "first_s": round(first, 2),
            "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
            "times": [round(t, 2) for t in times],
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "load_avg": round(os.getloadavg()[0], 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, help="timed calls per case (default: per case, see CASES)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--backends", default="xla,onednn")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: one case
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.repeats or CASES.get(args.one, 3))))
        return
    results = {}
    for case in args.cases.split(","):
        for backend in args.backends.split(","):
            env = {**os.environ, "SYNTHSEG_JAX_CONV": backend}
            repeats = args.repeats or CASES.get(case, 3)
            cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(repeats), "--one", case]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(f"{case} {backend}: failed (exit {out.returncode})\n{out.stderr[-2000:]}",
                      file=sys.stderr, flush=True)
                continue
            r = json.loads(lines[-1])
            assert r["backend"] == backend, r
            results[case, backend] = r
            print(json.dumps(r), flush=True)

    print(f"\nseconds: median of the timed calls after the first (which includes compilation); "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| case | timed calls | xla (s) | onednn (s) | xla / onednn | first call xla / onednn (s) "
          "| peak RSS xla / onednn (GB) | load avg xla / onednn |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        a, b = results.get((case, "xla")), results.get((case, "onednn"))
        get = lambda r, k: (r[k] if r else "-")  # noqa: E731
        ratio = f"{a['median_s'] / b['median_s']:.1f}x" if a and b else "-"
        loads = "/".join(str(r["load_avg"]) for r in (a, b) if r)
        n = len((a or b)["times"]) if (a or b) else "-"
        print(f"| {case} | {n} | {get(a, 'median_s')} | {get(b, 'median_s')} | {ratio} | "
              f"{get(a, 'first_s')} / {get(b, 'first_s')} | {get(a, 'peak_rss_gb')} / {get(b, 'peak_rss_gb')} | {loads} |")


if __name__ == "__main__":
    main()
