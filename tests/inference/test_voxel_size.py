import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.inference.network import (
    Mode,
    ModelError,
    Predictor,
    at_voxel_size,
    gaussian_blur,
    load_networks,
    qc_one_hot,
    upsample_linear,
)
from synthseg_jax.inference.options import PredictOptions
from synthseg_jax.inference.pipeline import run
from synthseg_jax.labels import LabelTables
from synthseg_jax.weights.keras_h5 import WeightFileError, read_voxel_size, save_keras_h5
from synthseg_jax.weights.models_dir import ModelsDir, build_network, variable_shapes


def test_coarse_model_sees_pooled_image_and_returns_full_grid():
    # a linear ramp: pooling then linear upsampling gives it back exactly away from the borders
    i, j, k = np.meshgrid(np.arange(8), np.arange(16), np.arange(8), indexing="ij")
    x = jnp.asarray((0.5 * i - 0.25 * j + 2.0 * k)[None, ..., None], jnp.float32)
    seen = {}

    def network(z):
        seen["shape"] = z.shape
        return z

    out = at_voxel_size(network, x, 2.0)
    assert seen["shape"] == (1, 4, 8, 4, 1)
    assert out.shape == x.shape
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(np.asarray(out)[inner], np.asarray(x)[inner], atol=1e-4)


@pytest.mark.parametrize("factor", [2, 3])
def test_upsampling_stencil_equals_jax_linear_resize(factor):
    """The stencil replaces jax.image.resize(method='linear'): same samples, edges included."""
    x = jnp.asarray(np.random.default_rng(factor).normal(size=(2, 5, 6, 7, 3)), jnp.float32)
    expected = jax.image.resize(x, (2, 5 * factor, 6 * factor, 7 * factor, 3), method="linear")
    out = x
    for axis in (1, 2, 3):
        out = upsample_linear(out, axis, factor)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=5e-6)


def test_one_mm_model_is_untouched():
    x = jnp.ones((1, 4, 4, 4, 1))
    assert at_voxel_size(lambda z: z * 3, x, 1.0).shape == x.shape


@pytest.fixture
def bare_h5(tmp_path, tiny_nets, labels_dir):
    """A folder holding only a tiny (not published-shaped) 2.0 network's .h5, nothing recorded."""
    save_keras_h5(tiny_nets["2.0"][2], str(tmp_path / "synthseg_2.0.h5"))
    return ModelsDir(str(tmp_path), labels_dir=labels_dir)


def test_voxel_size_read_from_architecture_file(bare_h5, tmp_path):
    (tmp_path / "architecture.json").write_text(json.dumps({"2.0": {"unet": {"voxel_size": 2.0}}}))
    assert bare_h5.voxel_size("2.0") == 2.0
    (tmp_path / "architecture.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="architecture.json: unreadable"):
        bare_h5.voxel_size("2.0")


def test_voxel_size_recorded_in_the_h5_wins(tmp_path, tiny_nets, labels_dir):
    path = str(tmp_path / "synthseg_2.0.h5")
    save_keras_h5(tiny_nets["2.0"][2], path, voxel_size=2.0)
    assert read_voxel_size(path) == 2.0
    (tmp_path / "architecture.json").write_text(json.dumps({"2.0": {"unet": {"voxel_size": 4.0}}}))
    assert ModelsDir(str(tmp_path), labels_dir=labels_dir).voxel_size("2.0") == 2.0


def test_h5_of_unknown_resolution_is_refused(bare_h5, tmp_path):
    """A coarse model without its voxel size used to run at 1 mm silently (issue 19, item 2)."""
    with pytest.raises(WeightFileError, match="unknown training voxel size"):
        bare_h5.voxel_size("2.0")
    scan = tmp_path / "scan.nii.gz"
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(1, 9, (20, 20, 20)).astype(np.float32),
                             np.eye(4)), str(scan))
    out, err = io.StringIO(), io.StringIO()
    code = run(PredictOptions.create(i=str(scan), o=str(tmp_path / "seg.nii.gz"), progress=False,
                                     models_dir=bare_h5.path, labels_dir=bare_h5.labels_dir,
                                     min_pad=32), stdout=out, stderr=err)
    assert code == 1
    (line,) = err.getvalue().splitlines()
    assert line.startswith(f"ERROR {tmp_path / 'synthseg_2.0.h5'}: unknown training voxel size")
    assert "--models-dir" in line and "Traceback" not in line
    assert not (tmp_path / "seg.nii.gz").exists()


