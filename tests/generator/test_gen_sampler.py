"""The composed sampler: determinism, vmapping, flip equivariance, GMM wiring, config, loader."""
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generator import labels as lab
from generator.sampler import (GeneratorConfig, LabelMapError, build_params, load_config, load_label_maps,
                               make_sampler, output_values, sample, sample_labels, sample_with_info)

from test_gen_common import MAPS, PRIORS, needs_data, small_label_map  # noqa: F401  (fixture)

OUT = (40, 40, 40)


def params_for(**kw):
    cfg = GeneratorConfig(priors_dir=PRIORS, output_shape=OUT).replace(**kw)
    return build_params(cfg)


# Most tests share one parameter set and one compiled sample_with_info (compiling is the slow part).
@pytest.fixture(scope='module')
def default_params():
    return params_for()


@needs_data
def test_same_key_same_sample_and_outputs(small_label_map, default_params):
    lm, _ = small_label_map
    p = default_params
    a_im, a_tg, _ = sample_with_info(jax.random.key(7), jnp.asarray(lm), p)
    b_im, b_tg, _ = sample_with_info(jax.random.key(7), jnp.asarray(lm), p)
    c_im, _, _ = sample_with_info(jax.random.key(8), jnp.asarray(lm), p)
    np.testing.assert_array_equal(a_im, b_im), np.testing.assert_array_equal(a_tg, b_tg)
    assert not np.allclose(a_im, c_im)
    assert a_im.shape == OUT + (1,) and a_im.dtype == jnp.float32
    assert a_tg.shape == OUT and a_tg.dtype == jnp.int32
    assert 0 <= float(a_im.min()) and float(a_im.max()) <= 1 + 1e-6
    assert set(np.unique(np.asarray(a_tg)).tolist()) <= set(p.segmentation_labels)


@needs_data
def test_sample_labels_are_the_labels_of_the_sample(small_label_map, default_params):
    """The label half of the sampler: for a key, the deformed and flipped labels its image is
    drawn from, so label-to-label training sees the generator's own geometry."""
    lm, _ = small_label_map
    for seed in (7, 8):
        _, target, info = sample_with_info(jax.random.key(seed), jnp.asarray(lm), default_params)
        labels = sample_labels(jax.random.key(seed), jnp.asarray(lm), default_params)
        np.testing.assert_array_equal(labels, info['labels'])
        np.testing.assert_array_equal(
            np.asarray(default_params.output_values)[np.asarray(labels)], target)


@needs_data
def test_output_values_and_with_config(default_params):
    """Another output table through the resolved labels equals building the params anew; other
    sampling settings keep the tables; table keys are refused."""
    for table in ('1.0', 'denoiser_2.0', None):
        np.testing.assert_array_equal(output_values(default_params, table),
                                      params_for(output_labels=table).output_values)
    moved = default_params.with_config(atlas_res=2.0, target='indices')
    assert moved == params_for(atlas_res=2.0, target='indices')
    with pytest.raises(ValueError, match='output_labels change the label tables'):
        default_params.with_config(output_labels='1.0')


@needs_data
def test_vmapped_batch_equals_single_samples(small_label_map, default_params):
    lm, _ = small_label_map
    p = default_params
    bank = jnp.stack([jnp.asarray(lm), jnp.asarray(lm)])      # identical maps: the pick does not matter
    key = jax.random.key(3)
    im_b, tg_b = make_sampler(p, batch_size=2)(key, bank)
    assert im_b.shape == (2,) + OUT + (1,) and tg_b.shape == (2,) + OUT
    for i, k in enumerate(jax.random.split(key, 2)):
        _, k_sample = jax.random.split(k)                     # as in sample_from_bank
        im, tg, _ = sample_with_info(k_sample, jnp.asarray(lm), p)
        np.testing.assert_allclose(im_b[i], im, atol=1e-5)
        np.testing.assert_array_equal(tg_b[i], tg)
    assert not np.allclose(im_b[0], im_b[1])


