"""Ctrl-C ends a command line with one line and the shell's status for it, 130, at any moment.

While the program starts, SIGINT raises KeyboardInterrupt at once. While a scan is processed
(``deferred``) it only sets a flag, and the scan stops at the next safe point (``check``: before
its outputs are written), because an exception raised inside jax's native code crashes the
process (nanobind's ``terminate``, SIGSEGV) and one raised in a garbage-collector callback is
printed as "Exception ignored" and lost. A second Ctrl-C quits at once.

Nothing here imports more than the standard library: an interrupt that lands while numpy or jax
is being imported leaves them half-initialised, and a handler that imported them again would fail
with a traceback of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn, TextIO

INTERRUPTED = 130   # 128 + SIGINT
_requested = False
_deferring = False


def _on_sigint(signum, frame) -> None:
    global _requested
    if not _deferring:
        _requested = True
        raise KeyboardInterrupt
    if _requested:
        print("ERROR interrupted again: quitting at once", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)
    _requested = True
    print("interrupted: stopping before this scan's outputs are written (Ctrl-C again to quit "
          "at once)", file=sys.stderr, flush=True)


def _quiet_unraisable(unraisable, default=sys.unraisablehook) -> None:
    """The interrupt lost in a callback is not news to print; anything else is."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        default(unraisable)


def install() -> None:
    """Remember SIGINT as well as raising it (main thread only, as Python's signal handlers)."""
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_unraisable


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGINT waits for ``check`` (or the end of the block) instead of raising."""
    global _deferring
    previous, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = previous
    check()


def check() -> None:
    """Raise the KeyboardInterrupt that was asked for (deferred, or swallowed by a callback)."""
    if _requested:
        raise KeyboardInterrupt


def guarded_main(module: str) -> None:
    """Run ``module.main()`` with the handler installed before the module is even imported."""
    import importlib

    install()
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        quit_while_starting()
    main()


def interrupted_while_starting(stderr: TextIO | None = None) -> int:
    """Say so (before any scan was touched) and give the exit code."""
    print("ERROR interrupted before any scan was segmented", file=stderr or sys.stderr)
    return INTERRUPTED


def quit_while_starting() -> NoReturn:
    """The entry points' end for an interrupt while starting."""
    interrupted_while_starting()
    quit_interrupted()


def quit_interrupted() -> NoReturn:
    """Exit with 130 without the interpreter's atexit handlers: a module whose import the interrupt
    cut short may have registered one that now fails (jax's ``clean_up`` calls a function its
    half-run module never defined: a NameError traceback after the one line). Whatever the run
    wrote is closed by then, and the scan in progress removed its partial outputs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)
