"""Intensity model: GMM sampling conditioned on the label map, bias field, and the clip /
min-max normalisation / gamma augmentation, following SynthSeg's model inputs and layers.

GMM parameters are drawn per generation *class* (labels sharing a class share a Gaussian):

* hyper-parameters are a ``(2 * n_mod, n_classes)`` array: rows ``(low, high)`` for uniform
  priors or ``(mean, std)`` for normal priors; with several modalities a block of two rows is
  picked at random (or block ``c`` for channel ``c`` with ``use_specific_stats_for_channel``);
* drawn values are clipped at 0;
* the background class is reset to mean = std = 0 in 5% of the draws and to a low Gaussian
  (mean ``U(0, 15)``, std ``U(0, 5)``) in another 25%.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .spatial import resize_linear

Array = jax.Array

KERAS_EPSILON = 1e-7


def prior_array(hyper, n_classes: int, centre: float, default_range: float) -> np.ndarray:
    """SynthSeg's hyper-parameter formats as a ``(2 * n_mod, n_classes)`` array.

    ``None`` -> ``[centre - default_range, centre + default_range]``; a number ``h`` ->
    ``[centre - h, centre + h]``; a pair -> that pair for every class; an array of shape
    ``(2 * n_mod, n_classes)`` -> as given.
    """
    if hyper is None:
        return np.array([[centre - default_range] * n_classes, [centre + default_range] * n_classes])
    arr = np.asarray(hyper, dtype=np.float64)
    if arr.ndim == 0:
        return np.array([[centre - float(arr)] * n_classes, [centre + float(arr)] * n_classes])
    if arr.shape == (2,):
        return np.tile(arr[:, None], (1, n_classes))
    if arr.ndim == 2 and arr.shape[0] % 2 == 0 and arr.shape[1] == n_classes:
        return arr
    raise ValueError(f"prior hyper-parameters of shape {arr.shape} do not match {n_classes} classes")


def _draw(key: Array, hyper: Array, distribution: str) -> Array:
    a, b = hyper[0], hyper[1]
    if distribution == 'uniform':
        v = a + (b - a) * jax.random.uniform(key, a.shape, jnp.float32)
    elif distribution == 'normal':
        v = a + b * jax.random.normal(key, a.shape, jnp.float32)
    else:
        raise ValueError(f"prior distribution must be 'uniform' or 'normal', got {distribution!r}")
    return jnp.maximum(v, 0.0)


def _pick_block(u: Array, arr: np.ndarray, channel: int, specific: bool) -> Array:
    """Block of two rows of ``arr``: the channel's (``specific``) or a random one (``u ~ U(0, 1)``)."""
    n_mod = arr.shape[0] // 2
    blocks = jnp.asarray(arr.reshape(n_mod, 2, -1), jnp.float32)
    if n_mod == 1:
        return blocks[0]
    if specific:
        if n_mod <= channel:
            raise ValueError(f"use_specific_stats_for_channel needs one block per channel, got {n_mod}")
        return blocks[channel]
    return blocks[jnp.minimum(jnp.floor(u * n_mod).astype(jnp.int32), n_mod - 1)]


