#!/usr/bin/env bash
# Builds the wheel into OUT_DIR from a clean copy of the working tree (tracked and untracked files,
# git's ignores applied): setuptools builds in-tree and would pack whatever a stale build/ holds.
#   bash tools/build_wheel.sh OUT_DIR [PYTHON]
set -euo pipefail
OUT="$(realpath -m "$1")"
PYTHON="${2:-python3}"
cd "$(dirname "$0")/.."
SRC="$(mktemp -d /tmp/synthseg_jax_src.XXXXXX)"
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 \
  | tar --null -T - -cf - | tar -xf - -C "$SRC"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$SRC"
