"""The neurite-style U-Net and residual encoder that every SynthSeg network is built from.

Layer names follow Keras' naming in neurite (``<prefix>_conv_downarm_<level>_<i>``, ...), because
those names are the contract with published ``.h5`` weight files: the importer maps them one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthseg_jax.nn.conv import Conv3D, ConvWeights, sibling_convs
from synthseg_jax.nn.upconv import UpsampledConcatConv3D

# Keras' defaults, which the published weights were trained with (Flax's epsilon is 1e-5).
KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": jax.nn.elu,
    "relu": jax.nn.relu,
    "linear": lambda x: x,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of neurite's ``unet`` builder (the ones SynthSeg uses)."""

    prefix: str
    n_labels: int
    nb_features: int = 24
    nb_levels: int = 5
    conv_size: int = 3
    nb_conv_per_level: int = 2
    feat_mult: int = 2
    activation: str = "elu"
    batch_norm: bool = True
    # Drop the skip connections of the N shallowest decoder levels (the l2l denoiser keeps 2 of 4).
    skip_n_concatenations: int = 0
    # 'bfloat16': convolution products in bf16, accumulated and returned in float32 (nn/conv.py)
    conv_dtype: str = "float32"

    def level_features(self, level: int) -> int:
        return int(round(self.nb_features * self.feat_mult**level))

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be a multiple of this, or the decoder cannot meet its skips."""
        return 2 ** (self.nb_levels - 1)


def conv3d(features: int, size: int, name: str, conv_dtype: str | None = None) -> Conv3D:
    """A Keras-equivalent ``Conv3D(padding='same')`` with Keras' Glorot-uniform initialisation."""
    # nn.Conv's parameters; backend and conv_dtype: see nn/conv.py
    return Conv3D(features, size, name=name, conv_dtype=conv_dtype)


def batch_norm(name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=KERAS_BN_MOMENTUM,
        epsilon=KERAS_BN_EPSILON,
        name=name,
    )


def max_pool(x: jax.Array) -> jax.Array:
    """Keras ``MaxPooling3D(2, padding='same')``: odd sizes are padded at the end only."""
    return nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="SAME")


def check_spatial_shape(shape: tuple[int, ...], multiple: int, what: str) -> None:
    bad = [s for s in shape if s % multiple]
    if bad:
        raise ValueError(
            f"{what}: spatial shape {tuple(shape)} must be a multiple of {multiple} along every axis"
        )


def encode_levels(cfg: UNetConfig, x: jax.Array, train: bool, levels: range
                  ) -> tuple[list[jax.Array], jax.Array]:
    """The encoder's ``levels`` (inside a Flax module's compact call: the layers get their Keras
    names): per level the convolutions, the skip (taken before the level's BatchNorm, as in
    neurite), BatchNorm and, but after the deepest level, max-pooling. Returns the skips and the
    last level's output."""
    act = ACTIVATIONS[cfg.activation]
    skips = []
    for level in levels:
        for i in range(cfg.nb_conv_per_level):
            name = f"{cfg.prefix}_conv_downarm_{level}_{i}"
            x = act(conv3d(cfg.level_features(level), cfg.conv_size, name, cfg.conv_dtype)(x))
        skips.append(x)
        if cfg.batch_norm:
            x = batch_norm(f"{cfg.prefix}_bn_down_{level}", train)(x)
        if level < cfg.nb_levels - 1:
            x = max_pool(x)
    return skips, x


def has_skip(cfg: UNetConfig, level: int) -> bool:
    """Whether the decoder joins encoder ``level``'s skip (the l2l denoiser drops the shallowest)."""
    return level >= cfg.skip_n_concatenations


def decode_level(cfg: UNetConfig, x: jax.Array, skip: jax.Array | None, train: bool,
                 level: int) -> jax.Array:
    """The decoder's step up to the resolution of encoder ``level``: upsampling, the skip joined
    (if ``has_skip``), convolutions, BatchNorm (inside a compact call, like ``encode_levels``)."""
    act = ACTIVATIONS[cfg.activation]
    up = cfg.nb_levels - 2 - level            # the decoder's own numbering, 0 = deepest
    features = cfg.level_features(level)
    for i in range(cfg.nb_conv_per_level):
        name = f"{cfg.prefix}_conv_uparm_{cfg.nb_levels + up}_{i}"
        if i == 0:   # of concat([skip, upsample_nearest(x)]), the upsampled part at x's resolution
            x = act(UpsampledConcatConv3D(features, cfg.conv_size, cfg.conv_dtype, name=name)(skip, x))
        else:
            x = act(conv3d(features, cfg.conv_size, name, cfg.conv_dtype)(x))
    if cfg.batch_norm:
        x = batch_norm(f"{cfg.prefix}_bn_up_{up}", train)(x)
    return x


