"""Post-processing, the stage after the network: from the posteriors on the padded grid to the
segmentation, posteriors and volumes on the scan's grid, as ``mri_synthseg``'s ``postprocess``.

In the pipeline's order (``network.Predictor.predict`` runs steps 1-4, ``pipeline.Runner`` step 5):

1. on the device, the masks whose connected components decide what is kept (``cleanup_masks``):
   the brain (sum of non-background posteriors > 0.25) and, unless fast, one mask per
   topological class but the first (any posterior of the class > 0.25);
2. on the host, their largest 6-connected components (``keep_masks``: cc3d, each class labelled
   inside its bounding box, which gives the components of the whole volume at a fraction of the
   cost); in fast/robust mode the brain's is taken inside the unpadded region, as the original
   crops first there;
3. on the device (``clean_and_label``): zero what lies outside the kept components (fast: also
   non-background posteriors <= 0.2), renormalise, argmax -> labels; with the parcellation, cortex
   voxels (labels 3 and 42) take the parcellation's label;
4. on the host, the volumes: sums of the posteriors as the original accumulates them
   (``original_sums``: float32 voxel after voxel, rounding errors of up to ~1 % that the CSV must
   reproduce), then the original's arithmetic (``assemble_volumes``);
5. on the host, the geometry back: remove the padding, paste the crop back, undo the RAS alignment
   (``to_scan_grid``), and with ``keepgeom`` resample onto the input's own grid (``to_input_grid``).

A step-by-step numpy transcription of the original's ``postprocess`` is the reference these are
tested against: ``tools/parity/reference_postprocess.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import cc3d

from synthseg_jax.geometry import resample_like
from synthseg_jax.inference.preprocess import Preprocessed
from synthseg_jax.nn.synthseg import CORTEX_LABELS

BRAIN_THRESHOLD = 0.25
CLASS_THRESHOLD = 0.25
FAST_THRESHOLD = 0.2


def crop_to(volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The window ``idx`` = [x0, y0, z0, x1, y1, z1] of a (X, Y, Z, ...) volume."""
    return volume[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]]


# ------------------------------------------------------------------------------------------------
# 1. Masks (device)
# ------------------------------------------------------------------------------------------------

def topology_groups(topology_classes: np.ndarray) -> list[np.ndarray]:
    """The channels of each cleaned topological class (every class but the first)."""
    topology_classes = np.asarray(topology_classes)
    classes = np.unique(topology_classes)
    if topology_classes[0] != classes[0]:
        raise ValueError("the background's topological class must be the first (smallest) one")
    return [np.flatnonzero(topology_classes == c) for c in classes[1:]]


def channel_groups(groups: list[tuple[int, ...]], n_channels: int) -> list[int]:
    """Each channel's cleaned class (1-based index into ``groups``; 0: not cleaned)."""
    channel_group = [0] * n_channels
    for k, channels in enumerate(groups):
        for c in channels:
            channel_group[c] = k + 1
    return channel_group


def cleanup_masks(post: jax.Array, groups: list[tuple[int, ...]], fast: bool) -> dict[str, jax.Array]:
    """Step 1 on the (X, Y, Z, C) posteriors: ``brain`` (X, Y, Z) and, unless fast, ``classes``
    (K, X, Y, Z), one per group of ``groups`` (static channel tuples)."""
    masks = {"brain": jnp.sum(post[..., 1:], axis=-1) > BRAIN_THRESHOLD}
    if not fast:
        # one pass over the posteriors (channels last), then one transpose so that each
        # class's mask is contiguous for the host
        above = post > CLASS_THRESHOLD
        per_class = jnp.stack([jnp.any(above[..., list(g)], axis=-1) for g in groups], -1)
        masks["classes"] = jnp.transpose(per_class, (3, 0, 1, 2))
    return masks


# ------------------------------------------------------------------------------------------------
# 2. Connected components (host)
# ------------------------------------------------------------------------------------------------

