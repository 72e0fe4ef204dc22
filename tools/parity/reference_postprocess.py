"""``mri_synthseg``'s ``postprocess`` transcribed step by step in numpy: the reference that the
pipeline's post-processing (``synthseg_jax/inference/postprocess.py``: JAX on the device, the
connected components on the host) is tested against, and what ``run_pipeline_parity.py`` applies
to our networks' outputs. Not used by prediction: on a 224x256x224 padded volume with 33 channels
it took ~34 s (loaded 2-core machine), almost all in channel-strided array arithmetic.

Tests import it with this folder on ``sys.path`` (``tests/inference/conftest.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from synthseg_jax.geometry import resample_like
from synthseg_jax.inference.postprocess import (
    BRAIN_THRESHOLD,
    CLASS_THRESHOLD,
    FAST_THRESHOLD,
    assemble_volumes,
    crop_to,
    largest_component,
    largest_component_fast,
    renormalise,
)
from synthseg_jax.inference.preprocess import Preprocessed
from synthseg_jax.labels import LabelTables
from synthseg_jax.nn.synthseg import CORTEX_LABELS


def clean_posteriors(posteriors: np.ndarray, pad_idx: np.ndarray, topology_classes: np.ndarray,
                     fast: bool) -> np.ndarray:
    """Steps 1-3 (before argmax): connected components, thresholds, padding removal, renormalising.

    ``posteriors`` is the padded (X, Y, Z, C) network output; a new float32 array is returned.
    """
    post = np.array(posteriors, dtype=np.float32, copy=True)
    if fast:
        post = np.ascontiguousarray(crop_to(post, pad_idx))

    brain = largest_component(post[..., 1:].sum(axis=-1) > BRAIN_THRESHOLD)
    post[..., 1:] *= brain[..., None]

    if not fast:
        # Classes partition the channels, so each class's mask can be taken when it is reached.
        for topology_class in np.unique(topology_classes)[1:]:
            channels = np.flatnonzero(topology_classes == topology_class)
            mask = np.any(post[..., channels] > CLASS_THRESHOLD, axis=-1)
            keep = largest_component_fast(mask)
            post[..., channels] *= keep[..., None]
        post = np.ascontiguousarray(crop_to(post, pad_idx))
    else:
        post[..., 1:] *= post[..., 1:] > FAST_THRESHOLD

    renormalise(post)
    return post


def parcellate(seg: np.ndarray, parc_posteriors: np.ndarray, pad_idx: np.ndarray,
               parc_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: cortex voxels take the parcellation label. Returns (seg, parcellation posteriors):
    the posteriors with background 1 outside the cortex and 0 inside, renormalised, as the
    original keeps them for the volumes."""
    parc = np.array(crop_to(parc_posteriors, pad_idx), dtype=np.float32, copy=True)
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
