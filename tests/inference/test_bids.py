"""BIDS in, BIDS-Derivatives out, through both real command lines, on a tiny synthetic dataset."""

import csv
import fnmatch
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synthseg_jax.inference.bids import derivative_stem, select_subjects
from synthseg_jax.inference.options import PredictOptions, UsageError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
# sub-01 has one session with a T1w and two T2w runs (names must stay apart); sub-02 a 1.5 mm T1w
# without sessions (its segmentation must come back on that grid, not 1 mm).
SCANS = {"sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": 1.0,
         "sub-01/ses-1/anat/sub-01_ses-1_run-1_T2w.nii.gz": 1.0,
         "sub-01/ses-1/anat/sub-01_ses-1_run-2_T2w.nii.gz": 1.0,
         "sub-02/anat/sub-02_T1w.nii.gz": 1.5}
SMALL = ["--crop", "32", "--fast", "--threads", "1", "--cpu", "--no-progress"]


def make_dataset(root):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    with open(os.path.join(root, "dataset_description.json"), "w") as handle:
        json.dump({"Name": "tiny", "BIDSVersion": "1.10.0"}, handle)
    for rel, voxel in SCANS.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        shape = (22, 20, 21) if voxel > 1 else (30, 28, 32)
        affine = np.diag([voxel, voxel, voxel, 1.0])
        nib.save(nib.Nifti1Image(rng.uniform(size=shape).astype(np.float32), affine),
                 os.path.join(root, rel))
    return str(root)


def derivative_regexes():
    """bidsschematools' own path rules for derivative (and common) files."""
    from bidsschematools import rules, schema

    loaded = schema.load_schema()
    regexes = []
    for group in (loaded.rules.files.common, loaded.rules.files.deriv):
        regexes += [r["regex"] for r in rules.regexify_filename_rules(group, loaded, level=2)]
    return [re.compile(r) for r in regexes]


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def run(cmd, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)


def test_bids_app_form_writes_valid_derivatives(tmp_path, models_dir, labels_dir):
    raw = make_dataset(tmp_path / "raw")
    out = tmp_path / "derivatives" / "synthseg"
    proc = run([os.path.join(BIN, "mri_synthseg_jax"), raw, str(out), "participant",
                "--suffix", "T1w", "T2w", "--models_dir", models_dir, "--labels_dir", labels_dir,
                *SMALL])
    assert proc.returncode == 0, proc.stderr

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "synthseg-jax"
    assert description["GeneratedBy"][0]["Version"]

    written = files_under(out)
    ignored = [p for p in (out / ".bidsignore").read_text().split() if p]
    regexes = derivative_regexes()
    checked = [p for p in written if p != ".bidsignore"
               and not any(fnmatch.fnmatch(os.path.basename(p), pat) for pat in ignored)]
    invalid = [p for p in checked if not any(r.fullmatch(p) for r in regexes)]
    assert not invalid, invalid
    segs = [p for p in written if p.endswith("_dseg.nii.gz")]
    assert len(segs) == len(SCANS) == len(set(segs))

    for rel in SCANS:
        suffix = rel.split("_")[-1].split(".")[0]
        stem = str(out / derivative_stem(rel, suffix))
        source = nib.load(os.path.join(raw, rel))
        seg = nib.load(f"{stem}_dseg.nii.gz")
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        sidecar = json.loads(open(f"{stem}_dseg.json").read())
        assert sidecar["Sources"] == [f"bids:raw:{rel}"]
        assert sidecar["SynthSegOptions"]["fast"] is True
        with open(f"{stem}_dseg.tsv") as handle:
            lut = list(csv.DictReader(handle, delimiter="\t"))
        assert {int(r["index"]) for r in lut} >= set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert all(re.fullmatch("#[0-9a-f]{6}", r["color"]) for r in lut)
        assert os.path.isfile(f"{stem}_volumes.csv")

    with open(out / "synthseg_volumes.csv") as handle:
        subjects = [row[0] for row in csv.reader(handle)][1:]
    assert sorted(subjects) == sorted(os.path.basename(r).split(".")[0] for r in SCANS)


