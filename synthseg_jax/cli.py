"""``mri_synthseg_jax``: the prediction pipeline behind ``mri_synthseg``'s own command line.

    mri_synthseg_jax --i IN --o OUT [--parc --robust --fast --vol CSV --qc CSV --post P
                     --resample R --crop N [N N] --threads T --cpu --v1 --ct --keepgeom]
    mri_synthseg_jax BIDS_DIR OUT_DIR participant [--participant-label 01 02] [--suffix T1w T2w]

accepts exactly the original's flags (so scripts switch by changing the program's name), FreeSurfer
8's (``--autocrop``, ``--addctab``/``--noaddctab``, ``--model``), plus ``--models_dir``,
``--labels_dir``, ``--device``, ``--overlay``, ``--channels``, ``--no-progress``, ``--overwrite``
and ``--shard K/N``; the second form is the BIDS-App command line (other flags as in the first).
The flags map
onto the same options as ``predict.py``'s keys (``PredictOptions``, defaults from
``configs/predict.yaml``; one flag per entry of the output table), except two defaults that follow
the original: one thread, and the models folder ``$SYNTHSEG_JAX_MODELS``, else
``$FREESURFER_HOME/models`` if that holds SynthSeg's files, else the shipped model.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from synthseg_jax import interrupts

FLAGS_HELP = "SynthSeg (JAX): segmentation of brain MRI scans of any contrast and resolution"
DEFAULT_THREADS = 1   # the original's


def build_parser() -> argparse.ArgumentParser:
    """Flags absent from the command line stay absent (their defaults are the options')."""
    from synthseg_jax.inference.outputs import OUTPUT_KINDS   # numpy, nibabel: inside main's guard

    parser = argparse.ArgumentParser(prog="mri_synthseg_jax", description=FLAGS_HELP,
                                     argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("bids_dir", nargs="?", help="(BIDS-App form) The BIDS dataset to segment.")
    add("output_dir", nargs="?", help="(BIDS-App form) The BIDS-Derivatives folder to write.")
    add("analysis_level", nargs="?",
        help="(BIDS-App form) participant: segment each scan (the group tables come with it).")
    add("--participant-label", "--participant_label", dest="participant_label", nargs="+",
        help="(BIDS-App form) Only these subjects (without 'sub-').")
    add("--suffix", nargs="+", help="(BIDS-App form) Anatomical suffixes to segment (default T1w).")
    add("--i", help="Image(s) to segment: an image, a folder, or a .txt list of paths.")
    for kind in OUTPUT_KINDS.values():
        add(f"--{kind.key}", help=kind.help)
    add("--parc", action="store_true", help="(optional) Cortical parcellation.")
    add("--robust", action="store_true", help="(optional) SynthSeg-robust (slower; implies --fast).")
    add("--fast", action="store_true", help="(optional) Bypass some processing for faster prediction.")
    add("--crop", nargs="+", help="(optional) Only analyse a centred patch of this size.")
    add("--autocrop", action="store_true",
        help="(optional) Crop to the head's bounding box (multiples of 32); not with --crop.")
    add("--threads", help=f"(optional) Number of CPU threads. Default is {DEFAULT_THREADS}.")
    add("--cpu", action="store_true", help="(optional) Run on the CPU even if a GPU is present.")
    add("--v1", action="store_true", help="(optional) Use SynthSeg 1.0.")
    add("--ct", action="store_true", help="(optional) CT scan: clip intensities to [0, 80].")
    add("--keepgeom", action="store_true",
        help="(optional) Write the segmentation/posteriors on the input's voxel grid, not 1 mm.")
    add("--addctab", action="store_true",
        help="(optional) FreeSurfer's colour table in .mgz segmentations (a .ctab beside others).")
    add("--noaddctab", dest="addctab", action="store_false", help="(optional) No colour table.")
    add("--model", dest="model_file", help="(optional) An alternative segmentation model (.h5).")
    add("--channels", choices=["mean", "first"],
        help="(optional) Multi-channel input: mean of the channels (FreeSurfer 8, default) or the "
             "first (FreeSurfer 7.3.2).")
    # ours
    add("--models_dir", help="(optional) FreeSurfer-style models/ folder with the .h5 weights.")
    add("--labels_dir", help="(optional) Folder with the label .npy files (default: the models folder "
                             "if it has them, else the label tables shipped with the package).")
    add("--device", help="(optional) auto, cpu, gpu or tpu; --cpu is the same as --device cpu.")
    add("--bf16", dest="precision", action="store_const", const="bf16",
        help="(optional) bfloat16 convolution products (float32 accumulation and all else).")
    add("--no-progress", dest="progress", action="store_false", help="(optional) No progress bar.")
    add("--overwrite", action="store_true",
        help="(optional) Segment again the scans whose outputs all exist (a re-run skips them).")
    add("--shard", metavar="K/N", help="(optional) Only the K-th (from 0) of N parts of the scans.")
    return parser


def default_models_dir() -> str | None:
    if os.environ.get("SYNTHSEG_JAX_MODELS"):
        return os.environ["SYNTHSEG_JAX_MODELS"]
    home = os.environ.get("FREESURFER_HOME")
    if home and os.path.isfile(os.path.join(home, "models", "synthseg_2.0.h5")):
        return os.path.join(home, "models")
    return None


def options_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The given flags as option values, with the original's defaults for threads and models."""
    from synthseg_jax.inference.options import UsageError

    values = dict(flags)
    bids_app = [values.pop(key, None) for key in ("bids_dir", "output_dir", "analysis_level")]
    if any(bids_app):
        if not all(bids_app):
            raise UsageError("the BIDS-App form needs BIDS_DIR OUT_DIR participant")
        if "o" in values:
            raise UsageError("the BIDS-App form takes its output folder as OUT_DIR, not --o")
        if bids_app[2] != "participant":
            raise UsageError(f"analysis level: only participant is supported (the group tables are "
                             f"written with it), got {bids_app[2]!r}")
        values.update(bids=bids_app[0], o=bids_app[1])
    if values.pop("cpu", False):
        values["device"] = "cpu"
    values.setdefault("threads", DEFAULT_THREADS)
    if not values.get("models_dir"):
        values["models_dir"] = default_models_dir()
    return values


def main(argv: list[str] | None = None) -> int:
    """Exit code as ``pipeline.run``'s; Ctrl-C while it starts is one line and 130 too."""
    interrupts.install()
    try:
        return checked_main(argv)
    except KeyboardInterrupt:
        interrupts.quit_while_starting()


def checked_main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return 1
    flags = vars(parser.parse_args(argv))

    # device and threads before jax is imported
    from synthseg_jax.inference import pipeline, runtime
    from synthseg_jax.inference.options import PredictOptions, UsageError

    try:
        opts = PredictOptions.from_mapping(options_from_flags(flags))
        for note in runtime.configure_runtime(opts.threads, opts.device):
            print(note)
    except UsageError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1
    runtime.setup_logging()
    code = pipeline.run(opts)
    if code == interrupts.INTERRUPTED:
        interrupts.quit_interrupted()
    return code


if __name__ == "__main__":
    sys.exit(main())
