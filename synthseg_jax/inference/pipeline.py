"""The batch: resolve inputs and outputs, load the networks once, segment every scan, report.

Inputs and outputs follow ``mri_synthseg``:

* ``i`` an image file (``.nii``, ``.nii.gz``, ``.mgz``): ``o``/``post``/``resample`` are files, or
  folders (no image extension) that receive ``<name>_synthseg<ext>`` etc.;
* ``i`` a folder: every image in it (sorted); ``o``/``post``/``resample`` must be folders;
* ``i`` a ``.txt`` list of paths: every output given must be a ``.txt`` list of the same length;
* ``vol``/``qc``: one CSV for all scans (``.csv`` added if missing), or per-scan CSVs from a
  ``.txt`` list.

A problem with one scan is reported as one line (file and problem, no traceback) and the batch
goes on; the summary lists the failures and the exit code is 1. A problem with the run itself
(bad arguments, a models folder lacking a file) stops it before anything is written. Each scan's
files are written under temporary names and renamed together at the end, so a failure leaves no
partial output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from synthseg_jax.scans import (
    AtomicWriter,
    ScanError,
    check_writable,
    image_extension,
    load_scan,
    strip_image_extension,
)
from synthseg_jax.inference.outputs import (
    CsvTable,
    format_qc,
    format_volumes,
    overlay_png,
    qc_columns,
    single_scan_csv,
    subject_name,
    volume_columns,
)
from synthseg_jax.inference.preprocess import as_three, preprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODELS_DIR = os.path.join(REPO_ROOT, "checkpoints")
DEFAULT_LABELS_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "synthseg", "labels_classes_priors")
LABEL_FILE = "synthseg_segmentation_labels_2.0.npy"

log = logging.getLogger("synthseg_jax.inference")


class UsageError(ValueError):
    """Arguments that cannot work together; nothing has been written."""


@dataclasses.dataclass
class Options:
    """One run's settings; names follow ``mri_synthseg``'s flags."""

    i: str | None = None
    o: str | None = None
    parc: bool = False
    robust: bool = False
    fast: bool = False
    v1: bool = False
    vol: str | None = None
    qc: str | None = None
    post: str | None = None
    resample: str | None = None
    overlay: str | None = None
    crop: Any = None
    ct: bool = False
    keepgeom: bool = False
    models_dir: str | None = None
    labels_dir: str | None = None
    threads: int | None = None
    device: str = "auto"
    progress: bool = True
    # Internal (not in configs/predict.yaml): smaller values only make tests fast.
    qc_crop_size: int = 224   # the original's MakeShape size
    min_pad: Any = None       # None: the original's rule (128, or the crop size)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Options":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items()})


@dataclasses.dataclass
class Job:
    """One scan and where its outputs go (None: not requested)."""

    image: str
    seg: str
    post: str | None = None
    resample: str | None = None
    overlay: str | None = None
    vol: str | None = None     # per-scan CSV (.txt list inputs only)
    qc: str | None = None

    def outputs(self) -> list[str]:
        return [p for p in (self.seg, self.post, self.resample, self.overlay, self.vol, self.qc) if p]


@dataclasses.dataclass
class Plan:
    jobs: list[Job]
    vol_table: str | None = None   # one CSV for all scans
    qc_table: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Inputs and outputs
# ------------------------------------------------------------------------------------------------

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


def _with_suffix(image_path: str, suffix: str) -> str:
    name = os.path.basename(image_path)
    ext = image_extension(name) or ""
    return f"{strip_image_extension(name)}_{suffix}{ext}"


def _csv_name(path: str, flag: str, notes: list[str]) -> str:
    if not path.lower().endswith(".csv"):
        notes.append(f"{flag} given without .csv extension; writing {path}.csv")
        path += ".csv"
    return path


def plan_outputs(opts: Options) -> Plan:
    """Every scan with its output paths, following the kind of ``i``; ``UsageError`` on mismatch."""
    if not opts.i:
        raise UsageError("no input: give i=<image, folder or .txt list> (--i)")
    if not opts.o:
        raise UsageError("no output: give o=<image, folder or .txt list> (--o)")
    src = os.path.abspath(os.path.expanduser(str(opts.i)))
    abs_or_none = lambda p: os.path.abspath(os.path.expanduser(str(p))) if p else None
    out = {k: abs_or_none(getattr(opts, k)) for k in ("o", "post", "resample", "overlay", "vol", "qc")}
    notes: list[str] = []

    if src.lower().endswith(".txt"):
        images = _read_list(src, "input")
        if not images:
            raise UsageError(f"{src}: the input list is empty")
        lists = {}
        for key, path in out.items():
            if path is None:
                continue
            if not path.lower().endswith(".txt"):
                raise UsageError(f"i is a .txt list, so {key} must be a .txt list too (got {path})")
            lists[key] = _read_list(path, key)
            if len(lists[key]) != len(images):
                raise UsageError(f"{path}: lists {len(lists[key])} path(s), the input list {len(images)}")
        jobs = []
        for n, image in enumerate(images):
            get = lambda key: os.path.abspath(lists[key][n]) if key in lists else None
            jobs.append(Job(image=os.path.abspath(image), seg=get("o"), post=get("post"),
                            resample=get("resample"), overlay=get("overlay"), vol=get("vol"),
                            qc=get("qc")))
        return Plan(jobs=jobs, notes=notes)

    for key, path in out.items():
        if path is not None and path.lower().endswith(".txt"):
            raise UsageError(f"{key} can only be a .txt list when i is one (got {path})")

    if image_extension(src):
        if not os.path.isfile(src):
            raise UsageError(f"{src}: file not found")

        def place(path: str | None, suffix: str, ext_ok) -> str | None:
            if path is None:
                return None
            if ext_ok(path):
                return path
            return os.path.join(path, _with_suffix(src, suffix) if suffix != "overlay"
                                else f"{strip_image_extension(os.path.basename(src))}_overlay.png")

        is_image = lambda p: image_extension(p) is not None
        job = Job(image=src, seg=place(out["o"], "synthseg", is_image),
                  post=place(out["post"], "posteriors", is_image),
                  resample=place(out["resample"], "resampled", is_image),
                  overlay=place(out["overlay"], "overlay", lambda p: p.lower().endswith(".png")))
        return Plan(jobs=[job], notes=notes,
                    vol_table=_csv_name(out["vol"], "vol", notes) if out["vol"] else None,
                    qc_table=_csv_name(out["qc"], "qc", notes) if out["qc"] else None)

    if os.path.isfile(src):
        raise UsageError(f"{src}: unsupported input; give a .nii, .nii.gz or .mgz image, a folder, "
                         f"or a .txt list")
    if not os.path.isdir(src):
        raise UsageError(f"{src}: input not found")
    images = list_images(src)
    if not images:
        raise UsageError(f"{src}: no .nii, .nii.gz or .mgz image in this folder")
    for key in ("o", "post", "resample"):
        if out[key] is not None and image_extension(out[key]):
            raise UsageError(f"i is a folder, so {key} must be a folder too (got {out[key]})")
    if out["overlay"] is not None and out["overlay"].lower().endswith(".png"):
        raise UsageError(f"i is a folder, so overlay must be a folder too (got {out['overlay']})")
    folder = lambda key, suffix, img: os.path.join(out[key], _with_suffix(img, suffix)) if out[key] else None
    jobs = [Job(image=img, seg=folder("o", "synthseg", img), post=folder("post", "posteriors", img),
                resample=folder("resample", "resampled", img),
                overlay=(os.path.join(out["overlay"], strip_image_extension(os.path.basename(img))
                                      + "_overlay.png") if out["overlay"] else None))
            for img in images]
    return Plan(jobs=jobs, notes=notes,
                vol_table=_csv_name(out["vol"], "vol", notes) if out["vol"] else None,
                qc_table=_csv_name(out["qc"], "qc", notes) if out["qc"] else None)


def resolve_dirs(opts: Options) -> tuple[str, str]:
    """(models folder, labels folder): the labels live in the models folder if it has them."""
    models_dir = os.path.abspath(os.path.expanduser(opts.models_dir or
                                                    os.environ.get("SYNTHSEG_JAX_MODELS", DEFAULT_MODELS_DIR)))
    if opts.labels_dir:
        labels_dir = os.path.abspath(os.path.expanduser(opts.labels_dir))
    elif os.path.isfile(os.path.join(models_dir, LABEL_FILE)):
        labels_dir = models_dir
    else:
        labels_dir = os.path.normpath(DEFAULT_LABELS_DIR)
    return models_dir, labels_dir


# ------------------------------------------------------------------------------------------------
# Runtime (before jax is imported)
# ------------------------------------------------------------------------------------------------

JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}


def configure_runtime(threads: int | None = None, device: str = "auto") -> list[str]:
    """Pin the device and the number of CPU threads. Only effective before jax starts its backend
    (the entry points call it first). XLA:CPU sizes its thread pools from the CPUs the process may
    run on, so ``threads`` restricts the process's CPU affinity. Returns notes to print."""
    notes = []
    device = (device or "auto").lower()
    if device != "auto":
        if device not in JAX_PLATFORMS:
            raise UsageError(f"device must be auto, cpu, gpu or tpu (got {device!r})")
        os.environ["JAX_PLATFORMS"] = JAX_PLATFORMS[device]
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    if threads:
        threads = int(threads)
        if threads < 1:
            raise UsageError(f"threads must be a positive number (got {threads})")
        try:
            allowed = sorted(os.sched_getaffinity(0))
            if threads < len(allowed):
                os.sched_setaffinity(0, allowed[:threads])
            notes.append(f"using {min(threads, len(allowed))} thread(s)")
        except (AttributeError, OSError):
            notes.append("cannot limit the number of threads on this system; using all cores")
        if threads == 1:
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_cpu_multi_thread_eigen" not in flags:
                os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    return notes


