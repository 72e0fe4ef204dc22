"""Post-processing: the pipeline's pieces, and the numpy reference they are tested against."""

import numpy as np
import pytest
from scipy import ndimage

from synthseg_jax.geometry import RasAlignment
from synthseg_jax.scans import Scan
from reference_postprocess import clean_posteriors, compute_volumes, parcellate, postprocess
from synthseg_jax.inference.postprocess import (
    FORTRAN_BLOCK,
    assemble_volumes,
    fortran_copy,
    largest_component,
    largest_component_fast,
    original_sums,
    volume_dtype,
)
from synthseg_jax.inference.preprocess import preprocess
from synthseg_jax.labels import LabelTables


def small_tables(version="2.0"):
    seg = np.array([0, 2, 3, 17, 41, 42])
    return LabelTables(
        version=version, segmentation=seg,
        names=np.array(["background", "lwm", "lctx", "lhippo", "rwm", "rctx"]),
        topology_classes=np.array([0, 1, 2, 3, 4, 5]), flip=np.array([0, 4, 5, 3, 1, 2]),
        n_groups=3, parcellation=np.array([0, 1001, 2001]),
        parcellation_names=np.array(["Background", "ctx-lh-a", "ctx-rh-a"]),
        qc_class=np.array([0, 1, 2, 3, 1, 2]), qc_names=np.array(["bg", "wm", "gm", "hp", "wm", "gm"]))


def test_largest_component_picks_biggest_and_first_on_ties():
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True          # 8 voxels
    mask[5:8, 5:8, 5:8] = True          # 27 voxels
    mask[0, 9, 9] = True
    out = largest_component(mask)
    assert out.sum() == 27 and out[6, 6, 6]
    tie = np.zeros((10, 10, 10), bool)
    tie[0, 0, 0:2] = True
    tie[9, 9, 0:2] = True
    assert largest_component(tie)[0, 0, 0] and not largest_component(tie)[9, 9, 0]
    empty = np.zeros((4, 4, 4), bool)
    assert not largest_component(empty).any()
    # 6-connectivity: diagonal neighbours are separate components
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 0] = diag[1, 1, 1] = True
    assert largest_component(diag).sum() == 2


@pytest.mark.parametrize("seed", range(6))
def test_largest_component_equals_scipy_labelling(seed):
    """cc3d's components against scipy's (the original's), ties settled the same way: the odd
    seeds' masks keep only voxels of one checkerboard colour, so every component is a single
    voxel and they all tie."""
    rng = np.random.default_rng(seed)
    mask = rng.random((17, 23, 19)) < 0.3
    if seed % 2:
        mask &= (np.indices(mask.shape).sum(0) % 2) == 0
    components, _ = ndimage.label(mask)
    counts = np.bincount(components.ravel())
    counts[0] = 0
    expected = components == int(np.argmax(counts))
    assert (counts == counts.max()).sum() > 1 or seed % 2 == 0
    mask.setflags(write=False)   # as the device's arrays come to the host
    np.testing.assert_array_equal(largest_component(mask), expected)


@pytest.mark.parametrize("seed", range(5))
def test_bounding_box_variant_is_identical(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.normal(size=(30, 25, 20)), 1.5) > 0.15
    mask[:5] = False
    np.testing.assert_array_equal(largest_component_fast(mask), largest_component(mask))


def reference_clean(post, pad_idx, classes, fast):
    """Plain transcription of the steps, masks computed on the whole volume up front."""
    post = post.astype(np.float64).copy()
    crop = lambda v: v[pad_idx[0]:pad_idx[3], pad_idx[1]:pad_idx[4], pad_idx[2]:pad_idx[5]]
    if fast:
        post = crop(post).copy()
    brain = largest_component(post[..., 1:].sum(-1) > 0.25)
    post[..., 1:] = post[..., 1:] * brain[..., None]
    if not fast:
        above = post > 0.25
        for c in np.unique(classes)[1:]:
            idx = np.where(classes == c)[0]
            keep = largest_component(np.any(above[..., idx], -1))
            for i in idx:
                post[..., i] *= keep
        post = crop(post)
    else:
        post[..., 1:] *= post[..., 1:] > 0.2
    return post / post.sum(-1, keepdims=True)


def smooth_posteriors(rng, shape, n):
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2) * 12 for _ in range(n)], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_clean_posteriors_matches_plain_transcription(seed, fast):
    rng = np.random.default_rng(seed)
    post = smooth_posteriors(rng, (24, 20, 22), 6)
    classes = np.array([0, 1, 1, 2, 3, 0])   # class 0 (background's) is left alone
    pad_idx = np.array([2, 1, 3, 20, 19, 21])
    out = clean_posteriors(post, pad_idx, classes, fast)
    np.testing.assert_allclose(out, reference_clean(post, pad_idx, classes, fast), atol=1e-6)
    assert out.shape == (18, 18, 18, 6)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-5)


