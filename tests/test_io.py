import os

import nibabel as nib
import numpy as np
import pytest

from synthseg_jax.io import (
    AtomicWriter,
    RasAlignment,
    ScanError,
    load_scan,
    needs_resampling,
    ras_axes,
    resample_grid,
    resample_like,
    resample_to_voxel_size,
    save_image,
)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def permuted_affine(rng, zooms=(1.0, 1.0, 1.0), tilt=0.2):
    """A voxel->world affine made of an axis permutation, flips, scaling, a small rotation."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], 3)
    m = np.zeros((3, 3))
    m[perm, np.arange(3)] = signs * np.asarray(zooms)
    small = np.eye(3) + tilt * rng.uniform(-1, 1, (3, 3))
    aff = np.eye(4)
    aff[:3, :3] = small @ m
    aff[:3, 3] = rng.uniform(-50, 50, 3)
    return aff


def world(aff, idx):
    return aff[:3, :3] @ np.asarray(idx, dtype=float) + aff[:3, 3]


@pytest.mark.parametrize("seed", range(12))
def test_ras_alignment_round_trip_and_world_coordinates(seed):
    rng = np.random.default_rng(seed)
    aff = permuted_affine(rng)
    shape = tuple(int(s) for s in rng.integers(3, 9, 3))
    vol = rng.normal(size=shape + (2,))
    al = RasAlignment.from_affine(aff)
    ras = al.to_ras(vol)
    # exact inverse
    np.testing.assert_array_equal(al.from_ras(ras), vol)
    assert ras.shape == al.ras_shape(shape + (2,))
    # the aligned affine is close to diagonal with positive diagonal
    ras_aff = al.ras_affine(aff, shape)
    assert np.all(np.diag(ras_aff)[:3] > 0)
    assert np.all(np.argmax(np.abs(ras_aff[:3, :3]), axis=0) == np.arange(3))
    # every voxel keeps its world position
    for _ in range(5):
        i = tuple(int(rng.integers(0, s)) for s in ras.shape[:3])
        j = np.linalg.solve(aff[:3, :3], world(ras_aff, i) - aff[:3, 3])
        j = tuple(int(round(v)) for v in j)
        np.testing.assert_array_equal(ras[i], vol[j])


def test_ras_axes_ties_give_a_permutation():
    # a 45 degree rotation in the x-y plane: both world axes prefer the same voxel axis
    c = np.sqrt(0.5)
    aff = np.array([[c, -c, 0, 0], [c, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    axes = ras_axes(aff)
    assert sorted(axes.tolist()) == [0, 1, 2]


def test_identity_and_lia_alignment():
    assert RasAlignment.from_affine(np.eye(4)).is_identity
    # FreeSurfer's conformed LIA orientation
    lia = np.array([[-1, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1.0]])
    al = RasAlignment.from_affine(lia)
    assert al.permutation == (0, 2, 1) and al.flips == (True, False, True)


def test_resampling_grid_and_values():
    # 1 x 1 x 3 mm: 3 slices become 9; positions as the original computes them
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    positions, new_aff = resample_grid(aff, (4, 4, 3))
    assert [len(p) for p in positions] == [4, 4, 9]
    np.testing.assert_allclose(positions[2][:3], [-1 / 3, 0, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(new_aff[:3, :3], np.eye(3))
    # the new grid's voxel k sits at the old position positions[k] (in world space)
    np.testing.assert_allclose(world(new_aff, (0, 0, 4)), world(aff, (0, 0, positions[2][4])))
    # a linear ramp along z stays a ramp (clamped at the ends)
    vol = np.broadcast_to(np.arange(3.0) * 10, (4, 4, 3)).copy()
    out, _ = resample_to_voxel_size(vol, aff)
    np.testing.assert_allclose(out[0, 0], np.clip(positions[2], 0, 2) * 10, atol=1e-9)


def test_resampling_matches_scipy_trilinear():
    from scipy.interpolate import RegularGridInterpolator

    rng = np.random.default_rng(3)
    vol = rng.normal(size=(5, 6, 4))
    aff = np.diag([1.3, 2.0, 3.0, 1.0])
    out, _ = resample_to_voxel_size(vol, aff)
    positions, _ = resample_grid(aff, vol.shape)
    clamped = [np.clip(p, 0, n - 1) for p, n in zip(positions, vol.shape)]
    interp = RegularGridInterpolator([np.arange(n) for n in vol.shape], vol)
    expected = interp(tuple(np.meshgrid(*clamped, indexing="ij")))
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_needs_resampling():
    assert not needs_resampling([1.0, 0.96, 1.04])
    assert needs_resampling([1.0, 1.0, 1.06])
    assert needs_resampling([0.9, 1.0, 1.0])


def test_resample_like_identity_and_nearest():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, (6, 6, 6))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(resample_like(seg, aff, seg.shape, aff, order=0), seg)
    # onto a 2 mm grid whose voxel centres coincide with even 1 mm voxels
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_array_equal(resample_like(seg, aff, (3, 3, 3), target, order=0), seg[::2, ::2, ::2])


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mgz"])
def test_save_and_load_round_trip(tmp_path, ext):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60, (5, 6, 7)).astype(np.int32)
    aff = permuted_affine(rng, zooms=(1.0, 1.0, 1.0), tilt=0.0)
    path = str(tmp_path / "sub" / f"seg{ext}")
    save_image(data, aff, None, path, dtype=np.int32)
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.get_data_dtype().newbyteorder("=") == np.int32
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert os.listdir(tmp_path / "sub") == [f"seg{ext}"]  # no temporary left behind


def test_scaled_input_header_does_not_scale_outputs(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4) + 1
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, 5.0)
    src = str(tmp_path / "in.nii.gz")
    nib.save(img, src)
    header = nib.load(src).header
    out = str(tmp_path / "out.nii.gz")
    save_image(data.astype(np.int32), np.eye(4), header, out, dtype=np.int32)
    np.testing.assert_array_equal(nib.load(out).get_fdata(), data)


def test_atomic_writer_discards_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicWriter() as writer:
            writer.text("a", str(tmp_path / "a.csv"))
            writer.image(np.zeros((2, 2, 2)), np.eye(4), None, str(tmp_path / "b.nii.gz"), np.float32)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def write_nifti(path, data, aff=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if aff is None else aff), str(path))
    return str(path)


def test_load_scan_squeezes_and_keeps_first_channel(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8, 1))
    scan = load_scan(write_nifti(tmp_path / "a.nii.gz", data))
    assert scan.data.shape == (6, 7, 8) and scan.n_channels == 1
    data = rng.normal(size=(6, 7, 8, 3))
    scan = load_scan(write_nifti(tmp_path / "b.nii.gz", data))
    assert scan.n_channels == 3
    np.testing.assert_allclose(scan.data, data[..., 0])


@pytest.mark.parametrize("shape,match", [
    ((6, 7), "2 dimension"),
    ((6, 7, 1), "2 dimension"),
    ((6, 7, 8, 2, 3), "5 dimensions"),
    ((6, 7, 8, 12), "4 dimensions"),
])
def test_load_scan_rejects_wrong_dimensions(tmp_path, shape, match):
    path = write_nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).normal(size=shape))
    with pytest.raises(ScanError, match=match) as info:
        load_scan(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_load_scan_rejects_bad_values_and_files(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(ScanError, match="NaN"):
        load_scan(write_nifti(tmp_path / "nan.nii.gz", data))
    with pytest.raises(ScanError, match="all zero"):
        load_scan(write_nifti(tmp_path / "zero.nii.gz", np.zeros((6, 7, 8), np.float32)))
    with pytest.raises(ScanError, match="file not found"):
        load_scan(str(tmp_path / "missing.nii.gz"))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ScanError, match="cannot read image"):
        load_scan(str(corrupt))
    good = write_nifti(tmp_path / "trunc.nii", np.ones((30, 30, 30), np.float32) * np.arange(30))
    with open(good, "r+b") as handle:
        handle.truncate(2000)
    with pytest.raises(ScanError, match="cannot read image"):
        load_scan(good)
    with pytest.raises(ScanError, match="unsupported file type"):
        load_scan(str(tmp_path / "scan.img"))