@needs_data
def test_flip_swaps_labels_and_mirrors_the_image(small_label_map):
    """Same key with the flip forced on and off: with a noiseless GMM, left/right structures
    sharing their classes, and no bias field or resampling grid, the flipped image is the
    mirrored one and the flipped target is the mirrored target with left/right labels swapped."""
    lm, _ = small_label_map
    classes = np.load(os.path.join(PRIORS, 'generation_classes.npy'))
    tied = tuple(int(c) for c in np.concatenate([classes[:36], classes[18:36]]))   # right = left's class
    tied = tuple(int(v) for v in np.unique(tied, return_inverse=True)[1])
    common = dict(prior_stds=[0.0, 0.0], bias_field_std=0.0, randomise_res=False, generation_classes=tied,
                  nonlin_std=0.0)      # (the deformation is shared by both runs; skipping it halves compile time)
    p_on = params_for(flip_prob=1.0, **common)
    p_off = params_for(flipping=False, **common)
    key = jax.random.key(11)
    im1, tg1 = sample(key, jnp.asarray(lm), p_on)
    im0, tg0 = sample(key, jnp.asarray(lm), p_off)
    np.testing.assert_allclose(np.asarray(im1), np.asarray(im0)[::-1], atol=1e-5)
    swap = {}
    for l, r in zip(p_on.output_values[18:36], p_on.output_values[36:]):
        if l and r:
            swap[l], swap[r] = r, l
    assert swap[2] == 41 and swap[42] == 3 and swap[17] == 53
    expected = np.vectorize(lambda v: swap.get(int(v), int(v)))(np.asarray(tg0)[::-1])
    np.testing.assert_array_equal(np.asarray(tg1), expected)
    assert np.any(np.asarray(tg1) != np.asarray(tg0)[::-1])


@needs_data
def test_flip_in_the_default_pipeline(small_label_map, default_params):
    lm, _ = small_label_map
    swap = np.asarray(default_params.flip_lut)
    flips = []
    for seed in range(6):
        _, _, info = sample_with_info(jax.random.key(100 + seed), jnp.asarray(lm), default_params)
        before, after = np.asarray(info['labels_before_flip']), np.asarray(info['labels'])
        flipped = bool(info['flipped'])
        flips.append(flipped)
        np.testing.assert_array_equal(after, swap[before[::-1]] if flipped else before)
    assert any(flips) and not all(flips)


@needs_data
def test_gmm_statistics_in_the_pipeline(small_label_map, default_params):
    """Before bias field and blur, each label's intensities follow the Gaussian drawn for its
    generation class."""
    lm, gl = small_label_map
    p = default_params
    classes = np.asarray(p.class_of_label)
    for seed in (0, 1):
        _, _, info = sample_with_info(jax.random.key(seed), jnp.asarray(lm), p)
        gmm, labels = np.asarray(info['channels'][0]['gmm']), np.asarray(info['labels'])
        means = np.asarray(info['channels'][0]['class_means'])[classes]
        stds = np.asarray(info['channels'][0]['class_stds'])[classes]
        checked = 0
        for i in np.unique(labels):
            v = gmm[labels == i]
            if v.size < 300:
                continue
            checked += 1
            assert abs(v.mean() - means[i]) < 5 * stds[i] / np.sqrt(v.size) + 1e-3, (gl[i], v.mean(), means[i])
            if stds[i] > 0.5:
                assert abs(v.std() / stds[i] - 1) < 5 / np.sqrt(2 * v.size) + 0.01, (gl[i], v.std(), stds[i])
        assert checked >= 10


@needs_data
def test_target_is_the_converted_label_map(small_label_map, default_params):
    lm, _ = small_label_map
    p = default_params
    _, tg, info = sample_with_info(jax.random.key(5), jnp.asarray(lm), p)
    labels = np.asarray(info['labels'])
    np.testing.assert_array_equal(np.asarray(tg), np.asarray(p.output_values)[labels])
    # target='indices' uses the softmax order: sorted unique segmentation labels
    idx = np.asarray(lab.convert(jnp.asarray(labels), np.asarray(p.output_indices)))
    np.testing.assert_array_equal(np.asarray(p.segmentation_labels)[idx], np.asarray(tg))


@needs_data
def test_default_yaml_is_the_dataclass_and_the_published_setup():
    cfg = load_config('default')
    assert cfg == GeneratorConfig()
    # the original's published training setup (BrainGenerator defaults, tutorial 3)
    assert (cfg.scaling_bounds, cfg.rotation_bounds, cfg.shearing_bounds, cfg.translation_bounds) == (0.2, 15, 0.012, False)
    assert (cfg.nonlin_std, cfg.nonlin_scale, cfg.bias_field_std, cfg.bias_scale) == (4.0, 0.04, 0.7, 0.025)
    assert (cfg.clip, cfg.gamma_std, cfg.blur_range, cfg.max_res_iso, cfg.max_res_aniso) == (300, 0.5, 1.03, 4, 8)
    assert cfg.output_shape == (160, 160, 160) and cfg.flipping and cfg.randomise_res
    assert cfg.prior_distributions == 'uniform' and cfg.prior_means is None and cfg.n_neutral_labels == 18
    over = load_config('default', ['output_shape=[96,96,96]', 'nonlin_std=2.5'])
    assert over.output_shape == (96, 96, 96) and over.nonlin_std == 2.5
    with pytest.raises(ValueError, match='unknown generator parameter'):
        GeneratorConfig.from_dict({'nonlin_sdt': 3})
    hash(build_params(cfg))


