"""SIGINT (Ctrl-C) and SIGTERM (how SLURM preempts a job) sent to a real ``python train.py``
process at several moments: during a step, during a validation, during a checkpoint save.

Each time the process must exit with 130 and leave a checkpoint at the last step it completed
(the last row of ``metrics.csv``, whatever the checkpoint cadence), and the same command must
resume from that checkpoint; a second signal stops at once, keeping the checkpoints written. One run folder goes through all the interruptions in turn, then
runs to the end: its metrics cover every step once.
"""

import csv
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, needs_maps, subprocess_env

pytestmark = needs_maps

BASE = ["model=tiny", "train.held_out=[training_seg_20]", "train.quiet=true",
        "train.compilation_cache=null", "train.export_h5=false", "validation.mni=false"]


def rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get("step")]


def checkpoints(out):
    folder = os.path.join(out, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def start(out, cwd, *overrides):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"), f"train.out_dir={out}"] + BASE + \
        list(overrides)
    return subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(proc, condition, what, timeout=600.0):
    """Poll ``condition`` (every 2 ms) while the process runs; fail if it ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (rc {proc.returncode}) before {what}:\n"
                        f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def interrupt(proc, sig, out, resumed_from):
    """Send ``sig``, then check exit code 130, the message, and the checkpoint of the last step."""
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"train.py did not stop after {signal.Signals(sig).name}")
    assert proc.returncode == 130, f"exit {proc.returncode} after {signal.Signals(sig).name}:\n" \
        f"{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert f"steps {resumed_from} -> " in output, output[-3000:]
    done = rows(os.path.join(out, "metrics.csv"))
    assert done == list(range(1, done[-1] + 1)), done        # every step once, in order
    assert checkpoints(out)[-1] == done[-1], (checkpoints(out), done[-1])
    assert f"interrupted: checkpoint at step {done[-1]}" in output, output[-3000:]
    assert not glob.glob(os.path.join(out, "checkpoints", "*tmp*")), os.listdir(
        os.path.join(out, "checkpoints"))
    return done[-1]


def test_signals_at_any_moment_save_the_last_step_and_resume(tmp_path):
    out = str(tmp_path / "run")
    metrics, validation = os.path.join(out, "metrics.csv"), os.path.join(out, "validation.csv")
    long_run = ["train.steps=400", "train.checkpoint_every=1000", "validation.every=0"]

    # 1. SIGINT during a step (no checkpoint is due for 1000 steps)
    proc = start(out, tmp_path, *long_run)
    wait_for(proc, lambda: len(rows(metrics)) >= 4, "step 4")
    last = interrupt(proc, signal.SIGINT, out, 0)

    # 2. SIGTERM during a validation: after a validation step's metrics, before its row
    first_val = (last // 5 + 1) * 5
    proc = start(out, tmp_path, "train.steps=400", "train.checkpoint_every=1000",
                 "validation.every=5")
    wait_for(proc, lambda: any(s >= first_val and s % 5 == 0 and s not in rows(validation)
                               for s in rows(metrics)[-1:]), "a validation")
    last = interrupt(proc, signal.SIGTERM, out, last)
    assert first_val in rows(validation)          # the validation under way was finished first

    # 3. SIGINT while an (asynchronous) checkpoint is being written
    proc = start(out, tmp_path, "train.steps=400", "train.checkpoint_every=3",
                 "validation.every=0", "train.async_checkpointing=true")
    wait_for(proc, lambda: glob.glob(os.path.join(out, "checkpoints", "*orbax-checkpoint-tmp*")),
             "a checkpoint save")
    last = interrupt(proc, signal.SIGINT, out, last)

    # 4. SIGTERM during a step again, after a resume
    proc = start(out, tmp_path, *long_run)
    wait_for(proc, lambda: rows(metrics)[-1:] >= [last + 3], f"step {last + 3}")
    last = interrupt(proc, signal.SIGTERM, out, last)

    # 5. a second signal stops at once, keeping the checkpoints already written: both arrive
    #    while the first step is traced and compiled (20 s or more here)
    proc = start(out, tmp_path, *long_run)
    for line in proc.stdout:
        if f"steps {last} -> 400" in line:
            break
    time.sleep(2.0)
    assert rows(metrics)[-1] == last
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
    assert f"stopped at once: the latest checkpoint is step {last}" in output, output[-3000:]
    assert checkpoints(out)[-1] == last

    # 6. the same command resumes from that checkpoint and runs to the end
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"),
                           f"train.out_dir={out}", f"train.steps={last + 2}"] + BASE,
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"steps {last} -> {last + 2}" in proc.stdout
    assert rows(metrics) == list(range(1, last + 3))
    # Hydra's own files live in the run folder: nothing is created in the working directory
    assert sorted(os.listdir(tmp_path)) == ["run"], os.listdir(tmp_path)
    assert os.path.isfile(os.path.join(out, ".hydra", "config.yaml"))
