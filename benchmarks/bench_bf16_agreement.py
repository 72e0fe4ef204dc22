"""How far ``precision=bf16`` moves predict's results from float32's, on trained weights (issue 20,
item 3): the same images segmented twice through predict's whole pipeline, once in each
precision, in one process each.

Images: the held-out synthetic ones of ``bench_model_accuracy.py`` (maps 19 and 20, random
contrasts, several acquisition resolutions) and the nilearn MNI T1. Per image: the share of voxels
with the same label (of the whole grid, and of the voxels that either run labels as brain), the
Dice of each structure between the two segmentations (the lowest and the mean), and the largest
relative difference between the two volumes CSVs.

    python benchmarks/bench_bf16_agreement.py [--models-dir checkpoints] [--contrasts 1]
        [--resolutions 1x1x1 1x1x5 3x3x3]

On a CPU without avx512_bf16/amx_bf16 the bf16 run falls back to float32 (one log line), and the
table says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model_accuracy as accuracy  # noqa: E402  (the same images and predict call)

PRECISIONS = ("float32", "bf16")


def read_volumes(path: str) -> dict[str, float]:
    """The numeric columns of a one-scan volumes CSV."""
    with open(path, newline="") as f:
        header, values = list(csv.reader(f))[:2]
    out = {}
    for key, value in zip(header, values):
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def compare(a: np.ndarray, b: np.ndarray, vol_a: dict[str, float], vol_b: dict[str, float]) -> dict:
    """Voxel agreement, per-structure Dice between two segmentations, volume differences."""
    brain = (a > 0) | (b > 0)
    dice = {}
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == 0:
            continue
        in_a, in_b = a == label, b == label
        dice[int(label)] = 2.0 * float((in_a & in_b).sum()) / float(in_a.sum() + in_b.sum())
    rel = [abs(vol_a[k] - vol_b[k]) / vol_a[k] for k in vol_a if k in vol_b and vol_a[k] > 0]
    return {"equal": float((a == b).mean()), "equal_brain": float((a == b)[brain].mean()),
            "dice_min": min(dice.values()), "dice_mean": float(np.mean(list(dice.values()))),
            "worst": min(dice, key=dice.get), "volume_rel_max": max(rel) if rel else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=os.path.join(accuracy.REPO, "checkpoints"))
    parser.add_argument("--labels-dir", default=None)
    parser.add_argument("--maps", nargs="+", default=["training_seg_19", "training_seg_20"])
    parser.add_argument("--contrasts", type=int, default=1)
    parser.add_argument("--resolutions", nargs="+", default=["1x1x1", "1x1x5", "3x3x3"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import nibabel as nib

    from synthseg_jax.nn.conv import cpu_has_native_bf16
    from synthseg_jax.training.validation import MNI_FILES, mni_dir

    with tempfile.TemporaryDirectory() as work:
        cases = accuracy.make_synthetic(args, work)
        images = [c["image"] for c in cases] + [os.path.join(mni_dir(), MNI_FILES["t1"])]
        names = [c["name"] for c in cases] + ["MNI T1"]
        seconds = {}
        for precision in PRECISIONS:
            segs = [os.path.join(work, f"{n}_{precision}_seg.nii.gz") for n in range(len(images))]
            vols = os.path.join(work, f"vol_{precision}.txt")
            with open(vols, "w") as f:
                f.write("\n".join(os.path.join(work, f"{n}_{precision}_vol.csv")
                                  for n in range(len(images))) + "\n")
            start = time.perf_counter()
            accuracy.segment(images, segs, args, work, precision=precision, vol=vols)
            seconds[precision] = time.perf_counter() - start
        rows = []
        for n, name in enumerate(names):
            seg = {p: np.asarray(nib.load(os.path.join(work, f"{n}_{p}_seg.nii.gz")).dataobj)
                   for p in PRECISIONS}
            vol = {p: read_volumes(os.path.join(work, f"{n}_{p}_vol.csv")) for p in PRECISIONS}
            rows.append((name, compare(seg["float32"], seg["bf16"], vol["float32"], vol["bf16"])))

    print("| image | voxels equal, % of grid | % of brain voxels | lowest structure Dice (label) | "
          "mean structure Dice | largest volume difference, % |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {100 * r['equal']:.3f} | {100 * r['equal_brain']:.2f} | "
              f"{r['dice_min']:.4f} ({r['worst']}) | {r['dice_mean']:.4f} | {100 * r['volume_rel_max']:.2f} |")
    print(f"\nmodels {args.models_dir}; bf16 products {'on' if cpu_has_native_bf16() else 'OFF (CPU lacks them)'}; "
          f"predict wall s (one process each, compile included): float32 {seconds['float32']:.0f}, "
          f"bf16 {seconds['bf16']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
