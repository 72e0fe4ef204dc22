"""Accuracy of a models folder (default: the model shipped in checkpoints/), measured the way a
user runs it: every image goes through ``predict``'s whole pipeline.

* held-out synthetic images: the generator (``configs/generator/default.yaml``, random contrast,
  deformation and bias) applied to label maps that training never sees (``training_seg_19`` and
  ``training_seg_20``), at fixed acquisition resolutions; hard Dice per 2.0 structure against the
  generator's target;
* the nilearn MNI ICBM152 T1: white- and grey-matter Dice against its probability maps > 0.5,
  with the label sets of the model's training config (``configs/model/<name>.yaml``: mni_wm,
  mni_gm).

    python benchmarks/bench_model_accuracy.py [--models-dir checkpoints] [--model-config cpu_2.0]
        [--contrasts 2] [--resolutions 1x1x1 1x1x5 3x3x3] [--json OUT.json] [--against BASE.json]

Prints a markdown table (rows: structures; columns: resolutions) for BENCHMARKS.md. With
``--against`` (another run's ``--json``, same images), also the paired difference of each image's
mean Dice: two models compared on one set of images differ far less than either's spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default=os.path.join(REPO, "checkpoints"))
    p.add_argument("--labels-dir", default=None)
    p.add_argument("--model-config", default="cpu_2.0_16",
                   help="configs/model/<name>.yaml giving the MNI white/grey-matter label sets")
    p.add_argument("--maps", nargs="+", default=["training_seg_19", "training_seg_20"])
    p.add_argument("--contrasts", type=int, default=2, help="random contrasts per map and resolution")
    p.add_argument("--resolutions", nargs="+", default=["1x1x1", "1x1x5", "3x3x3"],
                   help="acquisition voxel sizes (mm, slice thickness = spacing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the images and segmentations here")
    p.add_argument("--json", default=None)
    p.add_argument("--against", default=None, help="a --json of another models folder on the same images")
    return p.parse_args(argv)


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Hard Dice of each label present in ``truth`` (absent labels are left out, not scored 1)."""
    scores = {}
    for label in labels:
        t = truth == label
        if not t.any():
            continue
        p = pred == label
        scores[int(label)] = 2.0 * float(np.logical_and(p, t).sum()) / float(p.sum() + t.sum())
    return scores


def paired_difference(cases: list[dict], base_cases: list[dict]) -> dict[str, dict[str, float]]:
    """Per-image mean Dice minus the base's on the same image: mean, its standard error, and how
    many images are ahead, per resolution and over all."""
    base = {c["name"]: np.mean(list(c["dice"].values())) for c in base_cases}
    missing = [c["name"] for c in cases if c["name"] not in base]
    if missing:
        raise ValueError(f"--against holds no image {missing[0]} (same --maps, --contrasts, --resolutions and --seed?)")

    def summary(group: list[dict]) -> dict[str, float]:
        diffs = np.array([np.mean(list(c["dice"].values())) - base[c["name"]] for c in group])
        se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        return {"mean": float(diffs.mean()), "se": se, "ahead": int((diffs > 0).sum()), "n": len(diffs)}

    resolutions = dict.fromkeys(c["resolution"] for c in cases)
    out = {r: summary([c for c in cases if c["resolution"] == r]) for r in resolutions}
    out["all"] = summary(cases)
    return out


def make_synthetic(args: argparse.Namespace, work: str) -> list[dict]:
    """Writes the synthetic images and their targets; returns one record per image."""
    import jax
    import nibabel as nib

    from generator.sampler import build_params, load_config, load_label_maps, sample

    cases = []
    for res_text in args.resolutions:
        res = ",".join(res_text.split("x"))
        cfg = load_config("default", ["randomise_res=false", f"data_res=[{res}]", f"thickness=[{res}]",
                                      "output_shape=[192,192,192]"])
        params = build_params(cfg)
        for stem in args.maps:
            path = os.path.join(cfg.label_dir, f"{stem}.nii.gz")
            bank = load_label_maps(path, params.generation_labels)
            affine = nib.as_closest_canonical(nib.load(path)).affine   # the bank's (RAS) grid
            for c in range(args.contrasts):
                key = jax.random.fold_in(jax.random.key(args.seed), len(cases))
                image, target = sample(key, bank.maps[0], params)
                name = f"{stem}_{res_text}_c{c}"
                image_path = os.path.join(work, f"{name}.nii.gz")
                nib.save(nib.Nifti1Image(np.asarray(image)[..., 0], affine), image_path)
                cases.append({"name": name, "resolution": res_text, "image": image_path,
                              "target": np.asarray(target), "seg": os.path.join(work, f"{name}_seg.nii.gz")})
    return cases