def sample_gmm_params(key: Array, n_classes: int, prior_distributions: str = 'uniform',
                      prior_means=None, prior_stds=None, *, channel: int = 0,
                      use_specific_stats_for_channel: bool = False, mix_prior_and_random: bool = False,
                      default_means=(125.0, 125.0), default_stds=(15.0, 15.0),
                      background_zero_prob: float = 0.05, background_low_prob: float = 0.25,
                      background_low_mean: float = 15.0, background_low_std: float = 5.0):
    """Draw the per-class means and stds of one channel. Returns ``(means, stds)``, each
    ``[n_classes]``.  ``default_*`` are SynthSeg's (centre, range) used when no prior is given
    (``U(0, 250)`` and ``U(0, 30)`` with uniform priors)."""
    k_u, k_m, k_s = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, (7,), jnp.float32)     # block picks, mixing, background reset
    dm = prior_array(None, n_classes, *default_means)
    ds = prior_array(None, n_classes, *default_stds)
    pm = prior_array(prior_means, n_classes, *default_means)
    ps = prior_array(prior_stds, n_classes, *default_stds)
    hm = _pick_block(u[0], pm, channel, use_specific_stats_for_channel)
    hs = _pick_block(u[1], ps, channel, use_specific_stats_for_channel)
    if mix_prior_and_random and prior_means is not None:
        hm = jnp.where(u[2] > 0.5, jnp.asarray(dm, jnp.float32), hm)
    if mix_prior_and_random and prior_stds is not None:
        hs = jnp.where(u[3] > 0.5, jnp.asarray(ds, jnp.float32), hs)
    means = _draw(k_m, hm, prior_distributions)
    stds = _draw(k_s, hs, prior_distributions)
    # background resets
    coef = u[4]
    low_mean = u[5] * background_low_mean
    low_std = u[6] * background_low_std
    zero = coef > 1.0 - background_zero_prob
    low = (coef > 1.0 - background_zero_prob - background_low_prob) & ~zero
    m0 = jnp.where(zero, 0.0, jnp.where(low, low_mean, means[0]))
    s0 = jnp.where(zero, 0.0, jnp.where(low, low_std, stds[0]))
    return means.at[0].set(m0), stds.at[0].set(s0)


def sample_gmm(key: Array, labels: Array, label_means: Array, label_stds: Array) -> Array:
    """GMM image ``mean[l] + std[l] * N(0, 1)`` for a label-index map ``labels`` and per-label
    (not per-class) parameter tables of shape ``[n_labels]``."""
    idx = labels.astype(jnp.int32)
    table = jax.lax.optimization_barrier(jnp.stack([label_means, label_stds], -1))  # keep out of the gather
    ms = table[idx]
    noise = jax.random.normal(key, labels.shape, jnp.float32)
    return ms[..., 0] + ms[..., 1] * noise


def bias_shape(shape: Sequence[int], bias_scale: float) -> list:
    return [int(np.ceil(s * bias_scale)) for s in shape]


def sample_bias_field(key: Array, shape: Sequence[int], bias_field_std: float = 0.7, bias_scale: float = 0.025,
                      std: Optional[Array] = None):
    """Multiplicative bias field: ``exp`` of a linearly upsampled ``N(0, s)`` grid of
    ``ceil(bias_scale * shape)`` nodes with ``s ~ U(0, bias_field_std)``.  Returns
    ``(field, s, small_log_field)``."""
    k_std, k_f = jax.random.split(key)
    if std is None:
        std = jax.random.uniform(k_std, (), jnp.float32) * bias_field_std
    small = jax.random.normal(k_f, tuple(bias_shape(shape, bias_scale)), jnp.float32) * std
    log_field = resize_linear(small, shape)
    return jnp.exp(log_field), std, small


def apply_bias_field(key: Array, image: Array, bias_field_std: float = 0.7, bias_scale: float = 0.025,
                     apply: Array | bool = True) -> Tuple[Array, Array]:
    """Multiply ``image`` (one channel) by a random bias field where ``apply`` is true (the sampler
    draws that once per sample, shared by its channels). Returns ``(image, drawn std)``."""
    field, std, _ = sample_bias_field(key, image.shape, bias_field_std, bias_scale)
    return jnp.where(apply, image * field, image), std


def intensity_augmentation(key: Array, image: Array, clip: float = 300.0, normalise: bool = True,
                           gamma_std: float = 0.5) -> Array:
    """Clip to ``[0, clip]``, min-max normalise to [0, 1], raise to ``exp(N(0, gamma_std))``."""
    x = image
    if clip:
        x = jnp.clip(x, 0.0, clip)
    if normalise:
        m, big_m = jnp.min(x), jnp.max(x)
        x = (jnp.clip(x, m, big_m) - m) / (big_m - m + KERAS_EPSILON)
    if gamma_std > 0:
        gamma = jax.random.normal(key, (), jnp.float32) * gamma_std
        x = jnp.power(x, jnp.exp(gamma))
    return x
