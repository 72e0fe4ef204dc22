"""A cohort's volumes or QC CSV, written by every process of a run (the shards of
``shard=K/N``, a re-run that resumes) and holding each scan's row exactly once.

Design: each writer takes an exclusive lock on a lock file beside the table (``filelock``, an
``fcntl`` lock that the system releases when its holder dies, even by ``kill -9``, so a killed
shard never leaves a stale lock), reads the table, puts its row in by subject, and replaces the
file atomically (a temporary file renamed over it). Readers need no lock: a rename leaves them
either the old file or the new one. Rows come out in the run's plan order (a folder's sorted
scans, a list's order), so the file's bytes are the same whichever shard wrote first, and a whole
sequential run writes what ``mri_synthseg`` appends. Rows of scans outside the run's plan, or a
file made with other columns (another mode), are dropped, as ``mri_synthseg`` starts a new file
on every run. One locked rewrite per scan is cheap next to a scan's seconds of network time, and
leaves no per-shard files to merge afterwards.
"""

from __future__ import annotations

import csv
import os

from filelock import FileLock

from synthseg_jax.inference.csv_files import csv_text
from synthseg_jax.scans import AtomicWriter, ensure_directory

SUBJECT = "subject"


def lock_path(path: str) -> str:
    """The hidden lock file beside ``path`` (same folder: the same file system for every shard)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lock")


class SharedTable:
    """One CSV for the cohort; ``subjects`` are the whole run's (every shard's), in plan order."""

    def __init__(self, path: str, columns: list[str], subjects: list[str]) -> None:
        self.path = path
        self.header = [SUBJECT] + list(columns)
        self.order = {subject: n for n, subject in enumerate(subjects)}
        self._lock = FileLock(lock_path(path))

    def read(self) -> dict[str, list[str]] | None:
        """The rows on disk of this run's scans, by subject; {} if there is no file, None if the
        file is not such a table (other columns, not a CSV)."""
        try:
            with open(self.path, newline="", encoding="utf8") as handle:
                rows = list(csv.reader(handle))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        if not rows or rows[0] != self.header:
            return None
        return {row[0]: row for row in rows[1:] if row and row[0] in self.order}

    def add(self, row: list[str]) -> None:
        """Put ``row`` (subject first) into the file, replacing the subject's earlier row."""
        if row[0] not in self.order:
            raise KeyError(f"{row[0]!r} is not a scan of this run")
        ensure_directory(self.path)
        with self._lock:
            rows = self.read() or {}
            rows[row[0]] = row
            ordered = sorted(rows.values(), key=lambda r: self.order[r[0]])
            with AtomicWriter() as writer:
                writer.text(csv_text([self.header] + ordered), self.path)
                writer.commit()
