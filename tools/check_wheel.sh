#!/usr/bin/env bash
# The installed package on its own: build the wheel, install it (not editable) into a fresh virtual
# environment, and segment a small scan from a folder outside the checkout with the shipped model
# (and its QC model), through both entry points (mri_synthseg_jax, python -m synthseg_jax.predict).
# Needs .venv (for nilearn's MNI T1, cropped to a small scan). Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$(mktemp -d /tmp/synthseg_jax_wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

bash tools/build_wheel.sh "$WORK/dist" .venv/bin/python
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --upgrade pip
"$WORK/venv/bin/pip" install --quiet "$WORK"/dist/synthseg_jax-*.whl

.venv/bin/python - "$WORK/scan.nii.gz" <<'PY'
import os, sys
import nibabel as nib, nilearn
path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
nib.load(path).slicer[50:146, 60:172, 50:146].to_filename(sys.argv[1])   # 96x112x96 at 1 mm
PY

cd "$WORK"   # outside the checkout: nothing may come from it
"$WORK/venv/bin/python" -c "import synthseg_jax, sys; assert '$REPO' not in synthseg_jax.__file__, synthseg_jax.__file__"
"$WORK/venv/bin/mri_synthseg_jax" --i scan.nii.gz --o out/seg.nii.gz --vol out/vol.csv --qc out/qc.csv --threads 2
"$WORK/venv/bin/python" -m synthseg_jax.predict i=scan.nii.gz o=hydra/seg.nii.gz progress=false

"$WORK/venv/bin/python" - <<'PY'
import csv
import nibabel as nib, numpy as np
seg = np.asarray(nib.load("out/seg.nii.gz").dataobj)
assert seg.shape == (96, 112, 96), seg.shape
labels, counts = np.unique(seg, return_counts=True)
present = dict(zip(labels.tolist(), counts.tolist()))
for label in (2, 3, 41, 42):   # cerebral white matter and cortex, both sides
    assert present.get(label, 0) > 5000, (label, present)
assert set(present) <= {0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 41,
                        42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60}, present
rows = list(csv.reader(open("out/vol.csv")))
assert len(rows) == 2 and rows[1][0] == "scan", rows
qc = list(csv.reader(open("out/qc.csv")))
scores = [float(v) for v in qc[1][1:]]
assert len(qc) == 2 and len(scores) == 8 and all(0 <= v <= 1 for v in scores), qc
hydra = np.asarray(nib.load("hydra/seg.nii.gz").dataobj)
agreement = np.mean(seg == hydra)   # threads differ (2 against all), so float sums may differ
assert agreement > 0.999, f"the two entry points agree on {agreement:.4%} of voxels only"
print(f"wheel check: OK ({len(present) - 1} structures, white matter {present[2] + present[41]} voxels, "
      f"QC scores {min(scores):.2f}-{max(scores):.2f})")
PY
