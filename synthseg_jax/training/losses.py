"""Training losses of SynthSeg, written from the definitions in the original's ``lab2im`` layers.

* :func:`weighted_l2` -- the warm-up loss, on the logits (the layer before the softmax): every
  channel is pulled to +5 where the voxel has that label and to -5 elsewhere, and background voxels
  count (almost) nothing;
* :func:`soft_dice_loss` -- the main loss, ``1 - soft Dice`` averaged over the batch and the labels;
* :func:`qc_regression_loss` -- the QC network's loss: squared error of the predicted Dice scores,
  averaged over the batch and summed over the QC classes;
* :func:`hard_dice` -- evaluation Dice between two label maps (validation, not a loss).

All are pure ``jax.numpy`` functions of arrays shaped ``(batch, X, Y, Z, channels)`` (one-hot
targets) and return scalars (or per-label scores), so they jit, vmap and shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keras' backend epsilon, used by the original's Dice (added once to the sums) and the probability
# normalisation.
KERAS_EPSILON = 1e-7
WL2_TARGET = 5.0
# The original adds this to the voxel weights so that an all-background batch does not divide by 0.
WL2_WEIGHT_EPSILON = 1e-8


def one_hot(indices: jax.Array, n_labels: int, dtype=jnp.float32) -> jax.Array:
    """Integer channel indices ``(B, X, Y, Z)`` -> one-hot ``(B, X, Y, Z, n_labels)``."""
    return jax.nn.one_hot(indices, n_labels, dtype=dtype)


def weighted_l2(logits: jax.Array, target: jax.Array, target_value: float = WL2_TARGET) -> jax.Array:
    """Weighted L2 between logits and ``target_value * (2 * one_hot - 1)``.

    The weight of a voxel is ``1 - target[..., 0]`` (plus 1e-8): background voxels are ignored.
    The weighted sum of squares over every element of the batch is divided by the sum of the
    weights times the number of channels, as the original's ``WeightedL2Loss``.
    """
    target = target.astype(logits.dtype)
    weights = 1.0 - target[..., :1] + WL2_WEIGHT_EPSILON
    squared = jnp.square(logits - target_value * (2.0 * target - 1.0))
    return jnp.sum(weights * squared) / (jnp.sum(weights) * logits.shape[-1])


def _normalise(x: jax.Array) -> jax.Array:
    """Make the channels a distribution (clipped to [0, 1]), as the original does to both inputs."""
    return jnp.clip(x / (jnp.sum(x, axis=-1, keepdims=True) + KERAS_EPSILON), 0.0, 1.0)


def soft_dice_per_label(probs: jax.Array, target: jax.Array) -> jax.Array:
    """Soft Dice ``(2 sum(g p) + eps) / (sum(g^2 + p^2) + eps)`` per item and label: ``(B, L)``."""
    target = _normalise(target.astype(probs.dtype))
    probs = _normalise(probs)
    spatial = tuple(range(1, probs.ndim - 1))
    top = jnp.sum(2.0 * target * probs, axis=spatial)
    bottom = jnp.sum(jnp.square(target) + jnp.square(probs), axis=spatial)
    return (top + KERAS_EPSILON) / (bottom + KERAS_EPSILON)


def soft_dice_loss(probs: jax.Array, target: jax.Array) -> jax.Array:
    """``mean(1 - soft Dice)`` over the batch and every label (background included)."""
    return jnp.mean(1.0 - soft_dice_per_label(probs, target))


def qc_regression_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """QC loss: ``sum over classes of mean over the batch of (target - predicted)^2``."""
    return jnp.sum(jnp.mean(jnp.square(target - predicted), axis=0))


def segmentation_loss(kind: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The loss of a segmentation network, ``'wl2'`` or ``'dice'``, on integer targets or on
    per-label shares shaped like the logits (a coarse network's cells, ``train.network_pooling``)."""
    target = targets.astype(logits.dtype) if targets.ndim == logits.ndim else \
        one_hot(targets, logits.shape[-1], logits.dtype)
    if kind == "wl2":
        return weighted_l2(logits, target)
    if kind == "dice":
        return soft_dice_loss(jax.nn.softmax(logits, axis=-1), target)
    raise ValueError(f"unknown segmentation loss {kind!r}; expected 'wl2' or 'dice'")


def hard_dice(pred: jax.Array, target: jax.Array, n_labels: int) -> tuple[jax.Array, jax.Array]:
    """Dice per label between two integer label maps of channel indices (any shape).

    Returns ``(dice, present)``: ``dice[l] = 2|P_l & T_l| / (|P_l| + |T_l|)`` (1 where both are
    empty) and whether label ``l`` occurs in the target.
    """
    p = jax.nn.one_hot(pred.reshape(-1), n_labels, dtype=jnp.float32)
    t = jax.nn.one_hot(target.reshape(-1), n_labels, dtype=jnp.float32)
    inter = jnp.sum(p * t, axis=0)
    total = jnp.sum(p, axis=0) + jnp.sum(t, axis=0)
    dice = jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), 1.0)
    return dice, jnp.sum(t, axis=0) > 0
