"""The oneDNN convolution backend against XLA's: layer forward and gradients, a whole U-Net, the
backend choice, parameter compatibility with ``flax.linen.Conv`` and a sharded (2-device) step."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn import conv as conv_mod
from synthseg_jax.nn.conv import (
    ENV_VAR,
    Conv3D,
    ConvWeights,
    conv3d_padded,
    resolve_backend,
    sibling_convs,
)
from synthseg_jax.nn.unet import UNet, UNetConfig

ONEDNN_AVAILABLE = jax.default_backend() == "cpu"
needs_cpu = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="the oneDNN custom call is XLA:CPU's")


def assert_close(actual, expected, rtol=1e-4):
    """Agreement relative to the largest magnitude (float32 sums in different orders)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    assert float(np.max(np.abs(actual - expected))) <= rtol * scale


def random_inputs(seed, shape, k, c_in, c_out):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape + (c_in,), dtype=np.float32)
    w = (r.standard_normal((k, k, k, c_in, c_out), dtype=np.float32) / np.sqrt(k**3 * c_in))
    b = r.standard_normal((c_out,), dtype=np.float32)
    probe = r.standard_normal(shape + (c_out,), dtype=np.float32)  # a generic output gradient
    return tuple(map(jnp.asarray, (x, w, b, probe)))


CASES = [  # kernel, channels in -> out, (batch, D, H, W), fused activation
    (3, 1, 24, (1, 8, 8, 8), "elu"),
    (3, 24, 24, (1, 7, 9, 8), None),
    (3, 48, 24, (2, 6, 5, 7), "elu"),
    (5, 8, 33, (1, 9, 8, 10), "relu"),
    (1, 24, 33, (2, 5, 6, 7), None),
    (1, 8, 33, (1, 8, 8, 8), "elu"),
]


@needs_cpu
@pytest.mark.parametrize("k,c_in,c_out,shape,activation", CASES)
def test_layer_forward_and_gradients_match_xla(k, c_in, c_out, shape, activation):
    x, w, b, probe = random_inputs(k + c_in + c_out, shape, k, c_in, c_out)

    def run(backend):
        def loss(x, w, b):
            y = conv3d_padded(x, w, b, backend=backend, activation=activation)
            return jnp.sum(y * probe), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
        return y, grads

    y_xla, g_xla = run("xla")
    y_dnn, g_dnn = run("onednn")
    assert_close(y_dnn, y_xla)
    for name, a, e in zip(("input", "kernel", "bias"), g_dnn, g_xla):
        assert a.shape == e.shape, name
        assert_close(a, e)


@needs_cpu
@pytest.mark.parametrize("in_axis", [0, 2])
def test_vmap_over_the_input_matches_one_call_per_item(in_axis):
    """The batching rule folds the mapped axis into the batch axis: each item's result is that
    of its own call, whichever axis is mapped; a mapped kernel is refused."""
    x, w, b, _ = random_inputs(7, (2, 6, 5, 7), 3, 4, 5)
    stacked = jnp.stack([x, x[::-1] * 0.5 + 1.0, -x], axis=in_axis)
    conv = lambda v: conv3d_padded(v, w, b, backend="onednn", activation="elu")
    mapped = jax.jit(jax.vmap(conv, in_axes=in_axis))(stacked)
    for i in range(3):
        assert_close(mapped[i], jax.jit(conv)(jnp.take(stacked, i, axis=in_axis)))
    with pytest.raises(NotImplementedError, match="kernel"):
        jax.vmap(lambda k: conv3d_padded(x, k, b, backend="onednn"))(jnp.stack([w, w]))


def conv_and_grads(backend, conv_dtype, activation, x, w, b, probe):
    def loss(x, w, b):
        y = conv3d_padded(x, w, b, backend=backend, activation=activation, conv_dtype=conv_dtype)
        return jnp.sum(y * probe), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
    return y, grads


