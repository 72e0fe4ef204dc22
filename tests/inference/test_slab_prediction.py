"""Prediction with the U-Nets in slabs (network.SLAB_BYTES exceeded) equals the whole-volume one."""

import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.inference.network import Mode, Predictor, slab_plan

from test_network import image, networks

SHAPE = (64, 16, 24)          # padded input: 4 slabs of 16 rows with the budget below
SLAB_BYTES = 16 * 16 * 24 * 2 * 4
WHOLE = 2**40

MODES = {
    "default+parc": (("2.0", "parc"), Mode(parc=True)),
    "fast+parc+qc": (("2.0", "parc", "qc"), Mode(fast=True, parc=True, qc=True)),
    "robust": (("robust",), Mode(robust=True)),
}


@pytest.mark.parametrize("name", list(MODES))
def test_slabs_equal_whole(tiny_nets, tables, name):
    kinds, mode = MODES[name]
    nets = networks(tiny_nets, tables, kinds)
    x = image(7, SHAPE)
    cfg = nets.parc.config if mode.parc else nets.segmenter.stage_configs()[1]
    assert slab_plan(cfg, jnp.zeros((1, *SHAPE, 1)), SLAB_BYTES).count == 4   # slabs do happen
    pad_idx = np.array([2, 1, 3, 60, 15, 21])
    results = [Predictor(nets, mode, qc_crop_size=16, slab_bytes=budget).predict(
        x, pad_idx, posteriors=True) for budget in (SLAB_BYTES, WHOLE)]
    slabs, whole = results
    np.testing.assert_allclose(slabs.posteriors, whole.posteriors, atol=1e-5)
    assert np.mean(slabs.seg == whole.seg) >= 0.9999
    assert len(np.unique(whole.seg)) > 5
    np.testing.assert_allclose(slabs.sums, whole.sums, rtol=1e-4)
    if mode.parc:
        np.testing.assert_allclose(slabs.parc_sums, whole.parc_sums, rtol=1e-4)
    if mode.qc:
        np.testing.assert_allclose(slabs.qc_scores, whole.qc_scores, atol=1e-5)
