import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.synthseg import QCRegressor, RobustCascade, Segmenter, segmenter_config
from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
from synthseg_jax.weights.keras_h5 import (
    WeightFileError,
    keras_layer_paths,
    load_keras_h5,
    read_keras_h5,
    save_keras_h5,
)
from synthseg_jax.weights.models_dir import MODEL_FILES, ModelsDir


def small_cascade():
    cfg = dict(nb_features=2, nb_levels=3)
    return RobustCascade(
        n_groups=3, n_labels=4,
        first=UNetConfig(prefix="unet", n_labels=3, **cfg),
        denoiser=UNetConfig(prefix="l2l", n_labels=3, conv_size=5, skip_n_concatenations=2, **cfg),
        second=UNetConfig(prefix="unet2", n_labels=4, **cfg))


def random_variables(module, x, seed=1):
    """Distinct random values in every weight (drawn with numpy: compiling jax's init is slow)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32), shapes)


@pytest.fixture
def cascade_file(tmp_path):
    module = small_cascade()
    x = jnp.ones((1, 8, 8, 8, 1))
    variables = random_variables(module, x)
    path = str(tmp_path / "cascade.h5")
    save_keras_h5(variables, path)
    return module, variables, path


def assert_same_tree(a, b):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def test_round_trip_restores_every_weight(cascade_file):
    module, variables, path = cascade_file
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 8, 8, 8, 1)))
    assert_same_tree(load_keras_h5(path, template), variables)


def test_file_has_keras_save_weights_layout(cascade_file):
    _, variables, path = cascade_file
    with h5py.File(path) as f:
        names = [n.decode() for n in f.attrs["layer_names"]]
        assert set(names) == set(keras_layer_paths(variables))
        bn = f["unet2_bn_down_0"]
        assert [n.decode() for n in bn.attrs["weight_names"]] == [
            "unet2_bn_down_0/gamma:0", "unet2_bn_down_0/beta:0",
            "unet2_bn_down_0/moving_mean:0", "unet2_bn_down_0/moving_variance:0"]
        assert f["l2l_conv_downarm_0_0/l2l_conv_downarm_0_0/kernel:0"].shape == (5, 5, 5, 3, 2)
        np.testing.assert_array_equal(
            f["unet2_bn_down_0/unet2_bn_down_0/moving_variance:0"],
            variables["batch_stats"]["unet2"]["unet2_bn_down_0"]["var"])


def test_whole_model_layout_under_model_weights(cascade_file, tmp_path):
    module, variables, path = cascade_file
    whole = str(tmp_path / "whole.h5")
    with h5py.File(path) as src, h5py.File(whole, "w") as dst:
        group = dst.create_group("model_weights")
        for key, value in src.attrs.items():
            group.attrs[key] = value
        for name in src:
            src.copy(src[name], group, name)
        dst.create_group("optimizer_weights")
    assert_same_tree(load_keras_h5(whole, variables), variables)


def edit_file(path, edit):
    with h5py.File(path, "a") as f:
        edit(f)


def test_missing_layer_is_named(cascade_file):
    module, variables, path = cascade_file

    def drop(f):
        del f["l2l_conv_uparm_4_1"]
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != b"l2l_conv_uparm_4_1"]
    edit_file(path, drop)
    with pytest.raises(WeightFileError, match=r"cascade\.h5: layer 'l2l_conv_uparm_4_1' is missing"):
        load_keras_h5(path, variables)


def test_extra_layer_is_named(cascade_file):
    _, variables, path = cascade_file

    def add(f):
        g = f.create_group("qc_final_conv_0")
        g.attrs["weight_names"] = [b"qc_final_conv_0/kernel:0"]
        g.create_dataset("qc_final_conv_0/kernel:0", data=np.zeros(3))
        f.attrs["layer_names"] = list(f.attrs["layer_names"]) + [b"qc_final_conv_0"]
    edit_file(path, add)
    with pytest.raises(WeightFileError, match="layer 'qc_final_conv_0' is not part of this network"):
        load_keras_h5(path, variables)


def test_wrong_shape_is_named(cascade_file):
    _, variables, path = cascade_file

    def reshape(f):
        name = "unet_likelihood/kernel:0"
        del f["unet_likelihood"][name]
        f["unet_likelihood"].create_dataset(name, data=np.zeros((1, 1, 1, 2, 5)))
    edit_file(path, reshape)
    with pytest.raises(WeightFileError, match=r"layer 'unet_likelihood' weight 'kernel' has shape \(1, 1, 1, 2, 5\)"):
        load_keras_h5(path, variables)


def test_not_hdf5(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("not a weight file")
    with pytest.raises(WeightFileError, match="bad.h5: not a readable HDF5"):
        read_keras_h5(str(bad))


def test_qc_layers_are_keras_named():
    module = QCRegressor(n_qc_labels=3, encoder=EncoderConfig(prefix="qc", nb_features=2))
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 16, 16, 16, 3)))
    names = set(keras_layer_paths(variables))
    assert {"qc_expand_down_merge_0", "qc_conv_downarm_3_1", "qc_bn_down_3",
            "qc_final_conv_0", "qc_final_conv_1"} <= names
    assert "qc_expand_down_merge_4" not in names


def test_models_dir_names_missing_weight_file(tmp_path):
    with pytest.raises(WeightFileError, match=r"synthseg_qc_2\.0\.h5: weight file missing"):
        ModelsDir(str(tmp_path)).weights_file("qc")
    assert set(MODEL_FILES) == {"1.0", "2.0", "robust", "parc", "qc"}


def test_segmenter_forward_uses_loaded_weights(tmp_path):
    module = Segmenter(segmenter_config(n_labels=3, nb_features=2, nb_levels=2))
    x = jax.random.normal(jax.random.key(3), (1, 4, 4, 4, 1))
    variables = random_variables(module, x, seed=5)
    path = str(tmp_path / "seg.h5")
    save_keras_h5(variables, path)
    loaded = load_keras_h5(path, variables)
    np.testing.assert_allclose(module.apply(loaded, x), module.apply(variables, x), rtol=0, atol=0)
