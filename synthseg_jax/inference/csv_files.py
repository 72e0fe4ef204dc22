"""The volumes and QC CSV files, in ``mri_synthseg``'s layout.

Layout of the original:

* one file for all scans (a file or folder input): first row ``subject`` + column names, then one
  row per scan, appended as scans finish (here: in the run's order, ``shared_table.py``);
* one file per scan (a ``.txt`` list input): first row ``""`` + column names, second row the scan;
* column names: the structure names in increasing label order, background left out; for 2.0 the
  extra ``total intracranial`` column comes first; with ``parc`` the parcellation names follow;
  QC columns are the QC class names (first occurrence per class, background class left out);
* the subject is the file's base name with a trailing ``.nii.gz`` removed (other extensions
  stay, as in the original); volumes are written as numpy 1.23 prints the value rounded to 3
  decimals (float32 when the original sums float32 posteriors: ``format_volumes``), QC scores
  clipped to [0, 1] with 4 decimals;
* rows end with ``\\r\\n`` (the csv module's default dialect, which the original uses).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from synthseg_jax.labels import LabelTables


def _sorted_header(labels: np.ndarray, names: np.ndarray, last_first: bool) -> list[str]:
    """Names in increasing label order (first occurrence of each label), the first dropped;
    with ``last_first`` the last name moves to the front."""
    _, first = np.unique(np.asarray(labels), return_index=True)
    header = [str(n) for n in np.asarray(names)[first]][1:]
    if last_first:
        header = [header[-1]] + header[:-1]
    return header


def volume_columns(tables: LabelTables, parc: bool) -> list[str]:
    """Column names of the volumes CSV (without the subject column)."""
    labels = np.asarray(tables.segmentation)
    names = np.asarray(tables.names)
    if parc:
        labels = np.concatenate([labels, np.asarray(tables.parcellation)[1:]])
        names = np.concatenate([names, np.asarray(tables.parcellation_names)[1:]])
    v1 = tables.version == "1.0"
    if not v1:
        labels = np.concatenate([labels, [labels.max() + 1]])
        names = np.concatenate([names, ["total intracranial"]])
    return _sorted_header(labels, names, last_first=not v1)


def qc_columns(tables: LabelTables) -> list[str]:
    """Column names of the QC CSV (without the subject column)."""
    return _sorted_header(tables.qc_class, tables.qc_names, last_first=False)


def subject_name(path: str) -> str:
    return os.path.basename(path).replace(".nii.gz", "")


def format_volumes(volumes: np.ndarray) -> list[str]:
    """Volumes as the original writes them (``str`` of numpy 1.23 scalars, rounded to 3 decimals):
    float64 as Python prints it; float32 with the shortest digits that identify the float32
    value, always positional (``6826766.0``; numpy 2 would print ``6.826766e+06``)."""
    volumes = np.asarray(volumes)
    if volumes.dtype == np.float32:
        return [np.format_float_positional(v, unique=True, trim="0") for v in np.around(volumes, 3)]
    return [str(float(v)) for v in np.round(volumes.astype(np.float64), 3)]


def format_qc(scores: np.ndarray) -> list[str]:
    """The network's QC scores without the background class, clipped to [0, 1], 4 decimals."""
    scores = np.round(np.clip(np.asarray(scores, dtype=np.float64).ravel()[1:], 0, 1), 4)
    return ["%.4f" % q for q in scores]


def csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def single_scan_csv(columns: list[str], row: list[str]) -> str:
    """Text of a per-scan CSV (``.txt`` list inputs)."""
    return csv_text([[""] + list(columns), row])