def test_hydra_bids_unknown_label_is_one_line_and_the_rest_go_on(tmp_path, models_dir, labels_dir):
    raw = make_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    proc = run([sys.executable, os.path.join(REPO, "predict.py"), f"bids={raw}", f"o={out}",
                "participant_label=['02','07']", f"models_dir={models_dir}",
                f"labels_dir={labels_dir}", "crop=32", "fast=true", "threads=1", "device=cpu",
                "progress=false", f"qc={tmp_path}/cohort_qc.csv", "qc_crop_size=16"], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert errors and all("participant label 07: no sub-07" in e for e in errors)
    assert "Traceback" not in proc.stderr
    stem = out / "sub-02" / "anat" / "sub-02_seg-synthseg_desc-T1w"
    assert os.path.isfile(f"{stem}_dseg.nii.gz")
    assert not os.path.exists(out / "sub-01")
    with open(f"{stem}_qc.csv") as handle:
        scan_qc = list(csv.reader(handle))
    with open(tmp_path / "cohort_qc.csv") as handle:
        assert list(csv.reader(handle))[1:] == scan_qc[1:] and scan_qc[1][0] == "sub-02_T1w"
    assert os.path.isfile(out / "synthseg_volumes.csv")


@pytest.mark.parametrize("layout, message", [
    ("empty", "not a BIDS dataset (no dataset_description.json)"),
    ("no_subjects", "not a BIDS dataset (no sub-* subject folder)"),
])
def test_not_a_bids_dataset_is_one_line(tmp_path, layout, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    if layout == "no_subjects":
        (raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    proc = run([os.path.join(BIN, "mri_synthseg_jax"), str(raw), str(tmp_path / "out"),
                "participant", "--cpu"])
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"ERROR {raw}: {message}"
    assert not os.path.exists(tmp_path / "out")


def test_names_keep_every_entity():
    assert (derivative_stem("sub-01/ses-1/anat/sub-01_ses-1_acq-fast_run-01_T2w.nii.gz", "T2w")
            == "sub-01/ses-1/anat/sub-01_ses-1_acq-fast_run-01_seg-synthseg_desc-T2w")


def test_participant_labels():
    assert select_subjects(["01", "02"], ("sub-02", "02")) == (["02"], [])
    subjects, errors = select_subjects(["01", "02"], ("01", "03"))
    assert subjects == ["01"] and len(errors) == 1 and "03" in errors[0]
    with pytest.raises(UsageError):
        derivative_stem("sub-01/anat/sub-01_T1w.nii.gz", "T2w")


@pytest.mark.parametrize("extra, message", [
    (dict(overlay="x"), "with bids, o is the derivatives folder; overlay cannot be written in BIDS mode"),
    (dict(suffix=["FLAIR"]), "no anatomical FLAIR scan (.nii, .nii.gz) for sub-01, sub-02"),
    (dict(participant_label=["09"]), "participant label 09: no sub-09 in the dataset (known: 01, 02)"),
])
def test_bids_plan_refusals(tmp_path, extra, message):
    from synthseg_jax.inference.bids import plan_bids

    raw = make_dataset(tmp_path / "raw")
    with pytest.raises(UsageError) as err:
        plan_bids(PredictOptions.create(bids=raw, o=str(tmp_path / "out"), **extra))
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["B", "O"], "the BIDS-App form needs BIDS_DIR OUT_DIR participant"),
    (["B", "O", "group"], "analysis level: only participant is supported"),
    (["B", "O", "participant", "--o", "x"], "takes its output folder as OUT_DIR, not --o"),
    (["B", "O", "participant", "--i", "x.nii"], "give either i"),
])
def test_bids_app_form_refusals(argv, message, capsys):
    from synthseg_jax import cli

    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR") and message in err and len(err.splitlines()) == 1
