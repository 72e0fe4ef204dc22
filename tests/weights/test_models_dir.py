import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.nn.synthseg import QCRegressor, RobustCascade, Segmenter
from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
from synthseg_jax.weights.keras_h5 import WeightFileError, save_keras_h5
from synthseg_jax.weights.models_dir import MODEL_FILES, ModelsDir


def save_random(module, in_channels, path, size=16):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, size, size, size, in_channels)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    save_keras_h5(variables, path)
    return variables


def test_architecture_is_read_off_the_weight_file(tmp_path, tables, labels_dir):
    narrow = dict(nb_features=3, nb_levels=3)
    cascade = RobustCascade(
        n_groups=tables.n_groups, n_labels=tables.n_labels,
        first=UNetConfig(prefix="unet", n_labels=tables.n_groups, **narrow),
        denoiser=UNetConfig(prefix="l2l", n_labels=tables.n_groups, conv_size=5,
                            skip_n_concatenations=2, nb_features=2, nb_levels=4),
        second=UNetConfig(prefix="unet2", n_labels=tables.n_labels, nb_conv_per_level=1, **narrow))
    variables = save_random(cascade, 1, str(tmp_path / MODEL_FILES["robust"]))
    qc = QCRegressor(n_qc_labels=tables.n_qc, encoder=EncoderConfig(prefix="qc", nb_features=2, nb_levels=3))
    save_random(qc, tables.n_qc, str(tmp_path / MODEL_FILES["qc"]))

    models = ModelsDir(str(tmp_path), labels_dir=labels_dir)
    module, loaded = models.load_network("robust")
    assert module.stage_configs() == cascade.stage_configs()
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    module, _ = models.load_network("qc")
    assert module.encoder == qc.encoder and module.n_qc_labels == tables.n_qc


def test_label_count_mismatch_names_file_and_layer(tmp_path, tables_v1, labels_dir):
    seg = Segmenter(UNetConfig(prefix="unet", n_labels=tables_v1.n_labels + 1, nb_features=2, nb_levels=2))
    save_random(seg, 1, str(tmp_path / MODEL_FILES["1.0"]))
    with pytest.raises(WeightFileError, match=r"synthseg_1\.0\.h5: 'unet_likelihood' has 33 outputs"):
        ModelsDir(str(tmp_path), labels_dir=labels_dir).load_network("1.0")
