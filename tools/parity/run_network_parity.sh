#!/usr/bin/env bash
# The whole network parity check on a fresh machine: TF environment, the original's networks with
# seeded random weights, then tools/parity/check_networks.py (ours vs. theirs, and the round trip).
#
#   tools/parity/run_network_parity.sh [DIR [check_networks.py options, e.g. --sizes 64]]
#   (DIR defaults to <repo>/.parity; needs <repo>/.venv)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${1:-$REPO/.parity}"

bash "$HERE/setup_tf_env.sh" "$DIR"
if [[ ! -f "$DIR/models/keras_param_counts.json" ]]; then
  "$DIR/venv/bin/python" "$HERE/make_keras_models.py" --script "$DIR/mri_synthseg" --out "$DIR/models" \
    --seed 0 --calib-image "$DIR/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
fi
"$REPO/.venv/bin/python" "$HERE/check_networks.py" --parity-dir "$DIR" --report "$DIR/network_parity.md" "${@:2}"