def likelihood(cfg: UNetConfig, x: jax.Array, pad_output: int = 0) -> jax.Array:
    """The final 1x1x1 convolution to float32 logits; ``pad_output``: see ``UNet``."""
    if pad_output:
        x = jnp.pad(x, [(0, 0)] + [(pad_output, pad_output)] * 3 + [(0, 0)])
    return conv3d(cfg.n_labels, 1, f"{cfg.prefix}_likelihood")(x)


class UNet(nn.Module):
    """neurite ``unet``: returns the logits of ``<prefix>_likelihood`` (softmax is the caller's).

    Logits rather than posteriors because training's warm-up loss is an L2 on logits.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, pad_output: int = 0) -> jax.Array:
        """``pad_output``: return the logits on the grid grown by that many voxels on each side,
        as if the last features were zero there (the final layer is 1x1x1, so the ring holds
        the bias and the inside is unchanged): a caller that blurs the posteriors with zero
        padding then needs no padded copy of its many-channel output."""
        cfg = self.config
        check_spatial_shape(x.shape[1:-1], cfg.size_multiple, f"U-Net '{cfg.prefix}'")
        skips, x = encode_levels(cfg, x, train, range(cfg.nb_levels))
        for level in reversed(range(cfg.nb_levels - 1)):
            x = decode_level(cfg, x, skips[level] if has_skip(cfg, level) else None, train, level)
        return likelihood(cfg, x, pad_output)


class UNetPart(nn.Module):
    """A part of ``UNet`` run on the UNet's own variables (same layer names): what slab-wise
    evaluation (``nn/slabs.py``) runs piece by piece. ``part``: 'encode' (levels ``lo``..``hi``-1:
    returns skips and output), 'decode' (decoder steps to the resolutions of levels ``hi``-1 down
    to ``lo``, given the skips of those levels, None where there is none) or 'likelihood'."""

    config: UNetConfig
    part: str
    lo: int = 0
    hi: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple | None = None, pad_output: int = 0):
        cfg = self.config
        if self.part == "encode":
            return encode_levels(cfg, x, False, range(self.lo, self.hi))
        if self.part == "decode":
            for level in reversed(range(self.lo, self.hi)):
                x = decode_level(cfg, x, skips[level - self.lo], False, level)
            return x
        return likelihood(cfg, x, pad_output)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of neurite's ``conv_enc`` with residual blocks (the QC regressor's trunk)."""

    prefix: str
    nb_features: int = 24
    nb_levels: int = 4
    conv_size: int = 5
    nb_conv_per_level: int = 2
    feat_mult: int = 2
    activation: str = "relu"
    batch_norm: bool = True
    use_residuals: bool = True
    conv_dtype: str = "float32"

    def level_features(self, level: int) -> int:
        return int(round(self.nb_features * self.feat_mult**level))


class ResidualEncoder(nn.Module):
    """neurite ``conv_enc``: per level, convs (the last without activation when residual), a
    residual sum with the level's input (projected by ``expand_down_merge`` when the channel
    counts differ; that projection and the level's first conv run as one, ``sibling_convs``),
    activation, BatchNorm, then max-pooling except after the last level."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]
        for level in range(cfg.nb_levels):
            features = cfg.level_features(level)
            level_input = x
            n_in = level_input.shape[-1]
            shortcut = level_input
            expands = cfg.use_residuals and n_in > 1 and features > 1 and n_in != features
            for i in range(cfg.nb_conv_per_level):
                name = f"{cfg.prefix}_conv_downarm_{level}_{i}"
                if i == 0 and expands:   # the level's first conv and the shortcut's, one input
                    x, shortcut = sibling_convs(level_input, [
                        ConvWeights(features, cfg.conv_size, name=name)(n_in),
                        ConvWeights(features, cfg.conv_size,
                                    name=f"{cfg.prefix}_expand_down_merge_{level}")(n_in)],
                        cfg.conv_dtype)
                    shortcut = act(shortcut)
                else:
                    x = conv3d(features, cfg.conv_size, name, cfg.conv_dtype)(x)
                last = i == cfg.nb_conv_per_level - 1
                x = x if (last and cfg.use_residuals) else act(x)
            if cfg.use_residuals:
                x = act(shortcut + x)
            if cfg.batch_norm:
                x = batch_norm(f"{cfg.prefix}_bn_down_{level}", train)(x)
            if level < cfg.nb_levels - 1:
                x = max_pool(x)
        return x
