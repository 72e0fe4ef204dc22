#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), as run on a lent GPU machine that has JAX with CUDA but
# no network. Here, once:
#   .venv/bin/python benchmarks/gpu_check.py prepare gpu_check_data          # ~20 min on 2 cores
#   echo /.whl/ >> .git/info/exclude; echo /gpu_check_data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl nibabel hydra-core omegaconf antlr4-python3-runtime==4.9.3
# There (carry .whl and gpu_check_data):
#   bash benchmarks/gpu_check.sh gpu_check_data
# Prints the table for BENCHMARKS.md; exit 1 if a mode's segmentation differs from the CPU's on
# more than 0.1 % of labelled voxels.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-gpu_check_data}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
timeout 570 python3 benchmarks/gpu_check.py check "$DATA" "${@:2}"
