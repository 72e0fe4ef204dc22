"""Prediction's options: defaults from configs/predict.yaml only, every value checked once."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synthseg_jax import cli
from synthseg_jax.inference.options import PredictOptions, UsageError, predict_defaults
from synthseg_jax.inference.outputs import OUTPUT_KINDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_come_from_the_yaml():
    defaults = predict_defaults()
    opts = PredictOptions.create()
    assert opts.outputs == {} and set(OUTPUT_KINDS) <= set(defaults)
    for name in ("parc", "robust", "fast", "v1", "ct", "keepgeom", "device", "progress",
                 "qc_crop_size", "threads", "models_dir"):
        assert getattr(opts, name) == defaults[name]
    assert (opts.device, opts.progress, opts.qc_crop_size) == ("auto", True, None)


@pytest.mark.parametrize("word,value", [
    (True, True), ("true", True), ("Yes", True), ("on", True), ("1", True), (1, True),
    (False, False), ("FALSE", False), ("no", False), ("off", False), ("0", False), (0, False)])
def test_boolean_words(word, value):
    assert PredictOptions.create(fast=word).fast is value


@pytest.mark.parametrize("values,message", [
    (dict(fast="maybe"), "fast: expected true or false (also yes/no, on/off, 1/0), got 'maybe'"),
    (dict(robust=2), "robust: expected true or false (also yes/no, on/off, 1/0), got 2"),
    (dict(threads="abc"), "threads: expected an integer, got 'abc'"),
    (dict(crop="abc"), "crop: expected one positive integer or three, got 'abc'"),
    (dict(crop=[160, 192]), "crop: expected one positive integer or three, got [160, 192]"),
    (dict(crop=0), "crop: expected one positive integer or three, got 0"),
    (dict(device="quantum"), "device: expected one of auto, cpu, gpu, tpu, got 'quantum'"),
    (dict(o=["a", "b"]), "o: expected a path or name, got ['a', 'b']"),
    (dict(fats=True), "unknown option(s): fats (known: i, o, "),
    (dict(threads=-1), "threads: expected a number of threads, or 0 for all cores, got -1"),
    (dict(qc_crop_size="0"), "qc_crop_size: expected a positive integer, got 0"),
    (dict(robust=True, v1=True), "robust cannot be combined with v1"),
    (dict(bids="/ds", i="a.nii"), "give either i (an image, folder or .txt list) or bids"),
    (dict(participant_label=["01"]), "participant_label needs bids=<BIDS dataset>"),
    (dict(bids="/ds", suffix=[]), "suffix: expected one or more BIDS suffixes"),
    (dict(suffix=[["T1w"]]), "suffix: expected a name or a list of names"),
    (dict(shard="3/2"), "shard: '3/2': K must be between 0 and N-1 (parts 0/2 to 1/2)"),
    (dict(shard="0/0"), "shard: '0/0': K must be between 0 and N-1"),
    (dict(shard="a/b"), "shard: expected K/N (the K-th of N parts, K from 0 to N-1, e.g. 0/4), "
                        "got 'a/b'"),
    (dict(shard="-1/2"), "shard: expected K/N"),
    (dict(shard=2), "shard: expected K/N"),
    (dict(overwrite="sometimes"), "overwrite: expected true or false"),
])
def test_bad_values_are_one_line(values, message):
    with pytest.raises(UsageError) as err:
        PredictOptions.create(**values)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_sizes_and_paths_are_normalised():
    opts = PredictOptions.create(crop="160", min_pad=[32, 48, 64], o=2024, vol="", threads="2")
    assert opts.crop == (160, 160, 160) and opts.min_pad == (32, 48, 64) and opts.threads == 2
    assert opts.outputs == {"o": "2024"}   # an empty path is no output
    assert PredictOptions.create(crop=[96]).crop == (96, 96, 96)
    assert PredictOptions.create(threads="0").threads == 0   # all cores, as null (documented)


def test_shard_spec():
    shard = PredictOptions.create(shard=" 1 / 4").shard
    assert (shard.index, shard.count, str(shard)) == (1, 4, "1/4")
    assert shard.select(list(range(10))) == [1, 5, 9]
    parts = [PredictOptions.create(shard=f"{k}/3").shard.select(list(range(10))) for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))        # disjoint, and all of them
    assert PredictOptions.create().shard is None and PredictOptions.create().overwrite is False


def test_every_output_kind_is_an_option_and_a_flag():
    flags = {a.dest for a in cli.build_parser()._actions}
    for key in OUTPUT_KINDS:
        assert key in predict_defaults() and key in flags
        assert PredictOptions.create(**{key: f"/x/{key}"}).output(key) == f"/x/{key}"


def small_scan(path):
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(size=(30, 28, 32)).astype(np.float32), np.eye(4)), str(path))
    return str(path)


@pytest.mark.parametrize("entry", ["hydra", "flags"])
def test_bad_values_refused_by_the_real_commands(tmp_path, entry):
    src = small_scan(tmp_path / "s.nii.gz")
    if entry == "hydra":
        cmds = [[sys.executable, os.path.join(REPO, "predict.py"), f"i={src}", "o=o.nii.gz", bad]
                for bad in ("fast=maybe", "threads=abc", "fats=true", "+fats=true", "threads=-1",
                            "qc_crop_size=0", "channels=median", "model_file=m.pt",
                            "shard=3/2", "shard=a/b")]
        # a sweep's bad shard is refused before any job starts, in one line
        cmds.append([sys.executable, os.path.join(REPO, "predict.py"), "-m", f"i={src}",
                     "o=o.nii.gz", "shard=0/2,2/2"])
    else:
        mri = os.path.join(os.path.dirname(sys.executable), "mri_synthseg_jax")
        cmds = [[mri, "--i", src, "--o", "o.nii.gz", *bad]
                for bad in (["--threads", "abc"], ["--crop", "abc"], ["--device", "quantum"],
                            ["--threads", "-1"], ["--robust", "--v1"],
                            ["--autocrop", "--crop", "96"], ["--model", "m.h5", "--robust"],
                            ["--shard", "3/2"], ["--shard", "a/b"])]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 1, (cmd, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ERROR "), (cmd, proc.stderr)
        assert "Error:" not in lines[0], lines[0]      # no ValueError: prefix
        assert sorted(os.listdir(tmp_path)) == ["s.nii.gz"]


def test_false_words_really_turn_an_option_off(tmp_path, models_dir, labels_dir):
    """``fast=no`` runs the default mode (a string used to count as true)."""
    src = small_scan(tmp_path / "s.nii.gz")
    cmd = [sys.executable, os.path.join(REPO, "predict.py"), f"i={src}", f"o={tmp_path}/o.nii.gz",
           "fast=no", "crop=32", "progress=off", "device=cpu", f"models_dir={models_dir}",
           f"labels_dir={labels_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "SynthSeg 2.0"   # not "SynthSeg 2.0 (fast)"
    assert os.path.isfile(tmp_path / "o.nii.gz")


def test_bf16_flag_of_the_drop_in_command_line():
    def precision(argv):
        flags = vars(cli.build_parser().parse_args(argv))
        return PredictOptions.from_mapping(cli.options_from_flags(flags)).precision

    assert precision(["--i", "a.nii", "--o", "b.nii", "--bf16"]) == "bf16"
    assert precision(["--i", "a.nii", "--o", "b.nii"]) == "float32"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present here")
@pytest.mark.parametrize("entry", ["hydra", "flags"])
def test_gpu_requested_without_one(tmp_path, entry):
    """``device=gpu`` on a machine without one printed ``ERROR AssertionError`` (issue 19, item 5)."""
    src = small_scan(tmp_path / "s.nii.gz")
    if entry == "hydra":
        cmd = [sys.executable, os.path.join(REPO, "predict.py"), f"i={src}", "o=o.nii.gz", "device=gpu"]
    else:
        mri = os.path.join(os.path.dirname(sys.executable), "mri_synthseg_jax")
        cmd = [mri, "--i", src, "--o", "o.nii.gz", "--device", "gpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        'ERROR device=gpu: no GPU is visible to JAX; install JAX\'s CUDA build (pip install -U '
        '"jax[cuda12]", see https://docs.jax.dev/en/latest/installation.html), or use device=cpu']
    assert sorted(os.listdir(tmp_path)) == ["s.nii.gz"]


def test_hydra_paths_with_special_characters(tmp_path):
    """An unquoted path with , ( ) or = got Hydra's six-line parse error (issue 19, item 9): one
    line saying how to quote it; quoted or escaped, the path reaches the program as it is."""
    src = small_scan(tmp_path / "a,b(1)=x.nii.gz")
    predict = [sys.executable, os.path.join(REPO, "predict.py")]
    proc = subprocess.run(predict + [f"i={src}", "o=o.nii.gz"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ERROR i: a path with , ( ) or = must be quoted for Hydra, e.g. \"i='{src}'\" "
        "(or use mri_synthseg_jax --i)"]
    escaped = src.replace(",", "\\,").replace("(", "\\(").replace(")", "\\)").replace("=", "\\=")
    for given in (f"i='{src}'", f"i={escaped}"):
        # the path is read (and found): the run goes on to the options check after it
        proc = subprocess.run(predict + [given, "o=o.nii.gz", "threads=-1"], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert proc.stderr.strip().splitlines() == [
            "ERROR threads: expected a number of threads, or 0 for all cores, got -1"], given
