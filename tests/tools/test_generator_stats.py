"""The generator parity statistics (tools/parity/generator_stats.py) detect the changes they are
meant to catch, on synthetic volumes whose answer is known; and the harness's seeding, reuse
check and table note (run_generator_parity.py, generator_settings.py), without TensorFlow."""
import json
import math
import os
import sys

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'parity'))
import generator_stats as gs  # noqa: E402

SHAPE = (48, 48, 48)


def phantom() -> np.ndarray:
    """Two hemispheres: white matter (2 / 41) blocks inside cortex (3 / 42) shells, CSF (24)
    between them, small left/right structures of deliberately different sizes."""
    t = np.zeros(SHAPE, np.int16)
    t[6:23, 6:42, 6:42], t[25:42, 6:42, 6:42] = 3, 42
    t[9:21, 9:39, 9:39], t[27:39, 9:39, 9:39] = 2, 41
    t[23:25, 6:42, 6:42] = 24
    t[12:16, 12:16, 12:17], t[32:36, 12:16, 12:15] = 17, 53      # hippocampus: left larger
    t[12:15, 20:26, 20:24], t[33:36, 20:24, 20:24] = 10, 49      # thalamus: left larger
    t[16:19, 30:33, 30:36], t[29:32, 30:33, 30:32] = 11, 50      # caudate: left larger
    return t


def render(target, rng, means, std=0.03, blur=(1.0, 1.0, 1.0), field=None):
    """An image from a target: per-label mean + noise, optional bias field, per-axis blur."""
    img = np.zeros(target.shape, np.float32)
    for lab, m in means.items():
        img[target == lab] = m
    img = img + rng.normal(0, std, target.shape).astype(np.float32)
    if field is not None:
        img = img * field
    img = ndimage.gaussian_filter(img, blur)
    return np.clip(img, 0, 1)


MEANS = {0: 0.05, 2: 0.8, 41: 0.8, 3: 0.5, 42: 0.5, 24: 0.2, 17: 0.55, 53: 0.55, 10: 0.7, 49: 0.7,
         11: 0.6, 50: 0.6}


def stats_of(images, target):
    src = gs.source_volumes_of(target)
    return [gs.sample_statistics(im, target, src, sorted(MEANS)) for im in images]


def test_label_medians_and_contrasts_are_the_rendered_values():
    t = phantom()
    s = stats_of([render(t, np.random.default_rng(0), MEANS, blur=(0.01,) * 3)], t)[0]
    assert s['median/2'] == pytest.approx(0.8, abs=0.01)
    assert s['median/24'] == pytest.approx(0.2, abs=0.02)
    assert s['contrast/wm_ctx'] == pytest.approx(0.3, abs=0.01)
    assert s['contrast/ctx_csf'] == pytest.approx(0.3, abs=0.03)
    assert s['spread/2'] == pytest.approx(2 * 0.6745 * 0.03, rel=0.15)      # IQR of N(0, 0.03)


def test_a_narrowed_intensity_range_separates():
    t = phantom()
    rng = np.random.default_rng(1)

    def draw(scale):
        out = []
        for _ in range(25):
            m = {k: (v if k == 0 else v * scale * rng.uniform(0.8, 1.2)) for k, v in MEANS.items()}
            out.append(render(t, rng, m, blur=(0.7,) * 3))
        return out
    ref, same, narrow = stats_of(draw(1.0), t), stats_of(draw(1.0), t), stats_of(draw(0.8), t)
    assert not any(r['separates'] for r in gs.compare(ref, same))
    flagged = {r['stat'] for r in gs.compare(ref, narrow) if r['separates']}
    assert {'median/2', 'median/41', 'median/3', 'quantile/95'} <= flagged


def test_pooled_statistics_are_the_mean_over_the_labels_present():
    t = phantom()
    s = stats_of([render(t, np.random.default_rng(4), MEANS, blur=(0.01,) * 3)], t)[0]
    for kind in ('median', 'spread'):
        per_label = [s[f'{kind}/{lab}'] for lab in sorted(MEANS) if lab != 0]
        present = [v for v in per_label if not math.isnan(v)]
        assert 0 < len(present) < len(per_label)     # a structure too small to count is left out
        assert s[f'pooled/{kind}'] == pytest.approx(np.mean(present))


