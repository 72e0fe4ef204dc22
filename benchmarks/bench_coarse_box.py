"""The shipped 2 mm model's box path against the whole grid on a 1 mm scan (issue 20, item 4).

    python benchmarks/bench_coarse_box.py [--input SCAN] [--modes default,fast,qc] [--repeats 3]

For each mode, ``Predictor.predict`` (the networks and the whole post-processing; volumes'
sums, posteriors returned) with the 1 mm work inside the box that can hold brain
(``inference/coarse.py``) and on the whole padded grid, one after the other in one process:
seconds per call (median of ``--repeats`` after a compiling first call, with the stages'
split), the box's share of the grid, and the agreement of the two results: labels, posteriors,
volume sums, QC scores. Prints markdown with the host's CPU and load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402

from bench_lowres_path import mni_t1  # noqa: E402
from bench_qc_model import host  # noqa: E402
from synthseg_jax.inference.network import Mode, Predictor, load_networks  # noqa: E402
from synthseg_jax.inference.preprocess import preprocess  # noqa: E402
from synthseg_jax.package_data import label_tables_dir  # noqa: E402
from synthseg_jax.scans import load_scan  # noqa: E402

MODES = {"default": Mode(), "fast": Mode(fast=True), "qc": Mode(qc=True)}


def timed_predictions(predictor: Predictor, prep, repeats: int):
    """The last result and the median seconds (total and per stage) of ``repeats`` calls after
    a first one that compiles."""
    run = lambda: predictor.predict(prep.image, prep.pad_idx, posteriors=True)  # noqa: E731
    run()
    results = [run() for _ in range(repeats)]
    stages = {k: statistics.median(r.seconds[k] for r in results) for k in results[0].seconds}
    return results[-1], statistics.median(sum(r.seconds.values()) for r in results), stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="a 1 mm scan (default: the MNI T1)")
    parser.add_argument("--models", default=os.path.join(REPO, "checkpoints"))
    parser.add_argument("--modes", default="default,fast,qc")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    prep = preprocess(load_scan(args.input or mni_t1()))
    rows = []
    for name in args.modes.split(","):
        mode = MODES[name]
        nets = load_networks(args.models, mode, label_tables_dir())
        box_predictor, whole_predictor = Predictor(nets, mode), Predictor(nets, mode, box=False)
        if not box_predictor.box:
            sys.exit(f"{args.models}: the segmenter is not a coarse model; no box path to measure")
        box, box_s, box_stages = timed_predictions(box_predictor, prep, args.repeats)
        whole, whole_s, whole_stages = timed_predictions(whole_predictor, prep, args.repeats)
        box_voxels = sum(np.prod(size) * box_predictor._factor ** 3
                         for _, size in box_predictor._compiled_box)
        labelled = (box.seg > 0) | (whole.seg > 0)
        qc = (float(np.max(np.abs(box.qc_scores - whole.qc_scores)))
              if box.qc_scores is not None else None)
        rows.append((name, whole_s, box_s, whole_stages, box_stages,
                     box_voxels / prep.image.size,
                     100 * np.mean(box.seg == whole.seg), 100 * np.mean(box.seg[labelled] == whole.seg[labelled]),
                     float(np.max(np.abs(box.posteriors - whole.posteriors))),
                     float(np.max(np.abs(box.sums / whole.sums - 1))), qc))

    print(f"host: {host()}; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"padded grid {prep.image.shape}")
    print("\n| mode | whole grid s | box s | speed-up | box / grid | labels equal, % of grid | "
          "% of labelled | max posterior difference | max volume sum difference | "
          "max QC difference |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, ws, bs, _, _, share, eq, eq_lab, post, vol, qc in rows:
        qc_text = "-" if qc is None else f"{qc:.1e}"
        print(f"| {name} | {ws:.2f} | {bs:.2f} | {ws / bs:.2f}x | {share:.2f} | {eq:.4f} | "
              f"{eq_lab:.4f} | {post:.1e} | {vol:.1e} | {qc_text} |")
    print("\nStages (s, medians): whole grid / box\n\n| mode | " +
          " | ".join(rows[0][3]) + " |\n|---|" + "---|" * len(rows[0][3]))
    for name, _, _, whole_stages, box_stages, *_ in rows:
        print(f"| {name} | " + " | ".join(f"{whole_stages[k]:.2f} / {box_stages[k]:.2f}"
                                         for k in whole_stages) + " |")


if __name__ == "__main__":
    main()
