"""A FreeSurfer-style ``models/`` folder as one unit: the five ``.h5`` files and the label tables.

Whatever trained the weights (the published Keras models, or ``train.py`` here), a folder with these
names is what prediction and export accept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
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
from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
from synthseg_jax.weights.keras_h5 import (
    VOXEL_SIZE_ATTRIBUTE,
    WeightFileError,
    load_keras_h5,
    read_keras_h5,
    read_voxel_size,
)

MODEL_FILES = {
    "1.0": "synthseg_1.0.h5",
    "2.0": "synthseg_2.0.h5",
    "robust": "synthseg_robust_2.0.h5",
    "parc": "synthseg_parc_2.0.h5",
    "qc": "synthseg_qc_2.0.h5",
}
# Written by training's export: per network kind and stage, its hyper-parameters, voxel size included.
ARCHITECTURE_FILE = "architecture.json"
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


def variable_shapes(module: nn.Module, in_channels: int, size: int = _INIT_SIZE) -> Any:
    """The variables tree as shapes only, without running the network."""
    dummy = jax.ShapeDtypeStruct((1, size, size, size, in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), dummy)


def _shapes(variables: Any) -> Any:
    """A variables tree (arrays or shapes) as its structure and leaf shapes, for comparison."""
    leaves, structure = jax.tree_util.tree_flatten(variables)
    return structure, [tuple(leaf.shape) for leaf in leaves]


def _kernel_shape(layers: dict, name: str, path: str) -> tuple[int, ...]:
    if name not in layers:
        raise WeightFileError(f"{path}: layer '{name}' is missing from the file")
    return layers[name]["kernel"].shape


def _count(layers: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in layers:
        n += 1
    return n


def infer_unet_config(layers: dict, prefix: str, path: str) -> UNetConfig:
    """Read a U-Net's width, depth, kernel size and kept skips off its weight shapes, so narrower
    models (like the CPU-trained default) load by the same route as the published ones."""
    first = _kernel_shape(layers, f"{prefix}_conv_downarm_0_0", path)
    nb_levels = _count(layers, prefix + "_conv_downarm_{}_0")
    nb_conv = _count(layers, prefix + "_conv_downarm_0_{}")
    features = [_kernel_shape(layers, f"{prefix}_conv_downarm_{lvl}_0", path)[-1]
                for lvl in range(nb_levels)]
    feat_mult = features[1] // features[0] if nb_levels > 1 else 1
    kept_skips = 0
    for level in range(nb_levels - 1):
        upsampled = features[nb_levels - 1 - level]  # channels arriving from the level below
        cin = _kernel_shape(layers, f"{prefix}_conv_uparm_{nb_levels + level}_0", path)[-2]
        kept_skips += int(cin > upsampled)
    n_labels = _kernel_shape(layers, f"{prefix}_likelihood", path)[-1]
    return UNetConfig(prefix=prefix, n_labels=n_labels, nb_features=features[0], nb_levels=nb_levels,
                      conv_size=first[0], nb_conv_per_level=nb_conv, feat_mult=feat_mult,
                      batch_norm=f"{prefix}_bn_down_0" in layers,
                      skip_n_concatenations=nb_levels - 1 - kept_skips)


def infer_encoder_config(layers: dict, prefix: str, path: str) -> EncoderConfig:
    first = _kernel_shape(layers, f"{prefix}_conv_downarm_0_0", path)
    nb_levels = _count(layers, prefix + "_conv_downarm_{}_0")
    second = _kernel_shape(layers, f"{prefix}_conv_downarm_1_0", path) if nb_levels > 1 else first
    return EncoderConfig(prefix=prefix, nb_features=first[-1], nb_levels=nb_levels,
                         conv_size=first[0], nb_conv_per_level=_count(layers, prefix + "_conv_downarm_0_{}"),
                         feat_mult=second[-1] // first[-1], batch_norm=f"{prefix}_bn_down_0" in layers)


def network_from_file(kind: str, path: str, tables: LabelTables,
                      conv_dtype: str = "float32") -> tuple[nn.Module, int]:
    """The module whose architecture the weight file describes, checked against the label tables;
    ``conv_dtype``: its convolutions' products ('float32' or 'bfloat16', nn/conv.py)."""
    layers = read_keras_h5(path)

    def unet(prefix: str, n_expected: int) -> UNetConfig:
        cfg = dataclasses.replace(infer_unet_config(layers, prefix, path), conv_dtype=conv_dtype)
        if cfg.n_labels != n_expected:
            raise WeightFileError(f"{path}: '{prefix}_likelihood' has {cfg.n_labels} outputs, the "
                                  f"label tables of SynthSeg {tables.version} need {n_expected}")
        return cfg

    if kind in ("1.0", "2.0"):
        return Segmenter(unet("unet", tables.n_labels)), 1
    if kind == "robust":
        return RobustCascade(n_groups=tables.n_groups, n_labels=tables.n_labels,
                             first=unet("unet", tables.n_groups), denoiser=unet("l2l", tables.n_groups),
                             second=unet("unet2", tables.n_labels)), 1
    if kind == "parc":
        return Segmenter(unet("unet_parc", len(tables.parcellation))), 3
    if kind == "qc":
        n_out = _kernel_shape(layers, "qc_final_conv_1", path)[-1]
        if n_out != tables.n_qc:
            raise WeightFileError(f"{path}: 'qc_final_conv_1' has {n_out} outputs, the QC label "
                                  f"table needs {tables.n_qc}")
        encoder = dataclasses.replace(infer_encoder_config(layers, "qc", path), conv_dtype=conv_dtype)
        return QCRegressor(n_qc_labels=n_out, encoder=encoder), n_out
    raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(MODEL_FILES)}")


