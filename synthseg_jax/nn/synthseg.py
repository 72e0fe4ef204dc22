"""The five SynthSeg networks, as ``mri_synthseg``'s ``build_model`` assembles them.

Each network returns logits or scores; the inference and training code decide what to do with
them (softmax, smoothing, losses). Module names equal the Keras prefixes so that weight files map
onto them by layer name.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthseg_jax.nn.unet import (
    EncoderConfig,
    ResidualEncoder,
    UNet,
    UNetConfig,
    conv3d,
    max_pool,
)

QC_CROP_SIZE = 224
CORTEX_LABELS = (3, 42)


def segmenter_config(n_labels: int, prefix: str = "unet", **overrides) -> UNetConfig:
    """SynthSeg 1.0/2.0 segmenter (and the robust cascade's first and last stages)."""
    return UNetConfig(prefix=prefix, n_labels=n_labels, **overrides)


def denoiser_config(n_groups: int, prefix: str = "l2l", **overrides) -> UNetConfig:
    """The robust cascade's label-to-label denoiser: wider kernels, only the two deepest skips."""
    defaults = dict(nb_features=16, conv_size=5, skip_n_concatenations=2)
    return UNetConfig(prefix=prefix, n_labels=n_groups, **{**defaults, **overrides})


def parcellation_config(n_labels: int, **overrides) -> UNetConfig:
    return UNetConfig(prefix="unet_parc", n_labels=n_labels, **overrides)


def one_hot_argmax(logits: jax.Array) -> jax.Array:
    """Hard decision between cascade stages: the original passes one-hot labels, not posteriors."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


class Segmenter(nn.Module):
    """A single U-Net segmenter (SynthSeg 1.0 or 2.0, or the parcellation U-Net)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, pad_output: int = 0) -> jax.Array:
        return UNet(self.config, name=self.config.prefix)(x, train, pad_output)


class RobustCascade(nn.Module):
    """SynthSeg-robust: segmenter into groups -> l2l denoiser -> segmenter on image + groups."""

    n_groups: int
    n_labels: int
    first: UNetConfig | None = None
    denoiser: UNetConfig | None = None
    second: UNetConfig | None = None

    def stage_configs(self) -> tuple[UNetConfig, UNetConfig, UNetConfig]:
        return (
            self.first or segmenter_config(self.n_groups, "unet"),
            self.denoiser or denoiser_config(self.n_groups, "l2l"),
            self.second or segmenter_config(self.n_labels, "unet2"),
        )

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
        return cascade(self.stage_configs(), image,
                       lambda cfg, x: UNet(cfg, name=cfg.prefix)(x, train))


def cascade(stages: tuple[UNetConfig, UNetConfig, UNetConfig], image: jax.Array,
            run: Callable[[UNetConfig, jax.Array], jax.Array]) -> jax.Array:
    """The robust cascade's wiring, ``run(config, input)`` giving each stage's logits (the
    module's U-Nets, or the same evaluated in slabs)."""
    return cascade_last(stages, image, cascade_groups(stages, image, run), run)


def cascade_groups(stages: tuple[UNetConfig, UNetConfig, UNetConfig], image: jax.Array,
                   run: Callable[[UNetConfig, jax.Array], jax.Array]) -> jax.Array:
    """The cascade's first two stages: the denoised one-hot groups its last stage takes."""
    first, denoiser, _ = stages
    groups = one_hot_argmax(run(first, image))
    return one_hot_argmax(run(denoiser, groups))


def cascade_last(stages: tuple[UNetConfig, UNetConfig, UNetConfig], image: jax.Array,
                 denoised: jax.Array, run: Callable[[UNetConfig, jax.Array], jax.Array]
                 ) -> jax.Array:
    """The cascade's last stage: logits from the image and the denoised groups."""
    return run(stages[2], jnp.concatenate([image, denoised], axis=-1))


class QCRegressor(nn.Module):
    """QC network: residual encoder, max-pool, two 5^3 ReLU convs, spatial mean -> one score per
    QC class. The input is the one-hot QC-class map of the ``MakeShape`` crop."""

    n_qc_labels: int
    encoder: EncoderConfig = EncoderConfig(prefix="qc")

    @nn.compact
    def __call__(self, onehot: jax.Array, train: bool = False) -> jax.Array:
        prefix = self.encoder.prefix
        x = ResidualEncoder(self.encoder, name=f"{prefix}_encoder")(onehot, train)
        x = max_pool(x)
        for i in range(2):
            x = jax.nn.relu(conv3d(self.n_qc_labels, 5, f"{prefix}_final_conv_{i}")(x))
        return jnp.mean(x, axis=(1, 2, 3))


def crop_around_labels(label_index: jax.Array, size: int = QC_CROP_SIZE) -> jax.Array:
    """``MakeShape``: a ``size``^3 window centred on the bounding box of the segmentation, zero
    padded where it leaves the volume, cut down around the centre if the box is larger.

    Like the original, the box is of voxels whose label *index* is neither 0 nor 24 (index 24,
    not label 24, is what the original's code tests). ``label_index`` is (X, Y, Z) int.
    """
    shape = jnp.array(label_index.shape)
    mask = (label_index != 0) & (label_index != 24)
    any_voxel = jnp.any(mask)
    lows, highs = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = jnp.any(mask, axis=others)
        coords = jnp.arange(label_index.shape[axis])
        lows.append(jnp.min(jnp.where(present, coords, label_index.shape[axis])))
        highs.append(jnp.max(jnp.where(present, coords, -1)) + 1)
    low = jnp.where(any_voxel, jnp.stack(lows), 0)
    high = jnp.where(any_voxel, jnp.stack(highs), jnp.minimum(shape, size))
    extra = size - (high - low)
    start = low - (extra + 1) // 2  # ceil(extra / 2), also for negative extra
    padded = jnp.pad(label_index, size)
    return jax.lax.dynamic_slice(padded, tuple(start + size), (size,) * 3)


def parcellation_input(image: jax.Array, seg_index: jax.Array, labels: jax.Array) -> jax.Array:
    """Image joined to a two-channel one-hot cortex mask (labels 3 and 42), as the parc U-Net sees it."""
    return with_cortex_mask(image, in_cortex(seg_index, labels))


def in_cortex(seg_index: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether each voxel's label index (into ``labels``) is a cortex label (3, 42)."""
    return jnp.isin(labels, jnp.array(CORTEX_LABELS))[seg_index]


def with_cortex_mask(image: jax.Array, in_cortex: jax.Array) -> jax.Array:
    """``image`` (..., 1) joined to the one-hot of the boolean mask ``in_cortex`` (...)."""
    mask = jax.nn.one_hot(in_cortex.astype(jnp.int32), 2, dtype=image.dtype)
    return jnp.concatenate([image, mask], axis=-1)