def test_clean_posteriors_removes_small_islands():
    post = np.zeros((12, 12, 12, 3), np.float32)
    post[..., 0] = 1
    post[2:8, 2:8, 2:8] = [0.1, 0.9, 0.0]     # structure 1, main blob
    post[3:5, 3:5, 9:11] = [0.1, 0.0, 0.9]   # structure 2, separate blob (not touching)
    post[10, 10, 10] = [0.1, 0.9, 0.0]       # island: removed by the brain mask
    pad = np.array([0, 0, 0, 12, 12, 12])
    out = clean_posteriors(post, pad, np.array([0, 1, 2]), fast=False)
    assert out[10, 10, 10, 1] == 0 and out[10, 10, 10, 0] == 1
    assert out[4, 4, 4, 1] == pytest.approx(0.9)
    assert out[4, 4, 9, 2] == 0  # structure 2 lies outside the brain's largest component


def test_parcellate_and_volumes():
    tables = small_tables()
    seg = np.array([[[0, 3, 42, 2]]], dtype=np.int32)
    parc_post = np.zeros((1, 1, 4, 3), np.float32)
    parc_post[..., :] = [0.2, 0.5, 0.3]
    seg2, parc = parcellate(seg, parc_post, np.array([0, 0, 0, 1, 1, 4]), tables.parcellation)
    np.testing.assert_array_equal(seg2, [[[0, 1001, 1001, 2]]])
    np.testing.assert_allclose(parc[0, 0, 1], [0, 0.625, 0.375])
    np.testing.assert_allclose(parc[0, 0, 0], [1 / 1.8, 0.5 / 1.8, 0.3 / 1.8])

    post = np.zeros((1, 1, 4, 6), np.float32)
    post[0, 0, :, :] = np.eye(6)[[0, 2, 5, 1]]
    post[0, 0, 3] = [0, 0.5, 0, 0, 0.5, 0]
    vol = compute_volumes(post, tables.segmentation, np.array([1.0, 1.0, 2.0]), v1=True)
    np.testing.assert_allclose(vol, [1.0, 2.0, 0, 1.0, 2.0])  # 2 mm^3 voxels
    vol2 = compute_volumes(post, tables.segmentation, np.ones(3), v1=False, parc_posteriors=parc)
    # total first; the parcellation is rescaled to volumes[idx(3), idx(42)] - 1 of that list
    # (labels 2 and 41 here: 0.5 + 0.5), as the original does
    assert vol2[0] == 3.0
    np.testing.assert_allclose(vol2[1:6], [0.5, 1.0, 0, 0.5, 1.0])
    parc_sums = parc[..., 1:].sum(axis=(0, 1, 2))
    np.testing.assert_allclose(vol2[6:], np.round(parc_sums / parc_sums.sum() * 1.0, 3))
    vol1 = compute_volumes(post, tables.segmentation, np.ones(3), v1=True, parc_posteriors=parc)
    np.testing.assert_allclose(vol1[5:], np.round(parc_sums / parc_sums.sum() * 2.0, 3))


def test_postprocess_undoes_crop_pad_and_alignment():
    rng = np.random.default_rng(0)
    tables = small_tables()
    shape = (40, 30, 36)
    lia = np.array([[-1, 0, 0, 10], [0, 0, 1, -5], [0, -1, 0, 7], [0, 0, 0, 1.0]])
    truth = np.zeros(shape, np.int64)
    truth[8:30, 5:25, 6:30] = 1
    truth[12:20, 10:20, 10:20] = 3
    scan = Scan("s.nii.gz", rng.uniform(1, 2, shape), lia, None, np.ones(3))
    prep = preprocess(scan, crop=[32, 64, 64])
    # posteriors that are the one-hot of the truth, placed where preprocess put the scan
    ras_truth = prep.alignment.to_ras(truth)
    c = prep.crop_idx
    window = ras_truth[c[0]:c[3], c[1]:c[4], c[2]:c[5]]
    p = prep.pad_idx
    padded = np.zeros(prep.padded_shape, np.int64)
    padded[p[0]:p[3], p[1]:p[4], p[2]:p[5]] = window
    post = np.eye(6, dtype=np.float32)[padded] * 0.9 + 0.1 / 6
    result = postprocess(post, prep, tables, fast=False, v1=False)
    expected = np.zeros(shape, np.int64)
    crop_mask = np.zeros(prep.aligned_shape, bool)
    crop_mask[c[0]:c[3], c[1]:c[4], c[2]:c[5]] = True
    crop_mask = prep.alignment.from_ras(crop_mask)
    expected[crop_mask] = tables.segmentation[truth[crop_mask]]
    np.testing.assert_array_equal(result.seg, expected)
    assert result.seg.dtype == np.int32 and result.posteriors.shape == shape + (6,)
    np.testing.assert_allclose(result.posteriors[~crop_mask, 0], 1)
    np.testing.assert_array_equal(result.affine, lia)


