"""GMM parameter priors, GMM sampling statistics, bias field, clip/normalise/gamma."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from generator import intensity as inten

from test_gen_common import PRIORS, needs_data


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_default_uniform_priors_and_background_resets():
    n = 6000
    m, s = jax.jit(jax.vmap(lambda k: inten.sample_gmm_params(k, 48)))(keys(n))
    m, s = np.asarray(m), np.asarray(s)
    # non-background classes: U(0, 250) and U(0, 30) (what the code draws, not the docstrings' ranges)
    assert m[:, 1:].min() >= 0 and m[:, 1:].max() <= 250 and s[:, 1:].min() >= 0 and s[:, 1:].max() <= 30
    assert m[:, 1:].max() > 249 and m[:, 1:].min() < 1 and s[:, 1:].max() > 29.9
    assert abs(m[:, 1:].mean() - 125) < 1.0 and abs(m[:, 1:].var() / (250 ** 2 / 12) - 1) < 0.02
    assert abs(s[:, 1:].mean() - 15) < 0.15
    # background: zero in 5% of draws, low Gaussian (mean < 15, std < 5) in 25%
    zero = (m[:, 0] == 0) & (s[:, 0] == 0)
    low = ~zero & (m[:, 0] <= 15) & (s[:, 0] <= 5)
    se = np.sqrt(0.25 * 0.75 / n)
    assert abs(zero.mean() - 0.05) < 4 * np.sqrt(0.05 * 0.95 / n)
    # regular draws also land in the 'low' box with probability (15/250)(5/30) * 0.7
    assert abs(low.mean() - (0.25 + 0.7 * 15 / 250 * 5 / 30)) < 4 * se


@needs_data
def test_normal_priors_from_the_t1_arrays():
    pm = np.load(os.path.join(PRIORS, 'prior_means_t1.npy'))
    ps = np.load(os.path.join(PRIORS, 'prior_stds_t1.npy'))
    k_classes = pm.shape[1]
    n = 4000
    draw = jax.jit(jax.vmap(lambda k: inten.sample_gmm_params(k, k_classes, 'normal', pm, ps)))
    m, s = (np.asarray(a) for a in draw(keys(n, 1)))
    ok = pm[0] > 4 * pm[1]          # clipping at 0 negligible
    ok[0] = False                   # background is reset in 30% of the draws
    assert ok.sum() > 15
    se = pm[1, ok] / np.sqrt(n)
    assert np.all(np.abs(m[:, ok].mean(0) - pm[0, ok]) < 5 * se)
    assert np.all(np.abs(m[:, ok].std(0) / pm[1, ok] - 1) < 0.06)
    oks = ps[0] > 4 * ps[1]
    oks[0] = False
    assert np.all(np.abs(s[:, oks].mean(0) - ps[0, oks]) < 5 * ps[1, oks] / np.sqrt(n))


def test_several_modalities_pick_a_block():
    k_classes = 5
    arr = np.array([[0.0] * k_classes, [1.0] * k_classes, [100.0] * k_classes, [101.0] * k_classes])
    opts = dict(background_zero_prob=0, background_low_prob=0)

    @jax.jit
    def draw(ks):      # random block per draw, and block 1 for channel 1 with channel-specific stats
        rand = jax.vmap(lambda k: inten.sample_gmm_params(k, k_classes, 'uniform', arr, [0, 1], **opts)[0])(ks)
        spec = jax.vmap(lambda k: inten.sample_gmm_params(k, k_classes, 'uniform', arr, [0, 1], channel=1,
                                                          use_specific_stats_for_channel=True, **opts)[0])(ks)
        return rand, spec

    m, spec = (np.asarray(a) for a in draw(keys(2000, 2)))
    high = m[:, 1] > 50
    assert 0.45 < high.mean() < 0.55
    assert np.all(high[:, None] == (m > 50))                 # one block per draw, all classes
    assert np.all(spec >= 100)


def test_mix_prior_and_random():
    draw = jax.jit(jax.vmap(lambda k: inten.sample_gmm_params(k, 4, 'uniform', [300, 301], [40, 41],
                                                              mix_prior_and_random=True)))
    m, s = (np.asarray(a) for a in draw(keys(3000, 4)))
    prior_m, prior_s = m[:, 1:] >= 300, s[:, 1:] >= 40      # the defaults stay below 250 and 30
    assert np.all(prior_m == prior_m[:, :1]) and np.all(prior_s == prior_s[:, :1])
    assert 0.46 < prior_m[:, 0].mean() < 0.54 and 0.46 < prior_s[:, 0].mean() < 0.54
    assert abs(np.corrcoef(prior_m[:, 0], prior_s[:, 0])[0, 1]) < 0.06   # decided independently


def test_gmm_sample_statistics_match_parameters():
    rng = np.random.default_rng(0)
    n_labels = 10
    labels = jnp.asarray(rng.integers(0, n_labels, (48, 48, 48)), jnp.uint8)
    means = jnp.asarray(rng.uniform(0, 250, n_labels), jnp.float32)
    stds = jnp.asarray(rng.uniform(0, 30, n_labels), jnp.float32).at[3].set(0.0)
    img = np.asarray(jax.jit(inten.sample_gmm)(jax.random.key(5), labels, means, stds))
    lab = np.asarray(labels)
    for i in range(n_labels):
        v = img[lab == i]
        se = float(stds[i]) / np.sqrt(v.size)
        assert abs(v.mean() - float(means[i])) < 5 * se + 1e-4
        if float(stds[i]) > 0:
            assert abs(v.std() / float(stds[i]) - 1) < 0.04
        else:
            assert np.all(v == float(means[i]))


def test_bias_field_log_std_matches_sampled_std():
    shape = (120, 120, 120)          # ceil(120 * 0.025) = 3 nodes per axis, at voxels 0, 40, 80

    @jax.jit
    def nodes(ks):
        def one(k):
            field, std, small = inten.sample_bias_field(k, shape, 0.7, 0.025)
            logf = jnp.log(field)
            return logf[::40, ::40, ::40], logf[20, 0, 0], std, small
        return jax.lax.map(one, ks)

    at_nodes, mid, std, small = (np.asarray(a) for a in nodes(keys(300, 6)))
    assert small.shape == (300, 3, 3, 3)
    np.testing.assert_allclose(at_nodes, small, atol=1e-5)                 # exp of the upsampled field
    np.testing.assert_allclose(mid, (small[:, 0, 0, 0] + small[:, 1, 0, 0]) / 2, atol=1e-5)  # linear in log
    assert std.min() >= 0 and std.max() <= 0.7 and abs(std.mean() - 0.35) < 0.04
    z = at_nodes / std[:, None, None, None]
    assert abs(z.std() - 1) < 0.04 and abs(z.mean()) < 0.05
    # per sample, the empirical log-std follows the drawn std
    emp = at_nodes.reshape(300, -1).std(1)
    assert np.corrcoef(emp, std)[0, 1] > 0.95


def test_bias_field_applied_where_asked():
    img = jnp.ones((8, 8, 8))
    ks = keys(200, 7)
    apply = jax.vmap(lambda k: jax.random.uniform(k) < 0.5)(keys(200, 9))
    out, std = jax.jit(jax.vmap(lambda k, a: inten.apply_bias_field(k, img, 0.7, 0.25, a)))(ks, apply)
    changed = np.any(np.abs(np.asarray(out) - 1) > 1e-6, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, np.asarray(apply) & (np.asarray(std) > 1e-6))
    field, _, _ = jax.vmap(lambda k: inten.sample_bias_field(k, img.shape, 0.7, 0.25))(ks)
    np.testing.assert_allclose(np.asarray(out)[changed], np.asarray(field)[changed], rtol=1e-6)


def test_clip_normalise_gamma():
    x = jnp.asarray(np.random.default_rng(1).uniform(-50, 400, (16, 16, 16)), jnp.float32)
    c = np.clip(np.asarray(x), 0, 300)
    norm = (c - c.min()) / (c.max() - c.min() + 1e-7)
    out0 = np.asarray(inten.intensity_augmentation(jax.random.key(0), x, 300.0, True, 0.0))
    np.testing.assert_allclose(out0, norm, atol=1e-6)
    outs = np.asarray(jax.jit(jax.vmap(lambda k: inten.intensity_augmentation(k, x, 300.0, True, 0.5)))(keys(2000, 8)))
    assert outs.min() >= 0 and outs.max() <= 1
    i = np.unravel_index(np.argmin(np.abs(norm - 0.5)), norm.shape)
    gamma = np.log(np.log(outs[(slice(None),) + i]) / np.log(norm[i]))      # out = norm ** exp(g)
    assert abs(gamma.mean()) < 0.04 and abs(gamma.std() / 0.5 - 1) < 0.06
