"""training/tasks.py: model specs, label targets and groups, corruption, pseudo-parcellation,
what each model kind samples and how it is scored."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, MAPS, needs_maps

from generator.sampler import GeneratorConfig, build_params, sample_labels
from synthseg_jax.training import tasks

PRIORS = os.path.join(DATA, "labels_classes_priors")


@pytest.fixture(scope="module")
def params():
    return build_params(GeneratorConfig(priors_dir=PRIORS, output_shape=(32, 32, 32), atlas_res=4.0))


@pytest.fixture(scope="module")
def label_map(params):
    data = tasks.load_training_data(tasks.ModelSpec(), params.config, max_maps=1, downsample=4,
                                    label_dir=MAPS)
    return jnp.asarray(data.train_maps[0])


def test_model_spec_refuses_unknown_keys_and_kinds():
    with pytest.raises(ValueError, match="unknown model parameter.*nb_featurs"):
        tasks.ModelSpec.from_dict({"kind": "segmenter", "nb_featurs": 4})
    with pytest.raises(ValueError, match="unknown model kind 'segmentor'"):
        tasks.ModelSpec.from_dict({"kind": "segmentor"})
    with pytest.raises(ValueError, match="unknown corruption parameter"):
        tasks.ModelSpec.from_dict({"kind": "denoiser", "corruption": {"blobs": 1}})
    spec = tasks.ModelSpec.from_dict({"kind": "qc", "nb_levels": 4, "mni_wm": [2, 41]})
    assert spec.size_multiple == 16 and spec.mni_wm == (2, 41)


@needs_maps
def test_targets_and_groups(params):
    """2.0 targets: 33 labels with background; the group tables reach the non-sided structures
    (ventricles 14/15, brainstem 16) instead of sending them to the background."""
    seg = tasks.target_values(params, "2.0")
    assert len(np.unique(seg)) == 33 and seg[0] == 0
    groups = tasks.target_values(params, "denoiser_2.0")
    gl = list(params.generation_labels)
    assert groups.shape == seg.shape and set(np.unique(groups)) == {0, 1, 2, 3, 4}
    for label in (14, 15, 16):
        assert groups[gl.index(label)] != 0, label
    lut, values = tasks.to_indices(np.array([5, 0, 5, 9]))
    assert lut.tolist() == [1, 0, 1, 2] and values.tolist() == [0, 5, 9]


def test_relabel_blobs_and_corruption():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, (16, 16, 16)), jnp.int32)
    key = jax.random.key(1)
    np.testing.assert_array_equal(tasks.relabel_blobs(key, labels, 5, 0.0), labels)
    blobbed = np.asarray(tasks.relabel_blobs(key, labels, 5, 0.9))
    assert 0 < np.mean(blobbed != np.asarray(labels)) < 0.9 and blobbed.max() < 5
    noisy = np.asarray(tasks.corrupt_labels(key, labels, 5, tasks.Corruption(), voxel=4.0))
    assert noisy.shape == labels.shape and noisy.min() >= 0 and noisy.max() < 5
    assert np.mean(noisy != np.asarray(labels)) > 0.05


def test_pseudo_parcellation_is_mirrored_and_in_the_cortex():
    index_map = np.zeros((20, 10, 10), np.int32)
    index_map[2:8, 2:8, 2:8] = 1                 # left cortex
    index_map[12:18, 2:8, 2:8] = 2               # right cortex, the mirror image of the left
    parcels = tasks.pseudo_parcellation(index_map, 1, 2, 6)
    assert set(np.unique(parcels[index_map > 0])) <= set(range(1, 7))
    assert np.all(parcels[index_map == 0] == 0)
    np.testing.assert_array_equal(parcels[2:8], parcels[12:18][::-1])
    assert len(np.unique(parcels[index_map == 1])) == 6


@needs_maps
def test_denoiser_trains_on_the_generators_deformed_labels(params, label_map):
    """The denoiser's clean target is the generator's own deformed labels for the key (no copy of
    the sampler's geometry), its input a corruption of it."""
    spec = tasks.ModelSpec.from_dict({"kind": "denoiser", "groups": "denoiser_2.0",
                                      "nb_levels": 3, "nb_features": 4})
    task = tasks.Task(spec, params)
    key = jax.random.key(3)
    noisy, target = jax.jit(task.sample)(key, label_map)
    k_gen, _ = jax.random.split(key)
    expected = task.target_lut[np.asarray(sample_labels(k_gen, label_map, task.gparams))]
    np.testing.assert_array_equal(target, expected)
    assert noisy.shape == target.shape + (task.n_outputs,) and task.n_outputs == 5
    assert 0 < np.mean(np.argmax(np.asarray(noisy), -1) != np.asarray(target)) < 0.9


@needs_maps
def test_segmenter_sample_and_evaluation(params, label_map):
    task = tasks.Task(tasks.ModelSpec(), params)
    image, target = jax.jit(task.sample)(jax.random.key(0), label_map)
    assert image.shape == (32, 32, 32, 1) and target.shape == (32, 32, 32)
    assert task.in_channels == 1 and task.n_outputs == 33 and task.phases == ("wl2", "dice")
    perfect = jax.nn.one_hot(target, task.n_outputs)[None] * 10.0
    assert float(task.evaluate(perfect, target[None])["dice"]) == pytest.approx(1.0)
    wrong = jax.nn.one_hot(jnp.zeros_like(target), task.n_outputs)[None]
    assert float(task.evaluate(wrong, target[None])["dice"]) == 0.0


@needs_maps
def test_pooled_segmenter_learns_each_cells_label_shares(params, label_map):
    """train.network_pooling: the same generated pair, the image average-pooled (as prediction
    pools a scan for a coarser network) and the targets each cell's share of every label."""
    fine = tasks.Task(tasks.ModelSpec(), params)
    coarse = tasks.Task(tasks.ModelSpec(), params, pooling=2)
    key = jax.random.key(4)
    image, target = jax.jit(fine.sample)(key, label_map)
    pooled, shares = jax.jit(coarse.sample)(key, label_map)
    assert coarse.crop_shape == (16, 16, 16) and coarse.network_voxel == 2 * fine.network_voxel
    expected = np.asarray(image).reshape(16, 2, 16, 2, 16, 2, 1).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    one_hot = np.eye(coarse.n_outputs, dtype=np.float32)[np.asarray(target)]
    np.testing.assert_allclose(shares, one_hot.reshape(16, 2, 16, 2, 16, 2, -1).mean(axis=(1, 3, 5)),
                               atol=1e-6)
    assert 0 < np.mean(np.max(np.asarray(shares), -1) < 1) < 1        # mixed cells on boundaries
    perfect = jnp.log(shares + 1e-6)[None]
    assert float(coarse.evaluate(perfect, shares[None])["dice"]) == pytest.approx(1.0)
    indices = jnp.argmax(shares, -1)[None]
    for phase in ("wl2", "dice"):       # one-hot shares are the integer targets' loss
        np.testing.assert_allclose(coarse.loss(phase, perfect, jax.nn.one_hot(indices, coarse.n_outputs)),
                                   coarse.loss(phase, perfect, indices), rtol=1e-6)
    with pytest.raises(ValueError, match="network_pooling 2 is for segmenters"):
        tasks.Task(tasks.ModelSpec.from_dict({"kind": "qc", "labels": "qc_2.0"}), params, pooling=2)
    with pytest.raises(ValueError, match="multiple of train.network_pooling 3"):
        tasks.Task(tasks.ModelSpec(), params, pooling=3)


def _frozen_segmenter(n_labels=33):
    from synthseg_jax.labels import LabelTables
    from synthseg_jax.nn.synthseg import Segmenter
    from synthseg_jax.nn.unet import UNetConfig
    from synthseg_jax.package_data import label_tables_dir
    module = Segmenter(UNetConfig("unet", n_labels, nb_features=4, nb_levels=2))
    variables = module.init(jax.random.key(5), jnp.zeros((1, 16, 16, 16, 1)))
    return tasks.FrozenSegmenter(module=module, variables=variables,
                                 labels=LabelTables.load(label_tables_dir()).segmentation)


@needs_maps
def test_qc_learns_from_the_frozen_segmenters_own_predictions(params, label_map):
    """inputs 'predictions': the QC input is the frozen network's argmax on the generated image of
    the same key, in QC classes, and the target its per-class Dice against the generator's labels."""
    spec = tasks.ModelSpec.from_dict({"kind": "qc", "labels": "qc_2.0", "inputs": "predictions",
                                      "nb_features": 4, "nb_levels": 2,
                                      "corruption": {"fov_prob": 0.0}})
    frozen = _frozen_segmenter()
    task = tasks.Task(spec, params, frozen)
    key = jax.random.key(8)
    onehot, dice = jax.jit(task.sample)(key, label_map, task.aux)
    k_gen, _ = jax.random.split(key)
    from generator.sampler import sample_with_info
    image, _, info = sample_with_info(k_gen, label_map, task.gparams)
    predicted = np.argmax(np.asarray(frozen.module.apply(frozen.variables, image[None]))[0], -1)
    expected_seg = task.prediction_lut[predicted]
    truth = task.target_lut[np.asarray(info["labels"])]
    np.testing.assert_array_equal(np.argmax(np.asarray(onehot), -1), expected_seg)
    for c in range(task.n_outputs):
        p, t = expected_seg == c, truth == c
        expected = 2 * np.sum(p & t) / max(np.sum(p) + np.sum(t), 1e-6)
        assert float(dice[c]) == pytest.approx(expected, abs=1e-4), c
    assert task.n_outputs == 9 and float(np.mean(dice)) < 0.9   # a random network is no oracle


@needs_maps
def test_denoiser_learns_from_the_frozen_segmenters_own_predictions_in_groups(params, label_map):
    """The denoiser's noisy input: the frozen network's argmax on the generated image of the same
    key, mapped to the 5 denoiser groups; its target the generator's labels in groups."""
    spec = tasks.ModelSpec.from_dict({"kind": "denoiser", "groups": "denoiser_2.0",
                                      "inputs": "predictions", "nb_features": 4, "nb_levels": 3})
    frozen = _frozen_segmenter()
    task = tasks.Task(spec, params, frozen)
    key = jax.random.key(9)
    noisy, target = jax.jit(task.sample)(key, label_map, task.aux)
    from generator.sampler import sample_with_info
    image, _, info = sample_with_info(jax.random.split(key)[0], label_map, task.gparams)
    predicted = np.argmax(np.asarray(frozen.module.apply(frozen.variables, image[None]))[0], -1)
    groups = tasks.group_values(PRIORS, "denoiser_2.0", frozen.labels)
    np.testing.assert_array_equal(np.argmax(np.asarray(noisy), -1), groups[predicted])
    np.testing.assert_array_equal(target, task.target_lut[np.asarray(info["labels"])])
    assert noisy.shape == target.shape + (5,)


def test_predictions_inputs_need_a_frozen_segmenter_and_a_group_task(params):
    spec = tasks.ModelSpec.from_dict({"kind": "qc", "labels": "qc_2.0", "inputs": "predictions"})
    with pytest.raises(ValueError, match="frozen segmenter"):
        tasks.Task(spec, params)
    with pytest.raises(ValueError, match="for the qc and denoiser kinds"):
        tasks.ModelSpec.from_dict({"kind": "segmenter", "inputs": "predictions"})
    with pytest.raises(ValueError, match="unknown model inputs"):
        tasks.ModelSpec.from_dict({"kind": "qc", "inputs": "guesses"})


def test_frozen_segmenter_refuses_another_voxel_size():
    """The shipped segmenter is a 2 mm model: on 4 mm data its errors would not be its own."""
    spec = tasks.ModelSpec.from_dict({"kind": "qc", "labels": "qc_2.0", "inputs": "predictions"})
    with pytest.raises(ValueError, match="trained at 2 mm.*4 mm"):
        tasks.load_frozen_segmenter(spec, 4.0)
    assert tasks.load_frozen_segmenter(spec, 2.0).labels.shape == (33,)