@pytest.mark.parametrize("view", ["plain", "flipped", "transposed", "3d"])
def test_fortran_copy_is_a_column_major_copy_of_any_view(view):
    # sizes that are not multiples of the block, so every axis has a partial last block
    shape = tuple(2 * b + 3 for b in FORTRAN_BLOCK) + (5,)
    volume = np.random.default_rng(1).random(shape, dtype=np.float32)
    volume = {"plain": volume, "flipped": volume[::-1, :, ::-2],
              "transposed": volume.transpose(2, 0, 1, 3), "3d": volume[..., 2]}[view]
    copied = fortran_copy(volume)
    assert copied.flags.f_contiguous and not np.shares_memory(copied, volume)
    np.testing.assert_array_equal(copied, volume)


def test_original_sums_accumulate_in_float32_voxel_after_voxel():
    """Regression (whole-run parity, MNI T1): the original's volumes are float32 numpy sums over
    (X, Y, Z) that add one voxel after another; on a whole brain they are off by up to ~1 %
    (CSF 521698 instead of 528397 mm^3), and the CSV must match them."""
    post = np.zeros((104, 102, 101, 3), np.float32)
    post[2:102, 1:101, 0:100] = [0.8, 0.1, 0.1]
    pad = np.array([2, 1, 0, 102, 101, 100])
    sums = original_sums(post, pad, np.float32)
    assert sums.dtype == np.float32
    sequential = np.add.accumulate(post[2:102, 1:101, 0:100, 1:].reshape(-1, 2), axis=0)[-1]
    np.testing.assert_array_equal(sums, sequential)       # bit for bit
    assert abs(float(sums[0]) - 1e5) > 500                # far from exact: 100958.34
    exact = original_sums(post, pad, np.float64)
    assert exact.dtype == np.float64 and abs(exact[0] - 1e6 * np.float64(np.float32(0.1))) < 1e-6
    assert volume_dtype(cropped=False) == np.float32 and volume_dtype(cropped=True) == np.float64


def test_original_sums_follow_the_alignment_view():
    """The order of the additions, hence the float32 result, depends on the view the original
    sums (the posteriors after undoing the RAS alignment)."""
    rng = np.random.default_rng(0)
    post = rng.random((30, 40, 50, 4), dtype=np.float32)
    pad = np.array([1, 2, 3, 29, 38, 47])
    lia = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    alignment = RasAlignment.from_affine(lia)
    region = post[1:29, 2:38, 3:47]
    expected = np.sum(alignment.from_ras(region)[..., 1:], axis=(0, 1, 2))
    np.testing.assert_array_equal(original_sums(post, pad, np.float32, alignment), expected)
    np.testing.assert_array_equal(original_sums(post, pad, np.float32),
                                  np.sum(region[..., 1:], axis=(0, 1, 2)))


def test_assemble_volumes_keeps_the_original_dtypes():
    """numpy 1.23 (the original's) keeps an array's dtype when it is operated with a scalar."""
    labels = small_tables().segmentation
    sums = np.array([1.5, 2.25, 3.0, 4.0, 0.125], np.float32)
    vol = assemble_volumes(sums, labels, np.array([1.0, 1.0, 1.0]), v1=False)
    assert vol.dtype == np.float32 and vol[0] == np.float32(10.875)
    parc = np.array([1.0, 3.0], np.float32)
    vol = assemble_volumes(sums.astype(np.float64), labels, np.ones(3), v1=False, parc_sums=parc)
    # float64 volumes, float32 parcellation volumes (rescaled in float32), then float64
    assert vol.dtype == np.float64
    cortex = np.float32(sums[0] + sums[3])  # entries (index of 3, 42) - 1 of [total, ...]
    np.testing.assert_array_equal(vol[-2:], np.around((parc / np.float32(4) * cortex).astype(np.float64), 3))
    # the voxel volume is the float32 product of the header's voxel sizes
    vol = assemble_volumes(sums.astype(np.float64), labels, np.array([0.9, 0.9, 1.2]), v1=True)
    np.testing.assert_array_equal(vol, np.around(sums.astype(np.float64) * np.float64(np.prod(np.float32([0.9, 0.9, 1.2]))), 3))