@needs_cpu
@pytest.mark.parametrize("k,c_in,c_out,shape,activation", [c for c in CASES if c[4] != "relu"])
def test_bfloat16_products_agree_with_float32_to_bf16_rounding(k, c_in, c_out, shape, activation,
                                                                 monkeypatch):
    """Both backends' bf16 path: float32 results, within bf16's rounding (2^-8) of float32, and
    the same as each other; far from it would mean a wrong layout, not rounding. On a CPU
    without native bfloat16 only XLA's (emulated) path runs: oneDNN's bf16 convolution fails
    there (no primitive, or an illegal instruction; seen on an AVX2-only AMD EPYC), which is
    why prediction and training fall back to float32 on such CPUs."""
    backends = ("xla", "onednn") if conv_mod.cpu_has_native_bf16() else ("xla",)
    monkeypatch.setattr(conv_mod, "cpu_has_native_bf16", lambda: True)
    conv_mod.effective_conv_dtype.cache_clear()
    x, w, b, probe = random_inputs(k * c_in + c_out, shape, k, c_in, c_out)
    y32, g32 = conv_and_grads("xla", "float32", activation, x, w, b, probe)
    for backend in backends:
        y16, g16 = conv_and_grads(backend, "bfloat16", activation, x, w, b, probe)
        assert y16.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in g16)
        assert_close(y16, y32, rtol=2e-2)
        assert not np.allclose(np.asarray(y16), np.asarray(y32), rtol=0, atol=0)  # really bf16
        for a, e in zip(g16, g32):   # relative to the whole gradient (a bias's may be ~0)
            assert np.linalg.norm(a - e) <= 1e-2 * np.linalg.norm(e)
    conv_mod.effective_conv_dtype.cache_clear()


def test_bfloat16_falls_back_to_float32_without_native_support(monkeypatch, capsys):
    monkeypatch.setattr(conv_mod, "cpu_has_native_bf16", lambda: False)
    conv_mod.effective_conv_dtype.cache_clear()
    try:
        expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        assert conv_mod.effective_conv_dtype("bfloat16") == expected
        assert conv_mod.effective_conv_dtype("bfloat16") == expected   # logged once
        if jax.default_backend() == "cpu":
            assert capsys.readouterr().out.count("no native bfloat16") == 1
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            conv_mod.effective_conv_dtype("float16")
    finally:
        conv_mod.effective_conv_dtype.cache_clear()


@needs_cpu
def test_onednn_path_really_emits_the_custom_call():
    x, w, b, _ = random_inputs(0, (1, 4, 4, 4), 3, 2, 3)
    grad = jax.value_and_grad(lambda x, w, b: jnp.sum(conv3d_padded(x, w, b, backend="onednn")),
                              argnums=(0, 1))
    hlo = jax.jit(grad).lower(x, w, b).as_text()
    assert hlo.count("__onednn$convolution") == 2   # forward and input gradient
    assert "__onednn$matmul" in hlo                  # kernel gradient
    assert "__onednn" not in jax.jit(lambda x, w, b: conv3d_padded(x, w, b, backend="xla")).lower(
        x, w, b).as_text()


def test_parameters_and_xla_numbers_are_those_of_flax_conv():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 6, 3), dtype=np.float32))
    ours = Conv3D(5, 3, backend="xla")
    theirs = nn.Conv(5, (3, 3, 3), padding="SAME", kernel_init=nn.initializers.glorot_uniform(),
                     bias_init=nn.initializers.zeros)
    key = jax.random.key(0)
    v_ours, v_theirs = ours.init(key, x), theirs.init(key, x)
    assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(v_theirs)
    for a, e in zip(jax.tree_util.tree_leaves(v_ours), jax.tree_util.tree_leaves(v_theirs)):
        np.testing.assert_array_equal(a, e)
    v = jax.tree_util.tree_map(lambda p: p + 0.1, v_theirs)  # a non-zero bias
    np.testing.assert_array_equal(ours.apply(v, x), theirs.apply(v, x))