def test_a_shift_common_to_all_structures_shows_first_in_the_pooled_median():
    """Each structure's mean drawn anew per sample (+-25 %), all of them 6 % brighter on one side:
    the pooled median sees that before any single structure's median does."""
    t = phantom()
    rng = np.random.default_rng(12)

    def draw(scale):
        out = []
        for _ in range(40):
            m = {k: (v if k == 0 else min(0.95, v * scale * rng.uniform(0.75, 1.25))) for k, v in MEANS.items()}
            out.append(render(t, rng, m, blur=(0.7,) * 3))
        return stats_of(out, t)
    ref, shifted = draw(1.0), draw(1.06)
    p = {r['stat']: r['p'] for r in gs.compare(ref, shifted)}
    assert p['pooled/median'] < 0.01
    assert p['pooled/median'] < min(v for k, v in p.items() if k.startswith('median/'))


def test_high_frequency_energy_tracks_blur_per_axis():
    t = phantom()
    rng = np.random.default_rng(2)
    sharp = gs.high_frequency_stats(render(t, rng, MEANS, blur=(0.5, 0.5, 0.5)))
    aniso = gs.high_frequency_stats(render(t, rng, MEANS, blur=(0.5, 0.5, 2.0)))
    assert aniso['hf/axis2'] < 0.5 * sharp['hf/axis2']
    assert aniso['hf/axis0'] == pytest.approx(sharp['hf/axis0'], rel=0.25)
    assert aniso['hf/min_over_max'] < 0.5 < sharp['hf/min_over_max']


def test_a_slightly_narrowed_blur_separates():
    t = phantom()
    rng = np.random.default_rng(3)

    def draw(sigma):
        return stats_of([render(t, rng, MEANS, blur=(sigma * rng.uniform(0.97, 1.03),) * 3) for _ in range(25)], t)
    ref, same, narrow = draw(1.0), draw(1.0), draw(0.85)
    assert not any(r['separates'] for r in gs.compare(ref, same))
    flagged = {r['stat'] for r in gs.compare(ref, narrow) if r['separates']}
    assert {'hf/axis0', 'hf/axis1', 'hf/axis2'} <= flagged


