"""The path of a segmenter trained at a coarser voxel size (the shipped 2 mm model) on a 1 mm
scan: the 1 mm work only inside the box that can hold anything but background.

The network runs at its own voxel size; its logits are upsampled linearly to 1 mm, where the
softmax, the flip average, the posterior blur and the clean-up follow, as the 1 mm pipeline
defines them (``network.at_voxel_size``). Those 33-channel 1 mm passes cost several times the
network on the MNI T1's padded 224x256x192 grid, most of which is background far from the brain.
Where the network is sure of the background, they can be skipped exactly:

* log p_background(l) = l_0 - logsumexp(l) is concave in the logits, and the upsampled logits are
  a convex combination of the coarse ones, so at a 1 mm voxel p_background is at least its
  smallest value over the coarse cells the voxel is interpolated from; the flip average and the
  blur (non-negative weights summing to at most 1) keep that bound for the sum of the
  non-background posteriors, and for each one.
* Where that sum stays <= ``ACTIVE_THRESHOLD`` (< the clean-up's 0.25) around a voxel, the voxel
  is in none of the clean-up's masks, so post-processing leaves it background with posterior 1 and
  volume 0: the whole pipeline's result there is known without computing it.

So the coarse cells where any pass's non-background share exceeds ``ACTIVE_THRESHOLD`` are found
at the network's resolution (``cell_bounds``), grown by the reach of the upsampling and the blur;
the groups of them too small to hold the brain mask's largest component (which the clean-up
keeps alone) are dropped, and the 1 mm work runs on the bounding box of the rest (``plan_box``),
rounded up to ``BUCKET_CELLS`` so that similar scans share a compiled program. Results equal the
whole-grid path's up to float rounding (``tests/inference/test_coarse_box.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import cc3d
import numpy as np
from scipy import ndimage

# Below the clean-up's thresholds (0.25; fast mode's 0.2 applies only inside the brain mask,
# itself thresholded at 0.25), with room for float rounding.
ACTIVE_THRESHOLD = 0.2
# Above the clean-up's brain threshold (0.25), with the same room.
SURE_THRESHOLD = 0.3
# Coarse cells a 1 mm voxel of cell i depends on: cells i - 1 .. i + 1 for the linear upsampling,
# one more 1 mm voxel each way for the blur (sigma 0.5: a 3-tap kernel), so i - 2 .. i + 2.
REACH_CELLS = 2
# Box sizes are rounded up to a multiple of this many cells (16 mm at 2 mm) per axis.
BUCKET_CELLS = 8


@dataclasses.dataclass(frozen=True)
class BoxPlan:
    """Where the 1 mm work runs, in coarse cells: ``start`` and ``size`` per spatial axis."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    factor: int

    @property
    def voxel_start(self) -> tuple[int, int, int]:
        return tuple(s * self.factor for s in self.start)

    @property
    def voxel_size(self) -> tuple[int, int, int]:
        return tuple(s * self.factor for s in self.size)

    def window(self) -> tuple[slice, slice, slice]:
        """The box's 1 mm voxels as index slices of the padded grid."""
        return tuple(slice(a, a + n) for a, n in zip(self.voxel_start, self.voxel_size))