@dataclasses.dataclass(frozen=True)
class ModelsDir:
    """A folder holding ``synthseg_*.h5`` weights and the label ``.npy`` files.

    The label files may live in another folder (``labels_dir``), so a model trained here ships its
    weights without copying the published label tables. ``overrides`` replaces a kind's file by
    another one anywhere (FreeSurfer 8's ``--model``); its voxel size is read from it, or from an
    ``architecture.json`` beside it.
    """

    path: str
    labels_dir: str | None = None
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def weights_file(self, kind: str) -> str:
        if kind not in MODEL_FILES:
            raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(MODEL_FILES)}")
        if kind in self.overrides:
            path = self.overrides[kind]
            if not os.path.isfile(path):
                raise WeightFileError(f"{path}: model file not found")
            return path
        path = os.path.join(self.path, MODEL_FILES[kind])
        if not os.path.isfile(path):
            raise WeightFileError(f"{path}: weight file missing from the models folder {self.path}; "
                                  f"point models_dir=... (--models_dir) at a folder that has it, "
                                  f"e.g. $FREESURFER_HOME/models")
        return path

    def labels(self, version: str = "2.0") -> LabelTables:
        return LabelTables.load(self.labels_dir or self.path, version)

    def voxel_size(self, kind: str, variables: Any = None) -> float:
        """The voxel size (mm) a network was trained at: recorded in its ``.h5`` by our exporter,
        else in ``architecture.json`` beside it, else 1 mm if it has the published network's
        shape (the published models record neither). Anything else is refused: a coarse model
        run at 1 mm gives a wrong segmentation without a word. ``variables``: the network's, if
        already loaded."""
        path = self.weights_file(kind)
        recorded = read_voxel_size(path)
        if recorded is None:
            recorded = self._architecture_voxel_size(kind)
        if recorded is not None:
            return recorded
        if variables is None:
            variables = self.load_network(kind)[1]
        if _shapes(variables) == _shapes(variable_shapes(*build_network(kind, self.labels(
                label_version(kind))))):
            return 1.0
        raise WeightFileError(
            f"{path}: unknown training voxel size (no {VOXEL_SIZE_ATTRIBUTE} attribute, no "
            f"{ARCHITECTURE_FILE} entry '{kind}' beside it, not the published architecture); "
            f"export it again with python -m synthseg_jax.training.checkpoint RUN --models-dir "
            f"{self.path}, or add the entry to {ARCHITECTURE_FILE}")

    def _architecture_stages(self, kind: str) -> tuple[str, dict]:
        """(path, the ``architecture.json`` entries of ``kind``'s stages; empty if none)."""
        path = os.path.join(os.path.dirname(self.weights_file(kind)), ARCHITECTURE_FILE)
        if not os.path.isfile(path):
            return path, {}
        try:
            with open(path) as fh:
                stages = json.load(fh).get(kind, {})
            if not all(isinstance(stage, dict) for stage in stages.values()):
                raise ValueError(f"entry '{kind}' is not a mapping of stages")
        except (OSError, ValueError, AttributeError) as err:
            raise WeightFileError(f"{path}: unreadable architecture file ({err})") from None
        return path, stages

    def training_field_mm(self, kind: str) -> float | None:
        """The edge (mm) of the crops a network was trained on, if its export recorded them: the
        QC model's spatial-mean head scales its scores with the share of the crop that is brain,
        so it must see the field it was trained on (None: not recorded, as for the published)."""
        path, stages = self._architecture_stages(kind)
        try:
            fields = {float(stage["crop"][0]) * float(stage.get("voxel_size") or 1.0)
                      for stage in stages.values() if stage.get("crop")}
        except (TypeError, ValueError, IndexError) as err:
            raise WeightFileError(f"{path}: unreadable architecture file ({err})") from None
        if len(fields) > 1:
            raise WeightFileError(f"{path}: the stages of '{kind}' disagree on the crop {sorted(fields)}")
        return fields.pop() if fields else None

    def _architecture_voxel_size(self, kind: str) -> float | None:
        path, stages = self._architecture_stages(kind)
        try:
            sizes = {float(stage.get("voxel_size") or 1.0) for stage in stages.values()}
        except (TypeError, ValueError) as err:
            raise WeightFileError(f"{path}: unreadable architecture file ({err})") from None
        if len(sizes) > 1:
            raise WeightFileError(f"{path}: the stages of '{kind}' disagree on the voxel size {sorted(sizes)}")
        return sizes.pop() if sizes else None

    def load_network(self, kind: str, conv_dtype: str = "float32") -> tuple[nn.Module, Any]:
        """The module of ``kind`` (architecture read off the file) and its variables."""
        path = self.weights_file(kind)
        module, in_channels = network_from_file(kind, path, self.labels(label_version(kind)),
                                                conv_dtype)
        return module, load_keras_h5(path, variable_shapes(module, in_channels))