@pytest.mark.parametrize("backend", ["xla", pytest.param("onednn", marks=needs_cpu)])
def test_sibling_convs_are_the_convs_one_by_one(monkeypatch, backend):
    """Values and gradients of the joined convolution against each convolution alone."""
    monkeypatch.setenv(ENV_VAR, backend)
    x, w1, b1, probe1 = random_inputs(3, (1, 7, 6, 8), 5, 9, 24)
    _, w2, b2, probe2 = random_inputs(4, (1, 7, 6, 8), 5, 9, 12)

    def loss(joined):
        def f(x, w1, b1, w2, b2):
            if joined:
                y1, y2 = sibling_convs(x, [(w1, b1), (w2, b2)])
            else:
                y1, y2 = conv3d_padded(x, w1, b1), conv3d_padded(x, w2, b2)
            return jnp.sum(y1 * probe1) + jnp.sum(y2 * probe2), (y1, y2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    (_, got), got_grads = loss(True)(x, w1, b1, w2, b2)
    (_, expected), expected_grads = loss(False)(x, w1, b1, w2, b2)
    for a, e in zip(got + got_grads, expected + expected_grads):
        assert_close(a, e, rtol=1e-5)


def test_conv_weights_are_a_conv3d_s_parameters():
    x = jnp.zeros((1, 6, 6, 6, 3))
    key = jax.random.key(2)
    conv = Conv3D(5, 3).init(key, x)
    weights = ConvWeights(5, 3).init(key, 3)
    assert jax.tree_util.tree_structure(conv) == jax.tree_util.tree_structure(weights)
    for a, e in zip(jax.tree_util.tree_leaves(conv), jax.tree_util.tree_leaves(weights)):
        np.testing.assert_array_equal(a, e)


@needs_cpu
def test_unet_logits_and_loss_gradient_agree_between_backends(monkeypatch):
    cfg = UNetConfig(prefix="unet", n_labels=5, nb_features=4, nb_levels=3)
    model = UNet(cfg)
    r = np.random.default_rng(2)
    x = jnp.asarray(r.standard_normal((2, 16, 16, 16, 1), dtype=np.float32))
    target = jax.nn.one_hot(jnp.asarray(r.integers(0, 5, (2, 16, 16, 16))), 5)
    # Keras-like initial values drawn with NumPy (an eager or jitted init takes tens of seconds)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(r.uniform(-0.3, 0.3, s.shape).astype(np.float32)), shapes)

    def soft_dice(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        p = jax.nn.softmax(logits)
        dice = 2 * jnp.sum(p * target, (1, 2, 3)) / (jnp.sum(p + target, (1, 2, 3)) + 1e-5)
        return 1 - jnp.mean(dice), logits

    results = {}
    for backend in ("xla", "onednn"):
        monkeypatch.setenv(ENV_VAR, backend)
        fn = jax.jit(jax.value_and_grad(soft_dice, has_aux=True))  # traced afresh per backend
        results[backend] = fn(variables["params"])
        hlo = fn.lower(variables["params"]).as_text()
        assert ("__onednn$convolution" in hlo) == (backend == "onednn")
    (loss_x, logits_x), grads_x = results["xla"]
    (loss_d, logits_d), grads_d = results["onednn"]
    assert_close(logits_d, logits_x)
    np.testing.assert_allclose(loss_d, loss_x, rtol=1e-5)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(grads_d), jax.tree_util.tree_leaves(grads_x)):
        assert_close(a, e, rtol=2e-4), jax.tree_util.keystr(path)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(conv_mod, "installed_jaxlib", lambda: conv_mod.VERIFIED_JAXLIB)
    expected_auto = "onednn" if jax.default_backend() == "cpu" else "xla"
    assert resolve_backend() == expected_auto
    assert resolve_backend("auto") == expected_auto
    monkeypatch.setattr(conv_mod, "installed_jaxlib", lambda: "0.0.1")  # not the verified jaxlib
    assert resolve_backend() == "xla"
    assert resolve_backend("onednn") == "onednn"  # an explicit choice is obeyed
    monkeypatch.setenv(ENV_VAR, "onednn")
    assert resolve_backend() == "onednn"
    assert resolve_backend("xla") == "xla"  # the layer's own setting beats the environment
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="SYNTHSEG_JAX_CONV|backend"):
        resolve_backend()


def test_verified_jaxlib_is_the_pinned_one():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert f"jaxlib=={conv_mod.VERIFIED_JAXLIB}" in deps
    assert f"jax=={conv_mod.VERIFIED_JAXLIB}" in deps


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from synthseg_jax.nn.conv import conv3d_padded
    assert jax.device_count() == 2
    mesh = Mesh(np.array(jax.devices()), ("data",))
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 6, 6, 6, 3), dtype=np.float32)
    w = r.standard_normal((3, 3, 3, 3, 4), dtype=np.float32) * 0.2
    b = r.standard_normal(4, dtype=np.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    w, b = jax.device_put((w, b), NamedSharding(mesh, P()))
    out = {}
    for backend in ("xla", "onednn"):
        loss = lambda x, w, b: jnp.sum(jnp.sin(conv3d_padded(x, w, b, backend=backend, activation="elu")))
        out[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, b)
    for a, e in zip(jax.tree_util.tree_leaves(out["onednn"]), jax.tree_util.tree_leaves(out["xla"])):
        a, e = np.asarray(a), np.asarray(e)
        assert np.max(np.abs(a - e)) <= 1e-4 * np.max(np.abs(e)), (a, e)
    print("OK")
""")


@needs_cpu
def test_sharded_data_parallel_step_is_correct():
    """Two CPU devices, batch split over them: the custom call has no partitioning rule, so XLA
    gathers its operands (slower, but the numbers are right)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