def segment(images: list[str], segs: list[str], args: argparse.Namespace, work: str,
            **options: str) -> None:
    """predict on ``images`` in one process; ``options`` are further predict keys (precision,
    vol: a list file)."""
    from synthseg_jax.inference.pipeline import run

    with open(os.path.join(work, "in.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    with open(os.path.join(work, "out.txt"), "w") as f:
        f.write("\n".join(segs) + "\n")
    code = run({"i": os.path.join(work, "in.txt"), "o": os.path.join(work, "out.txt"),
                "models_dir": args.models_dir, "labels_dir": args.labels_dir, **options})
    if code:
        raise SystemExit(f"predict failed with exit code {code}")


def mni_scores(seg: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    import nibabel as nib

    from synthseg_jax.training.config import load
    from synthseg_jax.training.validation import MNI_FILES, mask_dice, mni_dir

    spec = load([f"model={args.model_config}"]).model    # composed, so a defaults list counts
    scores = {}
    for key, labels in (("wm", spec.mni_wm), ("gm", spec.mni_gm)):
        prob = np.asarray(nib.load(os.path.join(mni_dir(), MNI_FILES[key])).dataobj, dtype=np.float32)
        prob = prob / prob.max() if prob.max() > 1 else prob
        scores[key] = mask_dice(np.isin(seg, list(labels)), prob > 0.5)
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_cases = None
    if args.against:   # read before the run, so a wrong path fails at once
        with open(args.against) as f:
            base_cases = json.load(f)["per_case"]
    import nibabel as nib

    from synthseg_jax.labels import LabelTables
    from synthseg_jax.training.validation import MNI_FILES, mni_dir

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        cases = make_synthetic(args, work)
        mni_seg = os.path.join(work, "mni_seg.nii.gz")
        segment([c["image"] for c in cases] + [os.path.join(mni_dir(), MNI_FILES["t1"])],
                [c["seg"] for c in cases] + [mni_seg], args, work)
        tables = LabelTables.load(args.labels_dir or os.path.join(REPO, "..", "shared", "data",
                                                                  "synthseg", "labels_classes_priors"))
        labels = tables.segmentation[tables.segmentation > 0]
        for c in cases:
            pred = np.asarray(nib.load(c["seg"]).dataobj)
            c["dice"] = dice_per_label(pred, c["target"], labels)
        mni = mni_scores(np.asarray(nib.load(mni_seg).dataobj), args)

    names = dict(zip(tables.segmentation.tolist(), tables.names.tolist()))
    columns = list(dict.fromkeys(c["resolution"] for c in cases))

    def mean_over(label: int | None, res: str | None) -> float:
        values = [v for c in cases if res in (None, c["resolution"])
                  for lab, v in c["dice"].items() if label in (None, lab)]
        return float(np.mean(values)) if values else float("nan")

    header = "| structure | " + " | ".join(f"{r} mm" for r in columns) + " | all |"
    print(header)
    print("|---" * (len(columns) + 2) + "|")
    for label in labels:
        row = [mean_over(int(label), r) for r in columns] + [mean_over(int(label), None)]
        print(f"| {names[int(label)]} ({label}) | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    means = [mean_over(None, r) for r in columns] + [mean_over(None, None)]
    print("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    print(f"\nMNI T1 (nilearn): white matter Dice {mni['wm']:.3f}, grey matter Dice {mni['gm']:.3f}")
    print(f"{len(cases)} synthetic images ({len(args.maps)} maps x {len(columns)} resolutions x "
          f"{args.contrasts} contrasts) + the MNI T1 in {time.perf_counter() - t0:.0f} s; "
          f"models {args.models_dir}")
    if base_cases is not None:
        paired = paired_difference(cases, base_cases)
        print(f"\nPaired against {args.against} (per-image mean Dice, this minus that, +- s.e.):")
        for res, d in paired.items():
            print(f"  {res}: {d['mean']:+.4f} +- {d['se']:.4f}, ahead on {d['ahead']} of {d['n']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mni": mni, "mean": dict(zip(columns + ["all"], means)),
                       "per_case": [{"name": c["name"], "dice": c["dice"]} for c in cases]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
