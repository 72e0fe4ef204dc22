"""``mri_synthseg_jax``: the prediction pipeline behind ``mri_synthseg``'s own command line.

    mri_synthseg_jax --i IN --o OUT [--parc --robust --fast --vol CSV --qc CSV --post P
                     --resample R --crop N [N N] --threads T --cpu --v1 --ct --keepgeom]

accepts exactly the original's flags (so scripts switch by changing the program's name), plus
``--models_dir``, ``--labels_dir``, ``--device`` and ``--overlay``. As in the original, the
default is one thread. The models folder defaults to ``$SYNTHSEG_JAX_MODELS``, then to
``$FREESURFER_HOME/models`` if that holds SynthSeg's files, then to this project's checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

FLAGS_HELP = "SynthSeg (JAX): segmentation of brain MRI scans of any contrast and resolution"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mri_synthseg_jax", description=FLAGS_HELP)
    add = parser.add_argument
    add("--i", help="Image(s) to segment: an image, a folder, or a .txt list of paths.")
    add("--o", help="Segmentation output(s), of the same kind as --i.")
    add("--parc", action="store_true", help="(optional) Cortical parcellation.")
    add("--robust", action="store_true", help="(optional) SynthSeg-robust (slower; implies --fast).")
    add("--fast", action="store_true", help="(optional) Bypass some processing for faster prediction.")
    add("--vol", help="(optional) CSV file with the volumes of all structures and subjects.")
    add("--qc", help="(optional) CSV file with the QC scores of all subjects.")
    add("--post", help="(optional) Posteriors output(s), of the same kind as --i.")
    add("--resample", help="(optional) Resampled image(s), of the same kind as --i.")
    add("--crop", nargs="+", type=int, help="(optional) Only analyse a centred patch of this size.")
    add("--threads", type=int, default=1, help="(optional) Number of CPU threads. Default is 1.")
    add("--cpu", action="store_true", help="(optional) Run on the CPU even if a GPU is present.")
    add("--v1", action="store_true", help="(optional) Use SynthSeg 1.0.")
    add("--ct", action="store_true", help="(optional) CT scan: clip intensities to [0, 80].")
    add("--keepgeom", action="store_true",
        help="(optional) Write the segmentation/posteriors on the input's voxel grid, not 1 mm.")
    # ours
    add("--models_dir", help="(optional) FreeSurfer-style models/ folder with the .h5 weights.")
    add("--labels_dir", help="(optional) Folder with the label .npy files (default: the models folder "
                             "if it has them, else the shared label tables).")
    add("--device", default="auto", choices=["auto", "cpu", "gpu", "tpu"],
        help="(optional) Device; --cpu is the same as --device cpu.")
    add("--overlay", help="(optional) PNG(s) with three orthogonal slices of the segmentation.")
    add("--no-progress", dest="progress", action="store_false", help="(optional) No progress bar.")
    return parser


def default_models_dir() -> str | None:
    if os.environ.get("SYNTHSEG_JAX_MODELS"):
        return os.environ["SYNTHSEG_JAX_MODELS"]
    home = os.environ.get("FREESURFER_HOME")
    if home and os.path.isfile(os.path.join(home, "models", "synthseg_2.0.h5")):
        return os.path.join(home, "models")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return 1
    args = parser.parse_args(argv)

    # device and threads before jax is imported
    from synthseg_jax.inference.pipeline import (
        Options,
        UsageError,
        configure_runtime,
        run,
        setup_logging,
    )

    device = "cpu" if args.cpu else args.device
    try:
        for note in configure_runtime(args.threads, device):
            print(note)
    except UsageError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1
    setup_logging()
    opts = Options(i=args.i, o=args.o, parc=args.parc, robust=args.robust, fast=args.fast,
                   v1=args.v1, vol=args.vol, qc=args.qc, post=args.post, resample=args.resample,
                   overlay=args.overlay, crop=args.crop, ct=args.ct, keepgeom=args.keepgeom,
                   models_dir=args.models_dir or default_models_dir(), labels_dir=args.labels_dir,
                   threads=args.threads, device=device, progress=args.progress)
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