def setup_logging(level: int = logging.INFO) -> None:
    """Show the pipeline's log lines (compilations) as plain messages on stderr."""
    logger = logging.getLogger("synthseg_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------------
# The batch
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    done: list[str]
    failed: list[tuple[str, str]]
    seconds: list[float]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(err, (ScanError, UsageError)) or type(err).__name__ == "ModelError":
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Runner:
    """Segments scans one after another with networks loaded once."""

    def __init__(self, opts: Options, stdout: TextIO | None = None, stderr: TextIO | None = None):
        from synthseg_jax.inference.network import Mode, Predictor, load_networks

        self.opts = opts
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        try:
            self.mode = Mode(robust=bool(opts.robust), fast=bool(opts.fast), v1=bool(opts.v1),
                             parc=bool(opts.parc), qc=bool(opts.qc))
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.crop = as_three(opts.crop) if opts.crop not in (None, "", []) else None
        self.plan = plan_outputs(opts)
        models_dir, labels_dir = resolve_dirs(opts)
        self.networks = load_networks(models_dir, self.mode, labels_dir)
        self.tables = self.networks.tables
        self.predictor = Predictor(self.networks, self.mode, qc_crop_size=opts.qc_crop_size)
        self.timings: list[dict[str, float]] = []   # per scan: compile, network, components, ...
        self.vol_columns = volume_columns(self.tables, self.mode.parc)
        self.qc_columns = qc_columns(self.tables)
        self.vol_table = CsvTable(self.plan.vol_table, self.vol_columns) if self.plan.vol_table else None
        self.qc_table = (CsvTable(self.plan.qc_table, self.qc_columns)
                         if self.plan.qc_table and self.mode.qc else None)
        for table in (self.vol_table, self.qc_table):
            if table is not None:
                try:
                    check_writable(table.path)
                except ScanError as err:
                    raise UsageError(str(err)) from None

    def say(self, message: str, err: bool = False) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self.stderr if err else self.stdout)

    def segment(self, job: Job) -> float:
        """Everything for one scan; raises on any problem, having written nothing."""
        start = time.perf_counter()
        from synthseg_jax.inference.postprocess import (
            assemble_volumes,
            to_input_grid,
            to_scan_grid,
            volume_dtype,
        )

        stages: dict[str, float] = {}   # host stages around the network's (seconds)
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            stages[name] = stages.get(name, 0.0) + now - mark
            mark = now

        scan = load_scan(job.image)
        lap("read")
        if scan.n_channels > 1:
            self.say(f"WARNING: {job.image}: {scan.n_channels} channels, only the first is used", err=True)
        for path in job.outputs():
            check_writable(path)
        for path in (job.seg, job.post, job.resample):
            if path and image_extension(path) is None:
                raise ScanError(f"{path}: output needs a .nii, .nii.gz or .mgz extension")
        prep = preprocess(scan, crop=self.crop, ct=bool(self.opts.ct), min_pad=self.opts.min_pad)
        lap("preprocess")
        net = self.predictor.predict(prep.image, prep.pad_idx, posteriors=bool(job.post),
                                     volume_dtype=volume_dtype(prep.crop_idx is not None),
                                     alignment=prep.alignment)
        mark = time.perf_counter()
        seg = to_scan_grid(net.seg, prep)
        post = to_scan_grid(net.posteriors, prep, fill_background=True) if job.post else None
        affine = prep.affine
        keepgeom = bool(self.opts.keepgeom) and prep.resampled is not None
        if keepgeom:
            seg, post = to_input_grid(seg, post, prep)
            affine = prep.input_affine
        volumes = assemble_volumes(net.sums, self.tables.segmentation, prep.voxel_size,
                                   self.mode.v1, net.parc_sums)
        subject = subject_name(job.image)
        vol_row = [subject] + format_volumes(volumes)
        qc_row = [subject] + format_qc(net.qc_scores) if net.qc_scores is not None else None
        lap("geometry")

        with AtomicWriter() as writer:
            writer.image(seg, affine, prep.header, job.seg, np.int32)
            if job.post:
                writer.image(post, affine, prep.header, job.post, np.float32)
            if job.resample and prep.resampled is not None:
                writer.image(prep.resampled, prep.affine, prep.header, job.resample, np.float32)
            if job.overlay:
                image = prep.resampled if prep.resampled is not None and not keepgeom else scan.data
                writer.bytes(overlay_png(image, seg, affine, title=subject), job.overlay)
            if job.vol:
                writer.text(single_scan_csv(self.vol_columns, vol_row), job.vol)
            if job.qc and qc_row is not None:
                writer.text(single_scan_csv(self.qc_columns, qc_row), job.qc)
            if self.vol_table is not None:
                writer.text(self.vol_table.pending(vol_row), self.vol_table.path)
            if self.qc_table is not None and qc_row is not None:
                writer.text(self.qc_table.pending(qc_row), self.qc_table.path)
            writer.commit()
        lap("write")
        if self.vol_table is not None:
            self.vol_table.add(vol_row)
        if self.qc_table is not None and qc_row is not None:
            self.qc_table.add(qc_row)
        if job.resample and prep.resampled is None:
            self.say(f"{job.image}: already at 1 mm, no resampled image written")
        timing = dict(stages, **net.seconds)
        timing["total"] = time.perf_counter() - start
        self.timings.append(timing)
        log.info("%s: %s", os.path.basename(job.image),
                 ", ".join(f"{k} {v:.1f} s" for k, v in timing.items() if k != "compile" or v > 0.5))
        return time.perf_counter() - start

    def run(self) -> Summary:
        from tqdm import tqdm

        jobs = self.plan.jobs
        for note in self.plan.notes:
            self.say(note)
        summary = Summary(done=[], failed=[], seconds=[])
        bar = tqdm(jobs, desc="predicting", unit="scan", file=self.stderr,
                   disable=not self.opts.progress or None, dynamic_ncols=True)
        for job in bar:
            try:
                summary.seconds.append(self.segment(job))
                summary.done.append(job.image)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one line per failing scan, the batch goes on
                message = _one_line(err)
                if job.image not in message:
                    message = f"{job.image}: {message}"
                summary.failed.append((job.image, message))
                self.say(f"ERROR {message}", err=True)
                log.debug("scan failed", exc_info=True)
        bar.close()
        self.report(summary)
        return summary

    def report(self, summary: Summary) -> None:
        jobs = self.plan.jobs
        if summary.done:
            where = (jobs[0].seg if len(jobs) == 1 else os.path.dirname(jobs[0].seg))
            self.say(f"{len(summary.done)} of {len(jobs)} scan(s) segmented "
                     f"({np.mean(summary.seconds):.1f} s per scan); segmentation(s) in {where}")
            for label, path in (("volumes", self.plan.vol_table), ("QC scores", self.plan.qc_table)):
                if path and (label == "volumes" or self.mode.qc):
                    self.say(f"{label} in {path}")
        if summary.failed:
            self.say(f"{len(summary.failed)} of {len(jobs)} scan(s) failed:", err=True)
            for _, message in summary.failed:
                self.say(f"  {message}", err=True)


def run(opts: Options | Mapping[str, Any], stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run a batch; returns the exit code: 0 if every scan was segmented, 1 otherwise (also when
    the run cannot start: bad arguments, missing models; then nothing is written)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        if not isinstance(opts, Options):
            opts = Options.from_mapping(opts)
        runner = Runner(opts, stdout=stdout, stderr=stderr)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        print(f"ERROR {_one_line(err)}", file=stderr)
        return 1
    print(runner.mode.describe(), file=stdout)
    return runner.run().exit_code
