import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synthseg_jax import cli
from synthseg_jax.inference import pipeline, runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@pytest.fixture
def captured(monkeypatch):
    calls = {}
    monkeypatch.setattr(runtime, "configure_runtime",
                        lambda threads, device: calls.update(threads=threads, device=device) or [])
    monkeypatch.setattr(pipeline, "run", lambda opts: calls.update(opts=opts) or 0)
    monkeypatch.delenv("SYNTHSEG_JAX_MODELS", raising=False)
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    return calls


def test_original_flags_map_to_options(captured):
    argv = ["--i", "in.nii.gz", "--o", "out.nii.gz", "--parc", "--robust", "--fast", "--vol", "v.csv",
            "--qc", "q.csv", "--post", "p.nii.gz", "--resample", "r.nii.gz", "--crop", "160", "192",
            "160", "--threads", "2", "--cpu", "--ct", "--keepgeom"]
    assert cli.main(argv) == 0
    o = captured["opts"]
    assert o.i == "in.nii.gz"
    assert o.outputs == {"o": "out.nii.gz", "vol": "v.csv", "qc": "q.csv", "post": "p.nii.gz",
                         "resample": "r.nii.gz"}
    assert o.parc and o.robust and o.fast and o.ct and o.keepgeom and not o.v1
    assert o.crop == (160, 192, 160) and o.models_dir is None
    assert captured["threads"] == 2 and captured["device"] == "cpu"


def test_freesurfer8_and_bids_app_flags_map_to_options(captured):
    argv = ["--i", "in.npz", "--o", "out.mgz", "--autocrop", "--addctab", "--model", "m.h5",
            "--channels", "first"]
    assert cli.main(argv) == 0
    o = captured["opts"]
    assert o.autocrop and o.addctab and o.model_file == "m.h5" and o.channels == "first"
    assert cli.main(["bids", "out", "participant", "--participant-label", "01", "02",
                     "--suffix", "T1w", "FLAIR", "--fast"]) == 0
    o = captured["opts"]
    assert o.bids == "bids" and o.outputs == {"o": "out"} and o.fast
    assert o.participant_label == ("01", "02") and o.suffix == ("T1w", "FLAIR")
    assert cli.main(["--i", "a.nii", "--o", "b.nii"]) == 0
    o = captured["opts"]
    assert o.bids is None and not o.autocrop and not o.addctab and o.channels == "mean"
    assert o.suffix == ("T1w",)


def test_defaults_follow_the_original(captured, monkeypatch, tmp_path):
    assert cli.main(["--i", "a.nii", "--o", "b.nii", "--v1", "--crop", "96"]) == 0
    assert captured["threads"] == 1 and captured["device"] == "auto"
    assert captured["opts"].v1 and captured["opts"].crop == (96, 96, 96)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "synthseg_2.0.h5").write_bytes(b"")
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path))
    cli.main(["--i", "a.nii", "--o", "b.nii"])
    assert captured["opts"].models_dir == str(tmp_path / "models")


def test_report_flag(captured):
    assert cli.main(["--i", "scans/", "--o", "segs/", "--report", "run.html"]) == 0
    assert captured["opts"].output("report") == "run.html"


def test_no_arguments_prints_help(capsys):
    assert cli.main([]) == 1
    assert "--keepgeom" in capsys.readouterr().out


def test_console_script_end_to_end(tmp_path, models_dir, labels_dir):
    rng = np.random.default_rng(0)
    data = rng.uniform(size=(30, 28, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "s.nii.gz"))
    cmd = [os.path.join(BIN, "mri_synthseg_jax"), "--i", str(tmp_path / "s.nii.gz"),
           "--o", str(tmp_path / "out"), "--vol", str(tmp_path / "v.csv"), "--crop", "32", "--fast",
           "--threads", "1", "--cpu", "--models_dir", models_dir, "--labels_dir", labels_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(tmp_path / "out" / "s_synthseg.nii.gz")
    assert "compiling SynthSeg 2.0 (fast)" in proc.stderr and "using 1 thread" in proc.stdout


def test_hydra_entry_reports_one_line(tmp_path, models_dir, labels_dir):
    cmd = [sys.executable, os.path.join(REPO, "predict.py"), f"i={tmp_path}/missing.nii.gz",
           f"o={tmp_path}/o.nii.gz", f"models_dir={models_dir}", f"labels_dir={labels_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"ERROR {tmp_path}/missing.nii.gz: file not found"
    assert os.listdir(tmp_path) == []  # no Hydra output folder, no partial output
