"""Which scans a run segments and where each output goes, following ``mri_synthseg``:

* ``i`` an image file (``.nii``, ``.nii.gz``, ``.mgz``): a per-scan output is a file, or a folder
  (a path without the kind's extension) that receives ``<name>_synthseg<ext>`` etc.;
* ``i`` a folder: every image in it (sorted); per-scan outputs must be folders;
* ``i`` a ``.txt`` list of paths: every per-scan output given must be a ``.txt`` list of the same
  length;
* tables (``vol``, ``qc``): one CSV for all scans (``.csv`` added if missing), whatever ``i`` is,
  or, when ``i`` is a ``.txt`` list, a ``.txt`` list of per-scan CSVs;
* run files (``report``): one file for the run (``.html`` added if missing), never a list.

Every rule reads the output table (``outputs.OUTPUT_KINDS``); nothing here names a kind.
"""

from __future__ import annotations

import dataclasses
import os

from synthseg_jax.inference.csv_files import subject_name
from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.outputs import OUTPUT_KINDS, OutputKind
from synthseg_jax.package_data import default_models_dir, label_tables_dir
from synthseg_jax.scans import (
    IMAGE_DESCRIPTION,
    ScanError,
    check_writable,
    image_extension,
    strip_image_extension,
)

LABEL_FILE = "synthseg_segmentation_labels_2.0.npy"
MODELS_ENV = "SYNTHSEG_JAX_MODELS"


@dataclasses.dataclass
class Job:
    """One scan and the files written for it alone, by output kind key; ``sidecars``: metadata
    files (path -> text) written together with them (BIDS' JSON and look-up table)."""

    image: str
    paths: dict[str, str]
    sidecars: dict[str, str] = dataclasses.field(default_factory=dict)

    def outputs(self) -> list[str]:
        return list(self.paths.values())


@dataclasses.dataclass
class Plan:
    jobs: list[Job]
    tables: dict[str, str] = dataclasses.field(default_factory=dict)  # one file for all scans
    run_files: dict[str, str] = dataclasses.field(default_factory=dict)  # written once, at the end
    notes: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)   # reported; the run goes on, exit 1
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> text, once per run


