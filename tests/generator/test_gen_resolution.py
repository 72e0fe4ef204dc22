"""Resolution randomisation: sampled resolutions/thicknesses, blur width, acquisition
(down/up-sampling), against an independent NumPy/SciPy re-implementation."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import correlate1d

from generator import resolution as reso


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_sampled_resolution_distribution():
    n = 6000
    res, thick = jax.jit(jax.vmap(lambda k: reso.sample_resolution(k, [1.0] * 3, [4.0] * 3, [8.0] * 3, 0.1, 0.05)))(
        keys(n))
    res, thick = np.asarray(res), np.asarray(thick)
    n_low = (res > 1).sum(1)
    p_min, p_one, p_three = (n_low == 0).mean(), (n_low == 1).mean(), (n_low == 3).mean()
    tol = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731
    assert abs(p_min - 0.05) < tol(0.05)
    assert abs(p_one - 0.95 * 0.9) < tol(0.855)
    assert abs(p_three - 0.95 * 0.1) < tol(0.095)
    one, three = res[n_low == 1], res[n_low == 3]
    assert one.max() <= 8 and one.max() > 7.9 and one[one > 1].mean() > 4.3       # U(1, 8) on one axis
    assert three.max() <= 4 and three.max() > 3.9
    # the original draws the three 'isotropic' values independently
    assert np.mean(np.abs(three[:, 0] - three[:, 1]) > 0.01) > 0.9
    # the anisotropic axis is uniform over the three axes
    counts = np.bincount(np.argmax(one, 1), minlength=3) / len(one)
    assert np.all(np.abs(counts - 1 / 3) < 0.03)
    # thickness ~ U(1, resolution), exactly 1 where the resolution is 1
    assert np.all(thick >= 1) and np.all(thick <= res + 1e-6)
    assert np.all(thick[res == 1] == 1)
    frac = (thick[res > 1] - 1) / (res[res > 1] - 1)
    assert abs(frac.mean() - 0.5) < 0.02


def test_blur_sigma_rule():
    s = np.asarray(reso.blur_sigma([1.0, 1.0, 1.0], jnp.array([1.0, 3.0, 6.0]), jnp.array([1.0, 2.0, 6.0])))
    np.testing.assert_allclose(s, [0.5, 1.5, 4.5])
    s = np.asarray(reso.blur_sigma([1.0, 1.0, 1.0], jnp.array([2.0, 3.0, 1.0])))
    np.testing.assert_allclose(s, [1.5, 2.25, 0.5])


def test_window_size_rule():
    # window = 2 * floor(ceil(2.5 * max_sigma) / 2) + 1
    assert reso.window_radius(0.75 * 8) == 7          # 15 taps for the 8 mm maximum
    assert reso.window_radius(0.75 * 4) == 4          # ceil(7.5) = 8 -> 9 taps
    assert reso.window_radius(0.5) == 1


def impulse_response_variance(mat, centre):
    col = np.asarray(mat)[:, centre].astype(np.float64)
    t = np.arange(len(col)) - centre
    return (col * t ** 2).sum() / col.sum(), col.sum()


def test_blur_width_matches_sigma():
    n, c = 41, 20
    for sigma in (1.3, 2.2):
        var, total = impulse_response_variance(reso.gaussian_matrix(n, jnp.float32(sigma), 7), c)
        assert abs(total - 1) < 1e-5
        assert abs(np.sqrt(var) / sigma - 1) < 0.01, (sigma, np.sqrt(var))
    # sigma 0.5 (the 1 mm case): a sampled Gaussian's variance is 2 e^-2 / (1 + 2 e^-2), not 0.25
    var, _ = impulse_response_variance(reso.gaussian_matrix(n, jnp.float32(0.5), 1), c)
    assert abs(var - 2 * np.exp(-2) / (1 + 2 * np.exp(-2))) < 1e-6
    # large sigmas are truncated by the original's window: the width is that of the truncated kernel
    sigma = 6.0
    t = np.arange(-7, 8)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    expected = (g * t ** 2).sum() / g.sum()
    var, _ = impulse_response_variance(reso.gaussian_matrix(n, jnp.float32(sigma), 7), c)
    assert abs(var / expected - 1) < 1e-4 and var < 0.5 * sigma ** 2
    # zero padding ('SAME' convolution): mass leaves at the border
    _, total = impulse_response_variance(reso.gaussian_matrix(n, jnp.float32(2.0), 7), 0)
    assert 0.55 < total < 0.65


def test_mimic_acquisition_on_a_ramp():
    # n = 8 at 2 mm: keep voxels 0, 2, 4, 6 (then the clamped last one) and interpolate linearly
    x = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[:, None, None], (8, 3, 3))
    run = jax.jit(lambda x: reso.apply_axis_operators(
        x, reso.axis_operators((8, 3, 3), (8, 3, 3), jnp.zeros(3), jnp.array([2.0, 1.0, 1.0]), 1.0, 0)))
    y = np.asarray(run(x))[:, 0, 0]
    np.testing.assert_allclose(y, [0, 1, 2, 3, 4, 5, 6, 6.5], atol=1e-6)


def numpy_reference(image, sigma, res, radius, atlas_res=1.0):
    """Independent re-implementation of blur + MimicAcquisition (float32 index arithmetic as
    in the original)."""
    x = np.asarray(image, np.float64)
    for ax in range(3):
        t = np.arange(-radius, radius + 1)
        g = np.exp(-t ** 2 / (2 * float(sigma[ax]) ** 2))
        x = correlate1d(x, g / g.sum(), axis=ax, mode='constant', cval=0.0)
    for ax in range(3):
        n = x.shape[ax]
        d = max(int(np.float32(n * atlas_res) / np.float32(res[ax])), 1)
        zoom = np.float32(d) / np.float32(n)
        loc = np.clip(np.arange(n, dtype=np.float32) / zoom, 0, n)
        idx = np.clip(np.round(loc), 0, n - 1).astype(int)           # round half to even
        down = np.take(x, idx, axis=ax)
        up_loc = np.arange(n, dtype=np.float32) / (np.float32(n) / np.float32(d))
        x = np.apply_along_axis(lambda v: np.interp(up_loc, np.arange(n), v), ax, down)
    return x


def test_randomised_acquisition_matches_reference():
    img = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (40, 36, 32)), jnp.float32)
    run = jax.jit(lambda k: reso.randomise_resolution(k, img, img.shape, return_params=True))
    # pick keys covering the three cases (1 mm, one low-resolution axis, three low-resolution axes)
    ks = keys(200, seed=5)
    res = np.asarray(jax.jit(jax.vmap(lambda k: reso.sample_resolution(
        jax.random.split(k)[0], [1.0] * 3, [4.0] * 3, [8.0] * 3, 0.1, 0.05)[0]))(ks))
    n_low = (res > 1).sum(1)
    chosen = [i for c in (0, 1, 3) for i in np.nonzero(n_low == c)[0][:3]]
    assert len(chosen) == 9
    for i in chosen:
        out, p = run(ks[i])
        res_i, sigma = np.asarray(p['resolution']), np.asarray(p['sigma'])
        np.testing.assert_array_equal(res_i, res[i])
        # sigma follows the sampled thickness, times a factor in [1/1.03, 1.03]
        base = np.where(np.asarray(p['thickness']) == 1, 0.5, 0.75 * np.asarray(p['thickness']))
        assert np.all((sigma / base > 1 / 1.03 - 1e-6) & (sigma / base < 1.03 + 1e-6))
        ref = numpy_reference(img, sigma, res_i, p['radius'])
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_fixed_resolution_path():
    img = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (24, 24, 24)), jnp.float32)
    out = jax.jit(lambda k, x: reso.fixed_resolution(k, x, x.shape, 1.0, [1.0, 1.0, 3.0], None, 1.0))(
        jax.random.key(0), img)
    # sigma 0.5, 0.5, 2.25 with per-axis windows of 3, 3 and 7 taps
    x = np.asarray(img, np.float64)
    for ax, (s, r) in enumerate(zip([0.5, 0.5, 2.25], [1, 1, 3])):
        t = np.arange(-r, r + 1)
        g = np.exp(-t ** 2 / (2 * s ** 2))
        x = correlate1d(x, g / g.sum(), axis=ax, mode='constant')
    ref = numpy_reference(x, [1e-9] * 3, [1.0, 1.0, 3.0], 0)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
