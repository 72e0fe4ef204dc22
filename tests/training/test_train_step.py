"""One real optimisation step per model kind lowers its loss on a fixed batch; initialisation,
freezing and the Keras-style BatchNorm update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose, needs_maps

from synthseg_jax.nn.synthseg import Segmenter
from synthseg_jax.nn.unet import UNetConfig
from synthseg_jax.training import step as st

# tiny versions of every model kind: 4 features, 3 levels, 32^3 crops of 4 mm label maps
SMALL = ["model.nb_features=4", "model.nb_levels=3", "generator.output_shape=[32,32,32]",
         "train.label_downsample=4", "train.max_maps=1", "train.held_out=[]", "optim.lr=1e-3",
         "train.compilation_cache=null"]
KINDS = [("tiny", ("wl2", "dice")), ("robust_segmenter", ("dice",)), ("robust_denoiser", ("dice",)),
         ("robust_second", ("dice",)), ("parc", ("dice",)), ("qc", ("qc",))]


@needs_maps
@pytest.mark.parametrize("model,phases", KINDS, ids=[k for k, _ in KINDS])
def test_one_step_lowers_loss(model, phases, tmp_path):
    from synthseg_jax.training.loop import Run
    r = Run(compose([f"model={model}", f"train.out_dir={tmp_path}"] + SMALL))
    state = r.trainer.place_state(r.initial)
    x, y = r.batch(0, jax.random.key(0))
    assert x.shape[:4] == (1, 32, 32, 32) and x.shape[-1] == r.task.in_channels
    assert np.all(np.isfinite(np.asarray(x)))
    if r.spec.kind == "qc":
        assert y.shape == (1, r.task.n_outputs) and 0 <= float(y.min()) and float(y.max()) <= 1
    else:
        assert y.shape == (1, 32, 32, 32) and 0 <= int(y.min()) and int(y.max()) < r.task.n_outputs
        assert len(np.unique(np.asarray(y))) > 1
    for phase in phases:
        # a fresh Adam per phase, as the loop does for the Dice phase after the warm-up
        state = r.trainer.place_state(state.replace(opt_state=r.tx.init(state.params)))
        before = float(r.trainer.loss(phase, state, x, y))
        state, metrics = r.trainer.step(phase, state, x, y)
        after = float(r.trainer.loss(phase, state, x, y))
        assert np.isclose(float(metrics["loss"]), before, rtol=1e-5)
        assert after < before, (model, phase, before, after)
    assert int(state.step) == len(phases)


def test_init_variables_are_keras_like():
    module = Segmenter(UNetConfig(prefix="unet", n_labels=5, nb_features=4, nb_levels=3))
    v = st.init_variables(module, 1, seed=3)
    shapes = st.variable_shapes(module, 1)
    assert jax.tree_util.tree_map(np.shape, v) == jax.tree_util.tree_map(lambda s: s.shape, shapes)
    k = v["params"]["unet"]["unet_conv_downarm_0_0"]["kernel"]
    limit = np.sqrt(6 / (27 * 1 + 27 * 4))
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.8 * limit
    assert np.all(v["batch_stats"]["unet"]["unet_bn_down_0"]["var"] == 1)
    again = st.init_variables(module, 1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                                     jax.tree_util.tree_leaves(again)))


def tiny_trainer(freeze=(), running_stats=False, ema_decay=0.0):
    module = Segmenter(UNetConfig(prefix="unet", n_labels=3, nb_features=2, nb_levels=2))
    v = st.init_variables(module, 1)
    tx = st.make_optimizer(1e-2, freeze=freeze, params=v["params"])
    loss = lambda phase, out, y: jnp.mean((out - 1.0) ** 2)
    return (st.Trainer(module, tx, loss, frozen_stats=freeze, running_stats=running_stats,
                       ema_decay=ema_decay),
            st.create_state(v, tx, 0, ema=ema_decay > 0))


def test_moving_average_of_the_weights():
    """Each step moves the average 10 % of the way to the new params; inference uses it, the
    optimiser keeps the raw params; no average is kept unless asked for."""
    trainer, state = tiny_trainer(ema_decay=0.9)
    x = jax.random.normal(jax.random.key(5), (1, 8, 8, 8, 1))
    expected = jax.device_get(state.params)
    state = trainer.place_state(state)
    for _ in range(3):
        state, _ = trainer.step("any", state, x, x[..., 0])
        expected = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, expected,
                                          jax.device_get(state.params))
    kernel = lambda v: np.asarray(v["params"]["unet"]["unet_likelihood"]["kernel"])
    np.testing.assert_allclose(kernel(state.inference_variables()), kernel({"params": expected}),
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(kernel(state.inference_variables()), kernel(state.variables()))
    plain, plain_state = tiny_trainer()
    assert plain_state.ema_params is None
    plain_state, _ = plain.step("any", plain.place_state(plain_state), x, x[..., 0])
    assert plain_state.ema_params is None
    np.testing.assert_array_equal(kernel(plain_state.inference_variables()), kernel(plain_state.variables()))


def test_running_stats_trains_the_inference_network():
    """With running_stats the step's loss is the inference-mode loss, its gradient lowers that
    loss, and the moving statistics stay as they were."""
    trainer, state = tiny_trainer(running_stats=True)
    state = trainer.place_state(state.replace(batch_stats=jax.tree_util.tree_map(
        lambda a: a + 0.5, state.batch_stats)))   # statistics far from any batch's own
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 8, 1)) * 3 + 2
    inference = float(trainer.loss("any", state, x, x[..., 0], train=False))
    assert not np.isclose(inference, float(trainer.loss("any", state, x, x[..., 0], train=True)))
    before = jax.device_get(state.batch_stats)
    new_state, metrics = trainer.step("any", state, x, x[..., 0])
    assert np.isclose(float(metrics["loss"]), inference, rtol=1e-5)
    assert float(trainer.loss("any", new_state, x, x[..., 0], train=False)) < inference
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(new_state.batch_stats)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_batchnorm_moving_average_is_keras():
    trainer, state = tiny_trainer()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1)) * 3 + 2
    old = jax.device_get(state.batch_stats)
    new_state, _ = trainer.step("any", trainer.place_state(state), x, x[..., 0])
    # the batch statistics of the first BatchNorm: its input is the level's last convolution
    params = state.params["unet"]
    h = jax.nn.elu(jax.lax.conv_general_dilated(x, params["unet_conv_downarm_0_0"]["kernel"], (1, 1, 1),
                                                "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
                   + params["unet_conv_downarm_0_0"]["bias"])
    h = jax.nn.elu(jax.lax.conv_general_dilated(h, params["unet_conv_downarm_0_1"]["kernel"], (1, 1, 1),
                                                "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
                   + params["unet_conv_downarm_0_1"]["bias"])
    mean, var = np.mean(h, axis=(0, 1, 2, 3)), np.var(h, axis=(0, 1, 2, 3))
    got = jax.device_get(new_state.batch_stats)["unet"]["unet_bn_down_0"]
    ref = old["unet"]["unet_bn_down_0"]
    np.testing.assert_allclose(got["mean"], 0.99 * ref["mean"] + 0.01 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["var"], 0.99 * ref["var"] + 0.01 * var, rtol=1e-4, atol=1e-6)


def test_freeze_keeps_layers_fixed():
    trainer, state = tiny_trainer(freeze=["_downarm_0_", "_bn_down_0$"])
    before = jax.device_get(state)
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 8, 1))
    after, _ = trainer.step("any", trainer.place_state(state), x, x[..., 0])
    after = jax.device_get(after)
    p0, p1 = before.params["unet"], after.params["unet"]
    for layer in ("unet_conv_downarm_0_0", "unet_conv_downarm_0_1", "unet_bn_down_0"):
        for name in p0[layer]:
            np.testing.assert_array_equal(p0[layer][name], p1[layer][name])
    np.testing.assert_array_equal(before.batch_stats["unet"]["unet_bn_down_0"]["mean"],
                                  after.batch_stats["unet"]["unet_bn_down_0"]["mean"])
    assert not np.array_equal(p0["unet_conv_downarm_1_0"]["kernel"], p1["unet_conv_downarm_1_0"]["kernel"])
    assert not np.array_equal(before.batch_stats["unet"]["unet_bn_down_1"]["mean"],
                              after.batch_stats["unet"]["unet_bn_down_1"]["mean"])
    with pytest.raises(ValueError, match="no layer matches"):
        tiny_trainer(freeze=["no_such_layer"])
