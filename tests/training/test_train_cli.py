"""train.py end to end: a Hydra multirun sweep of two tiny runs, with validation and curves."""

import csv
import os
import subprocess
import sys

from conftest import REPO_ROOT, TINY, needs_maps, subprocess_env

pytestmark = needs_maps


def test_multirun_sweep_of_two_runs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "optim.lr=1e-4,3e-4", "train.steps=2",
           "validation.every=2", "validation.mni=true", f"hydra.sweep.dir={sweep}"] + \
        [o for o in TINY if o != "train.compilation_cache=null"]
    env = subprocess_env()
    cache = env.get("SYNTHSEG_TEST_XLA_CACHE")
    cmd.append(f"train.compilation_cache={cache}" if cache else "train.compilation_cache=null")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(d for d in os.listdir(sweep) if (sweep / d).is_dir() and not d.startswith("."))
    assert len(runs) == 2, runs
    lrs = set()
    for name in runs:
        run_dir = sweep / name
        for f in ("metrics.csv", "validation.csv", "curves.png", "config.yaml",
                  "export/synthseg_2.0.h5", "checkpoints/2"):
            assert (run_dir / f).exists(), (name, f)
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        assert [int(r["step"]) for r in rows] == [1, 2]
        val = list(csv.DictReader(open(run_dir / "validation.csv")))
        assert len(val) == 1 and 0 <= float(val[0]["synthetic"]) <= 1
        assert 0 <= float(val[0]["mni_wm"]) <= 1 and 0 <= float(val[0]["mni_gm"]) <= 1
        lrs.add(open(run_dir / "config.yaml").read().split("lr: ")[1].split()[0])
    assert len(lrs) == 2
