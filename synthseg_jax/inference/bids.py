"""A BIDS dataset in, BIDS-Derivatives out: which anatomical scans a run segments and what each
one's files are called, as the same ``Plan`` of ``Job``s that ``planning.plan_outputs`` makes for
an image, a folder or a list (the runner, and any filtering of plans, work on either alike).

Discovery uses pybids' ``BIDSLayout`` (the BIDS Apps' standard). bids2table indexes faster, but
parses ``run-01`` into the integer 1, and output names must keep every entity exactly as the
source spells it; indexing is seconds against minutes of segmentation per scan.

For each source ``sub-01/ses-1/anat/sub-01_ses-1_run-1_T2w.nii.gz`` the derivatives folder ``o``
receives, in ``sub-01/ses-1/anat/``::

    sub-01_ses-1_run-1_seg-synthseg_desc-T2w_dseg.nii.gz   the segmentation, on the scan's grid
    sub-01_ses-1_run-1_seg-synthseg_desc-T2w_dseg.json     Sources and the options used
    sub-01_ses-1_run-1_seg-synthseg_desc-T2w_dseg.tsv      the look-up table (index, name, color)
    sub-01_ses-1_run-1_seg-synthseg_desc-T2w_volumes.csv   this scan's volumes (and _qc.csv)

``desc`` holds the source's suffix, so a session's T1w and T2w (and, through ``run``/``acq``,
its runs) stay apart. At the top: ``dataset_description.json``, the group tables
``synthseg_volumes.csv`` (and ``synthseg_qc.csv``, or the paths given as ``vol``/``qc``), and a
``.bidsignore`` naming the CSVs, which BIDS has no names for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from synthseg_jax.inference.colour_table import colour_table, dseg_tsv
from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.planning import Job, Plan, resolve_dirs
from synthseg_jax.labels import LabelTables
from synthseg_jax.package_data import package_version

SEGMENTATION_ENTITY = "seg-synthseg"
GROUP_TABLES = {"vol": "synthseg_volumes.csv", "qc": "synthseg_qc.csv"}
SCAN_TABLES = {"vol": "volumes.csv", "qc": "qc.csv"}
BIDS_IGNORE = "*_volumes.csv\n*_qc.csv\nsynthseg_*.csv\n.*.csv.lock\n"   # the group tables' locks (shared_table.py)
BIDS_VERSION = "1.10.0"
NOT_IN_BIDS_MODE = ("post", "resample", "overlay")
# Options that say where things are, not how a scan was segmented: left out of the sidecars.
NOT_SETTINGS = {"i", "outputs", "bids", "participant_label", "suffix", "progress", "threads",
                "device"}


def _bids_layout(root: str) -> Any:
    try:
        from bids import BIDSLayout
    except ImportError:
        raise UsageError("bids needs pybids: pip install 'synthseg-jax[bids]'") from None
    try:
        return BIDSLayout(root, validate=True, derivatives=False)
    except Exception as err:  # pybids' validation errors, a malformed dataset_description.json
        lines = str(err).strip().splitlines()
        raise UsageError(f"{root}: not a usable BIDS dataset ({lines[0] if lines else err})") from None


def check_dataset(root: str) -> None:
    """A BIDS dataset has ``dataset_description.json`` and ``sub-*`` folders; say which is missing."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: BIDS dataset folder not found")
    if not os.path.isfile(os.path.join(root, "dataset_description.json")):
        raise UsageError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    if not any(name.startswith("sub-") and os.path.isdir(os.path.join(root, name))
               for name in os.listdir(root)):
        raise UsageError(f"{root}: not a BIDS dataset (no sub-* subject folder)")