@needs_data
@pytest.mark.parametrize('name', ['synthseg_1.0', 'contrast_specific_t1', 'fast'])
def test_other_generator_configs(name):
    cfg = load_config(name)
    p = build_params(cfg)
    base = GeneratorConfig()
    changed = {f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(base, f)}
    expected = {'synthseg_1.0': {'output_labels'},
                'contrast_specific_t1': {'prior_distributions', 'generation_classes', 'prior_means', 'prior_stds',
                                         'randomise_res', 'data_res', 'thickness'},
                'fast': {'nonlin_integration_factor'}}[name]
    assert changed == expected
    if name == 'contrast_specific_t1':
        assert p.n_classes == 25 and np.asarray(p.prior_means).shape == (2, 25)
    if name == 'synthseg_1.0':
        assert len(p.segmentation_labels) == 32 and 24 not in p.segmentation_labels


def write_nifti(path, data, zooms=(1.0, 1.0, 1.0)):
    import nibabel as nib
    nib.save(nib.Nifti1Image(data, np.diag(list(zooms) + [1.0])), path)


def test_loader_reads_a_folder_and_reports_bad_files(tmp_path):
    gl = [0, 2, 41]
    good = np.zeros((10, 10, 10), np.int32)
    good[2:5] = 2
    good[5:8] = 41
    d = tmp_path / 'maps'
    d.mkdir()
    write_nifti(str(d / 'a.nii.gz'), good)
    write_nifti(str(d / 'b.nii.gz'), good[::-1].copy())
    bank = load_label_maps(str(d), gl)
    assert bank.maps.shape == (2, 10, 10, 10) and bank.maps.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bank.maps[0]), lab.encode_label_map(good, gl))
    derived = load_label_maps(str(d))                     # generation labels from the maps
    assert derived.generation_labels == (0, 2, 41)
    np.testing.assert_array_equal(np.asarray(derived.maps), np.asarray(bank.maps))

    def error_for(name, writer):
        sub = tmp_path / name
        sub.mkdir()
        write_nifti(str(sub / 'a.nii.gz'), good)
        bad = sub / 'z_bad.nii.gz'
        writer(str(bad))
        with pytest.raises(LabelMapError) as e:
            load_label_maps(str(sub), gl)
        msg = str(e.value)
        assert 'z_bad.nii.gz' in msg and '\n' not in msg
        return msg

    assert 'cannot read' in error_for('garbage', lambda p: open(p, 'wb').write(b'not a nifti'))
    assert 'cannot read' in error_for('truncated', lambda p: open(p, 'wb').write(gzip.compress(b'\0' * 400)[:50]))
    assert '[7]' in error_for('unknown', lambda p: write_nifti(p, np.where(good == 2, 7, good).astype(np.int32)))
    assert 'shape' in error_for('shape', lambda p: write_nifti(p, good[:8]))
    assert 'non-integer' in error_for('float', lambda p: write_nifti(p, good.astype(np.float32) + 0.5))
    assert 'voxel size' in error_for('zooms', lambda p: write_nifti(p, good, (2.0, 2.0, 2.0)))
    with pytest.raises(LabelMapError, match='no label maps'):
        load_label_maps(str(tmp_path), gl)          # only sub-folders there
    with pytest.raises(LabelMapError, match='does not exist'):
        load_label_maps(str(tmp_path / 'nope'), gl)


@needs_data
def test_loader_on_the_training_maps_is_ras():
    p = params_for()
    bank = load_label_maps(MAPS, p.generation_labels, max_maps=1)
    m = np.asarray(bank.maps[0])
    assert m.shape == (256, 256, 256) and bank.voxel_size == 1.0
    # RAS: axis 0 runs left -> right, so left structures (label 2) sit at lower indices than right (41)
    gl = np.asarray(p.generation_labels)
    x_left = np.nonzero(m == np.where(gl == 2)[0][0])[0].mean()
    x_right = np.nonzero(m == np.where(gl == 41)[0][0])[0].mean()
    assert x_left < x_right
