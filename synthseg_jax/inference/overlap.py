"""Scans through three stages, overlapped: while the calling thread runs ``compute`` on scan k
(the jitted networks, one program, always on this thread), one worker thread runs ``load`` on
scan k+1 and another ``store`` on scan k-1. Reading, resampling, the host's geometry and the
writing are numpy, scipy, nibabel and zlib, which release the GIL, so they take the time the
network leaves to the host. At most three scans are in memory.

Each stage gets what the one before it returned, so results do not depend on the overlap; only
time does (``overlap=False`` runs the same stages one scan at a time). ``finished`` is called on
the calling thread, in the scans' order, with the store's result or the exception of the stage
that failed (a later stage of that scan does not run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Outcome = Any   # the store's result, or the exception of the failed stage


def _stored(future: Future | BaseException) -> Outcome:
    if isinstance(future, BaseException):
        return future
    try:
        return future.result()
    except Exception as err:
        return err


def run_stages(items: Sequence[Item], load: Callable[[Item], Any], compute: Callable[[Any], Any],
               store: Callable[[Any, Any], Any], finished: Callable[[Item, Outcome], None],
               overlap: bool = True) -> None:
    """``store(load(item), compute(load(item)))`` for each item, ``finished`` after each."""
    if not overlap:
        for item in items:
            try:
                loaded = load(item)
                outcome = store(loaded, compute(loaded))
            except Exception as err:
                outcome = err
            finished(item, outcome)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="synthseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="synthseg-write") as writer:
        try:
            _overlapped(items, load, compute, store, finished, reader, writer)
        except BaseException:   # Ctrl-C: the scan being written is finished (or not) atomically
            reader.shutdown(wait=False, cancel_futures=True)
            raise


def _overlapped(items, load, compute, store, finished, reader, writer) -> None:
    next_load = reader.submit(load, items[0]) if items else None
    previous: tuple[Any, Future | BaseException] | None = None
    for k, item in enumerate(items):
        current = next_load
        next_load = reader.submit(load, items[k + 1]) if k + 1 < len(items) else None
        try:
            loaded = current.result()
            pending: Future | BaseException = writer.submit(store, loaded, compute(loaded))
        except Exception as err:
            pending = err
        if previous is not None:
            finished(previous[0], _stored(previous[1]))
        previous = (item, pending)
    if previous is not None:
        finished(previous[0], _stored(previous[1]))
