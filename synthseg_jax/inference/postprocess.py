"""From the network's posteriors to the segmentation, posteriors and volumes written to disk.

What ``mri_synthseg``'s ``postprocess`` does, in its order:

1. keep the largest connected component of (sum of non-background posteriors > 0.25) and zero the
   non-background posteriors elsewhere;
2. default mode: per topological class (all but the first), keep the largest connected component
   of (any posterior of the class > 0.25), zero the class's posteriors elsewhere; this runs on the
   padded volume, then the padding is removed. Fast/robust mode: remove the padding first, and
   zero non-background posteriors <= 0.2 instead;
3. renormalise the posteriors to sum to one; argmax -> labels;
4. parcellation: inside the cortex (labels 3 and 42) the parcellation's argmax replaces the label;
5. paste the crop back (background posterior 1 around it), undo the RAS alignment;
6. volumes = sum of posteriors x voxel volume, "total intracranial" first (2.0), parcellation
   volumes rescaled (see ``assemble_volumes``), rounded to 3 decimals. The sums are numpy
   reductions in float32 that carry rounding errors of up to ~1 % on a whole brain; the CSV
   must match the original's, so they are reproduced as such (``original_sums``).

Two forms: ``postprocess`` does it all in numpy (the reference, a plain transcription); the
pipeline runs the numerics in JAX (``network.Predictor.predict``) and only the connected
components and the volumes' sums here on the host (scipy, ``keep_masks``; numpy,
``original_sums``), each class labelled inside its bounding box,
which gives the same components as labelling the whole volume. Measured on a 224x256x224 padded
volume with 33 channels (loaded 2-core machine): the numpy form took ~34 s, almost all of it in
channel-strided array arithmetic; the connected components themselves ~1 s.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from synthseg_jax.geometry import resample_like
from synthseg_jax.inference.preprocess import Preprocessed
from synthseg_jax.labels import LabelTables
from synthseg_jax.nn.synthseg import CORTEX_LABELS

BRAIN_THRESHOLD = 0.25
CLASS_THRESHOLD = 0.25
FAST_THRESHOLD = 0.2


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (ties: the first in scan order).

    An empty mask is returned as it is.
    """
    mask = np.asarray(mask, dtype=bool)
    components, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    counts = np.bincount(components.ravel())
    counts[0] = 0
    return components == int(np.argmax(counts))


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


def _crop(volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return volume[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]]


def clean_posteriors(posteriors: np.ndarray, pad_idx: np.ndarray, topology_classes: np.ndarray,
                     fast: bool) -> np.ndarray:
    """Steps 1-3 (before argmax): connected components, thresholds, padding removal, renormalising.

    ``posteriors`` is the padded (X, Y, Z, C) network output; a new float32 array is returned.
    """
    post = np.array(posteriors, dtype=np.float32, copy=True)
    if fast:
        post = np.ascontiguousarray(_crop(post, pad_idx))

    brain = largest_component(post[..., 1:].sum(axis=-1) > BRAIN_THRESHOLD)
    post[..., 1:] *= brain[..., None]

    if not fast:
        # Classes partition the channels, so each class's mask can be taken when it is reached.
        for topology_class in np.unique(topology_classes)[1:]:
            channels = np.flatnonzero(topology_classes == topology_class)
            mask = np.any(post[..., channels] > CLASS_THRESHOLD, axis=-1)
            keep = largest_component_fast(mask)
            post[..., channels] *= keep[..., None]
        post = np.ascontiguousarray(_crop(post, pad_idx))
    else:
        post[..., 1:] *= post[..., 1:] > FAST_THRESHOLD

    renormalise(post)
    return post


def renormalise(post: np.ndarray) -> None:
    """Divide each voxel's posteriors by their sum, in place (all-zero voxels stay zero, where the
    original would produce NaN and then label 0 as well)."""
    total = post.sum(axis=-1, keepdims=True)
    np.divide(post, total, out=post, where=total > 0)


