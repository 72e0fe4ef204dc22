"""Label bookkeeping for the generator.

Inside the generator a label map holds *indices* into ``generation_labels`` (uint8), so every
per-label lookup is a gather from a small table:

* :func:`flip_lut` -- index permutation that swaps left and right structures;
* :func:`conversion_lut` -- generation label -> segmentation value (1.0 / 2.0 tables, or any
  table aligned with a generation-label list);
* corrupted label maps for the denoiser and QC training: :func:`random_dilation_erosion`,
  :func:`simulate_partial_fov` (with the Dice scores the QC network regresses), and the
  per-group morphological corruption used by the robust (group) training.

``generation_labels`` are ordered background, other non-sided labels, left labels, right labels
(same order), with ``n_neutral_labels`` non-sided labels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------- lookup tables

def encode_lut(generation_labels: Sequence[int]) -> np.ndarray:
    """Table from label value to index in ``generation_labels`` (-1 for unknown values)."""
    gl = np.asarray(generation_labels, dtype=np.int64)
    lut = np.full(int(gl.max()) + 1, -1, dtype=np.int64)
    lut[gl] = np.arange(len(gl))
    return lut


def encode_label_map(label_map: np.ndarray, generation_labels: Sequence[int]) -> np.ndarray:
    """Convert a label map of label values into generation-label indices (uint8 if it fits).

    Raises ``ValueError`` listing the values that are not generation labels.
    """
    lab = np.asarray(label_map)
    if not np.issubdtype(lab.dtype, np.integer):
        rounded = np.rint(lab)
        if not np.array_equal(rounded, lab):
            raise ValueError("label map has non-integer values")
        lab = rounded.astype(np.int64)
    lut = encode_lut(generation_labels)
    values = np.unique(lab)
    bad = values[(values < 0) | (values >= len(lut))]
    inside = values[(values >= 0) & (values < len(lut))]
    bad = np.concatenate([bad, inside[lut[inside] < 0]])
    if bad.size:
        raise ValueError(f"label values {sorted(bad.tolist())[:10]} are not in generation_labels")
    dtype = np.uint8 if len(generation_labels) <= 256 else np.int32
    return lut[lab].astype(dtype)


def flip_lut(n_labels: int, n_neutral_labels: int) -> np.ndarray:
    """Index permutation swapping left and right labels (neutral ones stay)."""
    idx = np.arange(n_labels)
    n_sided = n_labels - n_neutral_labels
    if n_sided == 0:
        return idx
    if n_sided % 2:
        raise ValueError(f"{n_sided} sided labels cannot be split into left and right halves")
    half = n_sided // 2
    left = idx[n_neutral_labels:n_neutral_labels + half]
    right = idx[n_neutral_labels + half:]
    return np.concatenate([idx[:n_neutral_labels], right, left])


def align_table(table: Sequence[int], generation_labels: Sequence[int], n_neutral_labels: int,
                n_neutral_table: Optional[int] = None) -> np.ndarray:
    """Per-generation-label values from a ``table`` written for a (possibly different) list of
    generation labels with the same sided structures.

    If ``table`` has one entry per generation label it is used as is.  Otherwise (SynthSeg 2.0's
    tables are written for a private 55-label list with one more non-sided label than the public
    54-label list) the sided parts are aligned from the end and the non-sided parts from the
    start; this is only accepted if the table's surplus non-sided entries and the last entry they
    would replace all carry the same value (in the 2.0 tables: 0, extra-cerebral labels), so the
    exact position of the extra label does not matter.
    """
    table = np.asarray(table, dtype=np.int64)
    gl = np.asarray(generation_labels, dtype=np.int64)
    if len(table) == len(gl):
        return table
    n_sided = len(gl) - n_neutral_labels
    if n_neutral_table is None:
        n_neutral_table = len(table) - n_sided
    if n_neutral_table < n_neutral_labels or len(table) - n_neutral_table != n_sided:
        raise ValueError(f"cannot align a table of {len(table)} entries with {len(gl)} generation labels "
                         f"({n_neutral_labels} non-sided)")
    tail = table[n_neutral_labels - 1:n_neutral_table]
    if np.any(tail != tail[0]):
        raise ValueError(f"cannot align a table of {len(table)} entries with {len(gl)} generation labels: "
                         f"its extra non-sided entries {tail.tolist()} differ")
    return np.concatenate([table[:n_neutral_labels], table[n_neutral_table:]])


def conversion_lut(dest_values: Sequence[int]) -> np.ndarray:
    """Generation-label index -> output value (identity on the order of ``dest_values``)."""
    return np.asarray(dest_values, dtype=np.int32)


def index_lut(dest_values: Sequence[int]) -> np.ndarray:
    """Generation-label index -> position of its output value in ``sorted(unique(dest_values))``
    (the channel order of the segmentation network's softmax)."""
    dest = np.asarray(dest_values)
    uniq = np.unique(dest)
    return np.searchsorted(uniq, dest).astype(np.int32)


def convert(labels: Array, lut) -> Array:
    """Vectorised table lookup ``lut[labels]``."""
    lut = jnp.asarray(lut)
    return lut[labels.astype(jnp.int32)]


# --------------------------------------------------------------------------- flipping

def flip_lr(labels: Array, do_flip: Array, swap: np.ndarray, axis: int = 0, image: Optional[Array] = None):
    """Mirror ``labels`` (and ``image``, spatial axes first) along ``axis`` when ``do_flip``,
    swapping left/right label indices with ``swap``."""
    swapped = jnp.flip(jnp.asarray(swap)[labels.astype(jnp.int32)].astype(labels.dtype), axis=axis)
    labels = jnp.where(do_flip, swapped, labels)
    if image is None:
        return labels
    image = jnp.where(do_flip, jnp.flip(image, axis=axis), image)
    return labels, image


# --------------------------------------------------------------------------- morphology

def _sq_distance_pass(d2: Array, axis: int, radius: int) -> Array:
    """One separable pass of the truncated squared Euclidean distance transform."""
    n = d2.shape[axis]
    big = jnp.asarray(jnp.inf, d2.dtype)
    pad = [(0, 0)] * d2.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(d2, pad, constant_values=big)
    out = d2
    for k in range(-radius, radius + 1):
        if k == 0:
            continue
        shifted = jax.lax.slice_in_dim(padded, radius + k, radius + k + n, axis=axis)
        out = jnp.minimum(out, shifted + float(k * k))
    return out


def dilate(mask: Array, radius: Array, max_radius: int) -> Array:
    """Binary dilation by the ball ``{|d| <= radius}`` (``radius <= max_radius``, may be traced).

    Exact: squared distances to the mask are computed separably and truncated beyond
    ``max_radius``; voxels outside the volume are not part of the mask (zero padding).
    """
    d2 = jnp.where(mask, 0.0, jnp.inf).astype(jnp.float32)
    for ax in range(mask.ndim):
        d2 = _sq_distance_pass(d2, ax, max_radius)
    r = jnp.asarray(radius, jnp.float32)
    return d2 <= r * r


def erode(mask: Array, radius: Array, max_radius: int) -> Array:
    """Binary erosion by a ball: complement of the dilation of the complement (the outside of
    the volume counts as inside the mask, as with the original's zero-padded convolution)."""
    return jnp.logical_not(dilate(jnp.logical_not(mask), radius, max_radius))


def random_dilation_erosion(key: Array, labels: Array, min_factor: int = 4, max_factor: int = 5,
                            prob: float = 0.3, operation: str = 'random', return_mask: bool = False):
    """SynthSeg's RandomDilationErosion on a label map (or binary mask).

    Draws ``u ~ U(-1, 1)`` ('random'), ``U(0, 1)`` ('dilation') or ``U(-1, 0)`` ('erosion'); the
    foreground mask is dilated if ``u > 1 - prob + 0.001`` and eroded if ``u < -(1 - prob +
    0.001)`` by a ball of radius ``randint(min_factor, max_factor)`` (``min_factor`` if equal).
    Returns ``labels * mask`` (so on label maps only erosion changes anything, as in the
    original) or the mask.
    """
    k_op, k_r = jax.random.split(key)
    lo, hi = {'random': (-1.0, 1.0), 'dilation': (0.0, 1.0), 'erosion': (-1.0, 0.0)}[operation]
    u = jax.random.uniform(k_op, (), jnp.float32, lo, hi)
    if min_factor == max_factor:
        radius = jnp.asarray(min_factor, jnp.int32)
    else:
        radius = jax.random.randint(k_r, (), min_factor, max_factor)
    max_radius = max(min_factor, max_factor)
    mask = labels > 0
    thr = 1.0 - prob + 0.001
    mask = jnp.where(u > thr, dilate(mask, radius, max_radius), mask)
    mask = jnp.where(u < -thr, erode(mask, radius, max_radius), mask)
    if return_mask:
        return mask
    return labels * mask.astype(labels.dtype)


# --------------------------------------------------------------------------- QC corruption

def soft_dice(x_onehot: Array, y_onehot: Array) -> Array:
    """Per-label Dice ``2 sum(xy) / sum(x + y + eps)`` over the spatial axes (eps = 1e-7 per
    voxel, as in the original)."""
    axes = tuple(range(x_onehot.ndim - 1))
    top = jnp.sum(2.0 * x_onehot * y_onehot, axis=axes)
    bottom = jnp.sum(x_onehot + y_onehot + 1e-7, axis=axes)
    return top / bottom


def simulate_partial_fov(key: Array, noisy: Array, target: Array, n_labels: int, crop_shape: Sequence[int],
                         min_fov_shape: int = 70, prob_mask: float = 0.3):
    """SynthSeg-QC's SimulatePartialFOV: with probability ``prob_mask`` zero the noisy label map
    outside a random box (size ``randint(min_fov_shape, shape)`` per axis, intersected with the
    crop), compute the per-label Dice between the (masked) noisy map and the target, and crop
    the one-hot noisy map.  Inputs hold label *indices* ``0..n_labels-1``.

    Returns ``(cropped one-hot noisy map [*crop_shape, n_labels], dice [n_labels])``.
    """
    shape = noisy.shape
    n = shape[0]
    crop_max = n - int(crop_shape[0])
    k_crop, k_fov, k_pos, k_apply = jax.random.split(key, 4)
    if crop_max > 0:
        crop_inf = jax.random.randint(k_crop, (3,), 0, crop_max)
    else:
        crop_inf = jnp.zeros(3, jnp.int32)
    fov = jax.random.randint(k_fov, (3,), min_fov_shape, n)
    m_inf = (jax.random.uniform(k_pos, (3,)) * (n - fov).astype(jnp.float32)).astype(jnp.int32)
    m_sup = m_inf + fov
    if crop_max > 0:
        m_inf = jnp.maximum(m_inf, crop_inf)
        m_sup = jnp.minimum(m_sup, crop_inf + jnp.asarray(crop_shape, jnp.int32))
    inside = None
    for d in range(3):
        g = jnp.arange(shape[d]).reshape([-1 if i == d else 1 for i in range(3)])
        ok = (g >= m_inf[d]) & (g <= m_sup[d])
        inside = ok if inside is None else inside & ok
    apply = jax.random.uniform(k_apply, ()) > 1.0 - prob_mask
    x = jnp.where(apply & ~inside, 0, noisy)
    x1 = jax.nn.one_hot(x, n_labels, dtype=jnp.float32)
    y1 = jax.nn.one_hot(target, n_labels, dtype=jnp.float32)
    dice = soft_dice(x1, y1)
    if crop_max > 0:
        x1 = jax.lax.dynamic_slice(x1, (crop_inf[0], crop_inf[1], crop_inf[2], 0),
                                   tuple(int(c) for c in crop_shape) + (n_labels,))
    return x1, dice


def corrupt_groups(key: Array, groups: Array, n_groups: int, radius: int = 1, prob: float = 0.9) -> Array:
    """Robust (group) training: one-hot group map with each group's mask independently dilated or
    eroded (radius 1 by default, probability 0.9) -- SynthSeg's per-channel RandomDilationErosion
    with ``return_mask=True``.  Returns a float32 ``[*shape, n_groups]`` array of masks."""
    keys = jax.random.split(key, n_groups)

    def one(k, g):
        m = (groups == g)
        return random_dilation_erosion(k, m.astype(jnp.int32), radius, radius, prob, 'random', True)

    masks = jax.vmap(one, in_axes=(0, 0), out_axes=-1)(keys, jnp.arange(n_groups))
    return masks.astype(jnp.float32)
