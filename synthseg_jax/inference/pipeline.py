"""The batch: plan the outputs, load the networks once, segment every scan, write, report.

A problem with one scan is reported as one line (file and problem, no traceback) and the batch
goes on; the summary lists the failures and the exit code is 1. A problem with the run itself
(bad options, a models folder lacking a file) stops it before anything is written. Each scan's
files are written under temporary names and renamed together at the end, so a failure leaves no
partial output; its rows then go into the shared tables (``shared_table.py``). What is written,
and where, comes from the output table (``outputs.py``); which scans this process takes (its
shard, less those already complete) from ``cohort.py``; the overlap of reading, network and
writing across scans from ``overlap.py``. With ``report``, each segmented scan leaves a record
and the HTML report (``report.py``) is written once at the end, failures included.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from synthseg_jax.inference.bids import plan_bids
from synthseg_jax.inference.cohort import split_done
from synthseg_jax.inference.colour_table import colour_table, ctab_text, mgh_colour_table_tag
from synthseg_jax.inference.csv_files import format_qc, format_volumes, single_scan_csv, subject_name
from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.outputs import OUTPUT_KINDS, ScanResult, write_content
from synthseg_jax.inference.overlap import run_stages
from synthseg_jax.inference.planning import Job, check_outputs, plan_outputs, resolve_dirs
from synthseg_jax.inference.preprocess import Preprocessed, preprocess
from synthseg_jax.inference.report import ScanRecord, scan_record, write_report
from synthseg_jax.inference.shared_table import SharedTable
from synthseg_jax import interrupts
from synthseg_jax.package_data import package_version
from synthseg_jax.scans import (
    AtomicWriter,
    Scan,
    ScanError,
    image_extension,
    load_scan,
    strip_image_extension,
)

log = logging.getLogger("synthseg_jax.inference")


@dataclasses.dataclass
class Summary:
    done: list[str]
    failed: list[tuple[str, str]]
    skipped: list[str]                 # outputs already complete (a resumed run)
    seconds: float = 0.0               # wall-clock time of the scans segmented
    errors: list[str] = dataclasses.field(default_factory=list)   # the plan's, not a scan's
    run_errors: list[str] = dataclasses.field(default_factory=list)   # the report not written

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.errors or self.run_errors else 0


@dataclasses.dataclass
class Loaded:
    """A scan read and preprocessed (the reader's stage), with what to say about it."""

    job: Job
    scan: Scan
    prep: Preprocessed
    messages: list[tuple[str, bool]]   # (line, to stderr)
    stages: dict[str, float]


@dataclasses.dataclass
class Stored:
    """A scan's outputs written (the writer's stage)."""

    messages: list[tuple[str, bool]]
    timing: dict[str, float]


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(err, (ScanError, UsageError)) or type(err).__name__ == "ModelError":
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Laps:
    """Seconds per named stage, each lap from the previous one."""

    def __init__(self, stages: dict[str, float] | None = None) -> None:
        self.stages = stages if stages is not None else {}
        self.mark = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.mark
        self.mark = now


class Runner:
    """Segments this process's scans with networks loaded once."""

    def __init__(self, opts: PredictOptions, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        from synthseg_jax.inference.network import Mode, Predictor, load_networks

        self.opts = opts
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.mode = Mode(robust=opts.robust, fast=opts.fast, v1=opts.v1, parc=opts.parc,
                         qc=opts.output("qc") is not None)
        self.plan = plan_bids(opts) if opts.bids else plan_outputs(opts)
        check_outputs(self.plan)
        # BIDS derivatives without a space entity lie on their source's grid
        self.keepgeom = opts.keepgeom or opts.bids is not None
        models_dir, labels_dir = resolve_dirs(opts)
        conv_dtype = "bfloat16" if opts.precision == "bf16" else "float32"
        self.networks = load_networks(models_dir, self.mode, labels_dir, conv_dtype, opts.model_file)
        self.tables = self.networks.tables
        self.ctab = colour_table(self.tables, self.mode.parc) if opts.addctab else None
        self.predictor = Predictor(self.networks, self.mode, qc_crop_size=opts.qc_crop_size)
        self.timings: list[dict[str, float]] = []   # per scan: compile, network, components, ...
        self.columns = {key: kind.columns(self.tables, self.mode.parc)
                        for key, kind in OUTPUT_KINDS.items() if kind.scope == "table"}
        subjects = [subject_name(job.image) for job in self.plan.jobs]
        self.batch_tables = {key: SharedTable(path, self.columns[key], subjects)
                             for key, path in self.plan.tables.items()}
        self.jobs = opts.shard.select(self.plan.jobs) if opts.shard else self.plan.jobs
        self.records: list[ScanRecord] = []   # for the report, one per segmented scan

    def say(self, message: str, err: bool = False) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self.stderr if err else self.stdout)

    def pending(self) -> tuple[list[Job], list[Job]]:
        """(this process's scans to segment, those skipped as complete), the tables read once."""
        rows = {}
        for key, table in self.batch_tables.items():
            rows[key] = table.read()
            if rows[key] is None:
                self.say(f"{table.path}: not a {OUTPUT_KINDS[key].what} table of this run's "
                         f"columns; rewriting it with this run's rows")
        return split_done(self.jobs, lambda job: all(
            subject_name(job.image) in (found or {}) for found in rows.values()), self.opts.overwrite)

    # The three stages of one scan -----------------------------------------------------------
    def load(self, job: Job) -> Loaded:
        laps = _Laps()
        scan = load_scan(job.image, channels=self.opts.channels)
        laps("read")
        messages = []
        if scan.n_channels > 1:
            used = ("their mean is used (channels=first: the first, as FreeSurfer 7)"
                    if self.opts.channels == "mean" else "only the first is used")
            messages.append((f"WARNING: {job.image}: {scan.n_channels} channels, {used}", True))
        if scan.non_finite:
            messages.append((f"WARNING: {job.image}: {scan.non_finite} NaN or infinite voxel(s) "
                             f"taken as background", True))
        prep = preprocess(scan, crop=self.opts.crop, ct=self.opts.ct, min_pad=self.opts.min_pad,
                          autocrop=self.opts.autocrop)
        laps("preprocess")
        return Loaded(job=job, scan=scan, prep=prep, messages=messages, stages=laps.stages)

    def infer(self, loaded: Loaded):
        """The networks and the device's post-processing: the calling (main) thread, where a
        deferred Ctrl-C stops the run before the next scan's network."""
        from synthseg_jax.inference.postprocess import volume_dtype

        interrupts.check()
        prep = loaded.prep
        posteriors = self._writes_posteriors(loaded.job) or self._keepgeom(prep)
        return self.predictor.predict(prep.image, prep.pad_idx, posteriors=posteriors,
                                      volume_dtype=volume_dtype(prep.crop_idx is not None),
                                      alignment=prep.alignment)

    @staticmethod
    def _writes_posteriors(job: Job) -> bool:
        return any(OUTPUT_KINDS[key].needs_posteriors for key in job.paths)

    def _keepgeom(self, prep: Preprocessed) -> bool:
        """keepgeom's labels come from the posteriors, resampled onto the input's grid."""
        return self.keepgeom and prep.resampled is not None

    def store(self, loaded: Loaded, net) -> Stored:
        """Back onto the scan's grid, the volumes, every output written; raises having written
        nothing of this scan."""
        from synthseg_jax.inference.postprocess import assemble_volumes, to_input_grid, to_scan_grid

        laps = _Laps(dict(loaded.stages))
        job, prep, scan = loaded.job, loaded.prep, loaded.scan
        write_posteriors = self._writes_posteriors(job)
        keepgeom = self._keepgeom(prep)
        post = (to_scan_grid(net.posteriors, prep, fill_background=True)
                if write_posteriors or keepgeom else None)
        affine = prep.affine
        if keepgeom:
            parc = (to_scan_grid(net.parc_posteriors, prep, fill_background=True)
                    if net.parc_posteriors is not None else None)
            seg, post = to_input_grid(post, prep, self.tables.segmentation, parc,
                                      self.tables.parcellation, keep_posteriors=write_posteriors)
            affine = prep.input_affine
        else:
            seg = to_scan_grid(net.seg, prep)
        volumes = assemble_volumes(net.sums, self.tables.segmentation, prep.voxel_size,
                                   self.mode.v1, net.parc_sums)
        result = ScanResult(
            subject=subject_name(job.image), header=prep.header, seg=seg, affine=affine,
            posteriors=post, resampled=prep.resampled, resampled_affine=prep.affine,
            image=prep.resampled if prep.resampled is not None and not keepgeom else scan.data,
            volumes=format_volumes(volumes),
            qc_scores=format_qc(net.qc_scores) if net.qc_scores is not None else None)
        laps("geometry")
        messages = list(loaded.messages)
        if not np.any(seg):
            messages.append((f"WARNING: {job.image}: the segmentation is empty (no structure "
                             f"found); is this a brain scan, with the whole head in the field of "
                             f"view?", True))
        record = None
        if self.plan.run_files:   # before writing: a failure here leaves no output
            record = scan_record(job.image, result, self.columns["vol"], self.columns["qc"])
            laps("report")
        interrupts.check()   # Ctrl-C during the scan: write nothing
        messages += [(f"{job.image}: {note}", False) for note in self._write(job, result)]
        laps("write")
        if record is not None:
            self.records.append(record)
        timing = dict(laps.stages, **net.seconds)
        timing["total"] = sum(timing.values())
        return Stored(messages=messages, timing=timing)

    def _write(self, job: Job, result: ScanResult) -> list[str]:
        """Every file of one scan, committed together, then its rows in the shared tables (a scan
        killed in between lacks its rows and is segmented again). Returns the notes for what had
        nothing to write."""
        notes: list[str] = []
        with AtomicWriter() as writer:
            for key, path in job.paths.items():
                kind = OUTPUT_KINDS[key]
                if kind.scope == "scan":
                    content = kind.render(result)
                    if content is None:
                        notes.append(kind.skipped_note)
                    else:
                        write_content(writer, content, path, self._embedded_ctab(key, path))
                        if (beside := self._ctab_beside(key, path)) is not None:
                            writer.text(ctab_text(self.ctab), beside)
                elif (row := kind.row(result)) is not None:
                    writer.text(single_scan_csv(self.columns[key], [result.subject] + row), path)
            for path, text in job.sidecars.items():
                writer.text(text, path)
            writer.commit()
        for key, table in self.batch_tables.items():
            row = OUTPUT_KINDS[key].row(result)
            if row is not None:
                table.add([result.subject] + row)
        return notes

    def _embedded_ctab(self, key: str, path: str) -> bytes:
        """With ``addctab``, the tag that embeds the colour table in an ``.mgz`` segmentation."""
        if key == "o" and self.ctab is not None and image_extension(path) == ".mgz":
            return mgh_colour_table_tag(self.ctab)
        return b""

    def _ctab_beside(self, key: str, path: str) -> str | None:
        """With ``addctab``, where another format's segmentation gets its ``.ctab`` (none in BIDS
        mode: the ``_dseg.tsv`` is the table there)."""
        if key != "o" or self.ctab is None or image_extension(path) == ".mgz" or self.opts.bids:
            return None
        return strip_image_extension(path) + ".ctab"

    # The batch ------------------------------------------------------------------------------
    def run(self) -> Summary:
        from tqdm import tqdm

        for note in self.plan.notes:
            self.say(note)
        if self.opts.shard:
            self.say(f"shard {self.opts.shard}: {len(self.jobs)} of {len(self.plan.jobs)} scan(s)")
        todo, skipped = self.pending()
        summary = Summary(done=[], failed=[], skipped=[job.image for job in skipped],
                          errors=list(self.plan.errors))
        for error in summary.errors:   # e.g. an unknown participant label: the rest go on
            self.say(f"ERROR {error}", err=True)
        if self.plan.files:
            with AtomicWriter() as writer:
                for path, text in self.plan.files.items():
                    writer.text(text, path)
                writer.commit()
        bar = tqdm(total=len(self.jobs), initial=len(skipped), desc="predicting", unit="scan",
                   file=self.stderr, disable=not self.opts.progress or None, dynamic_ncols=True)
        bar.set_postfix_str(self._counts(summary), refresh=False)

        def finished(job: Job, outcome) -> None:
            if isinstance(outcome, Stored):
                for line, err in outcome.messages:
                    self.say(line, err=err)
                self.timings.append(outcome.timing)
                log.info("%s: %s", os.path.basename(job.image), ", ".join(
                    f"{k} {v:.1f} s" for k, v in outcome.timing.items() if k != "compile" or v > 0.5))
                summary.done.append(job.image)
            else:   # one line per failing scan, the batch goes on
                message = _one_line(outcome)
                if job.image not in message:
                    message = f"{job.image}: {message}"
                summary.failed.append((job.image, message))
                self.say(f"ERROR {message}", err=True)
                log.debug("scan failed", exc_info=outcome)
            bar.set_postfix_str(self._counts(summary), refresh=False)
            bar.update()

        start = time.perf_counter()
        try:
            with interrupts.deferred():   # Ctrl-C: stop at the next safe point (interrupts.py)
                run_stages(todo, self.load, self.infer, self.store, finished,
                           overlap=self.opts.overlap)
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - start
        self._write_report(summary)
        self.report(summary)
        return summary

    def _write_report(self, summary: Summary) -> None:
        path = self.plan.run_files.get("report")
        if path is None:
            return
        about = {"input": os.path.abspath(self.opts.i or self.opts.bids),
                 "mode": self.mode.describe(), "program": f"synthseg-jax {package_version()}"}
        try:
            write_report(path, self.records, summary.failed, about)
        except OSError as err:
            summary.run_errors.append(f"{path}: cannot write the report ({err})")

    @staticmethod
    def _counts(summary: Summary) -> str:
        return (f"done {len(summary.done)}, failed {len(summary.failed)}, "
                f"skipped {len(summary.skipped)}")

    def report(self, summary: Summary) -> None:
        """What was written and where, the failures, then one closing line."""
        jobs = self.jobs
        if summary.done:
            seg = jobs[0].paths["o"]
            where = seg if len(self.plan.jobs) == 1 else os.path.dirname(seg)
            if self.opts.bids:
                where = os.path.abspath(self.opts.output("o"))
            self.say(f"segmentation(s) in {where}")
            for key, path in self.plan.tables.items():
                self.say(f"{OUTPUT_KINDS[key].what} in {path}")
        if summary.failed:
            self.say(f"{len(summary.failed)} of {len(jobs)} scan(s) failed:", err=True)
            for _, message in summary.failed:
                self.say(f"  {message}", err=True)
        for error in summary.errors:
            self.say(f"ERROR {error}", err=True)
        for message in summary.run_errors:
            self.say(f"ERROR {message}", err=True)
        if not summary.run_errors:
            for key, path in self.plan.run_files.items():
                self.say(f"{OUTPUT_KINDS[key].what} in {path}")
        rate = (f" in {summary.seconds:.1f} s ({summary.seconds / len(summary.done):.1f} s per scan)"
                if summary.done else "")
        part = f" of shard {self.opts.shard}" if self.opts.shard else ""
        self.say(f"{len(summary.done)} of {len(jobs)} scan(s){part} segmented, {len(summary.failed)} "
                 f"failed, {len(summary.skipped)} skipped (outputs already complete){rate}")


def run(opts: PredictOptions | Mapping[str, Any], stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run a batch; returns the exit code: 0 if every scan was segmented, 1 otherwise (also when
    the run cannot start: bad options, missing models; then nothing is written), 130 on Ctrl-C."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        if not isinstance(opts, PredictOptions):
            opts = PredictOptions.from_mapping(opts)
        runner = Runner(opts, stdout=stdout, stderr=stderr)
        interrupts.check()
    except KeyboardInterrupt:
        return interrupts.interrupted_while_starting(stderr)
    except Exception as err:
        print(f"ERROR {_one_line(err)}", file=stderr)
        return 1
    precision = ", bfloat16 convolution products" if opts.precision == "bf16" else ""
    model = f", segmenter {opts.model_file}" if opts.model_file else ""
    print(runner.mode.describe() + model + precision, file=stdout)
    try:
        return runner.run().exit_code
    except KeyboardInterrupt:   # the scan in progress wrote nothing (AtomicWriter)
        print("ERROR interrupted; the scans finished before it are written, the one in progress "
              "left no output", file=stderr)
        return interrupts.INTERRUPTED
