"""Tiny random-weight SynthSeg networks for the real label tables, and a models folder of them."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from synthseg_jax.nn.synthseg import QCRegressor, RobustCascade, Segmenter
from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
from synthseg_jax.weights.keras_h5 import save_keras_h5
from synthseg_jax.weights.models_dir import MODEL_FILES

TINY = dict(nb_features=2, nb_levels=3)

# the numpy reference of post-processing lives with the parity tools, its other user
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools", "parity"))


def random_variables(module, in_channels, seed, logit_scale=4.0):
    """Random weights with valid BatchNorm statistics; final 1x1x1 convs scaled for peaky outputs."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 8, 8, 8, in_channels)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        name, layer = names[-1], names[-2]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
            if layer.endswith("likelihood"):
                value *= logit_scale
            return value.astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
        return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_segmenter(n_labels, prefix="unet"):
    return Segmenter(UNetConfig(prefix=prefix, n_labels=n_labels, **TINY))


def tiny_cascade(tables):
    return RobustCascade(
        n_groups=tables.n_groups, n_labels=tables.n_labels,
        first=UNetConfig(prefix="unet", n_labels=tables.n_groups, **TINY),
        denoiser=UNetConfig(prefix="l2l", n_labels=tables.n_groups, conv_size=5,
                            skip_n_concatenations=2, **TINY),
        second=UNetConfig(prefix="unet2", n_labels=tables.n_labels, **TINY))


def tiny_qc(tables):
    return QCRegressor(n_qc_labels=tables.n_qc,
                       encoder=EncoderConfig(prefix="qc", nb_features=2, nb_levels=2, conv_size=3))


def tiny_networks(tables, tables_v1):
    """kind -> (module, in_channels, variables)."""
    nets = {
        "2.0": (tiny_segmenter(tables.n_labels), 1),
        "1.0": (tiny_segmenter(tables_v1.n_labels), 1),
        "robust": (tiny_cascade(tables), 1),
        "parc": (tiny_segmenter(len(tables.parcellation), "unet_parc"), 3),
        "qc": (tiny_qc(tables), tables.n_qc),
    }
    out = {kind: (m, c, random_variables(m, c, seed=i)) for i, (kind, (m, c)) in enumerate(nets.items())}
    # centre each segmenter's mean logits (every label gets some voxels), favouring the cortex a
    # little so that the parcellation has voxels to label
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.uniform(size=(16, 16, 16)), 1.5)
    x = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)[None, ..., None]
    for kind, prefix, extra in (("2.0", "unet", tables), ("1.0", "unet", tables_v1),
                                ("parc", "unet_parc", None)):
        module, channels, variables = out[kind]
        inp = jnp.asarray(np.concatenate([x] * channels, -1))
        logits = np.asarray(jax.jit(module.apply)(variables, inp))
        bias = variables["params"][prefix][f"{prefix}_likelihood"]["bias"]
        bias -= logits.mean(axis=(0, 1, 2, 3))
        if extra is not None:
            bias[np.isin(extra.segmentation, [3, 42])] += 4.0
    return out


@pytest.fixture(scope="session")
def tiny_nets(tables, tables_v1):
    return tiny_networks(tables, tables_v1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_nets):
    """A models folder with the five tiny .h5 files, each recording its 1 mm training voxel size
    (labels come from the shared folder)."""
    path = tmp_path_factory.mktemp("models")
    for kind, (_, _, variables) in tiny_nets.items():
        save_keras_h5(variables, os.path.join(path, MODEL_FILES[kind]), voxel_size=1.0)
    return str(path)
