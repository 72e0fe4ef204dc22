import numpy as np
import pytest

from synthseg_jax.scans import Scan
from synthseg_jax.inference.preprocess import (
    as_three,
    centre_crop_indices,
    pad_indices,
    preprocess,
    rescale_percentiles,
    round_up,
)


def make_scan(data, affine=None, zooms=None):
    affine = np.eye(4) if affine is None else affine
    if zooms is None:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return Scan(path="x.nii.gz", data=np.asarray(data, dtype=np.float64), affine=affine,
                header=None, zooms=np.asarray(zooms))


def test_helpers():
    assert round_up(33, 32) == 64 and round_up(64, 32) == 64 and round_up(1, 32) == 32
    assert as_three(160) == (160, 160, 160) and as_three([1, 2, 3]) == (1, 2, 3)
    assert as_three([96]) == (96, 96, 96) and as_three(None) is None
    with pytest.raises(ValueError):
        as_three([1, 2])
    np.testing.assert_array_equal(centre_crop_indices((100, 50, 64), (64, 64, 64)), [18, 0, 0, 82, 50, 64])
    idx, widths = pad_indices((30, 64, 65), (64, 64, 96))
    np.testing.assert_array_equal(idx, [17, 0, 15, 47, 64, 80])
    assert widths == [(17, 17), (0, 0), (15, 16)]


def test_rescale_percentiles():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 20, 20))
    out = rescale_percentiles(vol)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    np.testing.assert_allclose(out, (np.clip(vol, lo, hi) - lo) / (hi - lo))
    assert out.min() == 0 and out.max() == 1
    np.testing.assert_array_equal(rescale_percentiles(np.ones((4, 4, 4))), 0)


def test_default_padding_to_128_and_ras_alignment():
    rng = np.random.default_rng(1)
    data = rng.uniform(size=(40, 30, 50))
    lia = np.array([[-1, 0, 0, 10], [0, 0, 1, -5], [0, -1, 0, 7], [0, 0, 0, 1.0]])
    prep = preprocess(make_scan(data, lia))
    assert prep.padded_shape == (128, 128, 128)
    assert prep.aligned_shape == (40, 50, 30)
    assert prep.resampled is None and prep.crop_idx is None
    np.testing.assert_array_equal(prep.pad_idx, [44, 39, 49, 84, 89, 79])
    inner = prep.image[44:84, 39:89, 49:79]
    expected = rescale_percentiles(prep.alignment.to_ras(data)).astype(np.float32)
    np.testing.assert_array_equal(inner, expected)
    assert prep.image.dtype == np.float32
    assert np.count_nonzero(prep.image) == np.count_nonzero(inner)


def test_crop_sets_minimum_padding_and_ct_clipping():
    rng = np.random.default_rng(2)
    data = rng.uniform(-100, 200, size=(70, 40, 64))
    prep = preprocess(make_scan(data), crop=[40, 33, 64], ct=True)
    # crop sizes are rounded up to multiples of 32: 64, 64, 64 -> window no larger than the volume
    np.testing.assert_array_equal(prep.crop_idx, [3, 0, 0, 67, 40, 64])
    assert prep.padded_shape == (64, 64, 64)
    window = np.clip(data[3:67], 0, 80)
    np.testing.assert_allclose(prep.image[:, 12:52], rescale_percentiles(window), atol=1e-6)


def test_anisotropic_scan_is_resampled():
    data = np.random.default_rng(3).uniform(size=(32, 32, 12))
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    prep = preprocess(make_scan(data, aff), crop=32)
    assert prep.resampled.shape == (32, 32, 36)
    np.testing.assert_array_equal(prep.voxel_size, [1, 1, 1])
    np.testing.assert_allclose(prep.affine[:3, :3], np.eye(3))
    assert prep.input_shape == (32, 32, 12)