def select_subjects(known: list[str], wanted: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(subjects to segment, one error line per unknown label); labels may carry ``sub-``."""
    if wanted is None:
        return sorted(known), []
    labels = [w[4:] if w.startswith("sub-") else w for w in wanted]
    errors = [f"participant label {label}: no sub-{label} in the dataset (known: "
              f"{', '.join(sorted(known))})" for label in labels if label not in known]
    return [label for label in dict.fromkeys(labels) if label in known], errors


def derivative_stem(relpath: str, suffix: str) -> str:
    """The derivative's path without its own suffix: the source's folder and entities, as spelled
    there, then ``seg-synthseg`` and ``desc-<source suffix>``."""
    folder, name = os.path.split(relpath)
    entities = name.split(".", 1)[0]
    if not entities.endswith(f"_{suffix}"):
        raise UsageError(f"{relpath}: expected a file name ending in _{suffix}")
    return os.path.join(folder, f"{entities[:-len(suffix) - 1]}_{SEGMENTATION_ENTITY}_desc-{suffix}")


def settings(opts: PredictOptions, models_dir: str, labels_dir: str) -> dict[str, Any]:
    """The options that decide the segmentation, for the sidecars (keepgeom is always on here)."""
    values = {k: v for k, v in dataclasses.asdict(opts).items() if k not in NOT_SETTINGS}
    values.update(keepgeom=True, models_dir=models_dir, labels_dir=labels_dir,
                  qc="qc" in opts.outputs)
    return values


def dataset_link(root: str, out: str) -> str:
    """How the derivatives reach the raw dataset: relative when inside it (``derivatives/``)."""
    if Path(out).is_relative_to(root):
        return os.path.relpath(root, out)
    return Path(root).as_uri()


def dataset_description(raw_name: str, link: str) -> str:
    return json.dumps({
        "Name": f"SynthSeg segmentations of {raw_name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "synthseg-jax", "Version": package_version(),
                         "Description": "SynthSeg (Billot et al., MedIA 2023) in JAX/Flax"}],
        "DatasetLinks": {"raw": link},
    }, indent=2) + "\n"


def scan_sidecar(relpath: str, used: dict[str, Any]) -> str:
    return json.dumps({"Sources": [f"bids:raw:{relpath}"], "SynthSegOptions": used},
                      indent=2) + "\n"


def _raw_name(root: str) -> str:
    try:
        with open(os.path.join(root, "dataset_description.json")) as handle:
            return str(json.load(handle).get("Name") or os.path.basename(root))
    except (OSError, ValueError, AttributeError):
        return os.path.basename(root)


def plan_bids(opts: PredictOptions) -> Plan:
    """Every anatomical scan of the chosen subjects and suffixes, with its derivative paths;
    ``UsageError`` when the dataset, the output folder or every participant label is wrong."""
    root = os.path.abspath(os.path.expanduser(opts.bids))
    out = opts.output("o")
    if not out:
        raise UsageError("no output: give o=<derivatives folder> (OUT_DIR)")
    out = os.path.abspath(os.path.expanduser(out))
    given = [key for key in NOT_IN_BIDS_MODE if key in opts.outputs]
    if given:
        raise UsageError(f"with bids, o is the derivatives folder; {', '.join(given)} cannot be "
                         f"written in BIDS mode")
    if os.path.isfile(out):
        raise UsageError(f"{out}: with bids, o must be a folder (the derivatives dataset)")
    if os.path.realpath(out) == os.path.realpath(root):
        raise UsageError(f"{out}: the derivatives folder cannot be the BIDS dataset itself")
    check_dataset(root)
    layout = _bids_layout(root)
    subjects, errors = select_subjects(layout.get_subjects(), opts.participant_label)
    if not subjects:
        raise UsageError(errors[0] if len(errors) == 1 else
                         f"{root}: none of the participant labels is in the dataset "
                         f"({'; '.join(errors)})")
    files = layout.get(subject=subjects, datatype="anat", suffix=list(opts.suffix),
                       extension=[".nii", ".nii.gz"])
    if not files:
        raise UsageError(f"{root}: no anatomical {'/'.join(opts.suffix)} scan (.nii, .nii.gz) for "
                         f"sub-{', sub-'.join(subjects)}")

    models_dir, labels_dir = resolve_dirs(opts)
    tables = LabelTables.load(labels_dir, "1.0" if opts.v1 else "2.0")
    lut = dseg_tsv(colour_table(tables, opts.parc))
    used = settings(opts, models_dir, labels_dir)
    outputs = ["vol"] + (["qc"] if "qc" in opts.outputs else [])
    jobs = []
    for image in sorted(files, key=lambda f: f.path):
        relpath = os.path.relpath(image.path, root)
        stem = os.path.join(out, derivative_stem(relpath, image.entities["suffix"]))
        jobs.append(Job(image=image.path,
                        paths={"o": f"{stem}_dseg.nii.gz",
                               **{key: f"{stem}_{SCAN_TABLES[key]}" for key in outputs}},
                        sidecars={f"{stem}_dseg.json": scan_sidecar(relpath, used),
                                  f"{stem}_dseg.tsv": lut}))
    tables_paths = {key: os.path.abspath(opts.output(key)) if opts.output(key)
                    else os.path.join(out, GROUP_TABLES[key]) for key in outputs}
    files_once = {os.path.join(out, "dataset_description.json"):
                  dataset_description(_raw_name(root), dataset_link(root, out)),
                  os.path.join(out, ".bidsignore"): BIDS_IGNORE}
    return Plan(jobs=jobs, tables=tables_paths, errors=errors, files=files_once)
