"""The process's runtime, set before jax starts: which device, how many CPU threads, logging."""

from __future__ import annotations

import logging
import os
import sys

from synthseg_jax.inference.options import UsageError

JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}
MISSING_DEVICE = {
    "gpu": 'no GPU is visible to JAX; install JAX\'s CUDA build (pip install -U "jax[cuda12]", '
           "see https://docs.jax.dev/en/latest/installation.html), or use device=cpu",
    "tpu": 'no TPU is visible to JAX; install JAX\'s TPU build (pip install -U "jax[tpu]"), '
           "or use device=cpu",
}


def configure_runtime(threads: int | None = None, device: str = "auto") -> list[str]:
    """Pin the device and the number of CPU threads (``threads`` 0 or None: all cores). Only
    effective before jax starts its backend (the entry points call it first); for a GPU or TPU the
    backend is then started, so that a missing one is a ``UsageError``. XLA:CPU sizes its thread
    pools from the CPUs the process may run on, so ``threads`` restricts the process's CPU
    affinity. Returns notes to print."""
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
    if device in MISSING_DEVICE:
        _require_device(device)
    return notes


def _require_device(device: str) -> None:
    """Start jax's backend now, so that a missing accelerator is one line, not jax's error."""
    import jax

    try:
        jax.devices()
    except Exception:  # jax raises AssertionError or RuntimeError, depending on what is missing
        raise UsageError(f"device={device}: {MISSING_DEVICE[device]}") from None


def setup_logging(level: int = logging.INFO) -> None:
    """Show the pipeline's log lines (compilations) as plain messages on stderr."""
    logger = logging.getLogger("synthseg_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