def parcellate(seg: np.ndarray, parc_posteriors: np.ndarray, pad_idx: np.ndarray,
               parc_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: cortex voxels take the parcellation label. Returns (seg, parcellation posteriors):
    the posteriors with background 1 outside the cortex and 0 inside, renormalised, as the
    original keeps them for the volumes."""
    parc = np.array(_crop(parc_posteriors, pad_idx), dtype=np.float32, copy=True)
    cortex = np.isin(seg, CORTEX_LABELS)
    parc[..., 0] = ~cortex
    renormalise(parc)
    parc_seg = parc_labels[np.argmax(parc, axis=-1)].astype(np.int32)
    seg = seg.copy()
    seg[cortex] = parc_seg[cortex]
    return seg, parc


def compute_volumes(posteriors: np.ndarray, labels: np.ndarray, voxel_size: np.ndarray, v1: bool,
                    parc_posteriors: np.ndarray | None = None) -> np.ndarray:
    """Step 6 from posteriors on the host, summed as they are given (their dtype and layout: see
    ``original_sums`` for why that matters), then ``assemble_volumes``."""
    axes = tuple(range(posteriors.ndim - 1))
    sums = np.sum(posteriors[..., 1:], axis=axes)
    parc_sums = None
    if parc_posteriors is not None:
        parc_sums = np.sum(parc_posteriors[..., 1:], axis=axes)
    return assemble_volumes(sums, labels, voxel_size, v1, parc_sums)


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
# Split form used by the pipeline: thresholds, renormalisation, argmax and volumes run in JAX
# (network.Predictor.predict); only the connected components run here, on boolean masks.
# ------------------------------------------------------------------------------------------------

def topology_groups(topology_classes: np.ndarray) -> list[np.ndarray]:
    """The channels of each cleaned topological class (every class but the first)."""
    topology_classes = np.asarray(topology_classes)
    classes = np.unique(topology_classes)
    if topology_classes[0] != classes[0]:
        raise ValueError("the background's topological class must be the first (smallest) one")
    return [np.flatnonzero(topology_classes == c) for c in classes[1:]]


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
        keep[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = largest_component_fast(_crop(brain, idx))
        return keep, None
    brain_keep = largest_component_fast(brain)
    class_keep = np.zeros_like(class_masks)
    for k, mask in enumerate(class_masks):
        box = bounding_box(mask)
        if box is None:
            continue
        class_keep[k][box] = largest_component(mask[box] & brain_keep[box])
    return brain_keep, class_keep


def to_scan_grid(volume: np.ndarray, prep: Preprocessed, fill_background: bool = False) -> np.ndarray:
    """Padded RAS volume -> the scan's (resampled) grid: remove the padding, paste the crop back
    (zeros around it; for posteriors background 1), undo the RAS alignment."""
    volume = _crop(volume, prep.pad_idx)
    if prep.crop_idx is not None:
        idx = prep.crop_idx
        full = np.zeros(prep.aligned_shape + volume.shape[3:], dtype=volume.dtype)
        if fill_background:
            full[..., 0] = 1
        full[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = volume
        volume = full
    return np.ascontiguousarray(prep.alignment.from_ras(volume))


def to_input_grid(seg: np.ndarray, post: np.ndarray | None, prep: Preprocessed):
    """keepgeom: segmentation (nearest) and posteriors (linear, renormalised) on the input's grid."""
    seg = resample_like(seg, prep.affine, prep.input_shape, prep.input_affine, order=0)
    if post is not None:
        post = resample_like(post, prep.affine, prep.input_shape, prep.input_affine, order=1)
        renormalise(post)
    return seg, post


@dataclasses.dataclass
class Prediction:
    """Everything that is written for one scan."""

    seg: np.ndarray            # int32 labels on the output grid
    posteriors: np.ndarray | None  # float32 (X, Y, Z, C) on the output grid (if requested)
    affine: np.ndarray         # the output grid's affine
    volumes: np.ndarray        # as in the CSV
    qc_scores: np.ndarray | None = None  # one per QC class, without the background's


def postprocess(posteriors: np.ndarray, prep: Preprocessed, tables: LabelTables, fast: bool,
                v1: bool, parc_posteriors: np.ndarray | None = None,
                keepgeom: bool = False) -> Prediction:
    """The original's ``postprocess`` in numpy, step by step: the reference that the pipeline's
    split form (``Predictor.predict``: JAX + ``keep_masks``) is tested against. ``keepgeom`` also
    maps the results back onto the input's own voxel grid (only differs from the default when the
    scan was resampled to 1 mm)."""
    labels = tables.segmentation
    post = clean_posteriors(posteriors, prep.pad_idx, tables.topology_classes, fast)
    seg = labels[np.argmax(post, axis=-1)].astype(np.int32)
    parc = None
    if parc_posteriors is not None:
        seg, parc = parcellate(seg, parc_posteriors, prep.pad_idx, tables.parcellation)

    if prep.crop_idx is not None:
        idx = prep.crop_idx
        full_seg = np.zeros(prep.aligned_shape, dtype=np.int32)
        # float64, like the original's (it matters for the volumes: see original_sums)
        full_post = np.zeros(prep.aligned_shape + (post.shape[-1],), dtype=np.float64)
        full_post[..., 0] = 1
        full_seg[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = seg
        full_post[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5]] = post
        seg, post = full_seg, full_post

    seg = np.ascontiguousarray(prep.alignment.from_ras(seg))
    post = prep.alignment.from_ras(post)
    volumes = compute_volumes(post, labels, prep.voxel_size, v1, parc)  # on the view, as the original
    post = np.ascontiguousarray(post, dtype=np.float32)

    affine = prep.affine
    if keepgeom and prep.resampled is not None:
        seg = resample_like(seg, affine, prep.input_shape, prep.input_affine, order=0)
        post = resample_like(post, affine, prep.input_shape, prep.input_affine, order=1)
        renormalise(post)
        affine = prep.input_affine
    return Prediction(seg=seg, posteriors=post, affine=affine, volumes=volumes)
