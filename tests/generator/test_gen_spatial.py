"""Spatial deformation: sampled parameters within bounds, composition order, diffeomorphism
(positive Jacobian), scaling and squaring, resampling conventions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from generator import spatial


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_affine_parameters_within_bounds_and_spread():
    aff = jax.jit(jax.vmap(lambda k: spatial.sample_affine(k, 0.2, 15.0, 0.012, False)))(keys(4000))
    rot, sc, sh, tr = (np.asarray(aff[k]) for k in ('rotation', 'scaling', 'shearing', 'translation'))
    assert rot.shape == (4000, 3) and sh.shape == (4000, 6)
    assert np.all(np.abs(rot) <= 15.0) and np.all(np.abs(sc - 1) <= 0.2 + 1e-6) and np.all(np.abs(sh) <= 0.012)
    assert np.all(tr == 0)
    # uniform over the whole range: extremes reached, mean centred, variance of U(-b, b) = b^2 / 3
    assert rot.max() > 14.8 and rot.min() < -14.8 and sc.max() > 1.198 and sc.min() < 0.802
    assert abs(rot.mean()) < 0.5 and abs(rot.var() - 15 ** 2 / 3) < 0.05 * 15 ** 2 / 3
    assert abs(sc.mean() - 1) < 0.005 and abs(sh.var() - 0.012 ** 2 / 3) < 0.05 * 0.012 ** 2 / 3
    # axes drawn independently
    assert abs(np.corrcoef(rot[:, 0], rot[:, 1])[0, 1]) < 0.05


def test_affine_disabled_and_explicit_bounds():
    a = spatial.sample_affine(jax.random.key(1), False, False, False, [2.0, 3.0])
    np.testing.assert_allclose(a['matrix'], np.eye(3), atol=1e-7)
    assert np.all((np.asarray(a['translation']) >= 2) & (np.asarray(a['translation']) <= 3))


def test_affine_matrix_is_scaling_shearing_rotation():
    a = spatial.sample_affine(jax.random.key(3), 0.2, 15.0, 0.012, False)
    rot = Rotation.from_euler('XYZ', np.asarray(a['rotation'], np.float64), degrees=True).as_matrix()  # Rx Ry Rz
    s = np.asarray(a['shearing'], np.float64)
    shear = np.array([[1, s[0], s[1]], [s[2], 1, s[3]], [s[4], s[5], 1]])
    expected = np.diag(np.asarray(a['scaling'], np.float64)) @ shear @ rot
    np.testing.assert_allclose(np.asarray(a['matrix']), expected, atol=1e-6)


def test_identity_transform_is_a_plain_crop():
    vol = jnp.asarray(np.random.default_rng(0).integers(0, 50, (40, 36, 32)), jnp.uint8)
    out, p = spatial.deform_and_crop(jax.random.key(5), vol, (24, 20, 16), scaling_bounds=False,
                                     rotation_bounds=False, shearing_bounds=False, nonlin_std=0,
                                     return_params=True)
    o = np.asarray(p['crop_offset'])
    assert np.all(o >= 0) and np.all(o < np.array([16, 16, 16]))
    np.testing.assert_array_equal(out, np.asarray(vol)[o[0]:o[0] + 24, o[1]:o[1] + 20, o[2]:o[2] + 16])


def test_crop_offsets_cover_the_range():
    offs = np.asarray(jax.vmap(lambda k: spatial.sample_crop_offset(k, (256, 256, 256), (160, 160, 160)))(keys(3000)))
    assert offs.min() == 0 and offs.max() == 95       # floor(U(0, 96)): 96 never drawn


def test_pure_scaling_samples_the_scaled_positions():
    # scaling fixed to 2 on every axis: voxel x reads 2 (x - c) + c
    shape = (21, 21, 21)
    pos = spatial.source_positions(jnp.eye(3) * 2.0, jnp.zeros(3), None, shape, jnp.array([5, 5, 5]), (11, 11, 11))
    c = 10.0
    x = np.arange(5, 16, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(pos)[:, 0, 0, 0], 2 * (x - c) + c, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pos)[3, :, 2, 1], 2 * (x - c) + c, atol=1e-5)


def jacobian_det(pos):
    """Finite-difference Jacobian determinant of a position field [X, Y, Z, 3]."""
    p = np.asarray(pos, np.float64)
    d = [np.diff(p, axis=a)[:p.shape[0] - 1, :p.shape[1] - 1, :p.shape[2] - 1] for a in range(3)]
    jac = np.stack(d, -1)   # [..., component, axis]
    return np.linalg.det(jac)


@pytest.mark.parametrize('factor,n_keys', [(0.5, 4)])     # (the 0.25 option: see the grid test below)
def test_deformation_has_positive_jacobian(factor, n_keys):
    """Full composed transform (affine + integrated field at the largest std) is a
    diffeomorphism on the grid, and the field is not trivially small."""
    shape = (64, 64, 64)

    @jax.jit
    def positions(k):
        k_aff, k_nl = jax.random.split(k)
        aff = spatial.sample_affine(k_aff, 0.2, 15.0, 0.012, False)
        disp, _ = spatial.sample_displacement(k_nl, shape, 4.0, 0.04, 7, factor, std=jnp.float32(4.0))
        pos = spatial.source_positions(aff['matrix'], aff['translation'], disp, shape, jnp.zeros(3, jnp.int32), shape)
        return pos, jnp.abs(disp).max()

    dets, max_disp = [], 0.0
    for k in keys(n_keys, seed=11):
        pos, m = positions(k)
        max_disp = max(max_disp, float(m))
        dets.append(jacobian_det(pos))
    dets = np.stack(dets)
    assert max_disp > 1.0
    assert dets.min() > 0, dets.min()
    # volume change stays within the affine scaling range (0.8^3 .. 1.2^3) up to the non-linear part
    assert 0.2 < np.median(dets) < 2.0


def test_jacobian_check_can_fail_without_integration():
    """Negative control: the same kind of field used directly as a displacement (no scaling and
    squaring) folds, so the Jacobian test above is not vacuous."""
    shape = (32, 32, 32)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij'), -1)

    @jax.jit
    def fields(k):
        vel = spatial.resize_linear(jax.random.normal(k, (4, 4, 4, 3)) * 4.0, shape)
        return vel, spatial.integrate_svf(vel, 7)

    for k in keys(3, seed=0):
        vel, disp = fields(k)
        assert jacobian_det(grid + np.asarray(vel)).min() < 0
        assert jacobian_det(grid + np.asarray(disp)).min() > 0


def test_scaling_and_squaring_of_constant_field_is_a_translation():
    v = jnp.broadcast_to(jnp.array([1.5, -2.0, 0.75], jnp.float32), (24, 24, 24, 3))
    d = np.asarray(spatial.integrate_svf(v, 7))
    np.testing.assert_allclose(d[6:-6, 6:-6, 6:-6], np.broadcast_to([1.5, -2.0, 0.75], d[6:-6, 6:-6, 6:-6].shape),
                               atol=1e-5)


def test_scaling_and_squaring_matches_ode_integration():
    """The integrated displacement equals the flow of dx/dt = v(x) at t = 1 (solved with an
    accurate ODE solver on the same trilinear field) up to the scheme's discretisation error,
    and is far from the non-integrated field v."""
    from scipy.integrate import solve_ivp
    from scipy.ndimage import map_coordinates
    shape = (32, 32, 32)
    v, ss = jax.jit(lambda k: (lambda v: (v, spatial.integrate_svf(v, 7)))(
        spatial.resize_linear(jax.random.normal(k, (4, 4, 4, 3)) * 2.0, shape)))(jax.random.key(4))
    vn, ss = np.asarray(v, np.float64), np.asarray(ss)
    pts = np.random.default_rng(0).uniform(8, 23, size=(200, 3))

    def f(t, y):
        p = y.reshape(3, -1)
        return np.stack([map_coordinates(vn[..., c], p, order=1, mode='nearest') for c in range(3)]).ravel()

    end = solve_ivp(f, (0, 1), pts.T.ravel(), rtol=1e-8, atol=1e-8).y[:, -1].reshape(3, -1).T
    u_ode = end - pts
    u_ss = np.stack([map_coordinates(ss[..., c], pts.T, order=1) for c in range(3)], 1)
    u_v = np.stack([map_coordinates(vn[..., c], pts.T, order=1) for c in range(3)], 1)
    err_ss, err_v = np.abs(u_ss - u_ode).max(), np.abs(u_v - u_ode).max()
    assert np.abs(u_ode).max() > 3.0
    assert err_ss < 0.08 * np.abs(u_ode).max(), err_ss
    assert err_v > 3 * err_ss


def test_integration_grid_option_stays_close_to_the_original_half_grid():
    """The default integrates on the original's half-size grid; the faster quarter-size option
    (nonlin_integration_factor=0.25) gives a displacement within a fraction of a voxel (RMS) of
    it at the largest velocity std -- the figure quoted in BENCHMARKS.md."""
    shape = (96, 96, 96)

    @jax.jit
    def both(k):
        d_half, _ = spatial.sample_displacement(k, shape, 4.0, 0.04, 7, 0.5, std=jnp.float32(4.0))
        d_quarter, _ = spatial.sample_displacement(k, shape, 4.0, 0.04, 7, 0.25, std=jnp.float32(4.0))
        a = spatial.resize_linear(d_half, shape)
        b = spatial.resize_linear(d_quarter, shape)
        return jnp.abs(a).max(), jnp.sqrt(jnp.mean((a - b) ** 2))

    for k in keys(1, seed=8):
        amp, rms = both(k)
        assert float(amp) > 2.0
        assert float(rms) < 0.25, float(rms)


def test_resize_linear_follows_zoom_convention():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 5)), jnp.float32)
    y = np.asarray(spatial.resize_linear(x, (160, 3, 5)))
    pos = np.arange(160) * 4 / 160                      # output j reads input j * n / m, edge-clamped
    for a in range(3):
        for b in range(5):
            np.testing.assert_allclose(y[:, a, b], np.interp(pos, np.arange(4), np.asarray(x)[:, a, b]), atol=1e-5)
    assert np.allclose(y[120:, 0, 0], np.asarray(x)[3, 0, 0])   # constant beyond the last node


def test_nearest_resample_rounds_half_to_even_and_clamps():
    vol = jnp.arange(5 * 4 * 3, dtype=jnp.int32).reshape(5, 4, 3)
    pos = jnp.array([[[[0.5, 1.5, 2.49], [10.0, -3.0, 1.0]]]], jnp.float32)
    out = np.asarray(spatial.nearest_resample(vol, pos))
    v = np.asarray(vol)
    assert out[0, 0, 0] == v[0, 2, 2] and out[0, 0, 1] == v[4, 0, 1]
