"""Cohort runs in one process: a re-run skips complete scans and retries failed ones, shards
cover the scans once, the overlapped loop gives the sequential loop's results, and the progress
bar counts what happened (a real process on a terminal)."""

import csv
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthseg_jax.inference.options import PredictOptions
from synthseg_jax.inference.overlap import run_stages
from synthseg_jax.inference.pipeline import run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(min_pad=32, qc_crop_size=16, progress=False, fast=True)


def make_scan(path, shape=(28, 32, 30), seed=0, zoom=1.0, constant=False):
    rng = np.random.default_rng(seed)
    data = (ndimage.gaussian_filter(rng.uniform(size=shape), 2) * 1000).astype(np.float32)
    if constant:
        data[:] = 7
    nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), str(path))
    return str(path)


def call(**kw):
    out, err = io.StringIO(), io.StringIO()
    code = run(PredictOptions.create(**{**FAST, **kw}), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def outputs(folder):
    """Every output file (not the hidden locks) -> its modification time."""
    return {os.path.relpath(os.path.join(root, f), folder): os.stat(os.path.join(root, f)).st_mtime_ns
            for root, _, files in os.walk(folder) for f in files if not f.startswith(".")}


def test_rerun_skips_complete_scans_and_retries_failed_ones(tmp_path, models_dir, labels_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    make_scan(src / "a.nii.gz", seed=1)
    make_scan(src / "b.nii.gz", (20, 20, 20), seed=2, zoom=1.5)   # resampled: a resample file
    make_scan(src / "c.nii.gz", seed=3)
    make_scan(src / "d.nii.gz", constant=True)                    # fails: nothing to segment
    opts = dict(i=str(src), o=str(out / "seg"), vol=str(out / "vols.csv"),
                resample=str(out / "res"), overlay=str(out / "png"), models_dir=models_dir,
                labels_dir=labels_dir)
    code, stdout, stderr = call(**opts)
    assert code == 1 and "d.nii.gz: image is constant" in stderr
    assert "3 of 4 scan(s) segmented, 1 failed, 0 skipped" in stdout
    first = outputs(out)
    assert sorted(os.listdir(out / "res")) == ["b_resampled.nii.gz"]   # a and c are at 1 mm
    rows = read_csv(out / "vols.csv")

    make_scan(src / "d.nii.gz", seed=4)                # fixed: retried
    os.unlink(out / "png" / "c_overlay.png")           # one output of c missing: c again
    code, stdout, stderr = call(**opts)
    assert code == 0, stderr
    assert "2 of 4 scan(s) segmented, 0 failed, 2 skipped (outputs already complete)" in stdout
    second = outputs(out)
    for name in ("seg/a_synthseg.nii.gz", "seg/b_synthseg.nii.gz", "res/b_resampled.nii.gz",
                 "png/a_overlay.png", "png/b_overlay.png"):
        assert second[name] == first[name], name       # skipped scans: not written again
    assert second["seg/c_synthseg.nii.gz"] != first["seg/c_synthseg.nii.gz"]
    assert "seg/d_synthseg.nii.gz" in second
    rows2 = read_csv(out / "vols.csv")
    assert [r[0] for r in rows2] == ["subject", "a", "b", "c", "d"]
    assert rows2[:4] == rows                           # the same rows, once each

    # a scan killed after its files but before its row (the row is written last) is redone
    with open(out / "vols.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([r for r in rows2 if r[0] != "a"])
    code, stdout, _ = call(**opts)
    assert "1 of 4 scan(s) segmented, 0 failed, 3 skipped" in stdout
    assert read_csv(out / "vols.csv") == rows2
    code, stdout, _ = call(**opts)
    assert code == 0 and "0 of 4 scan(s) segmented, 0 failed, 4 skipped" in stdout
    code, stdout, _ = call(**opts, overwrite=True)
    assert code == 0 and "4 of 4 scan(s) segmented, 0 failed, 0 skipped" in stdout
    assert read_csv(out / "vols.csv") == rows2


def test_shards_in_any_order_write_what_one_run_writes(tmp_path, models_dir, labels_dir):
    src = tmp_path / "in"
    src.mkdir()
    for n in range(5):
        make_scan(src / f"s{n}.nii.gz", seed=n)
    common = dict(i=str(src), models_dir=models_dir, labels_dir=labels_dir)

    def into(folder, **kw):
        return call(o=str(folder), vol=str(folder / "vols.csv"), **common, **kw)

    code, stdout, _ = into(tmp_path / "sharded", shard="2/3")
    assert code == 0 and "shard 2/3: 1 of 5 scan(s)" in stdout
    assert sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".gz")) == \
        ["s2_synthseg.nii.gz"]
    for shard in ("0/3", "1/3"):
        assert into(tmp_path / "sharded", shard=shard)[0] == 0
    assert into(tmp_path / "whole")[0] == 0
    sharded, whole = outputs(tmp_path / "sharded"), outputs(tmp_path / "whole")
    assert sorted(sharded) == sorted(whole) and len(whole) == 6
    assert (tmp_path / "sharded" / "vols.csv").read_bytes() == (tmp_path / "whole" / "vols.csv").read_bytes()
    for name in whole:
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "sharded" / name).dataobj),
                                          np.asarray(nib.load(tmp_path / "whole" / name).dataobj))


