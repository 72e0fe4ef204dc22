import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.synthseg import (
    Segmenter,
    crop_around_labels,
    one_hot_argmax,
    parcellation_input,
    segmenter_config,
)
from synthseg_jax.nn.unet import KERAS_BN_EPSILON, UNetConfig, batch_norm
from synthseg_jax.weights.models_dir import build_network, variable_shapes


def conv_params(k, cin, cout):
    return k**3 * cin * cout + cout


def neurite_unet_param_count(cfg: UNetConfig, in_channels: int) -> int:
    """Count of neurite's unet written from its layer list, independently of our module."""
    total, cin, skips = 0, in_channels, []
    for level in range(cfg.nb_levels):
        f = cfg.nb_features * cfg.feat_mult**level
        for _ in range(cfg.nb_conv_per_level):
            total += conv_params(cfg.conv_size, cin, f)
            cin = f
        skips.append(f)
        total += 4 * f
    for level in range(cfg.nb_levels - 1):
        f = cfg.nb_features * cfg.feat_mult ** (cfg.nb_levels - 2 - level)
        if level < cfg.nb_levels - 1 - cfg.skip_n_concatenations:
            cin += skips[cfg.nb_levels - 2 - level]
        for _ in range(cfg.nb_conv_per_level):
            total += conv_params(cfg.conv_size, cin, f)
            cin = f
        total += 4 * f
    return total + conv_params(1, cin, cfg.n_labels)


def count(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))


@pytest.mark.parametrize("kind,in_channels", [("2.0", 1), ("parc", 3)])
def test_segmenter_param_count_matches_neurite(tables, kind, in_channels):
    module, _ = build_network(kind, tables)
    variables = variable_shapes(module, in_channels)
    assert count(variables) == neurite_unet_param_count(module.config, in_channels)


def test_robust_cascade_param_count(tables):
    module, _ = build_network("robust", tables)
    variables = variable_shapes(module, 1)
    first, denoiser, second = module.stage_configs()
    expected = (neurite_unet_param_count(first, 1) + neurite_unet_param_count(denoiser, tables.n_groups)
                + neurite_unet_param_count(second, 1 + tables.n_groups))
    assert count(variables) == expected
    assert "l2l_merge_5" not in str(variables)  # denoiser keeps only the two deepest skips
    assert denoiser.skip_n_concatenations == 2


def test_v1_has_one_label_less(tables, tables_v1):
    assert tables_v1.n_labels == tables.n_labels - 1 == 32


@pytest.mark.parametrize("shape", [(16, 48, 80), (32, 16, 16)])
def test_segmenter_output_shape_non_cubic(shape):
    module = Segmenter(segmenter_config(n_labels=7))
    x = jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32)
    assert jax.eval_shape(module.apply, variable_shapes(module, 1), x).shape == (1, *shape, 7)


def test_padded_logits_are_the_logits_inside_and_the_bias_on_the_ring():
    module = Segmenter(segmenter_config(n_labels=5, nb_features=4, nb_levels=3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 12, 16, 1)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    head = variables["params"]["unet"]["unet_likelihood"]
    head["bias"] = jnp.arange(1.0, 6.0)                      # Glorot init leaves it zero
    logits = np.asarray(module.apply(variables, x))
    padded = np.asarray(module.apply(variables, x, pad_output=2))
    assert padded.shape == (1, 12, 16, 20, 5)
    np.testing.assert_array_equal(padded[:, 2:-2, 2:-2, 2:-2], logits)
    ring = np.ones(padded.shape[:-1], bool)
    ring[:, 2:-2, 2:-2, 2:-2] = False
    np.testing.assert_array_equal(padded[ring], np.broadcast_to(np.arange(1.0, 6.0), (ring.sum(), 5)))


def test_segmenter_rejects_sizes_the_decoder_cannot_meet():
    module = Segmenter(segmenter_config(n_labels=3, nb_features=2))
    with pytest.raises(ValueError, match="multiple of 16"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 24, 32, 32, 1)))


@pytest.mark.parametrize("kind,shape", [("robust", (16, 32, 48)), ("qc", (48, 16, 32))])
def test_cascade_and_qc_output_shapes(tables, kind, shape):
    module, in_channels = build_network(kind, tables)
    x = jax.ShapeDtypeStruct((1, *shape, in_channels), jnp.float32)
    out = jax.eval_shape(module.apply, variable_shapes(module, in_channels), x)
    expected = (1, *shape, tables.n_labels) if kind == "robust" else (1, tables.n_qc)
    assert out.shape == expected


def test_batchnorm_uses_keras_epsilon():
    layer = batch_norm("bn", train=False)
    y = layer.apply({"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
                     "batch_stats": {"mean": jnp.zeros(1), "var": jnp.zeros(1)}}, jnp.ones((1, 1)))
    np.testing.assert_allclose(y, 1 / np.sqrt(KERAS_BN_EPSILON), rtol=1e-6)


def test_one_hot_argmax_is_hard():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0]])
    np.testing.assert_array_equal(one_hot_argmax(logits), [[0, 1, 0], [1, 0, 0]])


def make_shape_reference(x: np.ndarray, size: int) -> np.ndarray:
    """MakeShape semantics written plainly with numpy slicing and padding."""
    mask = (x != 0) & (x != 24)
    shape = np.array(x.shape)
    if mask.any():
        idx = np.argwhere(mask)
        low, high = idx.min(0), idx.max(0) + 1
    else:
        low, high = np.zeros(3, int), np.minimum(shape, size)
    extra = size - (high - low)
    low = low - np.ceil(extra / 2).astype(int)
    high = high + np.floor(extra / 2).astype(int)
    lo, hi = np.maximum(low, 0), np.minimum(high, shape)
    out = x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return np.pad(out, np.stack([np.maximum(-low, 0), np.maximum(high - shape, 0)], 1))


@pytest.mark.parametrize("box", [
    ((10, 20), (5, 50), (30, 33)),    # small box: window grows around it, padded near edges
    ((0, 64), (0, 64), (2, 60)),      # box larger than the window: cut around the centre
    ((60, 64), (0, 3), (61, 64)),     # box in a corner
    None,                             # empty segmentation
])
def test_crop_around_labels_matches_makeshape(box):
    rng = np.random.default_rng(0)
    x = np.zeros((64, 48, 64), np.int32)
    if box is not None:
        (a, b), (c, d), (e, f) = box
        x[a:b, c:d, e:f] = rng.integers(1, 30, size=(b - a, min(d, 48) - c, f - e))
    x[0, 0, 0] = 24  # index 24 never counts towards the box
    for size in (32, 17):
        np.testing.assert_array_equal(crop_around_labels(jnp.asarray(x), size),
                                      make_shape_reference(x, size))


def test_parcellation_input_marks_cortex(tables):
    seg = jnp.array([[[[0, list(tables.segmentation).index(3), list(tables.segmentation).index(42),
                        list(tables.segmentation).index(2)]]]])
    x = parcellation_input(jnp.zeros((*seg.shape, 1)), seg, jnp.asarray(tables.segmentation))
    np.testing.assert_array_equal(x[0, 0, 0, :, 2], [0, 1, 1, 0])
    np.testing.assert_array_equal(x[0, 0, 0, :, 1], [1, 0, 0, 1])
