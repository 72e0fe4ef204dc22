"""Everything a run can write, as one table: ``OUTPUT_KINDS``.

Each entry is one output kind; the options (``options.PredictOptions``), the planning of paths
(``planning.plan_outputs``), the writing (``pipeline.Runner``) and both command lines read it, so a
new output is one entry here and its key, with its comment, in ``configs/predict.yaml``.

Three scopes:

* ``scan``: one file per scan (segmentation, posteriors, resampled image, overlay); given a folder,
  each scan's file is named after it (``folder_name``); ``render`` makes the file's content from a
  ``ScanResult`` (None: nothing to write for this scan, ``skipped_note`` says why);
* ``table``: one row per scan (volumes, QC scores): one file for all scans, or, when ``i`` is a
  ``.txt`` list, possibly a ``.txt`` list of one file per scan; ``columns`` and ``row`` give its
  content. A per-subject table is another entry of this scope;
* ``run``: one file for the whole run (the HTML report), made once at the end from every scan's
  record and the failures (``report.py``); never a ``.txt`` list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from synthseg_jax.inference.csv_files import qc_columns, volume_columns
from synthseg_jax.labels import LabelTables
from synthseg_jax.scans import IMAGE_DESCRIPTION, IMAGE_EXTENSIONS, AtomicWriter


@dataclasses.dataclass(frozen=True)
class FileForm:
    """Which file names an output kind accepts."""

    description: str                       # for messages: ".nii, .nii.gz or .mgz"
    extensions: tuple[str, ...]            # the first is added to a table's name that lacks one
    strict: bool                           # refuse a listed path with another extension

    def matches(self, path: str) -> bool:
        return path.lower().endswith(self.extensions)


IMAGE = FileForm(IMAGE_DESCRIPTION, IMAGE_EXTENSIONS, strict=True)
PNG = FileForm(".png", (".png",), strict=False)
CSV = FileForm(".csv", (".csv",), strict=False)
HTML = FileForm(".html", (".html", ".htm"), strict=False)


@dataclasses.dataclass(frozen=True)
class ImageContent:
    """An image to write: voxels, the grid's affine, the input's header, the file's dtype."""

    data: np.ndarray
    affine: np.ndarray
    header: Any
    dtype: type


Content = ImageContent | bytes


@dataclasses.dataclass
class ScanResult:
    """What one scan's outputs are made from, on the grid they are written on."""

    subject: str
    header: Any
    seg: np.ndarray                       # int32 labels
    affine: np.ndarray                    # the grid of ``seg`` and ``posteriors``
    posteriors: np.ndarray | None         # float32 (X, Y, Z, C), computed only if a kind needs it
    resampled: np.ndarray | None          # the 1 mm image, if the scan was resampled
    resampled_affine: np.ndarray
    image: np.ndarray                     # the scan on the grid of ``seg`` (for the overlay)
    volumes: list[str]                    # the volumes row, formatted as the original's CSV
    qc_scores: list[str] | None           # the QC row (QC mode only)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """One thing a run can write; ``key`` is its option name (Hydra key and ``--flag``)."""

    key: str
    help: str
    form: FileForm
    scope: Literal["scan", "table", "run"]
    folder_name: str = ""                 # scan scope: "{stem}" and "{ext}" of the input
    render: Callable[[ScanResult], Content | None] | None = None
    skipped_note: str = ""                # said when ``render`` gives nothing
    needs_posteriors: bool = False
    expected: Callable[[str], bool] = lambda image: True   # scan scope: is a file made for it?
    columns: Callable[[LabelTables, bool], list[str]] | None = None   # table scope (tables, parc)
    row: Callable[[ScanResult], list[str] | None] | None = None       # None: no row for this scan
    what: str = ""                        # table and run scopes: how the summary names the file


def write_content(writer: AtomicWriter, content: Content, path: str, mgh_tags: bytes = b"") -> None:
    if isinstance(content, ImageContent):
        writer.image(content.data, content.affine, content.header, path, content.dtype, mgh_tags)
    else:
        writer.bytes(content, path)


def _overlay(result: ScanResult) -> bytes:
    from synthseg_jax.inference.overlay import overlay_png

    return overlay_png(result.image, result.seg, result.affine, title=result.subject)


def _resampled(result: ScanResult) -> ImageContent | None:
    if result.resampled is None:
        return None
    return ImageContent(result.resampled, result.resampled_affine, result.header, np.float32)


def _resampling_expected(image: str) -> bool:
    """A resampled image is written only for a scan not at 1 mm, as its header says (a resumed
    run asks this of a scan whose resampled image is absent)."""
    import nibabel as nib

    from synthseg_jax.geometry import needs_resampling

    try:
        zooms = nib.load(image).header.get_zooms()[:3]
    except Exception:  # an unreadable scan: segmenting it again says why, in one line
        return True
    return needs_resampling(np.asarray(zooms))


_KINDS = [
    OutputKind("o", "Segmentation output(s), of the same kind as --i.", IMAGE, "scan",
               folder_name="{stem}_synthseg{ext}",
               render=lambda r: ImageContent(r.seg, r.affine, r.header, np.int32)),
    OutputKind("post", "(optional) Posteriors output(s), of the same kind as --i.", IMAGE, "scan",
               folder_name="{stem}_posteriors{ext}", needs_posteriors=True,
               render=lambda r: ImageContent(r.posteriors, r.affine, r.header, np.float32)),
    OutputKind("resample", "(optional) Resampled image(s), of the same kind as --i.", IMAGE, "scan",
               folder_name="{stem}_resampled{ext}", render=_resampled,
               expected=_resampling_expected,
               skipped_note="already at 1 mm, no resampled image written"),
    OutputKind("overlay", "(optional) PNG(s) with three orthogonal slices of the segmentation.",
               PNG, "scan", folder_name="{stem}_overlay.png", render=_overlay),
    OutputKind("vol", "(optional) CSV file with the volumes of all structures and subjects.", CSV,
               "table", columns=volume_columns, row=lambda r: r.volumes, what="volumes"),
    OutputKind("qc", "(optional) CSV file with the QC scores of all subjects.", CSV, "table",
               columns=lambda tables, parc: qc_columns(tables), row=lambda r: r.qc_scores,
               what="QC scores"),
    OutputKind("report", "(optional) HTML report of the run: each scan's overlay, volumes and QC "
                         "scores, the scans outside the cohort's range, the failures.", HTML, "run",
               what="report"),
]
OUTPUT_KINDS: dict[str, OutputKind] = {kind.key: kind for kind in _KINDS}
