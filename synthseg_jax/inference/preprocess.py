"""From a scan on disk to the network's input, as ``mri_synthseg`` prepares it.

Order: read (squeeze, first channel) -> resample to 1 mm if any voxel size is outside
[0.95, 1.05] -> align to RAS (permutations/flips) -> optional centre crop to multiples of 32 ->
CT clipping to [0, 80] -> rescale to [0, 1] between the 0.5 and 99.5 percentiles -> optional crop
to the head's bounding box (``autocrop``, FreeSurfer 8) -> zero-pad to a multiple of 32 and at
least 128 (or the crop size) per axis. Every step that changes geometry is
recorded so that ``postprocess`` can undo it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from synthseg_jax.geometry import RasAlignment, needs_resampling, resample_to_voxel_size
from synthseg_jax.scans import Scan

N_LEVELS = 5            # the published U-Nets pool 4 times; the original pads to 2**5 anyway
DEFAULT_MIN_PAD = 128


def round_up(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``n``."""
    return int(-(-int(n) // m) * m)


def as_three(value, what: str = "crop") -> tuple[int, int, int] | None:
    """One int, or three, as a 3-tuple (``crop=160`` or ``crop=[160,192,160]``)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        values = [int(value)] * 3
    else:
        values = [int(v) for v in value]
        if len(values) == 1:
            values = values * 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{what} must be one positive integer or three, got {value!r}")
    return tuple(values)


def rescale_percentiles(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and map that range linearly to [0, 1] (zeros if flat)."""
    robust_min, robust_max = np.percentile(volume, [low, high])
    if robust_min == robust_max:
        return np.zeros_like(volume)
    return (np.clip(volume, robust_min, robust_max) - robust_min) / (robust_max - robust_min)


def centre_crop_indices(shape: tuple[int, ...], crop_shape: tuple[int, ...]) -> np.ndarray:
    """[x0, y0, z0, x1, y1, z1] of the centred window (no larger than the volume)."""
    shape = np.asarray(shape[:3])
    low = np.maximum((shape - np.asarray(crop_shape)) // 2, 0)
    high = np.minimum(low + np.asarray(crop_shape), shape)
    return np.concatenate([low, high])


def pad_indices(shape: tuple[int, ...], pad_shape: tuple[int, ...]) -> tuple[np.ndarray, list]:
    """Where the volume sits inside the padded one ([x0, y0, z0, x1, y1, z1]) and numpy pad widths."""
    shape = np.asarray(shape[:3])
    extra = np.maximum(np.asarray(pad_shape) - shape, 0)
    before = extra // 2
    after = extra - before
    return np.concatenate([before, before + shape]), [(int(b), int(a)) for b, a in zip(before, after)]


def head_box(normalised: np.ndarray, multiple: int) -> np.ndarray | None:
    """FreeSurfer 8's ``--autocrop`` window [x0, y0, z0, x1, y1, z1]: the bounding box of the
    voxels above zero after rescaling, one voxel wider, grown to multiples of ``multiple`` around
    it and clipped to the volume. None when no voxel is above zero (nothing to crop to)."""
    above = np.argwhere(normalised > 0)
    if above.size == 0:
        return None
    low, high = above.min(axis=0), above.max(axis=0)
    extent = high - low + 2
    window = np.array([round_up(e, multiple) for e in extent])
    start = np.maximum(low - (window - extent) // 2, 0)
    stop = np.minimum(start + window, normalised.shape[:3])
    return np.concatenate([start, stop])


@dataclasses.dataclass
class Preprocessed:
    """The network input and everything needed to map the prediction back onto the scan."""

    image: np.ndarray            # (X, Y, Z) float32 in [0, 1], padded, RAS-aligned
    affine: np.ndarray           # affine of the (resampled) scan grid the outputs are written on
    header: object               # the input's header, reused for the outputs
    voxel_size: np.ndarray       # voxel sizes used for volumes (1 mm after resampling)
    alignment: RasAlignment
    aligned_shape: tuple[int, int, int]    # RAS-aligned shape before cropping
    crop_idx: np.ndarray | None  # window of aligned_shape that was kept
    pad_idx: np.ndarray          # where the cropped volume sits in ``image``
    resampled: np.ndarray | None  # the 1 mm image (scan layout) if resampling happened
    input_shape: tuple[int, int, int]      # the scan's own grid (for keepgeom)
    input_affine: np.ndarray

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)


def preprocess(scan: Scan, crop=None, ct: bool = False, min_pad=None,
               n_levels: int = N_LEVELS, autocrop: bool = False) -> Preprocessed:
    """The original's ``preprocess`` on an already-read scan (``autocrop``: FreeSurfer 8's, not
    with ``crop``)."""
    multiple = 2 ** n_levels
    volume, affine = scan.data, scan.affine
    voxel_size = np.asarray(scan.zooms, dtype=np.float64)
    resampled = None
    if needs_resampling(voxel_size):
        volume, affine = resample_to_voxel_size(volume, affine, 1.0)
        voxel_size = np.ones(3)
        resampled = volume

    alignment = RasAlignment.from_affine(affine)
    aligned = alignment.to_ras(volume)
    aligned_shape = tuple(int(s) for s in aligned.shape[:3])

    crop = as_three(crop)
    crop_idx = None
    if crop is not None:
        crop_idx = centre_crop_indices(aligned_shape, [round_up(c, multiple) for c in crop])
        aligned = aligned[crop_idx[0]:crop_idx[3], crop_idx[1]:crop_idx[4], crop_idx[2]:crop_idx[5]]

    if ct:
        aligned = np.clip(aligned, 0, 80)
    normalised = rescale_percentiles(np.asarray(aligned, dtype=np.float64))
    if autocrop:
        if crop_idx is not None:
            raise ValueError("autocrop cannot be combined with crop")
        crop_idx = head_box(normalised, multiple)
        if crop_idx is not None:
            normalised = normalised[crop_idx[0]:crop_idx[3], crop_idx[1]:crop_idx[4],
                                    crop_idx[2]:crop_idx[5]]

    if min_pad is None:
        min_pad = crop if crop is not None else DEFAULT_MIN_PAD
    min_pad = as_three(min_pad, "min_pad")
    pad_shape = [max(round_up(s, multiple), round_up(m, multiple))
                 for s, m in zip(normalised.shape, min_pad)]
    pad_idx, widths = pad_indices(normalised.shape, pad_shape)
    image = np.pad(normalised.astype(np.float32), widths, mode="constant")

    return Preprocessed(image=image, affine=affine, header=scan.header, voxel_size=voxel_size,
                        alignment=alignment, aligned_shape=aligned_shape, crop_idx=crop_idx,
                        pad_idx=pad_idx, resampled=resampled,
                        input_shape=tuple(int(s) for s in scan.data.shape[:3]),
                        input_affine=scan.affine)
