"""Function-preserving widening of a trained U-Net (Net2WiderNet, Chen et al., ICLR 2016).

A wider network can start where a narrower trained one stands instead of from nothing: every new
channel copies an old one (its kernel column, bias and BatchNorm parameters), and each consumer
splits the weight it gave the old channel between the copies. BatchNorm is per channel and ELU
acts voxel-wise, so the copies carry equal values and the logits are unchanged.

The split is random (positive fractions summing to 1 over the copies) rather than equal: with
equal halves two copies would receive equal gradients and stay copies for ever.

Works on Keras-named layers (``{layer: {'kernel', 'bias'} | {'gamma', 'beta', 'moving_mean',
'moving_variance'}}``, as :func:`synthseg_jax.weights.keras_h5.read_keras_h5` returns), so the
result saves to any ``.h5`` the importer reads.

    python -m synthseg_jax.nn.widen IN.h5 OUT.h5 --features 16 [--prefix unet] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from synthseg_jax.nn.unet import UNetConfig

Layers = dict[str, dict[str, np.ndarray]]


def channel_map(old: int, new: int) -> np.ndarray:
    """For each of ``new`` channels the old channel it copies: the old ones first, in order."""
    if new < old:
        raise ValueError(f"cannot narrow {old} channels to {new}")
    return np.arange(new) % old


def split_fractions(source: np.ndarray, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """(len(source), n_out) positive weights summing to 1 over the inputs copying one old channel."""
    u = rng.uniform(0.5, 1.5, size=(len(source), n_out))
    totals = np.zeros((source.max() + 1, n_out))
    np.add.at(totals, source, u)
    return u / totals[source]


def widen_conv(layer: dict[str, np.ndarray], in_map: np.ndarray, out_map: np.ndarray,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    kernel = layer["kernel"][..., in_map, :][..., out_map]
    kernel = kernel * split_fractions(in_map, len(out_map), rng).astype(kernel.dtype)
    return {"kernel": kernel, "bias": layer["bias"][out_map]}


def widen_batch_norm(layer: dict[str, np.ndarray], out_map: np.ndarray) -> dict[str, np.ndarray]:
    return {name: value[out_map] for name, value in layer.items()}


def widen_unet(layers: Layers, config: UNetConfig, nb_features: int, seed: int = 0) -> Layers:
    """The layers of ``config`` widened to ``nb_features`` at the first level (the others scale
    with ``feat_mult``); the likelihood layer keeps its outputs. Layers of other networks pass."""
    rng = np.random.default_rng(seed)
    wide = dataclasses.replace(config, nb_features=nb_features)
    p, out = config.prefix, dict(layers)

    def conv(name, in_map, n_old, n_new):
        out_map = channel_map(n_old, n_new)
        out[name] = widen_conv(layers[name], in_map, out_map, rng)
        return out_map

    x = np.arange(layers[f"{p}_conv_downarm_0_0"]["kernel"].shape[3])   # the image channels
    skips = []
    for level in range(config.nb_levels):
        n_old, n_new = config.level_features(level), wide.level_features(level)
        for i in range(config.nb_conv_per_level):
            x = conv(f"{p}_conv_downarm_{level}_{i}", x, n_old, n_new)
        skips.append((x, n_old))
        if config.batch_norm:
            out[f"{p}_bn_down_{level}"] = widen_batch_norm(layers[f"{p}_bn_down_{level}"], x)
    n_up = config.nb_levels - 1
    x_old = config.level_features(n_up)
    for level in range(n_up):
        if level < n_up - config.skip_n_concatenations:
            skip, skip_old = skips[n_up - 1 - level]
            x, x_old = np.concatenate([skip, skip_old + x]), skip_old + x_old
        n_old = config.level_features(n_up - 1 - level)
        n_new = wide.level_features(n_up - 1 - level)
        for i in range(config.nb_conv_per_level):
            x = conv(f"{p}_conv_uparm_{config.nb_levels + level}_{i}", x, n_old, n_new)
        x_old = n_old
        if config.batch_norm:
            out[f"{p}_bn_up_{level}"] = widen_batch_norm(layers[f"{p}_bn_up_{level}"], x)
    n_labels = layers[f"{p}_likelihood"]["bias"].shape[0]
    out[f"{p}_likelihood"] = widen_conv(layers[f"{p}_likelihood"], x, np.arange(n_labels), rng)
    return out


def _main(argv=None) -> None:
    from synthseg_jax.weights.keras_h5 import read_keras_h5, save_keras_layers
    from synthseg_jax.weights.models_dir import infer_unet_config

    parser = argparse.ArgumentParser(description="Widen a trained U-Net function-preservingly.")
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--features", type=int, required=True, help="new first-level width")
    parser.add_argument("--prefix", default="unet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = read_keras_h5(args.source)
    config = infer_unet_config(layers, args.prefix, args.source)
    save_keras_layers(widen_unet(layers, config, args.features, args.seed), args.dest)
    print(f"{args.dest}: {config.prefix} widened from {config.nb_features} to {args.features} features")


if __name__ == "__main__":
    _main()
