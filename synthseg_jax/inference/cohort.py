"""Which of a plan's scans this process segments: its shard (``shard=K/N``), less the scans whose
outputs are all complete already (a re-run resumes; ``overwrite=true`` redoes them).

Every output is written under a temporary name and renamed into place (``scans.AtomicWriter``),
and a shared table gains a scan's row only after the scan's own files are in place, so a file
that exists is complete and a scan with all its files and rows is done: a scan that failed or was
killed wrote nothing, or lacks its row, and is segmented again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synthseg_jax.inference.planning import Job

SHARD_FORM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Shard:
    """The ``index``-th (from 0) of ``count`` disjoint parts of a run's scans."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: object) -> "Shard":
        """``"K/N"`` with 0 <= K < N; ``ValueError`` with a one-line reason otherwise."""
        match = SHARD_FORM.match(str(text))
        if not match:
            raise ValueError(f"expected K/N (the K-th of N parts, K from 0 to N-1, e.g. 0/4), "
                             f"got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise ValueError(f"{text!r}: K must be between 0 and N-1 (parts 0/{max(count, 1)} to "
                             f"{max(count, 1) - 1}/{max(count, 1)})")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, jobs: list[Job]) -> list[Job]:
        """Round-robin over the plan's order (a folder's scans are sorted, a list keeps its order):
        the same parts on every machine, of sizes that differ by one at most."""
        return jobs[self.index::self.count]


def job_is_complete(job: Job, has_row: Callable[[Job], bool]) -> bool:
    """Every per-scan file of ``job`` exists (or is one it does not get, such as the resampled
    image of a scan already at 1 mm) and every shared table holds its row (``has_row``)."""
    from synthseg_jax.inference.outputs import OUTPUT_KINDS

    for key, path in job.paths.items():
        if not os.path.isfile(path) and OUTPUT_KINDS[key].expected(job.image):
            return False
    return has_row(job)


def split_done(jobs: Iterable[Job], has_row: Callable[[Job], bool],
               overwrite: bool) -> tuple[list[Job], list[Job]]:
    """(scans to segment, scans skipped because their outputs are complete)."""
    todo, done = [], []
    for job in jobs:
        (done if not overwrite and job_is_complete(job, has_row) else todo).append(job)
    return todo, done
