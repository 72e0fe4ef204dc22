"""Validation data of a training run: held-out synthetic images and the MNI ICBM152 T1.

* synthetic: images drawn once, with a fixed key, from held-out label maps (by default
  ``training_seg_19`` and ``training_seg_20``, which the training never sees); the score is the mean
  hard Dice over the foreground labels present (or the QC network's mean absolute error);
* real: the MNI ICBM152 2009a T1 shipped in the ``nilearn`` wheel, scored against its white- and
  grey-matter probability maps thresholded at 0.5 (the model's ``mni_wm`` / ``mni_gm`` label
  sets). The scan goes through prediction's own geometry: ``load_scan`` and ``preprocess`` (1 mm,
  RAS axes, percentile rescaling, padding) and ``at_voxel_size`` (a coarser network runs on the
  average-pooled image, its logits brought back to 1 mm), so the score measures what
  ``predict.py`` would segment, before its post-processing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from synthseg_jax.inference.preprocess import preprocess
from synthseg_jax.geometry import RasAlignment
from synthseg_jax.scans import load_scan

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
VOXEL_SIZES = (1.0, 2.0, 4.0)    # the network voxel sizes prediction runs


@dataclasses.dataclass
class MNIValidation:
    image: np.ndarray     # (1, X, Y, Z, 1) float32: prediction's network input (1 mm, RAS, padded)
    window: tuple         # slices of the padded frame that hold the scan
    wm: np.ndarray        # (x, y, z) bool, the scan's 1 mm RAS grid: white-matter probability > 0.5
    gm: np.ndarray        # grey-matter probability > 0.5
    voxel_size: float     # the network's voxel size (mm)


def mni_dir() -> str:
    try:
        import nilearn
    except ImportError as err:  # pragma: no cover - nilearn is a test/dev dependency
        raise FileNotFoundError("the MNI validation needs the nilearn package") from err
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _probability_mask(path: str, grid_of: str, alignment: RasAlignment, shape) -> np.ndarray:
    scan = load_scan(path)
    if scan.data.shape != shape:
        raise ValueError(f"{path}: shape {scan.data.shape} differs from {shape} of {grid_of}")
    prob = scan.data / max(float(scan.data.max()), 1.0)
    return np.ascontiguousarray(alignment.to_ras(prob > 0.5))


def load_mni(voxel_size: float = 1.0, multiple: int = 16, directory: str | None = None) -> MNIValidation:
    """The MNI T1 as prediction prepares it for a network of ``voxel_size`` mm whose input must
    be a multiple of ``multiple`` voxels (at its own voxel size), with its tissue masks."""
    if float(voxel_size) not in VOXEL_SIZES:
        raise ValueError(f"the MNI validation runs networks of {', '.join(f'{v:g}' for v in VOXEL_SIZES)} "
                         f"mm, as prediction does, not {voxel_size:g} mm; set validation.mni=false")
    directory = directory or mni_dir()
    paths = {key: os.path.join(directory, name) for key, name in MNI_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: MNI template file missing")
    t1 = load_scan(paths["t1"])
    n_levels = max(5, int(np.ceil(np.log2(multiple * int(round(voxel_size))))))
    prep = preprocess(t1, n_levels=n_levels)
    if prep.resampled is not None:
        raise ValueError(f"{paths['t1']}: the MNI template is expected at 1 mm")
    window = tuple(slice(int(a), int(b)) for a, b in zip(prep.pad_idx[:3], prep.pad_idx[3:]))
    masks = {key: _probability_mask(paths[key], paths["t1"], prep.alignment, t1.data.shape)
             for key in ("wm", "gm")}
    return MNIValidation(image=prep.image[None, ..., None], window=window, wm=masks["wm"],
                         gm=masks["gm"], voxel_size=float(voxel_size))


def mni_scores(labels: np.ndarray, mni: MNIValidation, wm_labels: Sequence[int],
               gm_labels: Sequence[int]) -> dict[str, float]:
    """White- and grey-matter Dice of a segmentation (label values) of ``mni.image``'s frame."""
    seg = np.asarray(labels)[mni.window]
    return {"mni_wm": mask_dice(np.isin(seg, wm_labels), mni.wm),
            "mni_gm": mask_dice(np.isin(seg, gm_labels), mni.gm)}


def mni_forward(apply: Callable, voxel_size: float) -> Callable:
    """``forward(variables, image) -> 1 mm logits`` of a network ``apply(variables, x)`` trained
    at ``voxel_size`` mm, the way prediction runs it (to be jitted by the caller)."""
    from synthseg_jax.inference.network import at_voxel_size
    return lambda variables, image: at_voxel_size(lambda x: apply(variables, x), image, voxel_size)


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total
