"""Scans per hour on a folder of scans: the overlapped loop (``overlap=true``: scan k+1 read and
preprocessed, scan k-1 written, while the network runs scan k) against the sequential loop
(``overlap=false``), in one process with the networks compiled once.

    nice python benchmarks/bench_cohort_throughput.py [--scans 6] [--repeats 2] [--voxel 1.5]
        [--threads 2] [--models DIR] [--work DIR]

The folder holds ``--scans`` copies of the MNI T1 template (from the nilearn wheel), cropped to
160x192x160 mm around its centre and resampled to ``--voxel`` mm, each with its own intensity
scale and noise: the pipeline resamples each back to 1 mm, so each scan has the host work of a
real one (read, resampling, writing the segmentation and the volumes CSV). Every repeat runs both
loops over the whole folder (``overwrite=true``, nothing skipped), alternating which goes first;
the table gives the median wall time of each. The host CPU (/proc/cpuinfo), its cores and the
load average are printed with it: a shared machine's load moves these figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_cpu() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_folder(folder: str, n: int, voxel: float) -> None:
    """``n`` variants of the MNI T1, cropped and resampled to ``voxel`` mm."""
    import nibabel as nib
    import nilearn
    from scipy import ndimage

    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.get_fdata(), np.float32)
    centre = np.array(data.shape) // 2
    size = np.array([160, 192, 160])
    lo = np.maximum(centre - size // 2, 0)
    crop = data[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]]
    small = ndimage.zoom(crop, 1.0 / voxel, order=1)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    affine[:3, :3] = img.affine[:3, :3] * voxel
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        scan = small * rng.uniform(0.7, 1.3) + rng.normal(0, 2.0, small.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(scan.astype(np.float32), affine),
                 os.path.join(folder, f"scan{k:02d}.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--voxel", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=None, help="models folder (default: the shipped model)")
    parser.add_argument("--work", default=None, help="where the scans and outputs go (default: a temp dir)")
    args = parser.parse_args()

    from synthseg_jax.inference.runtime import configure_runtime

    configure_runtime(args.threads, "cpu")
    from synthseg_jax.inference.options import PredictOptions
    from synthseg_jax.inference.pipeline import Runner

    work = args.work or tempfile.mkdtemp(prefix="bench_cohort_")
    scans = os.path.join(work, "scans")
    make_folder(scans, args.scans, args.voxel)
    opts = PredictOptions.create(i=scans, o=os.path.join(work, "segs"),
                                 vol=os.path.join(work, "vols.csv"), models_dir=args.models,
                                 progress=False, overwrite=True, threads=args.threads, device="cpu")
    quiet = io.StringIO()
    runner = Runner(opts, stdout=quiet, stderr=quiet)
    every = runner.jobs
    runner.jobs = every[:1]
    runner.run()                          # compiles the network's one padded shape
    runner.jobs = every
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for overlap in ((False, True) if repeat % 2 == 0 else (True, False)):
            runner.opts = dataclasses.replace(opts, overlap=overlap)
            start = time.perf_counter()
            summary = runner.run()
            seconds[overlap].append(time.perf_counter() - start)
            if summary.failed or len(summary.done) != args.scans:
                raise SystemExit(f"a run did not segment every scan: {summary.failed}")
            print(f"repeat {repeat} overlap={overlap}: {seconds[overlap][-1]:.1f} s", flush=True)

    print(f"\nhost: {host_cpu()}, {os.cpu_count()} cores, {args.threads} thread(s); load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.scans} scans of the MNI T1 at "
          f"{args.voxel} mm (1 mm: 160x192x160), {args.repeats} repeat(s)")
    print("| loop | median wall (s) | s per scan | scans per hour |")
    print("|---|---|---|---|")
    medians = {}
    for overlap, name in ((False, "sequential (`overlap=false`)"), (True, "overlapped (`overlap=true`)")):
        medians[overlap] = statistics.median(seconds[overlap])
        print(f"| {name} | {medians[overlap]:.1f} | {medians[overlap] / args.scans:.2f} | "
              f"{3600 * args.scans / medians[overlap]:.0f} |")
    print(f"\noverlapped / sequential scans per hour: {medians[False] / medians[True]:.2f}x")
    timings = runner.timings[1:]          # the warm-up's compilation left out
    stage = lambda *names: statistics.mean(sum(t.get(n, 0.0) for n in names) for t in timings)
    print(f"per scan (mean of both loops' stages): read + preprocess {stage('read', 'preprocess'):.2f} s, "
          f"network and device post-processing {stage('network', 'components', 'postprocess', 'volumes'):.2f} s, "
          f"geometry + write {stage('geometry', 'write'):.2f} s")


if __name__ == "__main__":
    main()
