"""Net2Net widening: the wider U-Net computes the narrow one's logits, its copies are not tied,
and the command line writes a file the importer loads."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.synthseg import Segmenter
from synthseg_jax.nn.unet import UNetConfig
from synthseg_jax.nn.widen import widen_unet
from synthseg_jax.weights.keras_h5 import (keras_layers, load_keras_h5, save_keras_h5,
                                           save_keras_layers)
from synthseg_jax.weights.models_dir import variable_shapes


def trained_like(config: UNetConfig, seed: int = 0) -> dict:
    """Random weights with non-trivial BatchNorm parameters and statistics (as a trained net's)."""
    module = Segmenter(config)
    variables = module.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 16, 2)))
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    out = []
    for path, leaf in leaves:
        name = path[-1].key
        if name == "var":
            out.append(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        elif name in ("mean", "bias"):
            out.append(rng.normal(0, 0.3, leaf.shape).astype(np.float32))
        elif name == "scale":
            out.append(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        else:
            out.append(np.asarray(leaf))
    return jax.tree_util.tree_unflatten(tree, out)


def widened_variables(config, variables, features, folder):
    """Widened through a weight file, as the command line does: the importer checks every shape."""
    wide = dataclasses.replace(config, nb_features=features)
    path = str(folder / "wide.h5")
    save_keras_layers(widen_unet(keras_layers(variables), config, features, seed=1), path)
    return wide, load_keras_h5(path, variable_shapes(Segmenter(wide), 2, 16))


@pytest.mark.parametrize("features,skip_n", [(8, 0), (7, 0), (12, 1)])
def test_widened_unet_computes_the_same_logits(features, skip_n, tmp_path):
    config = UNetConfig(prefix="unet", n_labels=5, nb_features=4, nb_levels=3,
                        skip_n_concatenations=skip_n)
    variables = trained_like(config)
    wide, wide_vars = widened_variables(config, variables, features, tmp_path)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 16, 16, 16, 2)), jnp.float32)
    narrow = Segmenter(config).apply(variables, x)
    widened = Segmenter(wide).apply(wide_vars, x)
    assert wide_vars["params"]["unet"]["unet_conv_downarm_1_0"]["kernel"].shape[-1] == 2 * features
    np.testing.assert_allclose(np.asarray(widened), np.asarray(narrow), rtol=1e-4, atol=1e-4)


def test_copies_get_different_outgoing_weights(tmp_path):
    """Equal halves would keep a channel and its copy identical through training."""
    config = UNetConfig(prefix="unet", n_labels=5, nb_features=4, nb_levels=3)
    _, wide_vars = widened_variables(config, trained_like(config), 8, tmp_path)
    consumer = np.asarray(wide_vars["params"]["unet"]["unet_conv_downarm_0_1"]["kernel"])
    original, copy = consumer[..., 0, :], consumer[..., 4, :]
    assert not np.allclose(original, copy)
    assert np.all(np.sign(original) == np.sign(copy))   # positive fractions of one weight


def test_command_line_widens_a_weight_file(tmp_path):
    config = UNetConfig(prefix="unet", n_labels=5, nb_features=4, nb_levels=3)
    variables = trained_like(config)
    source, dest = tmp_path / "narrow.h5", tmp_path / "wide.h5"
    save_keras_h5(variables, str(source))
    done = subprocess.run([sys.executable, "-m", "synthseg_jax.nn.widen", str(source), str(dest),
                           "--features", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wide = dataclasses.replace(config, nb_features=8)
    loaded = load_keras_h5(str(dest), variable_shapes(Segmenter(wide), 2, 16))
    x = jnp.ones((1, 16, 16, 16, 2), jnp.float32)
    np.testing.assert_allclose(np.asarray(Segmenter(wide).apply(loaded, x)),
                               np.asarray(Segmenter(config).apply(variables, x)), rtol=1e-4, atol=1e-4)