def pool(x: jax.Array, factor: int) -> jax.Array:
    """(B, X, Y, Z, C) average-pooled by ``factor`` per spatial axis (sizes divisible by it)."""
    b, *spatial, c = x.shape
    return x.reshape(b, spatial[0] // factor, factor, spatial[1] // factor, factor,
                     spatial[2] // factor, factor, c).mean(axis=(2, 4, 6))


def cell_bounds(logits: jax.Array) -> dict[str, jax.Array]:
    """What the passes' coarse logits (P, X, Y, Z, C) bound at 1 mm, per cell (X, Y, Z):

    * ``share``: the largest non-background share of any pass (above ``ACTIVE_THRESHOLD``, a
      1 mm voxel up to ``REACH_CELLS`` cells away may be in the clean-up's masks);
    * ``sure``: every 1 mm voxel of the cell is in the brain mask, for some channel's posterior
      exceeds ``SURE_THRESHOLD`` in every pass throughout the cell's reach (its upsampled value
      can only be larger, log p_j being concave too). Cells within the reach of the grid's edge,
      where the blur's zero padding lowers the values, are never sure."""
    post = jax.nn.softmax(logits, axis=-1)
    share = jnp.max(1.0 - post[..., 0], axis=0)
    lowest = jnp.min(post[..., 1:], axis=0)
    for axis in range(3):   # the smallest over the reach, one axis at a time (a 5^3 window at
        # once, reduce_window, took 8 s at 112x128x96 on 2 cores; these three passes a fraction)
        n = lowest.shape[axis]
        padded = jnp.pad(lowest, [(REACH_CELLS, REACH_CELLS) if a == axis else (0, 0)
                                  for a in range(4)])
        shifted = [jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
                   for k in range(2 * REACH_CELLS + 1)]
        lowest = functools.reduce(jnp.minimum, shifted)
    return {"share": share, "sure": jnp.max(lowest, axis=-1) > SURE_THRESHOLD}


def plan_box(share: np.ndarray, sure: np.ndarray, region: np.ndarray, factor: int) -> BoxPlan:
    """The box of cells to compute at 1 mm, from ``cell_bounds`` and the padded grid's
    ``region`` = [x0, y0, z0, x1, y1, z1] (voxels) where the scan lies.

    Every voxel of the clean-up's brain mask lies in a cell near an active one: in the cells
    ``U`` within ``REACH_CELLS`` of them, and each of its connected components inside one
    component of ``U``. The largest component holds at least the largest connected group of
    sure cells inside the region (where fast mode looks for it), so a component of ``U`` with
    fewer voxels cannot hold it; the box is the bounding box of the others, rounded up to
    ``BUCKET_CELLS``. No active cell: a box of one bucket at the grid's corner."""
    grid = share.shape
    reach = ndimage.maximum_filter(share > ACTIVE_THRESHOLD, size=2 * REACH_CELLS + 1)
    inside = np.zeros(grid, dtype=bool)
    lo = [-(-int(a) // factor) for a in region[:3]]
    hi = [int(b) // factor for b in region[3:]]
    inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    sure_cells = np.require(sure & inside, requirements=["C", "W"])
    groups = cc3d.connected_components(sure_cells, connectivity=6)
    least = int(np.bincount(groups[sure_cells]).max()) if sure_cells.any() else 0
    components = cc3d.connected_components(np.require(reach, requirements=["C", "W"]),
                                           connectivity=6)
    counts = np.bincount(components.ravel())
    kept = np.flatnonzero(counts >= least)
    keep = np.isin(components, kept[kept > 0])
    start, size = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(keep, axis=others))
        first, last = (int(present[0]), int(present[-1]) + 1) if present.size else (0, 1)
        n = min(-(-(last - first) // BUCKET_CELLS) * BUCKET_CELLS, grid[axis])
        start.append(min(first, grid[axis] - n))
        size.append(n)
    return BoxPlan(tuple(start), tuple(size), factor)


def upsample_linear(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """``jax.image.resize(..., method='linear')`` by an integer ``factor`` along one axis (same
    half-voxel sample positions, edge values repeated), written as the two-tap stencil it is:
    output ``factor * i + p`` mixes input ``i`` with its neighbour at ``(p + 0.5) / factor - 0.5``.
    Equal to the resize within float rounding (2e-7 at factor 2); the shipped 2 mm network plus
    upsampling and softmax ran 2.3x faster so on this CPU (measured in isolation, under load)."""
    n = x.shape[axis]
    index = jnp.arange(n)
    before = jnp.take(x, jnp.maximum(index - 1, 0), axis=axis)
    after = jnp.take(x, jnp.minimum(index + 1, n - 1), axis=axis)
    phases = []
    for p in range(factor):
        offset = (p + 0.5) / factor - 0.5
        neighbour = before if offset < 0 else after
        phases.append(x if offset == 0 else (1 - abs(offset)) * x + abs(offset) * neighbour)
    shape = list(x.shape)
    shape[axis] = n * factor
    return jnp.stack(phases, axis=axis + 1).reshape(shape)


def box_posteriors(logits: jax.Array, start: jax.Array, size: tuple[int, int, int], factor: int,
                   margin: int = 0) -> jax.Array:
    """The averaged 1 mm posteriors of the box of cells ``start`` (traced) + ``size`` (static)
    from the passes' coarse logits (P, X, Y, Z, C), grown by ``margin`` voxels each way: the same
    values as upsampling, softmax and averaging the whole grid, then cutting the box out.

    The margin (at most ``REACH_CELLS * factor``) is what a blur of that reach needs; its voxels
    beyond the grid hold zeros, as the whole grid's 'SAME' blur pads."""
    reach = REACH_CELLS
    grid = logits.shape[1:4]
    # edge-repeated cells beyond the grid: what the whole grid's upsampling repeats at its edges
    padded = jnp.pad(logits, [(0, 0)] + [(reach, reach)] * 3 + [(0, 0)], mode="edge")
    block = jax.lax.dynamic_slice(padded, (0, start[0], start[1], start[2], 0),
                                  (logits.shape[0],) + tuple(n + 2 * reach for n in size)
                                  + (logits.shape[-1],))
    for axis in (1, 2, 3):
        block = upsample_linear(block, axis, factor)
    post = jnp.mean(jax.nn.softmax(block, axis=-1), axis=0)
    cut = reach * factor - margin
    post = post[cut:post.shape[0] - cut, cut:post.shape[1] - cut, cut:post.shape[2] - cut]
    for axis in range(3):
        first = start[axis] * factor - margin
        index = jax.lax.broadcasted_iota(jnp.int32, post.shape[:3], axis) + first
        inside = (index >= 0) & (index < grid[axis] * factor)
        post = jnp.where(inside[..., None], post, 0.0)
    return post
