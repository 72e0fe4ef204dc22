"""Where the files installed with the package live: the Hydra configs, the shipped default model
and the label tables prediction needs.

The same lookup serves a checkout installed in editable mode and an installed wheel:
``pyproject.toml`` maps the repository's ``configs/`` and ``checkpoints/`` folders onto the packages
``synthseg_jax.configs`` and ``synthseg_jax.default_model``, and ``synthseg_jax/label_tables/`` is
package data, so nothing here depends on the working directory or the checkout's layout.
"""

from __future__ import annotations

import os
from importlib import resources


def _package_dir(package: str) -> str:
    return os.fspath(resources.files(package))


def config_dir() -> str:
    """The folder of the Hydra configs (``predict.yaml``, ``train.yaml``, ``generator/``, ...)."""
    return _package_dir("synthseg_jax.configs")


def default_models_dir() -> str:
    """The shipped default model: a models folder holding ``synthseg_2.0.h5`` and its
    ``architecture.json``."""
    return _package_dir("synthseg_jax.default_model")


def label_tables_dir() -> str:
    """SynthSeg's label tables (Apache-2.0), used when a models folder does not hold its own."""
    return os.path.join(_package_dir("synthseg_jax"), "label_tables")


def package_version() -> str:
    """The installed distribution's version, for reports and BIDS' ``GeneratedBy``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthseg-jax")
    except PackageNotFoundError:   # run from a checkout that was not installed
        return "(not installed)"