def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (ties: the one reached first in C
    scan order, as with scipy's labelling, which the original uses).

    cc3d, and counting inside the mask only, make ``keep_masks`` 2.7x faster than with
    ``scipy.ndimage.label`` on the noisy masks of random-weight networks (BENCHMARKS.md); cc3d
    may number the components otherwise, so a tie is settled by position, not by label. An empty
    mask is returned as it is.
    """
    # cc3d needs a writable C-ordered buffer: the device's arrays are read-only (copied only then)
    mask = np.require(mask, dtype=bool, requirements=["C", "W"])
    components, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    if n == 0:
        return mask.copy()
    counts = np.bincount(components[mask])   # over the mask only: 2x faster than the whole grid
    largest = np.flatnonzero(counts == counts.max())
    if largest.size == 1:
        label = largest[0]
    else:
        flat = components.reshape(-1)
        label = flat[np.argmax(np.isin(flat, largest))]
    return components == label


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every True voxel, or None if there is none."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=others))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def largest_component_fast(mask: np.ndarray) -> np.ndarray:
    """``largest_component`` computed inside the mask's bounding box (same result, less work)."""
    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return mask.copy()
    out = np.zeros_like(mask)
    out[box] = largest_component(mask[box])
    return out


def keep_masks(brain: np.ndarray, class_masks: np.ndarray | None, pad_idx: np.ndarray,
               fast: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Connected components of the padded masks computed on the device.

    ``brain``: (sum of non-background posteriors > 0.25); ``class_masks`` (K, X, Y, Z): per cleaned
    class, any non-background posterior of the class > 0.25 (before the brain mask is applied).
    Returns the brain's largest component (found inside the unpadded region in fast mode, where
    the original crops first) and, unless fast, each class's largest component within it.
    """
    if fast:
        keep = np.zeros_like(brain)
        idx = pad_idx
        keep[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = largest_component_fast(crop_to(brain, idx))
        return keep, None
    brain_keep = largest_component_fast(brain)
    class_keep = np.zeros_like(class_masks)
    for k, mask in enumerate(class_masks):
        box = bounding_box(mask)
        if box is None:
            continue
        class_keep[k][box] = largest_component(mask[box] & brain_keep[box])
    return brain_keep, class_keep


# ------------------------------------------------------------------------------------------------
# 3. Clean-up, labels, parcellation (device)
# ------------------------------------------------------------------------------------------------

def _renormalise(post: jax.Array) -> jax.Array:
    total = jnp.sum(post, axis=-1, keepdims=True)
    return jnp.where(total > 0, post / jnp.where(total > 0, total, 1), post)


def clean_and_label(post: jax.Array, brain_keep: jax.Array, class_keep: jax.Array | None,
                    parc: jax.Array | None, channel_group: list[int], labels: jax.Array,
                    parc_labels: jax.Array) -> dict[str, jax.Array]:
    """Step 3 on the padded grid once the components are known (``class_keep`` None: fast mode):
    ``posteriors`` (cleaned, renormalised), ``seg`` (int32 labels, the parcellation's in the
    cortex) and ``parc`` (the parcellation posteriors, background 1 outside the cortex and 0
    inside, renormalised, as the original keeps them for the volumes)."""
    post = post.at[..., 1:].multiply(brain_keep[..., None].astype(post.dtype))
    if class_keep is None:
        post = post.at[..., 1:].multiply((post[..., 1:] > FAST_THRESHOLD).astype(post.dtype))
    else:
        ones = jnp.ones(post.shape[:-1], dtype=jnp.bool_)
        factor = jnp.stack([class_keep[g - 1] if g else ones for g in channel_group], -1)
        post = post * factor.astype(post.dtype)
    post = _renormalise(post)
    seg = labels[jnp.argmax(post, axis=-1)]
    out = {"posteriors": post}
    if parc is not None:
        seg, out["parc"] = label_parcellation(seg, parc, parc_labels)
    out["seg"] = seg.astype(jnp.int32)
    return out


def label_parcellation(seg: jax.Array, parc: jax.Array, parc_labels: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """The parcellation's part of step 3 (voxel-wise, so also slab by slab): cortex voxels of
    ``seg`` take the parcellation's label; the parcellation posteriors get background 1 outside
    the cortex and 0 inside, renormalised."""
    cortex = jnp.isin(seg, jnp.asarray(CORTEX_LABELS))
    parc = _renormalise(parc.at[..., 0].set((~cortex).astype(parc.dtype)))
    return jnp.where(cortex, parc_labels[jnp.argmax(parc, axis=-1)], seg), parc


# ------------------------------------------------------------------------------------------------
# 4. Volumes (host)
# ------------------------------------------------------------------------------------------------

def volume_dtype(cropped: bool) -> type:
    """The dtype the original sums the posteriors in: its network's float32 posteriors, unless a
    crop was pasted back into a (float64) array of the scan's size."""
    return np.float64 if cropped else np.float32


def original_sums(posteriors: np.ndarray, pad_idx: np.ndarray, dtype=np.float32,
                  alignment=None) -> np.ndarray:
    """Per-channel sums of the non-background posteriors inside ``pad_idx`` of the padded
    (X, Y, Z, C) C-ordered array ``posteriors``, accumulated as ``mri_synthseg`` does it.

    The original sums with ``np.sum(post[..., 1:], axis=(0, 1, 2))`` on a view of the padded
    float32 network output (unless a crop was pasted into a float64 array), after undoing the RAS
    alignment. numpy reduces over those axes by adding voxel after voxel into a float32
    accumulator per channel, in the view's order: for a 1 mm brain the sums carry rounding errors
    of up to ~1 % (measured on the MNI T1: CSF 521698 mm^3 against an exact 528397). The volumes
    CSV must match the original's, so the same reduction is done here, on the same view
    (``alignment.from_ras`` of the region: the order of the additions depends on it). With
    ``dtype`` float64 the sums are accurate, as in the original's cropped case.
    """
    region = posteriors[pad_idx[0]:pad_idx[3], pad_idx[1]:pad_idx[4], pad_idx[2]:pad_idx[5]]
    if alignment is not None:
        region = alignment.from_ras(region)
    region = region[..., 1:]
    if np.dtype(dtype) == np.float32:
        return np.sum(np.asarray(region, dtype=np.float32), axis=(0, 1, 2))
    return np.sum(region, axis=(0, 1, 2), dtype=np.float64)


def add_float32_sums(sums: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``original_sums``' float32 accumulation (voxel after voxel in C order) carried on over
    further ``rows`` (X, Y, Z, C) of the same region: the same bits as summing the whole at once."""
    flat = np.asarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
    return np.sum(flat if sums is None else np.concatenate([sums[None], flat]), axis=0)


def assemble_volumes(sums: np.ndarray, labels: np.ndarray, voxel_size: np.ndarray, v1: bool,
                     parc_sums: np.ndarray | None = None) -> np.ndarray:
    """Step 6, the original's arithmetic (mm^3, 3 decimals), from the per-channel sums of the
    non-background posteriors (and of the parcellation's).

    Order: ["total intracranial" (2.0 only)] + one per non-background label + [one per
    non-background parcellation label]. The parcellation volumes are rescaled so they sum to
    the volume the original takes as the cortex volume: the entries at (index of labels 3 and 42
    among the segmentation labels) - 1 of the volume list. For 1.0 those are the cortex volumes;
    for 2.0, whose list starts with the total, they are the structures just before the cortices
    (labels 2 and 41, the cerebral white matter). We reproduce this, since the CSV must match the
    original's.

    The arithmetic keeps the dtypes of ``sums`` and ``parc_sums`` as the original's numpy (1.23,
    value-based casting: an array operated with a scalar keeps its dtype) does: float32 sums give
    float32 volumes, printed as float32 (``format_volumes``); the parcellation volumes stay
    float32; the voxel volume is the product of the header's float32 voxel sizes.
    """
    volumes = np.asarray(sums)
    if volumes.dtype not in (np.float32, np.float64):
        volumes = volumes.astype(np.float64)
    dtype = volumes.dtype.type
    if not v1:
        volumes = np.concatenate([np.array([np.sum(volumes)], dtype=volumes.dtype), volumes])
    if parc_sums is not None:
        parc_volumes = np.asarray(parc_sums)
        if parc_volumes.dtype not in (np.float32, np.float64):
            parc_volumes = parc_volumes.astype(np.float64)
        cortex = np.flatnonzero(np.isin(labels, CORTEX_LABELS)) - 1
        total_cortex = parc_volumes.dtype.type(np.sum(volumes[cortex]))
        parc_volumes = parc_volumes / np.sum(parc_volumes) * total_cortex
        volumes = np.concatenate([volumes, parc_volumes])
        dtype = volumes.dtype.type
    voxel_volume = np.prod(np.asarray(voxel_size, dtype=np.float32))
    return np.around(volumes * dtype(voxel_volume), 3)


# ------------------------------------------------------------------------------------------------
# 5. Back onto the scan's grid (host)
# ------------------------------------------------------------------------------------------------

def renormalise(post: np.ndarray) -> None:
    """Divide each voxel's posteriors by their sum, in place (all-zero voxels stay zero, where the
    original would produce NaN and then label 0 as well)."""
    total = post.sum(axis=-1, keepdims=True)
    np.divide(post, total, out=post, where=total > 0)


def to_scan_grid(volume: np.ndarray, prep: Preprocessed, fill_background: bool = False) -> np.ndarray:
    """Padded RAS volume -> the scan's (resampled) grid: remove the padding, paste the crop back
    (zeros around it; for posteriors background 1), undo the RAS alignment. The result is
    column-major (``fortran_copy``), the order the output files store."""
    volume = crop_to(volume, prep.pad_idx)
    if prep.crop_idx is not None:
        idx = prep.crop_idx
        full = np.zeros(prep.aligned_shape + volume.shape[3:], dtype=volume.dtype)
        if fill_background:
            full[..., 0] = 1
        full[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = volume
        volume = full
    return fortran_copy(prep.alignment.from_ras(volume))


FORTRAN_BLOCK = (64, 8, 8)   # the fastest of five tried on a 197x233x189x33 volume


def fortran_copy(volume: np.ndarray) -> np.ndarray:
    """A column-major copy of ``volume`` (any strides), copied in blocks of its first three axes.

    NIfTI and MGH store voxels column-major, and nibabel writes a row-major array through a
    strided copy: for 33-channel 1 mm posteriors (1.1 GB) that took 5.5 s, this copy 1.0 s, after
    which nibabel writes contiguous slices. The copy that undoing the RAS alignment needs anyway
    is this one, so the layout costs no extra memory."""
    reversed_out = np.empty(volume.shape[::-1], volume.dtype)   # row-major: numpy copies
    bx, by, bz = FORTRAN_BLOCK                                   # along its last axis
    nx, ny, nz = volume.shape[:3]
    for x in range(0, nx, bx):
        for y in range(0, ny, by):
            for z in range(0, nz, bz):
                reversed_out[..., z:z + bz, y:y + by, x:x + bx] = volume[x:x + bx, y:y + by,
                                                                         z:z + bz].T
    return reversed_out.T


def to_input_grid(post: np.ndarray, prep: Preprocessed, labels: np.ndarray,
                  parc: np.ndarray | None = None, parc_labels: np.ndarray | None = None,
                  keep_posteriors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """keepgeom: the segmentation (and, if ``keep_posteriors``, the renormalised posteriors) on
    the input's own grid, from the cleaned posteriors ``post`` (and the parcellation's ``parc``)
    on the scan's 1 mm grid.

    The labels are the argmax of the posteriors resampled linearly onto the input's grid, not
    the 1 mm labels resampled by nearest neighbour (FreeSurfer 8's ``--keepgeom``, surfa's
    ``resample_like(method='nearest')``): at even factors (a 2 mm scan from its 1 mm grid) every
    input voxel centre lies halfway between 1 mm centres, so nearest neighbour breaks a tie
    per axis by rounding, which depends on the direction the file stores each axis in (a RAS
    and an LPS copy disagreed on 11 % of labelled voxels, and the labels shifted ~0.5 mm per
    axis). Linear weights at a world position do not depend on storage order, and the labels
    then agree with the posteriors written beside them. Cortex voxels take the argmax of the
    resampled parcellation posteriors (background excluded), as at 1 mm. One channel is
    resampled at a time, so only the posteriors asked for are ever held on the input's grid."""
    index, resampled = _argmax_on_input_grid(post, prep, keep_posteriors)
    seg = np.asarray(labels)[index]
    if parc is not None:
        cortex = np.isin(seg, CORTEX_LABELS)
        parc_index, _ = _argmax_on_input_grid(parc[..., 1:], prep, False)
        seg = np.where(cortex, np.asarray(parc_labels)[1:][parc_index], seg)
    if resampled is not None:
        renormalise(resampled)
    return seg.astype(np.int32), resampled


def _argmax_on_input_grid(volume: np.ndarray, prep: Preprocessed, keep: bool
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Channel index of the largest linearly resampled value (the first on ties), and the
    resampled channels if ``keep``."""
    shape = tuple(prep.input_shape)
    kept = np.empty(shape + volume.shape[3:], dtype=np.float32) if keep else None
    best = index = None
    for channel in range(volume.shape[-1]):
        values = resample_like(np.ascontiguousarray(volume[..., channel]), prep.affine, shape,
                               prep.input_affine, order=1)
        if kept is not None:
            kept[..., channel] = values
        if best is None:
            best, index = values, np.zeros(shape, dtype=np.int32)
        else:
            larger = values > best
            index[larger] = channel
            np.maximum(best, values, out=best)
    return index, kept
