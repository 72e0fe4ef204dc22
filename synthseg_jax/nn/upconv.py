"""The decoder's first convolution, ``conv(concat([skip, upsample_nearest(x)]))``, without the
upsampled tensor: its upsampled part is computed at the coarse resolution.

A 'SAME' k^3 convolution of a 2x nearest-upsampled volume takes, at a fine voxel of parity p
along an axis, only a few distinct coarse voxels: the k taps fall on ``ceil``-many coarse
neighbours (2 for k = 3, 3 for k = 5), with the taps that land on the same coarse voxel summed.
So each of the 2^3 output parities is a small convolution of the coarse volume with a kernel
folded from the original one, and the zero padding of the fine grid is exactly the zero padding
of the coarse grid. All eight parities run as one convolution with 8x the output channels
(each parity's kernel placed at its own tap offset), whose outputs are interleaved back to the
fine grid. For the published 2.0 U-Net this replaces 27 taps over the 48-192 upsampled channels by
8, about a quarter of the whole forward's products, and the 72-channel concatenation (3.2 GB at a
224x256x192 1 mm input) no longer exists. The result is the same convolution up to float
rounding (tests/nn/test_upconv.py); the parameters are those of the ``Conv3D`` it replaces.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthseg_jax.nn.conv import conv3d_padded


@functools.lru_cache(maxsize=None)
def parity_taps(kernel_size: int) -> tuple[tuple[np.ndarray, ...], int, tuple[int, int]]:
    """Per fine parity p (0, 1) along one axis, the (K, k) 0/1 matrix that sums the k fine taps
    into the K coarse taps they fall on, with each parity's coarse taps shifted so that one
    K-tap convolution with padding ``pad`` serves both: parity p's output at coarse voxel i is
    that convolution's output at ``i + offset[p]`` (returned as the matrices, K, pad; the
    offsets are ``offsets(kernel_size)``)."""
    r = kernel_size // 2
    firsts = [(p - r) // 2 for p in (0, 1)]                 # coarse tap of the first fine tap
    lasts = [(p - r + kernel_size - 1) // 2 for p in (0, 1)]
    start = min(firsts)
    taps = max(last - first for first, last in zip(firsts, lasts)) + 1
    mats = []
    for p, first in enumerate(firsts):
        mat = np.zeros((taps, kernel_size), np.float32)
        for a in range(kernel_size):
            mat[(p - r + a) // 2 - first, a] = 1.0
        mats.append(mat)
    spread = max(firsts) - start
    return tuple(mats), taps, (-start, taps - 1 + start + spread)


def offsets(kernel_size: int) -> tuple[int, int]:
    """Where each parity's coarse output sits in the joint convolution's output (see above)."""
    r = kernel_size // 2
    firsts = [(p - r) // 2 for p in (0, 1)]
    return tuple(f - min(firsts) for f in firsts)


def folded_kernel(kernel: jax.Array) -> jax.Array:
    """(k, k, k, C_in, C_out) -> (K, K, K, C_in, 8 * C_out): the eight parities' coarse kernels,
    parity (p0, p1, p2) in output block 4 p0 + 2 p1 + p2."""
    mats, _, _ = parity_taps(kernel.shape[0])
    blocks = [jnp.einsum("ia,jb,kc,abcnm->ijknm", mats[p0], mats[p1], mats[p2], kernel)
              for p0, p1, p2 in itertools.product((0, 1), repeat=3)]
    return jnp.concatenate(blocks, axis=-1)


def interleave(joint: jax.Array, coarse_shape: tuple[int, int, int], kernel_size: int) -> jax.Array:
    """The joint output (N, X', Y', Z', 8 C) -> the fine (N, 2X, 2Y, 2Z, C) volume."""
    n, c8 = joint.shape[0], joint.shape[-1]
    c = c8 // 8
    offs = offsets(kernel_size)
    parts = []
    for block, (p0, p1, p2) in enumerate(itertools.product((0, 1), repeat=3)):
        o = (offs[p0], offs[p1], offs[p2])
        parts.append(joint[:, o[0]:o[0] + coarse_shape[0], o[1]:o[1] + coarse_shape[1],
                           o[2]:o[2] + coarse_shape[2], block * c:(block + 1) * c])
    x = jnp.stack(parts, axis=-2).reshape(n, *coarse_shape, 2, 2, 2, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, 2 * coarse_shape[0], 2 * coarse_shape[1], 2 * coarse_shape[2], c)


def upsampled_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   conv_dtype: str | None = None) -> jax.Array:
    """``conv_same(upsample_nearest(x), kernel) + bias`` computed on the coarse ``x``."""
    k = kernel.shape[0]
    if kernel.shape[:3] != (k, k, k) or k % 2 == 0:
        raise ValueError(f"upsampled_conv needs an odd cubic kernel, got {kernel.shape[:3]}")
    _, _, pad = parity_taps(k)
    # every fine voxel takes exactly one parity's output, so each parity carries the bias
    joint = conv3d_padded(x, folded_kernel(kernel), jnp.tile(bias, 8), padding=(pad,) * 3,
                          conv_dtype=conv_dtype)
    return interleave(joint, x.shape[1:4], k)


class UpsampledConcatConv3D(nn.Module):
    """``Conv3D(features, kernel_size)`` applied to ``concat([skip, upsample_nearest(x)])``
    (``skip`` may be None: then to the upsampled ``x`` alone), with that layer's parameters
    (``kernel`` over all input channels, skip's first; ``bias``)."""

    features: int
    kernel_size: int
    conv_dtype: str | None = None
    kernel_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, skip: jax.Array | None, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        n_skip = 0 if skip is None else skip.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, k, n_skip + x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        if skip is None:
            return upsampled_conv(x, kernel, bias, self.conv_dtype)
        up = upsampled_conv(x, kernel[..., n_skip:, :], jnp.zeros_like(bias), self.conv_dtype)
        return conv3d_padded(skip, kernel[..., :n_skip, :], bias, conv_dtype=self.conv_dtype) + up
