"""The decoder's first convolution computed at the coarse resolution (nn/upconv.py) against its
definition, a 'SAME' convolution of ``concat([skip, upsample_nearest(x)])``: values and gradients,
3^3 and 5^3 kernels, with and without the skip, both convolution backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.conv import conv3d_padded
from synthseg_jax.nn import upconv
from synthseg_jax.nn.upconv import ParityFold, UpsampledConcatConv3D, parity_fold


def upsample_nearest(x):
    """Keras' ``UpSampling3D(2)``: every voxel repeated twice along each spatial axis."""
    return jnp.repeat(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), 2, axis=3)


def by_definition(skip, x, kernel, bias, backend):
    up = upsample_nearest(x)
    joined = up if skip is None else jnp.concatenate([skip, up], axis=-1)
    return conv3d_padded(joined, kernel, bias, backend=backend)


def inputs(seed, k, with_skip):
    r = np.random.default_rng(seed)
    x = r.standard_normal((2, 6, 4, 8, 5), dtype=np.float32)
    skip = r.standard_normal((2, 12, 8, 16, 3), dtype=np.float32) if with_skip else None
    n_in = 5 + (3 if with_skip else 0)
    kernel = r.standard_normal((k, k, k, n_in, 7), dtype=np.float32) / np.sqrt(k**3 * n_in)
    bias = r.standard_normal((7,), dtype=np.float32)
    return (None if skip is None else jnp.asarray(skip)), jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias)


def relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("backend", ["xla", "onednn"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("with_skip", [True, False])
def test_equals_the_convolution_of_the_upsampled_concatenation(backend, k, with_skip, monkeypatch):
    monkeypatch.setenv("SYNTHSEG_JAX_CONV", backend)
    skip, x, kernel, bias = inputs(k + 10 * with_skip, k, with_skip)
    layer = UpsampledConcatConv3D(7, k)
    params = {"params": {"kernel": kernel, "bias": bias}}

    def ours(kernel, x, skip):
        return layer.apply({"params": {"kernel": kernel, "bias": bias}}, skip, x)

    def reference(kernel, x, skip):
        return by_definition(skip, x, kernel, bias, backend)

    y = layer.apply(params, skip, x)
    assert y.shape == (2, 12, 8, 16, 7)
    assert relative_error(y, reference(kernel, x, skip)) < 2e-6

    probe = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32))
    argnums = (0, 1, 2) if with_skip else (0, 1)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a)) * probe), argnums)(kernel, x, skip)
    expected = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a)) * probe), argnums)(kernel, x, skip)
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < 2e-5


def test_a_wrong_tap_fold_is_caught(monkeypatch):
    """The comparison can fail: the two parities' tap sums swapped give another convolution."""
    skip, x, kernel, bias = inputs(3, 3, True)
    params = {"params": {"kernel": kernel, "bias": bias}}
    reference = by_definition(skip, x, kernel, bias, "xla")
    assert relative_error(UpsampledConcatConv3D(7, 3).apply(params, skip, x), reference) < 2e-6
    fold = parity_fold(3)
    swapped = ParityFold(fold.sums[::-1], fold.taps, fold.padding, fold.offsets)
    monkeypatch.setattr(upconv, "parity_fold", lambda k: swapped)
    assert relative_error(UpsampledConcatConv3D(7, 3).apply(params, skip, x), reference) > 1e-2


@pytest.mark.parametrize("k, taps, pad, offsets", [(3, 2, (1, 1), (0, 1)), (5, 3, (1, 1), (0, 0)),
                                                   (7, 4, (2, 2), (0, 1))])
def test_parity_fold_sums_every_fine_tap_once(k, taps, pad, offsets):
    fold = parity_fold(k)
    assert (fold.taps, fold.padding, fold.offsets) == (taps, pad, offsets)
    for mat in fold.sums:
        assert mat.shape == (taps, k)
        np.testing.assert_array_equal(mat.sum(axis=0), np.ones(k))