def _read_list(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: {what} list file not found")
    try:
        with open(path) as handle:
            return [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read {what} list ({err})") from None


def list_images(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if image_extension(f) and not f.startswith("."))


def _in_folder(folder: str, kind: OutputKind, image: str) -> str:
    name = os.path.basename(image)
    stem = strip_image_extension(name)
    return os.path.join(folder, kind.folder_name.format(stem=stem, ext=image_extension(name) or ""))


def _single_file(path: str, kind: OutputKind, notes: list[str]) -> str:
    if not kind.form.matches(path):
        notes.append(f"{kind.key} given without {kind.form.extensions[0]} extension; "
                     f"writing {path}{kind.form.extensions[0]}")
        path += kind.form.extensions[0]
    return path


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def plan_outputs(opts: PredictOptions) -> Plan:
    """Every scan with its output paths, following the kind of ``i``; ``UsageError`` on mismatch."""
    if not opts.i:
        raise UsageError("no input: give i=<image, folder or .txt list> (--i), or "
                         "bids=<BIDS dataset>")
    if not opts.output("o"):
        raise UsageError("no output: give o=<image, folder or .txt list> (--o)")
    src = _absolute(opts.i)
    given = {key: _absolute(path) for key, path in opts.outputs.items()}
    notes: list[str] = []
    run_files = {}
    for key in [k for k in given if OUTPUT_KINDS[k].scope == "run"]:
        path = given.pop(key)
        if path.lower().endswith(".txt"):
            raise UsageError(f"{key} is one file for the whole run, not a .txt list (got {path})")
        run_files[key] = _single_file(path, OUTPUT_KINDS[key], notes)
    kinds = [OUTPUT_KINDS[key] for key in given]

    if src.lower().endswith(".txt"):
        plan = _plan_lists(src, given)
        return dataclasses.replace(plan, run_files=run_files, notes=notes + plan.notes)
    for key, path in given.items():
        if path.lower().endswith(".txt"):
            raise UsageError(f"{key} can only be a .txt list when i is one (got {path})")

    if image_extension(src):
        if not os.path.isfile(src):
            raise UsageError(f"{src}: file not found")
        images = [src]
    elif os.path.isfile(src):
        raise UsageError(f"{src}: unsupported input; give a {IMAGE_DESCRIPTION} image, a folder, "
                         f"or a .txt list")
    elif not os.path.isdir(src):
        raise UsageError(f"{src}: input not found")
    else:
        images = list_images(src)
        if not images:
            raise UsageError(f"{src}: no {IMAGE_DESCRIPTION} image in this folder")
        for kind in kinds:
            if kind.scope == "scan" and kind.form.matches(given[kind.key]):
                raise UsageError(f"i is a folder, so {kind.key} must be a folder too "
                                 f"(got {given[kind.key]})")

    def place(kind: OutputKind, image: str) -> str:
        path = given[kind.key]
        return path if kind.form.matches(path) else _in_folder(path, kind, image)

    jobs = [Job(image=image, paths={k.key: place(k, image) for k in kinds if k.scope == "scan"})
            for image in images]
    tables = {k.key: _single_file(given[k.key], k, notes) for k in kinds if k.scope == "table"}
    return Plan(jobs=jobs, tables=tables, run_files=run_files, notes=notes)


def _plan_lists(src: str, given: dict[str, str]) -> Plan:
    """``i`` is a ``.txt`` list: every per-scan output a list of as many paths; a table a list of
    per-scan files, or one file for the whole cohort."""
    images = _read_list(src, "input")
    if not images:
        raise UsageError(f"{src}: the input list is empty")
    lists, notes, tables = {}, [], {}
    for key, path in given.items():
        kind = OUTPUT_KINDS[key]
        if kind.scope == "table" and not path.lower().endswith(".txt"):
            tables[key] = _single_file(path, kind, notes)
            continue
        if not path.lower().endswith(".txt"):
            raise UsageError(f"i is a .txt list, so {key} must be a .txt list too (got {path})")
        lists[key] = _read_list(path, key)
        if len(lists[key]) != len(images):
            raise UsageError(f"{path}: lists {len(lists[key])} path(s), the input list {len(images)}")
    jobs = [Job(image=os.path.abspath(image),
                paths={key: os.path.abspath(paths[n]) for key, paths in lists.items()})
            for n, image in enumerate(images)]
    return Plan(jobs=jobs, tables=tables, notes=notes)


def check_outputs(plan: Plan) -> None:
    """Refuse, before any scan is read, an output that cannot be written, lacks its kind's
    extension, is one of the run's inputs (it would overwrite the scan) or is given twice, and a
    shared table for scans it cannot tell apart (its rows are keyed by subject name)."""
    if plan.tables:
        first: dict[str, str] = {}
        for job in plan.jobs:
            name = subject_name(job.image)
            if name in first:
                key = next(iter(plan.tables))
                raise UsageError(f"{job.image}: subject name {name!r} is also {first[name]}'s; one "
                                 f"{key} table cannot tell their rows apart (rename one, or give "
                                 f"{key} as a .txt list of per-scan CSVs)")
            first[name] = job.image
    inputs = {os.path.realpath(job.image) for job in plan.jobs}
    seen: dict[str, str] = {}
    outputs = [(key, path) for job in plan.jobs for key, path in job.paths.items()]
    for key, path in outputs + list(plan.tables.items()) + list(plan.run_files.items()):
        form = OUTPUT_KINDS[key].form
        if form.strict and not form.matches(path):
            raise UsageError(f"{path}: {key} needs a {form.description} extension")
        real = os.path.realpath(path)
        if real in inputs:
            raise UsageError(f"{path}: {key} is an input scan of this run; it would be overwritten")
        if real in seen:
            raise UsageError(f"{path}: given for both {seen[real]} and {key}")
        seen[real] = key
        try:
            check_writable(path)
        except ScanError as err:
            raise UsageError(str(err)) from None


def resolve_dirs(opts: PredictOptions) -> tuple[str, str]:
    """(models folder, labels folder): ``models_dir``, else ``$SYNTHSEG_JAX_MODELS``, else the
    shipped default model; the labels live in the models folder if it has them, else the label
    tables shipped with the package."""
    models_dir = _absolute(opts.models_dir or os.environ.get(MODELS_ENV) or default_models_dir())
    if opts.labels_dir:
        labels_dir = _absolute(opts.labels_dir)
    elif os.path.isfile(os.path.join(models_dir, LABEL_FILE)):
        labels_dir = models_dir
    else:
        labels_dir = label_tables_dir()
    return models_dir, labels_dir
