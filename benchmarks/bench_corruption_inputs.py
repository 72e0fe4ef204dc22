"""How the denoiser's and QC regressor's training inputs compare with the segmentations they will
see (issue 16, last item): the original trains its denoiser on its first segmenter's own
predictions; ours corrupts the ground truth (``tasks.corrupt_labels``, ``model.corruption``).

On the held-out synthetic crops of a segmenter run's validation (maps 19 and 20, the run's own
generator, crop and voxel size) this scores, per structure, the Dice against the target of
(a) the run's trained segmenter's prediction and (b) the ground truth corrupted with the
denoiser's and the QC model's corruption settings (``configs/model/robust_denoiser.yaml``,
``configs/model/qc.yaml``). Where (a) and (b) differ much, a network trained on (b) learns to
fix or to score errors that the segmenter does not make, and misses those it makes.

    python benchmarks/bench_corruption_inputs.py [--run checkpoints/cpu_2.0_run] [--n-per-map 16]
        [--png benchmarks/corruption_inputs.png]

Prints a markdown table (one row per structure, then the per-crop mean) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
from bench_model_accuracy import dice_per_label  # noqa: E402

CORRUPTIONS = ("robust_denoiser", "qc")


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """``dice_per_label`` over the class indices, as an array (NaN where absent from ``truth``)."""
    out = np.full(n_classes, np.nan)
    for c, value in dice_per_label(pred, truth, np.arange(1, n_classes)).items():
        out[c] = value
    return out


def corruption_of(model: str):
    """The ``Corruption`` of ``configs/model/<model>.yaml``."""
    from omegaconf import OmegaConf

    from synthseg_jax.training.tasks import Corruption

    cfg = OmegaConf.load(os.path.join(REPO, "configs", "model", f"{model}.yaml"))
    return Corruption(**OmegaConf.to_container(cfg.model.get("corruption", {})))


def plot(names: list[str], scores: dict[str, np.ndarray], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(names))
    for k, (label, s) in enumerate(scores.items()):
        ax1.plot(x, np.nanmean(s, 0), "o-", label=label, alpha=0.8)
        ax2.hist(np.nanmean(s, 1), bins=20, range=(0, 1), alpha=0.5, label=label)
    ax1.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax1.set_ylabel("Dice against the target (mean over crops)")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax2.set_xlabel("per-crop mean Dice")
    ax2.set_ylabel("crops")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=os.path.join(REPO, "checkpoints", "cpu_2.0_run"))
    p.add_argument("--n-per-map", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from synthseg_jax.labels import LabelTables
    from synthseg_jax.package_data import label_tables_dir
    from synthseg_jax.training import checkpoint, config
    from synthseg_jax.training.loop import Run
    from synthseg_jax.training.tasks import corrupt_labels

    cfg = config.of_run(args.run)
    cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, n_per_map=args.n_per_map))
    run = Run(cfg, out_dir=args.run)   # only read
    variables, meta = checkpoint.load_model(args.run)
    task = run.task
    forward = jax.jit(lambda v, x: jnp.argmax(run.module.apply(v, x), -1))
    corrupt = {m: jax.jit(jax.vmap(lambda k, y, c=corruption_of(m): corrupt_labels(
        k, y, task.n_outputs, c, task.voxel, task.gcfg.nonlin_integration_factor)))
        for m in CORRUPTIONS}
    scores: dict[str, list[np.ndarray]] = {"segmenter prediction": []}
    scores.update({f"corrupted truth ({m})": [] for m in CORRUPTIONS})
    key = jax.random.key(args.seed)
    for n, (x, y) in enumerate(run.validation_set()):
        truth = np.asarray(y)
        pred = np.asarray(forward(variables, x))
        scores["segmenter prediction"] += [dice_per_class(p_, t, task.n_outputs) for p_, t in zip(pred, truth)]
        for m in CORRUPTIONS:
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, n), CORRUPTIONS.index(m)), len(truth))
            noisy = np.asarray(corrupt[m](keys, y))
            scores[f"corrupted truth ({m})"] += [dice_per_class(c_, t, task.n_outputs) for c_, t in zip(noisy, truth)]
    arrays = {k: np.stack(v)[:, 1:] for k, v in scores.items()}
    n_crops = len(arrays["segmenter prediction"])
    tables = LabelTables.load(label_tables_dir())
    names_of = dict(zip(tables.segmentation.tolist(), tables.names.tolist()))
    labels = np.asarray(task.target_labels)[1:]
    names = [f"{names_of.get(int(l), l)} ({l})" for l in labels]

    cols = list(arrays)
    print(f"| structure | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for j, name in enumerate(names):
        print(f"| {name} | " + " | ".join(f"{np.nanmean(a[:, j]):.3f}" for a in arrays.values()) + " |")
    crop_means = {k: np.nanmean(a, 1) for k, a in arrays.items()}
    print("| **per-crop mean: median (10th-90th percentile)** | " + " | ".join(
        f"**{np.median(m):.3f}** ({np.percentile(m, 10):.3f}-{np.percentile(m, 90):.3f})"
        for m in crop_means.values()) + " |")
    spread = {k: np.nanmean(np.nanstd(a, 0)) for k, a in arrays.items()}
    print("| between-crop s.d. of a structure's Dice (mean over structures) | " + " | ".join(
        f"{v:.3f}" for v in spread.values()) + " |")
    print(f"\n{n_crops} held-out crops of {args.run} (step {meta.get('step')}), "
          f"{tuple(task.crop_shape)} at {task.voxel:g} mm")
    if args.png:
        plot(names, arrays, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
