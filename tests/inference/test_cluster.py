"""A cohort in shards through Hydra's submitit launcher, for real: ``predict.py -m ... shard=0/2,1/2
hydra/launcher=submitit_local`` on four small scans, one shard killed (SIGKILL) part-way, the same
command run again; every output is then complete and each CSV holds each scan exactly once."""

import csv
import glob
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")   # the [cluster] extra (.ci/run)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {"s0": (28, 32, 30), "s1": (30, 28, 32), "s2": (40, 44, 36), "s3": (26, 30, 28)}


def make_scan(path, shape, seed):
    rng = np.random.default_rng(seed)
    data = (ndimage.gaussian_filter(rng.uniform(size=shape), 2) * 1000).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def job_logs(tmp_path):
    """Shard spec -> (job id = pid of the local job, its stdout log)."""
    found = {}
    for log in glob.glob(str(tmp_path / "multirun" / "*" / "*" / ".submitit" / "*" / "*_0_log.out")):
        with open(log) as handle:
            text = handle.read()
        for shard in ("0/2", "1/2"):
            if f"shard {shard}:" in text:
                found[shard] = (int(os.path.basename(os.path.dirname(log))), log)
    return found


def kill_job(pid):
    """SIGKILL a local job as a scheduler would: the worker that runs the shard (a child of the
    job's process, whose pid is the job id), then the job's process."""
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        children = [int(child) for child in handle.read().split()]
    assert children, "the job has no worker process"
    for child in children + [pid]:
        os.kill(child, signal.SIGKILL)


def test_sharded_cohort_killed_and_resumed(tmp_path, models_dir, labels_dir):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for n, (name, shape) in enumerate(SHAPES.items()):
        make_scan(scans / f"{name}.nii.gz", shape, seed=n)
    # shard 0/2 takes s0 and s2 (round-robin over the sorted scans); s2's larger padded shape
    # costs a second compilation, the window in which the shard is killed
    cmd = [sys.executable, os.path.join(REPO, "predict.py"), "-m", f"i={scans}", f"o={out}",
           f"vol={out}/vols.csv", f"qc={out}/qc.csv", "fast=true", "min_pad=32", "qc_crop_size=16",
           "progress=false", "device=cpu", "threads=1", f"models_dir={models_dir}",
           f"labels_dir={labels_dir}", "shard=0/2,1/2", "hydra/launcher=submitit_local"]

    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        jobs = job_logs(tmp_path)
        if "0/2" in jobs and all((out / table).is_file() and "s0" in [row[0] for row in
                                  read_csv(out / table)] for table in ("vols.csv", "qc.csv")):
            break
        time.sleep(0.02)
    assert not (out / "s2_synthseg.nii.gz").exists()   # killed part-way: s0 done, s2 not
    kill_job(jobs["0/2"][0])
    first_output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0, first_output       # the sweep says that a job died
    assert not (out / "s2_synthseg.nii.gz").exists()
    before = {row[0]: row for row in read_csv(out / "vols.csv")[1:]}
    assert "s2" not in before

    for old in glob.glob(str(tmp_path / "multirun" / "*")):   # the re-run's logs alone
        os.rename(old, old + "_first")
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    logs = {shard: open(log).read() for shard, (_, log) in job_logs(tmp_path).items()
            if "_first" not in log}
    assert "1 of 2 scan(s) of shard 0/2 segmented, 0 failed, 1 skipped" in logs["0/2"]
    assert f"0 of 2 scan(s) of shard 1/2 segmented, 0 failed, 2 skipped" in logs["1/2"]

    names = sorted(SHAPES)
    for name in names:
        seg = nib.load(out / f"{name}_synthseg.nii.gz")
        assert seg.shape == SHAPES[name] and np.asarray(seg.dataobj).any()
    for table in ("vols.csv", "qc.csv"):
        rows = read_csv(out / table)
        assert rows[0][0] == "subject" and [row[0] for row in rows[1:]] == names, table
        assert len({len(row) for row in rows}) == 1
    after = {row[0]: row for row in read_csv(out / "vols.csv")[1:]}
    assert all(after[name] == row for name, row in before.items())   # skipped scans untouched
    hidden = sorted(f for f in os.listdir(out) if f.startswith("."))
    assert hidden == [".qc.csv.lock", ".vols.csv.lock"]          # no temporaries left