def test_same_subject_twice_is_refused_for_a_shared_table(tmp_path, models_dir, labels_dir):
    a = make_scan(tmp_path / "a.nii.gz")
    (tmp_path / "site2").mkdir()
    b = make_scan(tmp_path / "site2" / "a.nii.gz", seed=1)
    (tmp_path / "in.txt").write_text(f"{a}\n{b}\n")
    (tmp_path / "out.txt").write_text(f"{tmp_path}/o1.nii.gz\n{tmp_path}/o2.nii.gz\n")
    code, _, stderr = call(i=str(tmp_path / "in.txt"), o=str(tmp_path / "out.txt"),
                           vol=str(tmp_path / "v.csv"), models_dir=models_dir, labels_dir=labels_dir)
    assert code == 1
    assert stderr.strip() == (f"ERROR {b}: subject name 'a' is also {a}'s; one vol table cannot "
                              f"tell their rows apart (rename one, or give vol as a .txt list of "
                              f"per-scan CSVs)")
    assert not os.path.exists(tmp_path / "v.csv")


def test_overlapped_loop_gives_the_sequential_results(tmp_path, models_dir, labels_dir):
    src = tmp_path / "in"
    src.mkdir()
    make_scan(src / "a.nii.gz", (28, 32, 30), seed=1)
    make_scan(src / "b.nii.gz", (20, 20, 20), seed=2, zoom=1.5)
    make_scan(src / "c.nii.gz", constant=True)     # a failure in the middle of the overlap
    make_scan(src / "d.nii.gz", (30, 26, 28), seed=3)
    make_scan(src / "e.nii.gz", (26, 30, 28), seed=4)
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}"
        code, stdout, stderr = call(
            i=str(src), o=str(out / "seg"), post=str(out / "post"), resample=str(out / "res"),
            overlay=str(out / "png"), vol=str(out / "vols.csv"), qc=str(out / "qc.csv"),
            keepgeom=True, fast=False, overlap=overlap, models_dir=models_dir, labels_dir=labels_dir)
        assert code == 1
        lines = [re.sub(r" in [\d.]+ s \([\d.]+ s per scan\)", "", line).replace(str(out), "OUT")
                 for line in (stdout + stderr).splitlines()]
        runs[overlap] = (out, sorted(outputs(out)), lines)
    (seq, seq_files, seq_lines), (ovl, ovl_files, ovl_lines) = runs[False], runs[True]
    assert seq_files == ovl_files and len(seq_files) == 4 * 3 + 1 + 2
    assert seq_lines == ovl_lines                  # the same messages, in the same order
    for name in seq_files:
        if name.endswith(".nii.gz"):
            a, b = nib.load(seq / name), nib.load(ovl / name)
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
        else:
            assert (seq / name).read_bytes() == (ovl / name).read_bytes(), name


def test_stages_overlap_and_the_network_stays_on_the_calling_thread():
    """While compute(k) runs, load(k+1) and store(k-1) must have started (each waits for the
    others: run one at a time, this would time out)."""
    main = threading.current_thread()
    started = {("load", 0): threading.Event()}
    log = []

    def event(stage, k):
        return started.setdefault((stage, k), threading.Event())

    def load(k):
        event("load", k).set()
        return k

    def compute(k):
        assert threading.current_thread() is main
        assert event("load", k + 1).wait(10) or k == 4, f"scan {k + 1} not read during scan {k}"
        time.sleep(0.05)
        if k == 2:
            raise ValueError("bad scan")
        return k * 10

    def store(k, value):
        assert threading.current_thread() is not main
        event("store", k).set()
        return value

    def finished(k, outcome):
        log.append((k, outcome if not isinstance(outcome, Exception) else str(outcome)))

    def compute_checking_store(k):
        value = compute(k)
        if k >= 2 and k - 1 != 2:
            assert event("store", k - 1).wait(10), f"scan {k - 1} not written during scan {k}"
        return value

    run_stages(list(range(5)), load, compute_checking_store, store, finished)
    assert log == [(0, 0), (1, 10), (2, "bad scan"), (3, 30), (4, 40)]
    log.clear()
    run_stages(list(range(5)), lambda k: k, lambda k: k * 10, lambda k, v: v, finished, overlap=False)
    assert log == [(k, k * 10) for k in range(5)]


def test_progress_bar_and_exit_code_of_the_real_command(tmp_path, models_dir, labels_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("d", 3)):
        make_scan(src / f"{name}.nii.gz", seed=seed)
    make_scan(src / "c.nii.gz", constant=True)
    args = [f"i={src}", f"o={out}", f"vol={out}/vols.csv", "fast=true", "min_pad=32",
            f"models_dir={models_dir}", f"labels_dir={labels_dir}", "device=cpu", "threads=1"]
    assert call(**dict(a.split("=", 1) for a in args if "fast" not in a), shard="0/2")[0] == 1   # a; c fails
    leader, follower = pty.openpty()    # a terminal (200 columns): tqdm draws its bar
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "predict.py"), *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = proc.communicate(timeout=300)[0]
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 1                      # a scan failed
    bars = [part for part in re.split(r"[\r\n]", terminal) if "predicting" in part]
    assert bars, terminal
    last = bars[-1]
    assert "4/4" in last and "done 2, failed 1, skipped 1" in last, last
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", last), last        # elapsed < remaining
    assert "ERROR " in terminal and "c.nii.gz: image is constant" in terminal
    assert "2 of 4 scan(s) segmented, 1 failed, 1 skipped (outputs already complete)" in stdout
    assert "Traceback" not in terminal + stdout
