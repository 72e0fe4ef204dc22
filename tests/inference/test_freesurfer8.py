"""FreeSurfer 8's additions to mri_synthseg's command line: --autocrop, --addctab/--noaddctab,
--model, .npz inputs and multi-channel inputs averaged (7.3.2's first channel behind channels=first)."""

import gzip
import io
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from synthseg_jax.inference.colour_table import colour_table, read_mgh_colour_table
from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.pipeline import run
from synthseg_jax.inference.preprocess import head_box, preprocess
from synthseg_jax.scans import ScanError, load_scan

BIN = os.path.dirname(sys.executable)
FAST = dict(min_pad=32, qc_crop_size=16, progress=False, fast=True)


def smooth(shape, seed):
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.uniform(size=shape), 2) * 1000).astype(np.float32)


def call(**kw):
    out, err = io.StringIO(), io.StringIO()
    code = run(PredictOptions.create(**{**FAST, **kw}), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def seg_of(path):
    return np.asarray(nib.load(path).dataobj) if not str(path).endswith(".npz") else \
        np.load(path)["vol_data"]


# --- autocrop ---------------------------------------------------------------------------------

def test_head_box_follows_freesurfer8():
    volume = np.zeros((100, 120, 90))
    volume[10:50, 20:90, 5:40] = 1.0
    # bounding box 10..49, 20..89, 5..39 -> extent + 2 = 42, 72, 37 -> windows 64, 96, 64, centred
    # on the box, clipped at zero and at the volume's end
    assert head_box(volume, 32).tolist() == [0, 8, 0, 64, 104, 64]
    assert head_box(np.zeros((40, 40, 40)), 32) is None


def test_autocrop_shrinks_the_network_input_and_pastes_back(tmp_path, models_dir, labels_dir):
    data = np.zeros((96, 96, 96), np.float32)
    data[30:60, 35:65, 30:62] = smooth((30, 30, 32), 0) + 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "head.nii.gz"))
    scan = load_scan(str(tmp_path / "head.nii.gz"))
    full, cropped = preprocess(scan, min_pad=32), preprocess(scan, min_pad=32, autocrop=True)
    # box extents 30, 30, 32, plus 2 -> windows 32, 32, 64
    assert full.image.shape == (96, 96, 96) and cropped.image.shape == (32, 32, 64)
    code, _, err = call(i=str(tmp_path / "head.nii.gz"), o=str(tmp_path / "seg.nii.gz"),
                        autocrop=True, models_dir=models_dir, labels_dir=labels_dir)
    assert code == 0, err
    seg = seg_of(tmp_path / "seg.nii.gz")
    assert seg.shape == (96, 96, 96) and not seg[:10].any()


def test_autocrop_with_crop_is_refused():
    with pytest.raises(UsageError, match="autocrop cannot be combined with crop"):
        PredictOptions.create(autocrop=True, crop=96)


# --- colour table -----------------------------------------------------------------------------

def test_addctab_embeds_freesurfers_table_in_mgz_and_writes_ctab_beside_nifti(
        tmp_path, models_dir, labels_dir, tables, monkeypatch):
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    nib.save(nib.Nifti1Image(smooth((30, 28, 32), 1), np.eye(4)), str(tmp_path / "s.nii.gz"))
    common = dict(i=str(tmp_path / "s.nii.gz"), crop=32, models_dir=models_dir, labels_dir=labels_dir)
    assert call(o=str(tmp_path / "plain.mgz"), **common)[0] == 0
    assert call(o=str(tmp_path / "tab.mgz"), addctab=True, **common)[0] == 0
    assert call(o=str(tmp_path / "tab.nii.gz"), addctab=True, **common)[0] == 0

    plain = gzip.decompress((tmp_path / "plain.mgz").read_bytes())
    tagged = gzip.decompress((tmp_path / "tab.mgz").read_bytes())
    assert tagged.startswith(plain)                       # header, voxels and footer unchanged
    entries = read_mgh_colour_table(tagged[len(plain):])
    assert entries == colour_table(tables, parc=False)
    assert {e.index for e in entries} == set(tables.segmentation.tolist())
    assert np.array_equal(seg_of(tmp_path / "tab.mgz"), seg_of(tmp_path / "plain.mgz"))
    lines = (tmp_path / "tab.ctab").read_text().splitlines()
    assert len(lines) == len(entries) and lines[2].split()[0] == str(entries[2].index)
    assert not os.path.exists(tmp_path / "plain.ctab")


def test_noaddctab_flag_turns_it_off():
    from synthseg_jax import cli

    flags = vars(cli.build_parser().parse_args(["--i", "a.nii", "--o", "b.mgz", "--addctab",
                                                "--noaddctab"]))
    assert PredictOptions.from_mapping(cli.options_from_flags(flags)).addctab is False


# --- model ------------------------------------------------------------------------------------

