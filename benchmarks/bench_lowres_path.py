"""Where the shipped 2 mm model's time goes on a 1 mm scan, and what the shortcuts that would run
the rest of the pipeline at 2 mm change (issue 20, item 4).

    python benchmarks/bench_lowres_path.py [--input MNI] [--repeats 3]

The shipped model's network runs on the image pooled to 2 mm; its logits are upsampled linearly
to 1 mm, where the softmax, the flip average and the posterior blur (sigma 0.5 voxel) follow, as
the 1 mm pipeline expects. Table 1 times each step on the MNI T1's padded grid (default mode,
compiled alone; median of ``--repeats`` calls after the first). Table 2 sets variants of the
forward against today's (``Predictor._forward``): the argmax of their blurred posteriors inside
the scan's region, before clean-up, as a share of the region's voxels and of its labelled ones,
with the forward's time. Only variants at 0.000 % keep issue 20's ">= 99.9 % of voxels" with
room for the clean-up's effects; prints markdown with the host's CPU and load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from synthseg_jax.inference.network import (  # noqa: E402
    Mode,
    Predictor,
    gaussian_blur,
    load_networks,
    upsample_linear,
)
from synthseg_jax.inference.postprocess import cleanup_masks  # noqa: E402
from synthseg_jax.inference.preprocess import preprocess  # noqa: E402
from synthseg_jax.package_data import label_tables_dir  # noqa: E402
from synthseg_jax.scans import load_scan  # noqa: E402


def mni_t1() -> str:
    import nilearn
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def timed(fn: Callable, *args: Any, repeats: int,
          compiler_options: dict[str, Any] | None = None) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` compiled for ``args`` (with XLA's
    ``compiler_options``, if given), after a first call, and its result."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options)
    result = jax.block_until_ready(compiled(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def upsample(logits: jax.Array) -> jax.Array:
    for axis in (1, 2, 3):
        logits = upsample_linear(logits, axis, 2)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="a 1 mm scan (default: the MNI T1)")
    parser.add_argument("--models", default=os.path.join(REPO, "checkpoints"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    mode = Mode()
    nets = load_networks(args.models, mode, label_tables_dir())
    predictor = Predictor(nets, mode)
    variables = predictor._variables
    prep = preprocess(load_scan(args.input or mni_t1()))
    image = jnp.asarray(prep.image)
    x = image[None, ..., None]
    n = x.shape[1:4]
    net = lambda z: nets.segmenter.apply(variables["seg"], z)  # noqa: E731
    pool = lambda z: z.reshape(1, n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2, 1).mean(axis=(2, 4, 6))  # noqa: E731
    flip_back = lambda p: jnp.take(jnp.flip(p, axis=1), predictor._flip, axis=-1)  # noqa: E731
    softmax = lambda z: jax.nn.softmax(z, axis=-1)  # noqa: E731

    pooled = pool(x)
    both = jnp.concatenate([pooled, jnp.flip(pooled, axis=1)])
    steps, results = [], {}

    def step(name: str, key: str, fn: Callable, *fn_args: Any) -> None:
        seconds, results[key] = timed(fn, *fn_args, repeats=args.repeats)
        steps.append((name, seconds))

    step("network at 2 mm, one pass", "logits", net, pooled)
    step("network at 2 mm, both passes as a batch of 2", "both", net, both)
    step("logits upsampled to 1 mm (33 channels), one pass", "logits_1mm", upsample,
         results["logits"])
    step("softmax at 1 mm, one pass", "post", softmax, results["logits_1mm"])
    post = results["post"]
    step("flip back + left/right channel swap at 1 mm", "_", flip_back, post)
    step("posterior blur at 1 mm", "_", gaussian_blur, post)
    step("clean-up masks at 1 mm", "_", lambda p: cleanup_masks(p[0], predictor._groups, False),
         post)
    step("whole forward today (Predictor._forward)", "today", predictor._forward, variables, image)
    both_logits, today = results["both"], results["today"]

    la, lb = both_logits[:1], flip_back(both_logits[1:])
    variants = {
        "exact, both passes batched, flip back at 2 mm":
            lambda la, lb: gaussian_blur(0.5 * (softmax(upsample(la)) + softmax(upsample(lb)))),
        "softmax and flip average at 2 mm, posteriors upsampled, then blurred":
            lambda la, lb: gaussian_blur(upsample(0.5 * (softmax(la) + softmax(lb)))),
        "softmax and flip average at 2 mm, posteriors upsampled, no blur":
            lambda la, lb: upsample(0.5 * (softmax(la) + softmax(lb))),
        "logits averaged at 2 mm, then upsampled, softmax, blur":
            lambda la, lb: gaussian_blur(softmax(upsample(0.5 * (la + lb)))),
    }
    idx = prep.pad_idx
    region = lambda a: np.asarray(a)[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]]  # noqa: E731
    reference = region(np.argmax(np.asarray(today["seg"]), axis=-1))
    rows = []
    for name, variant in variants.items():
        t, post_1mm = timed(variant, la, lb, repeats=args.repeats)
        labels = region(np.argmax(np.asarray(post_1mm[0]), axis=-1))
        differ = labels != reference
        labelled = (labels > 0) | (reference > 0)
        rows.append((name, 100 * differ.mean(), 100 * differ[labelled].mean(),
                     float(np.max(np.abs(np.asarray(post_1mm[0]) - np.asarray(today["seg"])))), t))

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    flags = open("/proc/cpuinfo").read()
    bf16 = "avx512_bf16" in flags
    print(f"host: {cpu}, {os.cpu_count()} cores, avx512_bf16 {'yes' if bf16 else 'no'}; "
          f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}; padded grid {tuple(n)}")
    print("\n| step (shipped model, default mode) | s |\n|---|---|")
    for name, t in steps:
        print(f"| {name} | {t:.2f} |")
    print("\n| variant of the forward | labels differing from today's, % of region | "
          "% of labelled voxels | max posterior difference | s |\n|---|---|---|---|---|")
    for name, share, share_labelled, diff, t in rows:
        print(f"| {name} | {share:.3f} | {share_labelled:.2f} | {diff:.1e} | {t:.2f} |")


if __name__ == "__main__":
    main()
