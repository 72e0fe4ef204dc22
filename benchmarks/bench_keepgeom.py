"""keepgeom against FreeSurfer 8's --keepgeom, on copies of the MNI T1 at 2 mm and 3 mm, each
stored twice (RAS, and LPS: x and y reversed on disk), segmented with the shipped model.

* ours: ``keepgeom=true``, labels = argmax of the posteriors resampled linearly onto the input's
  grid (``inference/postprocess.py``, ``to_input_grid``);
* FreeSurfer 8: the 1 mm segmentation resliced as its ``mri_synthseg`` does it, by surfa's
  ``Volume.resample_like(input, method='nearest')`` (run for real, in a separate interpreter that
  has ``surfa``: ``--surfa-python``).

Per approach: the share of labelled voxels on which the RAS and LPS copies disagree; the share on
which the labels disagree with the argmax of our resampled posteriors; then ours against
FreeSurfer 8's: voxel agreement, mean Dice over structures, and the mean shift of the structures'
centroids per axis (mm).

    python -m venv /tmp/surfa && /tmp/surfa/bin/pip install surfa
    python benchmarks/bench_keepgeom.py --surfa-python /tmp/surfa/bin/python
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthseg_jax.inference.options import PredictOptions
from synthseg_jax.inference.pipeline import run
from synthseg_jax.labels import LabelTables
from synthseg_jax.package_data import label_tables_dir

RESLICE = ("import sys, surfa as sf\n"
           "src, like, out = sys.argv[1:]\n"
           "sf.load_volume(src).resample_like(sf.load_volume(like), method='nearest').save(out)\n")


def mni_t1() -> str:
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def low_resolution_copies(folder: str, factor: int) -> dict[str, str]:
    """The MNI T1 at ``factor`` mm (blurred, subsampled), stored RAS and LPS."""
    image = nib.load(mni_t1())
    data = ndimage.gaussian_filter(image.get_fdata(dtype=np.float32), factor / 2.355)
    data = data[::factor, ::factor, ::factor]
    ras = image.affine.copy()
    ras[:3, :3] = ras[:3, :3] * factor
    lps = ras.copy()
    lps[:3, :2] *= -1
    lps[:3, 3] += ras[:3, :2] @ (np.array(data.shape[:2]) - 1)
    paths = {}
    for name, volume, affine in (("ras", data, ras), ("lps", data[::-1, ::-1], lps)):
        paths[name] = os.path.join(folder, f"mni_{factor}mm_{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), affine), paths[name])
    return paths


def as_ras(path: str, name: str) -> np.ndarray:
    volume = np.asarray(nib.load(path).dataobj)
    return volume[::-1, ::-1] if name == "lps" else volume


def centroid_shift(a: np.ndarray, b: np.ndarray, labels: np.ndarray, voxel_mm: float) -> np.ndarray:
    shifts = [np.mean(np.argwhere(b == lab), 0) - np.mean(np.argwhere(a == lab), 0)
              for lab in labels if (a == lab).any() and (b == lab).any()]
    return np.mean(shifts, axis=0) * voxel_mm


def mean_dice(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == lab) & (b == lab)) / (np.sum(a == lab) + np.sum(b == lab))
                          for lab in labels if (a == lab).any() or (b == lab).any()]))


def measure(folder: str, factor: int, surfa_python: str, labels: np.ndarray) -> list[str]:
    copies = low_resolution_copies(folder, factor)
    ours, fs8, post = {}, {}, {}
    for name, src in copies.items():
        stem = os.path.join(folder, f"{factor}mm_{name}")
        common = dict(i=src, progress=False)
        for opts in (dict(o=stem + "_keep.nii.gz", post=stem + "_post.nii.gz", keepgeom=True),
                     dict(o=stem + "_1mm.nii.gz")):
            if run(PredictOptions.create(**common, **opts), stdout=sys.stderr) != 0:
                raise SystemExit(f"prediction of {src} failed")
        subprocess.run([surfa_python, "-c", RESLICE, stem + "_1mm.nii.gz", src, stem + "_fs8.nii.gz"],
                       check=True, stdout=subprocess.DEVNULL)
        ours[name] = as_ras(stem + "_keep.nii.gz", name)
        fs8[name] = as_ras(stem + "_fs8.nii.gz", name)
        post[name] = labels[as_ras(stem + "_post.nii.gz", name).argmax(-1)]
    rows = []
    structures = labels[1:]
    for approach, segs in (("synthseg-jax keepgeom", ours), ("FreeSurfer 8 --keepgeom (surfa)", fs8)):
        labelled = (segs["ras"] > 0) | (segs["lps"] > 0)
        storage = np.mean(segs["ras"][labelled] != segs["lps"][labelled])
        # the parcellation is off: every label is a segmentation label
        argmax = np.mean(segs["ras"][segs["ras"] > 0] != post["ras"][segs["ras"] > 0])
        rows.append(f"| {factor} mm | {approach} | {100 * storage:.2f} % | {100 * argmax:.2f} % |")
    labelled = (ours["ras"] > 0) | (fs8["ras"] > 0)
    agree = np.mean(ours["ras"][labelled] == fs8["ras"][labelled])
    shift = centroid_shift(ours["ras"], fs8["ras"], structures, factor)
    rows.append(f"| {factor} mm | ours vs FreeSurfer 8 (RAS copy) | voxel agreement "
                f"{100 * agree:.1f} %, mean Dice {mean_dice(ours['ras'], fs8['ras'], structures):.3f} | "
                f"centroid shift x/y/z {shift[0]:+.2f} / {shift[1]:+.2f} / {shift[2]:+.2f} mm |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--surfa-python", required=True, help="an interpreter that can import surfa")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args()
    labels = LabelTables.load(label_tables_dir(), "2.0").segmentation
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"host: {cpu}, {os.cpu_count()} cores; shipped model (checkpoints/)")
    print("| input | keepgeom | RAS vs LPS copy: labelled voxels differing | "
          "labels differing from the posteriors' argmax |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for factor in args.factors:
            for row in measure(folder, factor, args.surfa_python, labels):
                print(row, flush=True)


if __name__ == "__main__":
    main()