def test_model_replaces_the_segmenter(tmp_path, models_dir, labels_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(os.path.join(models_dir, "synthseg_2.0.h5"), elsewhere / "mine.h5")
    empty = tmp_path / "empty_models"
    empty.mkdir()
    nib.save(nib.Nifti1Image(smooth((30, 28, 32), 2), np.eye(4)), str(tmp_path / "s.nii.gz"))
    common = dict(i=str(tmp_path / "s.nii.gz"), crop=32, labels_dir=labels_dir)
    code, out, err = call(o=str(tmp_path / "a.nii.gz"), model_file=str(elsewhere / "mine.h5"),
                          models_dir=str(empty), **common)
    assert code == 0, err
    assert f"segmenter {elsewhere / 'mine.h5'}" in out
    assert call(o=str(tmp_path / "b.nii.gz"), models_dir=models_dir, **common)[0] == 0
    assert np.array_equal(seg_of(tmp_path / "a.nii.gz"), seg_of(tmp_path / "b.nii.gz"))
    code, _, err = call(o=str(tmp_path / "c.nii.gz"), model_file=str(tmp_path / "missing.h5"),
                        models_dir=models_dir, **common)
    assert code == 1 and err.strip() == f"ERROR {tmp_path / 'missing.h5'}: model file not found"


@pytest.mark.parametrize("values, message", [
    (dict(model_file="m.h5", robust=True), r"model_file \(--model\) cannot be combined with robust"),
    (dict(model_file="m.pt"), "model_file: expected a Keras .h5 weight file"),
    (dict(channels="median"), "channels: expected one of mean, first"),
])
def test_bad_freesurfer8_options(values, message):
    with pytest.raises(UsageError, match=message):
        PredictOptions.create(**values)


# --- .npz and channels ------------------------------------------------------------------------

def test_npz_input_and_output_follow_freesurfer8(tmp_path, models_dir, labels_dir):
    volume = smooth((30, 28, 32), 3)
    np.savez_compressed(tmp_path / "s.npz", vol_data=volume)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "s.nii.gz"))
    common = dict(crop=32, models_dir=models_dir, labels_dir=labels_dir)
    code, _, err = call(i=str(tmp_path / "s.npz"), o=str(tmp_path / "out"), **common)
    assert code == 0, err
    assert call(i=str(tmp_path / "s.nii.gz"), o=str(tmp_path / "ref.nii.gz"), **common)[0] == 0
    assert np.array_equal(seg_of(tmp_path / "out" / "s_synthseg.npz"), seg_of(tmp_path / "ref.nii.gz"))
    np.savez(tmp_path / "bad.npz", image=volume)
    with pytest.raises(ScanError, match=r"bad.npz: no 'vol_data' array in this .npz \(it holds image\)"):
        load_scan(str(tmp_path / "bad.npz"))


def test_channels_are_averaged_unless_channels_first(tmp_path, models_dir, labels_dir):
    channels = np.stack([smooth((30, 28, 32), s) for s in (4, 5, 6)], axis=-1)
    for name, data in (("multi", channels), ("first", channels[..., 0]),
                       ("mean", channels.astype(np.float64).mean(-1))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    common = dict(crop=32, models_dir=models_dir, labels_dir=labels_dir)
    code, _, err = call(i=str(tmp_path / "multi.nii.gz"), o=str(tmp_path / "m_mean.nii.gz"), **common)
    assert code == 0 and "3 channels, their mean is used" in err
    code, _, err = call(i=str(tmp_path / "multi.nii.gz"), o=str(tmp_path / "m_first.nii.gz"),
                        channels="first", **common)
    assert code == 0 and "3 channels, only the first is used" in err
    for name in ("mean", "first"):
        assert call(i=str(tmp_path / f"{name}.nii.gz"), o=str(tmp_path / f"{name}_seg.nii.gz"),
                    **common)[0] == 0
    assert np.array_equal(seg_of(tmp_path / "m_mean.nii.gz"), seg_of(tmp_path / "mean_seg.nii.gz"))
    assert np.array_equal(seg_of(tmp_path / "m_first.nii.gz"), seg_of(tmp_path / "first_seg.nii.gz"))
    assert not np.array_equal(seg_of(tmp_path / "m_mean.nii.gz"), seg_of(tmp_path / "m_first.nii.gz"))


def test_console_script_takes_freesurfer8_flags(tmp_path, models_dir, labels_dir):
    nib.save(nib.Nifti1Image(smooth((40, 40, 40), 7), np.eye(4)), str(tmp_path / "s.nii.gz"))
    cmd = [os.path.join(BIN, "mri_synthseg_jax"), "--i", str(tmp_path / "s.nii.gz"),
           "--o", str(tmp_path / "seg.mgz"), "--autocrop", "--addctab", "--fast", "--cpu",
           "--model", os.path.join(models_dir, "synthseg_2.0.h5"), "--models_dir", models_dir,
           "--labels_dir", labels_dir, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert nib.load(tmp_path / "seg.mgz").shape == (40, 40, 40)
    proc = subprocess.run(cmd + ["--crop", "32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR autocrop cannot be combined with crop: give one of them"
