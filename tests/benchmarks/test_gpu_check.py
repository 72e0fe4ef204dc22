"""The GPU check stays working where there is no GPU: prepared and checked on the CPU with tiny
networks (one mode and a tiny training step), it must find the two sides equal."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_with_tiny_networks(tmp_path):
    folder = tmp_path / "check"
    prepared = subprocess.run([sys.executable, str(SCRIPT), "prepare", str(folder), "--size", "48",
                               "--tiny", "--threads", "2", "--modes", "default"],
                              capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    checked = subprocess.run([sys.executable, str(SCRIPT), "check", str(folder), "--device", "cpu",
                              "--train-model", "tiny", "--train-size", "32"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr[-2000:]
    row = [line for line in checked.stdout.splitlines() if line.startswith("| default |")][-1]
    assert row.split("|")[4].strip() == "100.0"          # labels equal (%)
    assert "training step, tiny at 32^3" in checked.stdout