def test_bias_statistic_sees_a_smooth_field_and_not_the_noise():
    t = phantom()
    rng = np.random.default_rng(4)
    x = np.linspace(-1, 1, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    sharp = (0.01,) * 3                                   # unblurred noise: only the smoothing removes it
    plain = gs.bias_stats(render(t, rng, MEANS, std=0.1, blur=sharp), t)['bias/wm_cv']
    biased = gs.bias_stats(render(t, rng, MEANS, std=0.1, blur=sharp, field=np.exp(0.3 * x)), t)['bias/wm_cv']
    assert plain < 0.02
    assert biased > 3 * plain


def test_geometry_volume_ratio_and_centroid_distance():
    t = phantom()
    src = gs.source_volumes_of(t)
    same = gs.geometry_stats(t, src)
    assert same['volratio/hippocampus'] == pytest.approx(1.0)
    shifted = np.roll(t, 3, axis=1)
    d0 = np.linalg.norm(np.array(ndimage.center_of_mass(t == 17)) - 23.5)
    d1 = np.linalg.norm(np.array(ndimage.center_of_mass(shifted == 17)) - 23.5)
    d0r = np.linalg.norm(np.array(ndimage.center_of_mass(t == 53)) - 23.5)
    d1r = np.linalg.norm(np.array(ndimage.center_of_mass(shifted == 53)) - 23.5)
    assert gs.geometry_stats(shifted, src)['centroid/hippocampus'] == pytest.approx((d1 + d1r) / 2, abs=1e-4)
    assert same['centroid/hippocampus'] == pytest.approx((d0 + d0r) / 2, abs=1e-4)
    zoomed = ndimage.zoom(t, 1.1, order=0)[2:50, 2:50, 2:50]
    assert gs.geometry_stats(zoomed, src)['volratio/cerebral_wm'] == pytest.approx(1.331, rel=0.05)


def test_flip_is_detected_from_the_asymmetries():
    t = phantom()
    src = gs.source_volumes_of(t)
    swap = {2: 41, 41: 2, 3: 42, 42: 3, 17: 53, 53: 17, 10: 49, 49: 10, 11: 50, 50: 11}
    lut = np.arange(64)
    for k, v in swap.items():
        lut[k] = v
    flipped = lut[t[::-1]]
    assert gs.label_stats(t, src)['flip/swapped'] == 0.0
    assert gs.label_stats(flipped, src)['flip/swapped'] == 1.0
    assert gs.label_stats(t, src)['labels/n'] == len(MEANS)


def test_absent_labels_give_nan_and_are_not_tested():
    t = phantom()
    img = render(t, np.random.default_rng(5), MEANS)
    s = gs.sample_statistics(img, t, gs.source_volumes_of(t), [2, 77])
    assert math.isnan(s['median/77']) and not math.isnan(s['median/2'])
    rows = {r['stat']: r for r in gs.compare([s] * 6, [s] * 6)}
    assert rows['median/77']['test'] == 'n/a'
    with pytest.raises(ValueError, match='same 3-D shape'):
        gs.sample_statistics(img[:-1], t, gs.source_volumes_of(t), [2])


def test_binary_statistic_uses_an_exact_test():
    ref = [{'flip/swapped': float(i % 2)} for i in range(40)]
    never = [{'flip/swapped': 0.0} for _ in range(40)]
    row = gs.compare(ref, never)[0]
    assert row['test'] == 'fisher' and row['separates'] and row['effect'] == pytest.approx(-0.5)
    assert not gs.compare(ref, ref)[0]['separates']


def test_bonferroni_correction_over_the_tested_statistics():
    """A shift with raw p ~ 0.004 separates alone, not among ten statistics."""
    ref = [{'a': float(i)} for i in range(20)]
    ours = [{'a': float(i + 11)} for i in range(20)]
    alone = gs.compare(ref, ours)[0]
    assert 0.001 < alone['p'] < 0.01 and alone['separates']
    for r, o in zip(ref, ours):
        r.update({f'same{j}': r['a'] for j in range(9)})
        o.update({f'same{j}': r['a'] for j in range(9)})
    among = {r['stat']: r for r in gs.compare(ref, ours)}['a']
    assert among['p_bonferroni'] == pytest.approx(10 * among['p']) and not among['separates']


# --------------------------------------------------------------------------- background statistic

EXTRA = 507          # an extra-cerebral generation label that the output tables map to target 0


def with_extra_cerebral(t: np.ndarray) -> np.ndarray:
    """Generation labels of the phantom: a shell of EXTRA around the head inside target 0."""
    g = t.copy()
    shell = np.zeros(SHAPE, bool)
    shell[3:45, 3:45, 3:45] = True
    g[shell & (t == 0)] = EXTRA
    return g


def test_target_from_generation_is_the_table_lookup():
    g = with_extra_cerebral(phantom())
    gl = np.unique(g)
    out = np.where(gl == EXTRA, 0, gl)
    np.testing.assert_array_equal(gs.target_from_generation(g, gl, out), phantom())
    with pytest.raises(ValueError, match='not generation labels'):
        gs.target_from_generation(g, gl[gl != EXTRA], out[gl != EXTRA])
    with pytest.raises(ValueError, match='same length'):
        gs.target_from_generation(g, gl, out[:-1])


def test_background_statistic_sees_only_generation_label_0():
    """Target 0 mixes the true background (0.05) with a bright extra-cerebral class (0.9): the
    background statistic is over generation label 0 only, and target 0 gets no statistic."""
    t = phantom()
    g = with_extra_cerebral(t)
    img = render(g, np.random.default_rng(6), {**MEANS, EXTRA: 0.9}, std=0.01, blur=(0.01,) * 3)
    s = gs.sample_statistics(img, t, gs.source_volumes_of(t), sorted(MEANS), generation=g)
    assert s['median/background'] == pytest.approx(0.05, abs=0.01)
    assert s['spread/background'] < 0.03
    assert 'median/0' not in s and 'spread/0' not in s
    assert 'median/background' not in gs.sample_statistics(img, t, gs.source_volumes_of(t), sorted(MEANS))
    with pytest.raises(ValueError, match='generation'):
        gs.sample_statistics(img, t, gs.source_volumes_of(t), [2], generation=g[:-1])


# --------------------------------------------------------------------------- harness: seeds, table note

import generator_settings  # noqa: E402
import run_generator_parity as rgp  # noqa: E402


def test_each_setting_draws_from_its_own_streams():
    seeds = (0, 1, 2, 17, 999_999)
    streams = [generator_settings.stream_seed(x, s) for x in generator_settings.SETTINGS for s in seeds]
    assert len(set(streams)) == len(streams)
    assert set(generator_settings.SEED_OFFSETS) == set(generator_settings.SETTINGS)
    assert [generator_settings.stream_seed('2.0', s) for s in seeds] == list(seeds)
    with pytest.raises(ValueError):
        generator_settings.stream_seed('robust', generator_settings.SEED_STRIDE)
    with pytest.raises(ValueError):
        generator_settings.stream_seed('robust', -1)


def test_reuse_needs_the_same_format_and_stream(tmp_path):
    paths = [os.path.abspath('m.nii.gz')]

    def write(**kw):
        d = dict(shape=96, n_per_map=5, maps=paths, seed=0, format=generator_settings.SAMPLE_FORMAT,
                 stream_seed=generator_settings.stream_seed('robust', 0))
        d.update(kw)
        (tmp_path / 'done.json').write_text(json.dumps(d))
    write()
    assert rgp.done_matches(str(tmp_path), 'robust', 96, 5, paths, 0)
    assert not rgp.done_matches(str(tmp_path), 't1', 96, 5, paths, 0)        # another setting's stream
    write(stream_seed=None)                                                   # drawn before the offsets
    assert not rgp.done_matches(str(tmp_path), 'robust', 96, 5, paths, 0)
    write(format=None)                                                        # no generation labels
    assert not rgp.done_matches(str(tmp_path), 'robust', 96, 5, paths, 0)


def test_ours_uses_the_setting_stream_and_saves_generation_labels(tmp_path, monkeypatch):
    """run_ours, with the sampler replaced by a recorder: the key is the setting's stream seed's,
    and the saved generation labels are the values of the sampler's label indices."""
    import jax
    import generator
    seen = []
    labels = np.arange(4 * 4 * 4).reshape(4, 4, 4) % 7

    class Bank:
        maps = [np.zeros((8, 8, 8), np.uint8)]

    def fake(key, label_map, params):
        seen.append(np.asarray(jax.random.key_data(key)).tolist())
        return np.zeros((4, 4, 4, 1), np.float32), np.zeros((4, 4, 4), np.int32), dict(labels=labels, flipped=False)
    monkeypatch.setattr(generator, 'load_label_maps', lambda path, gl: Bank)
    monkeypatch.setattr(generator, 'sample_with_info', fake)
    for setting in ('2.0', 'robust'):
        rgp.run_ours(setting, ['m.nii.gz'], 4, 1, 0, str(tmp_path / setting))
    with open(tmp_path / 'robust' / 'done.json') as f:
        assert json.load(f)['stream_seed'] == generator_settings.stream_seed('robust', 0)
    expected = [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(
        generator_settings.stream_seed(x, 0)), 0))).tolist() for x in ('2.0', 'robust')]
    assert seen == expected and seen[0] != seen[1]
    name, overrides = generator_settings.ours('robust')
    gl = np.asarray(generator.build_params(generator.load_config(name, overrides)).generation_labels)
    with np.load(tmp_path / 'robust' / 'sample_0_0.npz') as z:
        np.testing.assert_array_equal(z['generation'], gl[labels])


def test_printed_table_notes_that_geometry_statistics_are_correlated():
    row = dict(n_ref=5, n_ours=5, median_ref=1.0, median_ours=1.0, test='ks', effect=0.1, p_bonferroni=1.0,
               separates=False)
    assert gs.GEOMETRY_NOTE in rgp.markdown('2.0', [dict(row, stat='centroid/caudate'), dict(row, stat='median/2')])
    assert gs.GEOMETRY_NOTE not in rgp.markdown('2.0', [dict(row, stat='median/2')])
