#!/usr/bin/env bash
# Quick start: set up a virtual environment and segment the MNI T1 template (from the nilearn
# wheel) with the default model shipped in checkpoints/. Outputs go to quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install --quiet -e '.[test]'

MNI_T1="$(.venv/bin/python -c 'import os, nilearn; print(os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))')"
.venv/bin/python predict.py i="$MNI_T1" o=quickstart/mni_synthseg.nii.gz \
  vol=quickstart/mni_volumes.csv overlay=quickstart/mni_overlay.png
echo "wrote quickstart/mni_synthseg.nii.gz, quickstart/mni_volumes.csv, quickstart/mni_overlay.png"
