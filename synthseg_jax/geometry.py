"""Voxel grids: alignment to RAS by axis permutations and flips, resampling to 1 mm, resampling
onto another grid of the same world space.

Semantics follow what ``mri_synthseg`` does to an input (see REFERENCE.md):

* RAS alignment only permutes and flips axes (no interpolation): the voxel axis closest to each
  world axis is moved into place and flipped if it points the wrong way, so undoing it is exact;
* resampling to 1 mm is linear, after a small Gaussian pre-filter on the axes that are finer than
  1 mm, with the sample positions the original uses (the new grid covers the old field of view, its
  first voxel centred half a new voxel inside the first old voxel's outer edge).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter


# ------------------------------------------------------------------------------------------------
# RAS alignment by permutation and flips
# ------------------------------------------------------------------------------------------------

def ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each world axis (R, A, S), the voxel axis that runs closest to it.

    Taken from the inverse affine, column by column; if two world axes pick the same voxel axis,
    the later of them gets the voxel axis nobody picked (the original's tie rule).
    """
    inverse = np.linalg.inv(affine)
    axes = np.argmax(np.abs(inverse[:3, :3]), axis=0)
    for voxel_axis in range(3):
        if voxel_axis not in axes:
            values, counts = np.unique(axes, return_counts=True)
            duplicated = values[np.argmax(counts)]
            axes[np.nonzero(axes == duplicated)[0][-1]] = voxel_axis
    return axes


@dataclasses.dataclass(frozen=True)
class RasAlignment:
    """Axis permutation then flips taking a volume from its stored layout to RAS layout."""

    permutation: tuple[int, int, int]   # aligned axis k = stored axis permutation[k]
    flips: tuple[bool, bool, bool]      # flip aligned axis k

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> "RasAlignment":
        perm = ras_axes(affine)
        permuted = affine[:3, :3][:, perm]
        flips = tuple(bool(permuted[k, k] < 0) for k in range(3))
        return cls(tuple(int(p) for p in perm), flips)

    def _full_perm(self, ndim: int) -> tuple[int, ...]:
        return tuple(self.permutation) + tuple(range(3, ndim))

    def to_ras(self, volume: np.ndarray) -> np.ndarray:
        """Stored layout -> RAS layout (a view when possible); trailing channel axes are kept."""
        out = np.transpose(volume, self._full_perm(volume.ndim))
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=axis)
        return out

    def from_ras(self, volume: np.ndarray) -> np.ndarray:
        """RAS layout -> stored layout: the exact inverse of ``to_ras``."""
        out = volume
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=axis)
        inverse = np.argsort(self._full_perm(volume.ndim))
        return np.transpose(out, tuple(int(i) for i in inverse))

    def ras_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[p] for p in self.permutation) + tuple(shape[3:])

    def ras_affine(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The affine of ``to_ras(volume)`` for a volume of the stored ``shape`` and ``affine``."""
        out = affine.copy()
        out[:, :3] = affine[:, list(self.permutation)]
        aligned_shape = self.ras_shape(shape)
        for axis, flip in enumerate(self.flips):
            if flip:
                out[:3, 3] += out[:3, axis] * (aligned_shape[axis] - 1)
                out[:3, axis] = -out[:3, axis]
        return out


# ------------------------------------------------------------------------------------------------
# Resampling to 1 mm
# ------------------------------------------------------------------------------------------------

def needs_resampling(zooms: np.ndarray, tolerance: float = 0.05) -> bool:
    """The original resamples when any voxel size lies outside [0.95, 1.05] mm."""
    zooms = np.asarray(zooms, dtype=np.float64)
    return bool(np.any((zooms > 1 + tolerance) | (zooms < 1 - tolerance)))


def _interp_axis(volume: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` along ``axis`` at (clamped) fractional ``positions``."""
    n = volume.shape[axis]
    positions = np.clip(positions, 0, n - 1)
    low = np.minimum(np.floor(positions).astype(np.int64), max(n - 2, 0))
    weight = positions - low
    high = np.minimum(low + 1, n - 1)
    shape = [1] * volume.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    a = np.take(volume, low, axis=axis)
    b = np.take(volume, high, axis=axis)
    return a * (1 - weight) + b * weight


def resample_grid(affine: np.ndarray, shape: tuple[int, ...], voxel_size: float = 1.0
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """Sample positions (in old voxel units, per axis) and affine of the ``voxel_size`` grid."""
    pixdim = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    factor = pixdim / voxel_size
    start = -(factor - 1) / (2 * factor)
    step = 1.0 / factor
    stop = start + step * np.ceil(np.asarray(shape[:3]) * factor)
    positions = [np.arange(start[i], stop[i], step[i]) for i in range(3)]
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / factor
    new_affine[:3, 3] = affine[:3, 3] - new_affine[:3, :3] @ (0.5 * (factor - 1))
    return positions, new_affine


def resample_to_voxel_size(volume: np.ndarray, affine: np.ndarray, voxel_size: float = 1.0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of a 3-D volume to isotropic ``voxel_size`` mm, keeping its field of view.

    Axes whose voxels are smaller than the target are first smoothed (Gaussian, sigma = a quarter
    of the size ratio) to limit aliasing; larger voxels are interpolated as they are.
    """
    pixdim = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    factor = pixdim / voxel_size
    sigmas = np.where(factor > 1, 0.0, 0.25 / factor)
    filtered = gaussian_filter(np.asarray(volume, dtype=np.float64), sigmas)
    positions, new_affine = resample_grid(affine, volume.shape, voxel_size)
    out = filtered
    for axis in range(3):
        out = _interp_axis(out, axis, positions[axis])
    return out, new_affine


def resample_like(volume: np.ndarray, affine: np.ndarray, target_shape: tuple[int, ...],
                  target_affine: np.ndarray, order: int) -> np.ndarray:
    """Resample ``volume`` (3-D, or 4-D with channels last) onto another voxel grid of the same
    world space: ``order`` 0 (nearest, for labels) or 1 (linear, for posteriors). Outside the
    source grid the nearest edge value is used."""
    from scipy.ndimage import affine_transform

    to_source = np.linalg.inv(affine) @ target_affine
    matrix, offset = to_source[:3, :3], to_source[:3, 3]
    if volume.ndim == 3:
        return affine_transform(volume, matrix, offset, output_shape=tuple(target_shape[:3]),
                                order=order, mode="nearest")
    out = np.empty(tuple(target_shape[:3]) + volume.shape[3:], dtype=volume.dtype)
    for c in range(volume.shape[-1]):
        out[..., c] = affine_transform(volume[..., c], matrix, offset,
                                       output_shape=tuple(target_shape[:3]), order=order,
                                       mode="nearest")
    return out
