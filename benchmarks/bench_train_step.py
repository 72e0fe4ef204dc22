"""Benchmark of one training step (batch 1 by default): seconds per step, the generator's share,
compile time and peak memory, for any model config and crop size.

    python benchmarks/bench_train_step.py [--model synthseg_2.0] [--sizes 96,128,160] [--iters 3]
                                          [--phase dice] [--maps 2] [key=value ...]

Each size runs in its own process (peak memory per size). Trailing ``key=value`` arguments are
Hydra overrides of configs/train.yaml (e.g. ``model.nb_features=16 train.label_downsample=2``).
Wall-clock and process CPU seconds are both reported with the load average: the machine may be
shared; the fastest steady wall time and the CPU time are the figures least disturbed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(model: str, size: int, iters: int, phase: str, maps: int, overrides: list[str]) -> dict:
    import jax
    from hydra import compose, initialize_config_dir

    from synthseg_jax.training.loop import Run

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"generator.output_shape=[{size},{size},{size}]",
                                          f"train.max_maps={maps}", "train.held_out=[]",
                                          "train.out_dir=/tmp/bench_train_step",
                                          "train.compilation_cache=null"] + overrides)
    r = Run(cfg)
    state = r.trainer.place_state(r.initial)
    rng = jax.random.key(0)
    phase = "qc" if r.spec.kind == "qc" else phase

    def gen(i):
        out = r.batch(i, rng)
        jax.block_until_ready(out)
        return out

    def step(s, x, y):
        s, m = r.trainer.step(phase, s, x, y)
        jax.block_until_ready(m["loss"])
        return s

    t = time.perf_counter()
    x, y = gen(0)
    gen_compile = time.perf_counter() - t
    t = time.perf_counter()
    state = step(state, x, y)
    step_compile = time.perf_counter() - t
    gen_wall, step_wall, cpu = [], [], []
    for i in range(1, iters + 1):
        c0 = time.process_time()
        t0 = time.perf_counter()
        x, y = gen(i)
        t1 = time.perf_counter()
        state = step(state, x, y)
        t2 = time.perf_counter()
        gen_wall.append(t1 - t0)
        step_wall.append(t2 - t1)
        cpu.append(time.process_time() - c0)
    best = min(range(iters), key=lambda i: gen_wall[i] + step_wall[i])
    return {"model": r.spec.name, "size": size, "voxel_mm": r.data.gcfg.atlas_res,
            "nb_features": r.spec.network_config(r.task.n_outputs).nb_features, "phase": phase,
            "seconds_per_step": round(gen_wall[best] + step_wall[best], 2),
            "generator_s": round(gen_wall[best], 2), "network_step_s": round(step_wall[best], 2),
            "generator_share": round(gen_wall[best] / (gen_wall[best] + step_wall[best]), 3),
            "mean_s": round(sum(gen_wall + step_wall) / iters, 2),
            "cpu_s_per_step": round(sum(cpu) / iters, 2),
            "compile_s": round(gen_compile + step_compile, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "load_avg": round(os.getloadavg()[0], 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthseg_2.0")
    p.add_argument("--sizes", default="96,128,160")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--phase", default="dice", choices=["wl2", "dice"])
    p.add_argument("--maps", type=int, default=2)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)      # child process: one size
    args, overrides = p.parse_known_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.iters, args.phase, args.maps, overrides)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--iters", str(args.iters),
               "--phase", args.phase, "--maps", str(args.maps), "--one", str(size)] + overrides
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if out.returncode or not lines:
            print(f"size {size}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        keys = ["size", "voxel_mm", "nb_features", "seconds_per_step", "generator_s", "network_step_s",
                "generator_share", "cpu_s_per_step", "compile_s", "peak_rss_gb", "load_avg"]
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
