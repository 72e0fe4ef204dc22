"""The decoder's first convolution, ``conv(concat([skip, upsample_nearest(x)]))`` (Keras'
``UpSampling3D(2)``: every voxel repeated twice per axis), without the upsampled tensor: its
upsampled part is computed at the coarse resolution.

A 'SAME' k^3 convolution of a 2x nearest-upsampled volume takes, at a fine voxel of parity p
along an axis, only a few distinct coarse voxels: the k taps fall on ``ceil``-many coarse
neighbours (2 for k = 3, 3 for k = 5), with the taps that land on the same coarse voxel summed.
So each of the 2^3 output parities is a small convolution of the coarse volume with a kernel
folded from the original one, and the zero padding of the fine grid is exactly the zero padding
of the coarse grid. All eight parities run as one convolution with 8x the output channels
(each parity's kernel placed at its own tap offset), whose outputs are interleaved back to the
fine grid. For the published 2.0 U-Net this replaces 27 taps over the 48-384 upsampled channels
by 8, about a quarter of the whole forward's products, and the 72-channel concatenation (3.2 GB at a
224x256x192 1 mm input) no longer exists. The result is the same convolution up to float
rounding (tests/nn/test_upconv.py); the parameters are those of the ``Conv3D`` it replaces.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthseg_jax.nn.conv import conv3d_padded


@dataclasses.dataclass(frozen=True)
class ParityFold:
    """How one axis's k fine taps fold onto the coarse grid, for fine parities p = 0 and 1.

    ``sums[p]`` is the (taps, k) 0/1 matrix summing the fine taps into the coarse taps they fall
    on; both parities share one ``taps``-tap convolution with zero ``padding`` (low, high), in
    whose output parity p's value for coarse voxel i sits at ``i + offsets[p]``."""

    sums: tuple[np.ndarray, np.ndarray]
    taps: int
    padding: tuple[int, int]
    offsets: tuple[int, int]


@functools.lru_cache(maxsize=None)
def parity_fold(kernel_size: int) -> ParityFold:
    """The fold of an odd ``kernel_size`` ('SAME': fine tap a of fine voxel 2 i + p reads fine
    voxel 2 i + p - r + a, r = k // 2, i.e. coarse voxel i + (p - r + a) // 2)."""
    r = kernel_size // 2
    firsts = [(p - r) // 2 for p in (0, 1)]                 # coarse offset of the first fine tap
    lasts = [(p - r + kernel_size - 1) // 2 for p in (0, 1)]
    taps = max(last - first for first, last in zip(firsts, lasts)) + 1
    sums = []
    for p, first in enumerate(firsts):
        mat = np.zeros((taps, kernel_size), np.float32)
        for a in range(kernel_size):
            mat[(p - r + a) // 2 - first, a] = 1.0
        sums.append(mat)
    offsets = tuple(first - min(firsts) for first in firsts)
    # output j reads coarse j - low .. j - low + taps - 1; parity p needs j = i + offsets[p] to
    # start at i + firsts[p]; the high side grows the output by max(offsets) voxels
    low = -min(firsts)
    return ParityFold(tuple(sums), taps, (low, taps - 1 - low + max(offsets)), offsets)


def folded_kernel(kernel: jax.Array, fold: ParityFold) -> jax.Array:
    """(k, k, k, C_in, C_out) -> (K, K, K, C_in, 8 * C_out): the eight parities' coarse kernels,
    parity (p0, p1, p2) in output block 4 p0 + 2 p1 + p2."""
    sums = fold.sums
    blocks = [jnp.einsum("ia,jb,kc,abcnm->ijknm", sums[p0], sums[p1], sums[p2], kernel)
              for p0, p1, p2 in itertools.product((0, 1), repeat=3)]
    return jnp.concatenate(blocks, axis=-1)


def interleave(joint: jax.Array, coarse_shape: tuple[int, int, int], fold: ParityFold) -> jax.Array:
    """The joint output (N, X', Y', Z', 8 C) -> the fine (N, 2X, 2Y, 2Z, C) volume."""
    n, c8 = joint.shape[0], joint.shape[-1]
    c = c8 // 8
    offs = fold.offsets
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
    fold = parity_fold(k)
    # every fine voxel takes exactly one parity's output, so each parity carries the bias
    joint = conv3d_padded(x, folded_kernel(kernel, fold), jnp.tile(bias, 8),
                          padding=(fold.padding,) * 3, conv_dtype=conv_dtype)
    return interleave(joint, x.shape[1:4], fold)


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