def test_published_architecture_without_record_is_1mm(tmp_path, labels_dir):
    """The published .h5 files record nothing; their shape says they are the 1 mm networks."""
    tables = LabelTables.load(labels_dir, "2.0")
    shapes = variable_shapes(*build_network("2.0", tables))
    save_keras_h5(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes),
                  str(tmp_path / "synthseg_2.0.h5"))
    assert ModelsDir(str(tmp_path), labels_dir=labels_dir).voxel_size("2.0") == 1.0


def test_coarse_model_flip_average_equals_the_1mm_definition(tmp_path, tiny_nets, labels_dir):
    """With a 2 mm model the flip pass is flipped back (and its left/right channels swapped) as
    logits at 2 mm; the result must be the 1 mm definition: the blurred mean of the softmax of
    each pass's upsampled logits, the second flipped back at 1 mm."""
    save_keras_h5(tiny_nets["2.0"][2], str(tmp_path / "synthseg_2.0.h5"), voxel_size=2.0)
    mode = Mode()
    nets = load_networks(str(tmp_path), mode, labels_dir)
    predictor = Predictor(nets, mode)
    image = jnp.asarray(np.random.default_rng(3).uniform(size=(32, 32, 32)), jnp.float32)
    out = jax.jit(predictor._forward)(predictor._variables, image)

    def posteriors(x):
        logits = at_voxel_size(lambda z: nets.segmenter.apply(predictor._variables["seg"], z),
                               x, 2.0)
        return jax.nn.softmax(logits, axis=-1)

    x = image[None, ..., None]
    back = jnp.take(jnp.flip(posteriors(jnp.flip(x, axis=1)), axis=1),
                    jnp.asarray(nets.tables.flip), axis=-1)
    expected = gaussian_blur(0.5 * (posteriors(x) + back))[0]
    assert not np.allclose(np.asarray(back), np.asarray(posteriors(x)), atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["seg"]), np.asarray(expected), atol=2e-6)


def test_coarse_qc_model_sees_the_segmentation_at_its_voxel_size(tmp_path, tiny_nets, labels_dir):
    """A QC model trained at 2 mm (the shipped one) scores the 1 mm segmentation's 2 mm majority
    classes, in the field of view it was trained on (16^3 crops at 2 mm: a 32^3 crop at 1 mm,
    seen as 16^3). Other voxel sizes are refused before any work."""
    save_keras_h5(tiny_nets["2.0"][2], str(tmp_path / "synthseg_2.0.h5"), voxel_size=1.0)
    save_keras_h5(tiny_nets["qc"][2], str(tmp_path / "synthseg_qc_2.0.h5"), voxel_size=2.0)
    mode = Mode(qc=True)
    assert load_networks(str(tmp_path), mode, labels_dir).qc_crop_size == 224   # nothing recorded
    (tmp_path / "architecture.json").write_text(json.dumps(
        {"qc": {"qc": {"voxel_size": 2.0, "crop": [16, 16, 16]}}}))
    nets = load_networks(str(tmp_path), mode, labels_dir)
    assert nets.qc_voxel_size == 2.0 and nets.qc_crop_size == 32
    predictor = Predictor(nets, mode)
    assert predictor.qc_crop_size == 32
    image = jnp.asarray(np.random.default_rng(4).uniform(size=(32, 32, 32)), jnp.float32)
    out = jax.jit(predictor._forward)(predictor._variables, image)
    onehot = qc_one_hot(jnp.argmax(out["seg"], axis=-1)[None], jnp.asarray(nets.tables.qc_class),
                        nets.tables.n_qc, 32, factor=2)
    assert onehot.shape[1:4] == (16, 16, 16)
    expected = nets.qc.apply(predictor._variables["qc"], onehot)[0]
    np.testing.assert_allclose(np.asarray(out["qc"]), np.asarray(expected), rtol=1e-5, atol=1e-6)
    (tmp_path / "architecture.json").write_text(json.dumps({"qc": {"qc": {"crop": 16}}}))
    with pytest.raises(ModelError, match="architecture.json: unreadable architecture file"):
        load_networks(str(tmp_path), mode, labels_dir)
    save_keras_h5(tiny_nets["qc"][2], str(tmp_path / "synthseg_qc_2.0.h5"), voxel_size=4.0)
    with pytest.raises(ModelError, match="trained at 4 mm; supported: 1, 2 mm"):
        load_networks(str(tmp_path), mode, labels_dir)
