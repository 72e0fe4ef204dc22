"""Reading and atomic writing of scans (synthseg_jax/scans.py)."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from synthseg_jax.scans import AtomicWriter, ScanError, load_scan


def save_image(data, affine, header, path, dtype):
    with AtomicWriter() as writer:
        writer.image(data, affine, header, path, dtype)
        writer.commit()


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mgz"])
def test_save_and_load_round_trip(tmp_path, ext):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60, (5, 6, 7)).astype(np.int32)
    aff = np.array([[0, -1.0, 0, 5], [0, 0, 1.0, -3], [-1.0, 0, 0, 2], [0, 0, 0, 1]])  # permuted, flipped
    path = str(tmp_path / "sub" / f"seg{ext}")
    save_image(data, aff, None, path, dtype=np.int32)
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.get_data_dtype().newbyteorder("=") == np.int32
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert os.listdir(tmp_path / "sub") == [f"seg{ext}"]  # no temporary left behind


@pytest.mark.parametrize("ext", [".nii", ".mgz"])
def test_written_bytes_do_not_depend_on_the_arrays_layout(tmp_path, ext):
    # to_scan_grid hands the writer column-major posteriors; the files must be the same
    data = np.random.default_rng(2).random((6, 7, 8, 3), dtype=np.float32)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = [str(tmp_path / f"{name}{ext}") for name in ("c", "f")]
    save_image(np.ascontiguousarray(data), aff, None, paths[0], dtype=np.float32)
    save_image(np.asfortranarray(data), aff, None, paths[1], dtype=np.float32)
    read = [open(path, "rb").read() for path in paths]
    if ext == ".mgz":
        read = [gzip.decompress(content) for content in read]
    assert read[0] == read[1]
    np.testing.assert_array_equal(np.asarray(nib.load(paths[1]).dataobj), data)


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


def test_load_scan_squeezes_and_averages_channels_or_keeps_the_first(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8, 1))
    scan = load_scan(write_nifti(tmp_path / "a.nii.gz", data))
    assert scan.data.shape == (6, 7, 8) and scan.n_channels == 1
    data = rng.normal(size=(6, 7, 8, 3))
    scan = load_scan(write_nifti(tmp_path / "b.nii.gz", data))
    assert scan.n_channels == 3
    np.testing.assert_allclose(scan.data, data.mean(axis=-1))          # FreeSurfer 8
    scan = load_scan(write_nifti(tmp_path / "b.nii.gz", data), channels="first")
    np.testing.assert_allclose(scan.data, data[..., 0])                # FreeSurfer 7.3.2


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


def test_non_finite_voxels_become_background(tmp_path):
    """Masked and SPM-normalised images carry NaN outside the brain (issue 19, item 9)."""
    data = np.random.default_rng(0).uniform(5, 10, size=(6, 7, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, :2] = [np.inf, -np.inf]
    scan = load_scan(write_nifti(tmp_path / "nan.nii.gz", data))
    assert scan.non_finite == 3
    finite = np.isfinite(data)
    np.testing.assert_array_equal(scan.data[finite], data[finite])
    assert np.all(scan.data[~finite] == data[finite].min())


def test_load_scan_rejects_bad_values_and_files(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    with pytest.raises(ScanError, match="only NaN or infinite values"):
        load_scan(write_nifti(tmp_path / "nan.nii.gz", np.full((6, 7, 8), np.nan, np.float32)))
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
