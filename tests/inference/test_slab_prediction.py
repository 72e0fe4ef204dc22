"""Prediction with the U-Nets in slabs (network.SLAB_BYTES exceeded) equals the whole-volume one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.inference.network import Mode, Predictor, SlabBudget

from test_network import image, networks

SHAPE = (64, 16, 24)          # padded input: 4 slabs of 16 rows with the budget below
SLABS = SlabBudget(slab_bytes=16 * 16 * 24 * 2 * 4, whole_voxels=0)
WHOLE = SlabBudget(whole_voxels=2**40)

MODES = {
    "default+parc": (("2.0", "parc"), Mode(parc=True)),
    "fast+parc+qc": (("2.0", "parc", "qc"), Mode(fast=True, parc=True, qc=True)),
    "fast": (("2.0",), Mode(fast=True)),
    "robust": (("robust",), Mode(robust=True)),
}


@pytest.mark.parametrize("name", list(MODES))
def test_slabs_equal_whole(tiny_nets, tables, name):
    kinds, mode = MODES[name]
    nets = networks(tiny_nets, tables, kinds)
    x = image(7, SHAPE)
    cfg = (nets.segmenter.stage_configs()[1] if mode.robust
           else nets.parc.config if mode.parc else nets.segmenter.config)
    assert SLABS.plan(cfg, jnp.zeros((1, *SHAPE, 1))).count == 4   # slabs do happen
    pad_idx = np.array([2, 1, 3, 60, 15, 21])
    results = [Predictor(nets, mode, qc_crop_size=16, slabs=budget).predict(
        x, pad_idx, posteriors=True) for budget in (SLABS, WHOLE)]
    slabs, whole = results
    np.testing.assert_allclose(slabs.posteriors, whole.posteriors, atol=1e-5)
    assert np.mean(slabs.seg == whole.seg) >= 0.9999
    assert len(np.unique(whole.seg)) > 5
    np.testing.assert_allclose(slabs.sums, whole.sums, rtol=1e-4)
    if mode.parc:
        np.testing.assert_allclose(slabs.parc_sums, whole.parc_sums, rtol=1e-4)
        np.testing.assert_allclose(slabs.parc_posteriors, whole.parc_posteriors, atol=1e-5)
    if mode.qc:
        np.testing.assert_allclose(slabs.qc_scores, whole.qc_scores, atol=1e-5)


def test_blur_in_slabs_equals_the_blur():
    from synthseg_jax.inference.network import gaussian_blur, gaussian_blur_in_slabs

    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 24, 5, 7, 3)), jnp.float32)
    expected = np.asarray(gaussian_blur(0.5 * x))
    for rows in (4, 6, 24):
        got = np.asarray(jax.jit(lambda z: gaussian_blur_in_slabs(z, rows, 0.5))(x))
        np.testing.assert_allclose(got, expected, atol=1e-7)
