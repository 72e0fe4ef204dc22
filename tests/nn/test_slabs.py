"""Slab-wise U-Net evaluation (nn/slabs.py) against the whole-volume U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.slabs import plan_slabs, unet_slabwise
from synthseg_jax.nn.unet import UNet, UNetConfig


def random_unet(cfg: UNetConfig, shape, seed=0):
    """Variables with non-trivial BatchNorm statistics (one training-mode pass) and biases."""
    x = jax.random.normal(jax.random.key(seed), shape)
    module = UNet(cfg)
    variables = module.init(jax.random.key(seed + 1), x)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 2), p.shape), variables["params"])
    _, stats = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return module, {"params": params, **stats}, x


def slabwise_logits(cfg, variables, x, plan):
    def emit(out, start, logits):
        return jax.lax.dynamic_update_slice_in_dim(out, logits, start, axis=1)

    out = jnp.zeros(x.shape[:-1] + (cfg.n_labels,), jnp.float32)
    return jax.jit(lambda v, x: unet_slabwise(cfg, v, x, plan, emit, out))(variables, x)


CASES = [  # config, input shape, rows per slab
    (UNetConfig("unet", 5, nb_features=4, nb_levels=4), (1, 64, 16, 24, 1), 16),
    (UNetConfig("unet", 5, nb_features=4, nb_levels=4), (1, 96, 16, 16, 2), 32),
    # the robust cascade's denoiser: 5^3 kernels, the two shallowest skips dropped
    (UNetConfig("l2l", 3, nb_features=4, nb_levels=4, conv_size=5, skip_n_concatenations=2),
     (1, 64, 16, 16, 3), 16),
    # a single slabbed level (a 2-level U-Net)
    (UNetConfig("unet", 4, nb_features=3, nb_levels=2), (1, 32, 8, 8, 1), 8),
]


@pytest.mark.parametrize("cfg, shape, rows", CASES)
def test_slabwise_equals_whole(cfg, shape, rows):
    module, variables, x = random_unet(cfg, shape)
    plan = plan_slabs(cfg, shape[1], rows)
    assert plan is not None and plan.count >= 3, plan
    whole = np.asarray(jax.jit(module.apply)(variables, x))
    slabs = np.asarray(slabwise_logits(cfg, variables, x, plan))
    scale = np.abs(whole).max()
    assert scale > 1e-2
    np.testing.assert_allclose(slabs, whole, atol=1e-5 * scale, rtol=0)


def test_too_small_halo_would_differ():
    """The test above can fail: slabs with their halos cut to nothing differ from the whole."""
    import synthseg_jax.nn.slabs as slabs

    cfg, shape, rows = CASES[0]
    module, variables, x = random_unet(cfg, shape)
    plan = plan_slabs(cfg, shape[1], rows)
    whole = np.asarray(jax.jit(module.apply)(variables, x))
    saved = slabs.encoder_halo
    try:
        slabs.encoder_halo = lambda cfg, n: 0
        cut = np.asarray(slabwise_logits(cfg, variables, x, plan))
    finally:
        slabs.encoder_halo = saved
    assert np.abs(cut - whole).max() > 1e-3 * np.abs(whole).max()


def test_plan():
    cfg = UNetConfig("unet", 33)
    plan = plan_slabs(cfg, 256, 64)
    assert (plan.rows, plan.count, plan.n_levels) == (64, 4, 2)
    assert plan_slabs(cfg, 224, 80).rows == 56          # the largest multiple of 4 dividing 224
    assert plan_slabs(cfg, 64, 64) is None              # fits whole
    assert plan_slabs(cfg, 16, 4) is None               # halos longer than the volume
