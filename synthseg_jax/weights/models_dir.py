"""A FreeSurfer-style ``models/`` folder as one unit: the five ``.h5`` files and the label tables.

Whatever trained the weights (the published Keras models, or ``train.py`` here), a folder with these
names is what prediction and export accept.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthseg_jax.labels import LabelTables
from synthseg_jax.nn.synthseg import (
    QCRegressor,
    RobustCascade,
    Segmenter,
    parcellation_config,
    segmenter_config,
)
from synthseg_jax.weights.keras_h5 import WeightFileError, load_keras_h5

MODEL_FILES = {
    "1.0": "synthseg_1.0.h5",
    "2.0": "synthseg_2.0.h5",
    "robust": "synthseg_robust_2.0.h5",
    "parc": "synthseg_parc_2.0.h5",
    "qc": "synthseg_qc_2.0.h5",
}
# Smallest input every network accepts: one voxel left after the deepest pooling.
_INIT_SIZE = 16


def label_version(kind: str) -> str:
    return "1.0" if kind == "1.0" else "2.0"


def build_network(kind: str, tables: LabelTables) -> tuple[nn.Module, int]:
    """The Flax module of one network kind and its number of input channels."""
    if kind in ("1.0", "2.0"):
        return Segmenter(segmenter_config(tables.n_labels)), 1
    if kind == "robust":
        return RobustCascade(n_groups=tables.n_groups, n_labels=tables.n_labels), 1
    if kind == "parc":
        return Segmenter(parcellation_config(len(tables.parcellation))), 3
    if kind == "qc":
        return QCRegressor(n_qc_labels=tables.n_qc), tables.n_qc
    raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(MODEL_FILES)}")


def variable_shapes(module: nn.Module, in_channels: int) -> Any:
    """The variables tree as shapes only, without running the network."""
    dummy = jax.ShapeDtypeStruct((1, _INIT_SIZE, _INIT_SIZE, _INIT_SIZE, in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), dummy)


def init_network(kind: str, tables: LabelTables, seed: int = 0) -> tuple[nn.Module, Any]:
    """A freshly initialised network (Keras' Glorot-uniform kernels, zero biases)."""
    module, in_channels = build_network(kind, tables)
    x = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, _INIT_SIZE, in_channels), jnp.float32)
    return module, jax.jit(module.init)(jax.random.key(seed), x)


@dataclasses.dataclass(frozen=True)
class ModelsDir:
    """A folder holding ``synthseg_*.h5`` weights and the label ``.npy`` files."""

    path: str

    def weights_file(self, kind: str) -> str:
        if kind not in MODEL_FILES:
            raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(MODEL_FILES)}")
        path = os.path.join(self.path, MODEL_FILES[kind])
        if not os.path.isfile(path):
            raise WeightFileError(f"{path}: weight file missing from the models folder")
        return path

    def labels(self, version: str = "2.0") -> LabelTables:
        return LabelTables.load(self.path, version)

    def load_network(self, kind: str) -> tuple[nn.Module, Any]:
        """The module of ``kind`` and its variables read from this folder's ``.h5`` file."""
        module, in_channels = build_network(kind, self.labels(label_version(kind)))
        return module, load_keras_h5(self.weights_file(kind), variable_shapes(module, in_channels))
