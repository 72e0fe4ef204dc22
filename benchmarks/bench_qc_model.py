"""How well a models folder's QC model (default: the one shipped in checkpoints/) predicts the
quality of the segmentations its segmenter makes, measured the way a user runs it: every image
goes through ``predict``'s whole pipeline with ``qc=``.

Held-out synthetic images (label maps 19 and 20, which no training saw; random contrast,
deformation and bias; several acquisition resolutions, the coarse ones where the segmenter
fails more) are segmented; each QC class's true Dice is that of the segmentation's QC-class map
against the generator's target's, over the whole volume. ``--cut-fov`` adds, for every image, a
copy whose field of view is cut (zeroed) from one side along a random axis, by 20-50 %: the
segmentation misses what the scan does not show, as with a partial acquisition, and the QC scores
should fall with the true Dice. Prints, per QC class, the Pearson
correlation between predicted and true Dice over the images and the mean absolute error, and
draws the scatter plots (``--png``).

    python benchmarks/bench_qc_model.py [--models-dir checkpoints] [--contrasts 3]
        [--resolutions 1x1x1 1x1x5 3x3x3 1x1x9] [--cut-fov] [--png benchmarks/qc_model.png] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_cohort_throughput import host_cpu  # noqa: E402
from bench_model_accuracy import dice_per_label, make_synthetic, segment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default=os.path.join(REPO, "checkpoints"))
    p.add_argument("--labels-dir", default=None)
    p.add_argument("--maps", nargs="+", default=["training_seg_19", "training_seg_20"])
    p.add_argument("--contrasts", type=int, default=3, help="random contrasts per map and resolution")
    p.add_argument("--resolutions", nargs="+", default=["1x1x1", "1x1x5", "3x3x3", "1x1x9"],
                   help="acquisition voxel sizes (mm, slice thickness = spacing)")
    p.add_argument("--seed", type=int, default=100, help="not bench_model_accuracy's 0: other images")
    p.add_argument("--cut-fov", action="store_true", help="also every image with a cut field of view")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--png", default=None, help="scatter plots of predicted against true Dice")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def qc_class_dice(seg: np.ndarray, target: np.ndarray, labels: np.ndarray, qc_class: np.ndarray,
                  names: dict[int, str]) -> dict[str, float]:
    """Dice of every non-background QC class present in the target, between two label maps
    (label values)."""
    lut = dict(zip(labels.tolist(), qc_class.tolist()))

    def classes(volume: np.ndarray) -> np.ndarray:
        values, inverse = np.unique(volume, return_inverse=True)
        return np.array([lut.get(int(v), 0) for v in values])[inverse].reshape(volume.shape)

    scores = dice_per_label(classes(seg), classes(target), np.unique(qc_class[qc_class > 0]))
    return {names[k]: v for k, v in scores.items()}


def cut_field_of_view(cases: list[dict], seed: int) -> list[dict]:
    """A copy of every case whose image is zeroed beyond a random plane: 20-50 % of the grid
    along a random axis, from a random side. The target stays whole."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    out = []
    for c in cases:
        img = nib.load(c["image"])
        data = np.asarray(img.dataobj, dtype=np.float32).copy()
        axis, fraction = int(rng.integers(3)), float(rng.uniform(0.2, 0.5))
        n = int(round(fraction * data.shape[axis]))
        index = [slice(None)] * 3
        index[axis] = slice(0, n) if rng.random() < 0.5 else slice(data.shape[axis] - n, None)
        data[tuple(index)] = 0
        image = c["image"].replace(".nii.gz", "_cut.nii.gz")
        nib.save(nib.Nifti1Image(data, img.affine), image)
        out.append({**c, "name": c["name"] + "_cut", "resolution": "cut field of view",
                    "image": image, "seg": c["seg"].replace("_seg.nii.gz", "_cut_seg.nii.gz")})
    return out


def read_qc_csv(path: str) -> dict[str, float]:
    with open(path, newline="") as fh:
        header, row = list(csv.reader(fh))[:2]
    return {name: float(v) for name, v in zip(header[1:], row[1:])}


def host() -> str:
    with open("/proc/cpuinfo") as fh:
        bf16 = "avx512_bf16" in fh.read()
    return f"{host_cpu()}, {os.cpu_count()} cores, avx512_bf16 {'yes' if bf16 else 'no'}"


def scatter(cases: list[dict], names: list[str], stats: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    resolutions = list(dict.fromkeys(c["resolution"] for c in cases))
    for ax, name in zip(axes.ravel(), names):
        for res in resolutions:
            sel = [c for c in cases if c["resolution"] == res]
            ax.scatter([c["true"][name] for c in sel], [c["predicted"][name] for c in sel],
                       s=14, label=f"{res} mm" if "x" in res else res)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nr = {stats[name]['pearson']:.2f}, MAE {stats[name]['mae']:.3f}",
                     fontsize=9)
        ax.set_xlabel("true Dice", fontsize=8)
        ax.set_ylabel("QC score", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"QC scores against true Dice, {len(cases)} held-out synthetic images\n{host()}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import nibabel as nib

    from synthseg_jax.labels import LabelTables
    from synthseg_jax.package_data import label_tables_dir

    t0 = time.perf_counter()
    tables = LabelTables.load(args.labels_dir or label_tables_dir())
    names = {int(k): str(n) for k, n in zip(tables.qc_class, tables.qc_names)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        cases = make_synthetic(args, work)
        if args.cut_fov:
            cases += cut_field_of_view(cases, args.seed)
        qc_files = [os.path.join(work, f"{c['name']}_qc.csv") for c in cases]
        with open(os.path.join(work, "qc.txt"), "w") as fh:
            fh.write("\n".join(qc_files) + "\n")
        segment([c["image"] for c in cases], [c["seg"] for c in cases], args, work,
                qc=os.path.join(work, "qc.txt"))
        for c, qc_file in zip(cases, qc_files):
            c["predicted"] = read_qc_csv(qc_file)
            c["true"] = qc_class_dice(np.asarray(nib.load(c["seg"]).dataobj), c["target"],
                                      tables.segmentation, tables.qc_class, names)
    columns = [n for n in cases[0]["predicted"] if n in cases[0]["true"]]
    stats = {}
    print("| QC class | Pearson r | mean absolute error | true Dice, mean (min-max) |")
    print("|---|---|---|---|")
    for name in columns + ["all classes"]:
        keys = columns if name == "all classes" else [name]
        true = np.array([c["true"][k] for c in cases for k in keys])
        pred = np.array([c["predicted"][k] for c in cases for k in keys])
        r = float(np.corrcoef(true, pred)[0, 1]) if true.std() > 0 and pred.std() > 0 else float("nan")
        stats[name] = {"pearson": r, "mae": float(np.mean(np.abs(true - pred)))}
        print(f"| {name} | {r:.3f} | {stats[name]['mae']:.3f} | "
              f"{true.mean():.3f} ({true.min():.3f}-{true.max():.3f}) |")
    per_class = [stats[n]["pearson"] for n in columns]
    print(f"\nmedian Pearson r over the {len(columns)} classes {np.nanmedian(per_class):.3f}; "
          f"{len(cases)} images ({len(args.maps)} maps x {len(args.resolutions)} resolutions x "
          f"{args.contrasts} contrasts{', each also cut' if args.cut_fov else ''}) in {time.perf_counter() - t0:.0f} s; models "
          f"{args.models_dir}; host {host()}")
    if args.png:
        scatter(cases, columns, stats, args.png)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"stats": stats, "per_case": [{k: c[k] for k in ("name", "resolution", "true",
                                                                        "predicted")} for c in cases]},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
