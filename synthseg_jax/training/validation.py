"""Validation data of a training run: held-out synthetic images and the MNI ICBM152 T1.

* synthetic: images drawn once, with a fixed key, from held-out label maps (by default
  ``training_seg_19`` and ``training_seg_20``, which the training never sees); the score is the mean
  hard Dice over the foreground labels present (or the QC network's mean absolute error);
* real: the MNI ICBM152 2009a T1 shipped in the ``nilearn`` wheel, scored against its white- and
  grey-matter probability maps thresholded at 0.5 (the model's ``mni_wm`` / ``mni_gm`` label
  sets). The preprocessing is ``mri_synthseg``'s in short: RAS axes, resampling to the training
  voxel size, intensities rescaled to [0, 1] between the 0.5 and 99.5 percentiles, zero padding to
  a multiple of the network's size step.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclasses.dataclass
class MNIValidation:
    image: np.ndarray     # (1, X, Y, Z, 1) float32 in [0, 1]
    wm: np.ndarray        # (X, Y, Z) bool: white-matter probability > 0.5
    gm: np.ndarray        # (X, Y, Z) bool: grey-matter probability > 0.5


def mni_dir() -> str:
    try:
        import nilearn
    except ImportError as err:  # pragma: no cover - nilearn is a test/dev dependency
        raise FileNotFoundError("the MNI validation needs the nilearn package") from err
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _zoom(volume: np.ndarray, factor: float, order: int) -> np.ndarray:
    if abs(factor - 1.0) < 1e-6:
        return volume
    from scipy.ndimage import zoom
    return zoom(volume, factor, order=order)


def _pad_to_multiple(volume: np.ndarray, multiple: int) -> np.ndarray:
    pads = []
    for s in volume.shape:
        total = (-s) % multiple
        pads.append((total // 2, total - total // 2))
    return np.pad(volume, pads)


def rescale_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def load_mni(voxel_size: float = 1.0, multiple: int = 16, directory: str | None = None) -> MNIValidation:
    import nibabel as nib
    directory = directory or mni_dir()
    volumes = {}
    for key, name in MNI_FILES.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: MNI template file missing")
        img = nib.as_closest_canonical(nib.load(path))
        volumes[key] = np.asarray(img.dataobj, dtype=np.float32)
        native = float(np.mean(img.header.get_zooms()[:3]))
    factor = native / float(voxel_size)
    image = rescale_percentiles(_zoom(volumes["t1"], factor, 1))
    masks = {}
    for key in ("wm", "gm"):
        prob = volumes[key] / max(float(volumes[key].max()), 1.0) if volumes[key].max() > 1 \
            else volumes[key]
        masks[key] = _pad_to_multiple(_zoom(prob, factor, 1) > 0.5, multiple)
    image = _pad_to_multiple(image, multiple)
    return MNIValidation(image=image[None, ..., None], wm=masks["wm"], gm=masks["gm"])


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total
