"""The best mean Dice a network trained at a coarser grid can reach at 1 mm (issue 15, lever 2).

A segmenter trained at ``f`` mm predicts posteriors on an ``f`` mm grid, and ``predict`` brings
them to the scan's 1 mm grid by linear interpolation before the argmax. A perfect such network
gives, in each coarse cell, the share of each structure in that cell (the soft oracle) or the
structure at the cell's centre (the label-map subsampling the training data loader does, the
hard oracle). Interpolating those back to 1 mm and taking the argmax is the best such a network
can do; its Dice against the 1 mm target is the ceiling that the resolution alone sets, whatever
the width, the steps or the data.

The targets are the generator's (random deformation, ``configs/generator/default.yaml``) on the
held-out maps, as in ``bench_model_accuracy.py``; Dice per 2.0 structure, absent ones left out.

    python benchmarks/bench_resolution_ceiling.py [--grids 1.5 2 3] [--samples 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_model_accuracy import dice_per_label  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", nargs="+", type=float, default=[1.5, 2.0, 3.0],
                   help="coarse voxel sizes in mm (the target is 1 mm)")
    p.add_argument("--maps", nargs="+", default=["training_seg_19", "training_seg_20"])
    p.add_argument("--samples", type=int, default=3, help="deformed targets per map")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cell_centres(fine_shape: tuple[int, ...], factor: float) -> list[np.ndarray]:
    """Per axis, the 1 mm coordinates of the coarse cells' centres (the cells that fit whole)."""
    return [(np.arange(int(np.floor(n / factor))) + 0.5) * factor - 0.5 for n in fine_shape]


def coarse_to_fine(volume: np.ndarray, factor: float, fine_shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of a coarse-grid volume onto the 1 mm grid it came from, voxel centres
    aligned (fine voxel i lies at coarse coordinate (i + 0.5) / factor - 0.5), as predict does."""
    coords = np.meshgrid(*[(np.arange(n) + 0.5) / factor - 0.5 for n in fine_shape], indexing="ij")
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest")


def centre_labels(mask: np.ndarray, factor: float) -> np.ndarray:
    """The 1 mm voxel nearest each coarse cell's centre: the training loader's subsampling."""
    coords = np.meshgrid(*cell_centres(mask.shape, factor), indexing="ij")
    return ndimage.map_coordinates(mask, coords, order=0, mode="nearest")


def cell_share(mask: np.ndarray, factor: float) -> np.ndarray:
    """Each coarse cell's exact share of a 1 mm mask: the mask refined ``k`` times (nearest) so
    that a cell spans a whole number of refined voxels, box-averaged, read at the cell centres."""
    size = grid_period(factor)
    k = int(round(size / factor))
    fine = mask
    for axis in range(mask.ndim):
        fine = np.repeat(fine, k, axis=axis)
    boxed = ndimage.uniform_filter(fine, size=size, mode="nearest")
    # an even box at index m is centred at m - 0.5; a 1 mm coordinate x is at x * k + (k - 1) / 2
    shift = (k - 1) / 2 + (0.5 if size % 2 == 0 else 0.0)
    coords = np.meshgrid(*[c * k + shift for c in cell_centres(mask.shape, factor)], indexing="ij")
    return ndimage.map_coordinates(boxed, coords, order=1, mode="nearest")


def grid_period(factor: float) -> int:
    """The smallest whole number of 1 mm voxels that a whole number of coarse cells spans."""
    return next(int(factor * k) for k in (1, 2, 4) if float(factor * k).is_integer())


def label_window(mask: np.ndarray, factor: float) -> tuple[slice, ...]:
    """A box around the mask, two cells wider on each side and aligned to the coarse grid, outside
    which its coarse share and its interpolation back to 1 mm are exactly zero."""
    period = grid_period(factor)
    margin = 2 * period + 2
    window = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        start = max(0, (hit[0] - margin) // period * period)
        stop = hit[-1] + 1 + margin
        stop = n if stop >= n else start + -(-(stop - start) // period) * period
        window.append(slice(int(start), int(min(stop, n))))
    return tuple(window)


def oracle_labels(target: np.ndarray, labels: np.ndarray, factor: float, soft: bool) -> np.ndarray:
    """The 1 mm argmax of a perfect ``factor`` mm network's interpolated posteriors (each label
    worked out in its own grid-aligned window, zero outside it; the first label, the background,
    covers the whole volume)."""
    best = np.full(target.shape, -1.0, dtype=np.float32)
    out = np.zeros(target.shape, dtype=target.dtype)
    for label in labels:
        mask = target == label
        window = label_window(mask, factor)
        crop = mask[window].astype(np.float32)
        coarse = cell_share(crop, factor) if soft else centre_labels(crop, factor)
        fine = coarse_to_fine(coarse, factor, crop.shape)
        better = fine > best[window]
        out[window][better], best[window][better] = label, fine[better]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from generator.sampler import build_params, load_config, load_label_maps, sample
    from synthseg_jax.labels import LabelTables

    t0 = time.perf_counter()
    cfg = load_config("default", ["output_shape=[192,192,192]"])
    params = build_params(cfg)
    tables = LabelTables.load(os.path.join(REPO, "..", "shared", "data", "synthseg", "labels_classes_priors"))
    structures = tables.segmentation[tables.segmentation > 0]
    rows: dict[tuple[float, str], list[dict[int, float]]] = {}
    n = 0
    for stem in args.maps:
        bank = load_label_maps(os.path.join(cfg.label_dir, f"{stem}.nii.gz"), params.generation_labels)
        for _ in range(args.samples):
            _, target = sample(jax.random.fold_in(jax.random.key(args.seed), n), bank.maps[0], params)
            target = np.asarray(target)
            present = np.unique(target)
            n += 1
            for grid in args.grids:
                for kind in ("hard", "soft"):
                    pred = oracle_labels(target, present, grid, soft=kind == "soft")
                    rows.setdefault((grid, kind), []).append(dice_per_label(pred, target, structures))
            print(f"  target {n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print("| network grid | oracle | mean Dice at 1 mm (min-max over targets) |")
    print("|---|---|---|")
    for (grid, kind), scores in rows.items():
        means = [np.mean(list(s.values())) for s in scores]
        what = "cell share (soft)" if kind == "soft" else "label at the cell centre (hard)"
        print(f"| {grid:g} mm | {what} | {np.mean(means):.3f} ({min(means):.3f}-{max(means):.3f}) |")
    print("\nPer structure, the soft oracle (mean over targets):\n")
    print("| structure | " + " | ".join(f"{g:g} mm" for g in args.grids) + " |")
    print("|---|" + "---|" * len(args.grids))
    names = dict(zip(tables.segmentation.tolist(), tables.names.tolist()))
    for label in structures:
        cells = []
        for grid in args.grids:
            values = [s[int(label)] for s in rows[(grid, "soft")] if int(label) in s]
            cells.append(f"{np.mean(values):.3f}" if values else "-")
        print(f"| {names[int(label)]} ({int(label)}) | " + " | ".join(cells) + " |")
    print(f"\n{n} deformed targets of {', '.join(args.maps)} at 192^3, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
