"""Label tables (flip swap, 1.0/2.0 conversion, denoiser/QC tables), label-map encoding,
morphology and the QC/denoiser corruptions."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from generator import labels as lab
from generator.sampler import GeneratorConfig, build_params

from test_gen_common import PRIORS, needs_data

# FreeSurfer left/right structure pairs (FreeSurferColorLUT), independent of the code under test
FS_LEFT_RIGHT = {2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54,
                 25: 57, 26: 58, 28: 60, 30: 62, 136: 163, 137: 164}


def load(name):
    return np.load(os.path.join(PRIORS, name))


@needs_data
def test_flip_swaps_freesurfer_left_right_pairs():
    gl = load('generation_labels.npy')
    swap = lab.flip_lut(len(gl), 18)
    pairs = {**FS_LEFT_RIGHT, **{r: l for l, r in FS_LEFT_RIGHT.items()}}
    for i, g in enumerate(gl):
        assert gl[swap[i]] == pairs.get(int(g), int(g)), g
    assert np.array_equal(swap[swap], np.arange(len(gl)))


def test_flip_mirrors_labels_and_image():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 6, (7, 5, 4)), jnp.uint8)
    image = jnp.asarray(np.random.default_rng(1).normal(size=(7, 5, 4)), jnp.float32)
    swap = lab.flip_lut(6, 2)                         # 0, 1 neutral; 2 <-> 4, 3 <-> 5
    fl, fi = lab.flip_lr(labels, jnp.bool_(True), swap, 0, image)
    np.testing.assert_array_equal(fl, swap[np.asarray(labels)[::-1]])
    np.testing.assert_array_equal(fi, np.asarray(image)[::-1])
    nl, ni = lab.flip_lr(labels, jnp.bool_(False), swap, 0, image)
    np.testing.assert_array_equal(nl, labels), np.testing.assert_array_equal(ni, image)


def expected_tables():
    """Generation label -> output value, derived from the .npy arrays without the code under
    test: 1.0 and QC 1.0 tables are aligned with generation_labels.npy; the 2.0 tables (55
    entries, for the private 55-label list with one more non-sided label) share the sided part,
    and their non-sided entries are either 0 or the label itself."""
    gl = load('generation_labels.npy')
    seg1 = load('synthseg_segmentation_labels.npy')
    seg2 = load('synthseg_segmentation_labels_2.0.npy')
    assert len(seg1) == len(gl) == 54 and len(seg2) == 55
    assert np.array_equal(seg2[-36:], seg1[-36:])                    # identical sided parts
    kept2 = set(seg2[:19].tolist()) - {0}
    assert kept2 == set(seg1[:18].tolist()) - {0} | {24}             # 2.0 adds CSF
    exp1 = {int(g): int(v) for g, v in zip(gl, seg1)}
    exp2 = dict(exp1)
    exp2[24] = 24
    return gl, exp1, exp2


@needs_data
@pytest.mark.parametrize('version', ['1.0', '2.0'])
def test_label_conversion_equals_original_tables(version):
    gl, exp1, exp2 = expected_tables()
    exp = exp1 if version == '1.0' else exp2
    p = build_params(GeneratorConfig(priors_dir=PRIORS, output_labels=version))
    got = {int(g): int(v) for g, v in zip(p.generation_labels, p.output_values)}
    assert got == exp
    # converting a label map: values, and softmax indices in sorted order
    idx = jnp.arange(len(gl), dtype=jnp.uint8)
    np.testing.assert_array_equal(lab.convert(idx, np.asarray(p.output_values)), [exp[int(g)] for g in gl])
    seg = np.unique(list(exp.values()))
    assert len(seg) == (32 if version == '1.0' else 33)
    np.testing.assert_array_equal(np.asarray(p.output_indices), np.searchsorted(seg, [exp[int(g)] for g in gl]))
    assert p.segmentation_labels == tuple(seg.tolist())


@needs_data
def test_denoiser_and_qc_tables_align():
    qc1 = load('synthseg_qc_labels.npy')
    qc2 = load('synthseg_qc_labels_2.0.npy')
    den = load('synthseg_denoiser_labels_2.0.npy')
    assert np.array_equal(np.asarray(build_params(GeneratorConfig(priors_dir=PRIORS, output_labels='qc')).output_values),
                          qc1)
    # the 2.0 QC table differs from the 1.0 one only by its extra (background) non-sided entry
    assert np.array_equal(np.concatenate([qc2[:18], qc2[19:]]), qc1) and qc2[18] == 0
    assert np.array_equal(
        np.asarray(build_params(GeneratorConfig(priors_dir=PRIORS, output_labels='qc_2.0')).output_values), qc1)
    # denoiser groups: first non-sided entries as given, extra-cerebral labels -> 0, sided part as given
    out = np.asarray(build_params(GeneratorConfig(priors_dir=PRIORS, output_labels='denoiser_2.0')).output_values)
    assert np.all(den[5:19] == 0)
    np.testing.assert_array_equal(out, np.concatenate([den[:5], np.zeros(13, int), den[19:]]))
    assert sorted(set(out.tolist())) == [0, 1, 2, 3, 4]


def test_align_table_rejects_mismatch():
    with pytest.raises(ValueError):
        lab.align_table(np.arange(10), np.arange(7), 3)
    with pytest.raises(ValueError, match='differ'):      # surplus non-sided entries must agree
        lab.align_table([0, 5, 6, 7, 8, 9], [0, 5, 7, 8, 9], 3)
    np.testing.assert_array_equal(lab.align_table([0, 5, 0, 0, 8, 9], [0, 5, 7, 8, 9], 3), [0, 5, 0, 8, 9])


def test_encode_label_map():
    gl = np.array([0, 14, 2, 41])
    m = np.array([[[0, 14], [2, 41]]], dtype=np.float32)
    np.testing.assert_array_equal(lab.encode_label_map(m, gl), [[[0, 1], [2, 3]]])
    assert lab.encode_label_map(m, gl).dtype == np.uint8
    with pytest.raises(ValueError, match=r'\[7, 999\]'):
        lab.encode_label_map(np.array([0, 7, 999, 2]), gl)
    with pytest.raises(ValueError, match='non-integer'):
        lab.encode_label_map(np.array([0.5, 2.0]), gl)


def ball(r):
    g = np.arange(-r, r + 1)
    d = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    return d <= r * r


@pytest.mark.parametrize('radius', [1, 2, 4])
def test_dilation_and_erosion_match_scipy(radius):
    rng = np.random.default_rng(radius)
    mask = ndimage.binary_opening(rng.uniform(size=(26, 24, 22)) > 0.6)
    d = np.asarray(lab.dilate(jnp.asarray(mask), radius, 5))
    e = np.asarray(lab.erode(jnp.asarray(mask), radius, 5))
    np.testing.assert_array_equal(d, ndimage.binary_dilation(mask, ball(radius)))
    np.testing.assert_array_equal(e, ndimage.binary_erosion(mask, ball(radius), border_value=1))


def test_random_dilation_erosion_on_label_maps():
    labels = np.zeros((20, 20, 20), np.int32)
    labels[4:16, 4:16, 4:16] = 3
    labels[8:12, 8:12, 8:12] = 5
    run = jax.jit(jax.vmap(lambda k: lab.random_dilation_erosion(k, jnp.asarray(labels), 4, 5, 0.3)))
    out = np.asarray(run(jax.random.split(jax.random.key(0), 2000)))
    changed = np.any(out != labels, axis=(1, 2, 3))
    # erosion with probability (1 - 0.701) / 2; dilation leaves label maps unchanged (labels * mask)
    assert abs(changed.mean() - (1 - 0.701) / 2) < 0.03
    eroded = ndimage.binary_erosion(labels > 0, ball(4), border_value=1)
    for o in out[changed][:5]:
        np.testing.assert_array_equal(o, labels * eroded)


def test_partial_fov_and_dice():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (30, 30, 30))
    noisy = np.where(rng.uniform(size=target.shape) < 0.1, rng.integers(0, 4, target.shape), target)
    run = jax.jit(lambda k: lab.simulate_partial_fov(k, jnp.asarray(noisy), jnp.asarray(target), 4, (20, 20, 20),
                                                     min_fov_shape=10, prob_mask=0.5))
    n_masked = 0
    for k in jax.random.split(jax.random.key(1), 10):
        x1, dice = run(k)
        x1, dice = np.asarray(x1), np.asarray(dice)
        assert x1.shape == (20, 20, 20, 4) and np.allclose(x1.sum(-1), 1)
        # Dice between the (possibly masked) full noisy map and the target
        assert np.all(dice <= 1) and np.all(dice > 0)
        n_masked += dice[1:].min() < 0.8
    assert n_masked > 0
    # without masking: plain per-label Dice of the two maps
    x1, dice = jax.jit(lambda k: lab.simulate_partial_fov(k, jnp.asarray(noisy), jnp.asarray(target), 4,
                                                          (20, 20, 20), prob_mask=0.0))(jax.random.key(2))
    exp = [2 * np.sum((noisy == i) & (target == i)) / (np.sum(noisy == i) + np.sum(target == i)) for i in range(4)]
    np.testing.assert_allclose(np.asarray(dice), exp, rtol=1e-4)


def test_group_corruption_masks():
    groups = np.zeros((16, 16, 16), np.int32)
    groups[4:12, 4:12, 4:12] = 1
    groups[6:10, 6:10, 6:10] = 2
    out = np.asarray(jax.jit(lambda k: lab.corrupt_groups(k, jnp.asarray(groups), 3))(jax.random.key(3)))
    assert out.shape == (16, 16, 16, 3)
    for g in range(3):
        m = groups == g
        ok = [np.array_equal(out[..., g], m), np.array_equal(out[..., g], ndimage.binary_dilation(m, ball(1))),
              np.array_equal(out[..., g], ndimage.binary_erosion(m, ball(1), border_value=1))]
        assert any(ok)
