"""Keras HDF5 weights <-> Flax variables, matched by layer name.

Keras 2's ``save_weights`` writes one group per layer at the root (or under ``/model_weights`` for a
whole-model file), with an attribute ``weight_names`` listing datasets such as
``unet_conv_downarm_0_0/kernel:0``. Conv3D kernels are (k, k, k, in, out) in both frameworks, so the
arrays move across unchanged; only BatchNorm's names differ.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

# Flax (collection, name) for each Keras weight name, in the order Keras stores a layer's weights.
CONV_WEIGHTS = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
BATCHNORM_WEIGHTS = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
KERAS_VERSION = "2.15.0"
# Root attribute our exporter adds: the voxel size (mm) the network was trained at. Keras and the
# original mri_synthseg ignore attributes they do not know, so the file stays theirs too.
VOXEL_SIZE_ATTRIBUTE = "synthseg_jax_voxel_size"


class WeightFileError(ValueError):
    """A weight file that does not fit the network; the message names the file and the layer."""


def _weight_short_name(full_name: str) -> str:
    """``unet_conv_downarm_0_0/kernel:0`` -> ``kernel``."""
    return full_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _as_str(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Every layer that has weights, as ``{layer: {short weight name: array}}``."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise WeightFileError(f"{path}: not a readable HDF5 weight file ({err})") from None
    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in root.attrs:
            raise WeightFileError(f"{path}: no 'layer_names' attribute; not a Keras weight file")
        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer in map(_as_str, root.attrs["layer_names"]):
            group = root[layer]
            names = [_as_str(n) for n in group.attrs.get("weight_names", [])]
            if names:
                layers[layer] = {_weight_short_name(n): np.asarray(group[n]) for n in names}
    return layers


def keras_layer_paths(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Where each Keras-named layer sits in a Flax ``params`` tree (cascades nest per stage)."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, child in node.items():
            if not isinstance(child, Mapping):
                continue
            if "kernel" in child or "scale" in child:
                if key in found:
                    raise ValueError(f"layer name {key} appears twice in the network")
                found[key] = path + (key,)
            else:
                walk(child, path + (key,))

    walk(variables["params"], ())
    return found


def _layer_mapping(flax_layer: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return BATCHNORM_WEIGHTS if "scale" in flax_layer else CONV_WEIGHTS


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _to_mutable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_mutable(v) for k, v in tree.items()}
    return tree


def load_keras_h5(path: str, variables: Mapping[str, Any], other_layers: bool = False
                  ) -> dict[str, Any]:
    """Fill a Flax variables tree (from ``module.init``) with the weights of a Keras file.

    Strict both ways: a layer missing from the file, a weighted layer the network lacks, or a shape
    that differs is an error naming the layer and the file. ``other_layers``: the file may also
    hold other networks' layers (one stage of ``synthseg_robust_2.0.h5``, for fine-tuning).
    """
    file_layers = read_keras_h5(path)
    paths = keras_layer_paths(variables)
    extra = sorted(set(file_layers) - set(paths))
    if extra and not other_layers:
        raise WeightFileError(f"{path}: layer '{extra[0]}' is not part of this network"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    loaded = _to_mutable(variables)
    for layer, layer_path in paths.items():
        if layer not in file_layers:
            raise WeightFileError(f"{path}: layer '{layer}' is missing from the file")
        flax_layer = _get(variables["params"], layer_path)
        mapping = _layer_mapping(flax_layer)
        weights = file_layers[layer]
        if set(weights) != set(mapping):
            raise WeightFileError(
                f"{path}: layer '{layer}' holds weights {sorted(weights)}, expected {sorted(mapping)}")
        for keras_name, (collection, flax_name) in mapping.items():
            target = _get(loaded[collection], layer_path)
            expected = tuple(target[flax_name].shape)
            value = weights[keras_name]
            if value.shape != expected:
                raise WeightFileError(
                    f"{path}: layer '{layer}' weight '{keras_name}' has shape {value.shape}, "
                    f"the network expects {expected}")
            target[flax_name] = np.asarray(value, dtype=np.float32)
    return loaded


def keras_layers(variables: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """A Flax variables tree as ``{layer: {Keras weight name: array}}``, as :func:`read_keras_h5`
    returns a file (BatchNorm's weights in Keras' order)."""
    out = {}
    for layer, layer_path in keras_layer_paths(variables).items():
        mapping = _layer_mapping(_get(variables["params"], layer_path))
        out[layer] = {keras_name: np.asarray(_get(variables[collection], layer_path)[flax_name],
                                             np.float32)
                      for keras_name, (collection, flax_name) in mapping.items()}
    return out


def read_voxel_size(path: str) -> float | None:
    """The training voxel size our exporter recorded in the file, or None (a published file)."""
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get(VOXEL_SIZE_ATTRIBUTE)
    except (OSError, ValueError) as err:
        raise WeightFileError(f"{path}: not a readable HDF5 weight file ({err})") from None
    if value is None:
        return None
    try:
        size = float(np.asarray(value).item())
    except (TypeError, ValueError):
        size = float("nan")
    if not np.isfinite(size) or size <= 0:
        raise WeightFileError(f"{path}: invalid {VOXEL_SIZE_ATTRIBUTE} attribute {value!r}")
    return size


def save_keras_h5(variables: Mapping[str, Any], path: str, voxel_size: float | None = None) -> None:
    """Write the layout of Keras 2 ``save_weights`` (HDF5), so ``mri_synthseg`` can load our weights
    with ``load_weights(by_name=True)``; ``voxel_size`` (mm) is recorded in the file."""
    save_keras_layers(keras_layers(variables), path, voxel_size)


def save_keras_layers(layers: Mapping[str, Mapping[str, np.ndarray]], path: str,
                      voxel_size: float | None = None) -> None:
    """Write ``{layer: {Keras weight name: array}}`` in Keras 2's ``save_weights`` layout, to a
    temporary name, then renamed (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=directory)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["backend"] = b"tensorflow"
            handle.attrs["keras_version"] = KERAS_VERSION.encode()
            handle.attrs["layer_names"] = np.array([n.encode() for n in layers])
            if voxel_size is not None:
                handle.attrs[VOXEL_SIZE_ATTRIBUTE] = float(voxel_size)
            for layer, weights in layers.items():
                group = handle.create_group(layer)
                full_names = [f"{layer}/{keras_name}:0" for keras_name in weights]
                group.attrs["weight_names"] = np.array([n.encode() for n in full_names])
                for full_name, value in zip(full_names, weights.values()):
                    group.create_dataset(full_name, data=np.asarray(value, np.float32))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a weight file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
