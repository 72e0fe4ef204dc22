"""SynthSeg prediction configured with Hydra (``configs/predict.yaml``, keys after
``mri_synthseg``'s flags); ``python predict.py`` in a checkout, ``python -m synthseg_jax.predict``
wherever the package is installed:

    python -m synthseg_jax.predict i=scan.nii.gz o=seg.nii.gz parc=true vol=vols.csv qc=qc.csv

The same pipeline is installed as ``mri_synthseg_jax``, which takes mri_synthseg's own flags.

A cohort in parts, each a job of Hydra's launcher (``pip install 'synthseg-jax[cluster]'``):

    python -m synthseg_jax.predict -m i=scans/ o=segs/ vol=vols.csv shard=0/4,1/4,2/4,3/4 \
        hydra/launcher=submitit_slurm            # or submitit_local: the same on this machine

In a multirun a job does not exit the process (the launcher runs the others): a job with a failed
scan raises ``ScansFailed`` instead, which Hydra reports and turns into the sweep's exit code 1.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

from synthseg_jax import interrupts
from synthseg_jax.package_data import config_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig


def main() -> None:
    """Ctrl-C while the program starts (Hydra, jax and the models load for seconds) ends it with
    one line and exit code 130, as it does once scans are being segmented."""
    interrupts.install()
    try:
        checked_main()
    except KeyboardInterrupt:
        interrupts.quit_while_starting()


def checked_main() -> None:
    """Unknown keys and bad shard specs are refused here, in one line, before Hydra would refuse
    them in six (or, in a multirun, each job of the launcher in its own log)."""
    import hydra

    from synthseg_jax.inference.options import UsageError, check_keys

    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in sys.argv[1:]
            if "=" in arg and not arg.startswith("-")]
    try:
        check_keys(k for k in keys if not k.startswith(("hydra.", "hydra/")))
        check_path_quoting(sys.argv[1:])
        check_shards(sys.argv[1:])
    except UsageError as err:
        print(f"ERROR {err}", file=sys.stderr)
        sys.exit(1)
    hydra.main(version_base=None, config_path=config_dir(), config_name="predict")(predict)()


def check_shards(args: list[str]) -> None:
    """Every value of ``shard=`` (a sweep: ``shard=0/2,1/2``) is a ``K/N``."""
    from synthseg_jax.inference.cohort import Shard
    from synthseg_jax.inference.options import UsageError

    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "shard" and value not in ("", "null") and "(" not in value:
            for spec in value.split(","):
                try:
                    Shard.parse(spec)
                except ValueError as err:
                    raise UsageError(f"shard: {err}") from None


HYDRA_SPECIAL = re.compile(r"(?<!\\)[,()=]")   # not escaped with a backslash


def check_path_quoting(args: list[str]) -> None:
    """Hydra reads ``,`` as a sweep and ``(``, ``)``, ``=`` as grammar: a path holding one must be
    quoted (``"i='/data/a,b.nii.gz'"``); say so in one line rather than in Hydra's six."""
    from synthseg_jax.inference.options import UsageError
    from synthseg_jax.inference.outputs import OUTPUT_KINDS

    for arg in args:
        key, _, value = arg.partition("=")
        if (key in ("i", "bids", "model_file", "models_dir", "labels_dir", *OUTPUT_KINDS) and HYDRA_SPECIAL.search(value)
                and value[:1] not in "'\""):
            raise UsageError(f"{key}: a path with , ( ) or = must be quoted for Hydra, e.g. "
                             f"\"{key}='{value}'\" (or use mri_synthseg_jax --{key})")


class ScansFailed(RuntimeError):
    """A job of a multirun (one shard) could not segment every scan; its ERROR lines say why."""


def predict(cfg: DictConfig) -> None:
    # jax is imported only after the device and thread settings are in place
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from synthseg_jax.inference.options import PredictOptions, UsageError
    from synthseg_jax.inference.pipeline import run
    from synthseg_jax.inference.runtime import configure_runtime, setup_logging

    setup_logging()
    try:
        opts = PredictOptions.from_mapping(OmegaConf.to_container(cfg, resolve=True))
        for note in configure_runtime(opts.threads, opts.device):
            print(note)
    except UsageError as err:
        print(f"ERROR {err}", file=sys.stderr)
        sys.exit(1)
    code = run(opts)
    if code == interrupts.INTERRUPTED:
        interrupts.quit_interrupted()
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        if code:
            raise ScansFailed(f"{'shard ' + str(opts.shard) if opts.shard else 'this job'}: "
                              f"not every scan was segmented (exit code {code}; see its ERROR lines)")
        return
    sys.exit(code)


if __name__ == "__main__":
    main()
