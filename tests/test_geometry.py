"""RAS alignment and resampling (synthseg_jax/geometry.py)."""

import numpy as np
import pytest

from synthseg_jax.geometry import (
    RasAlignment,
    needs_resampling,
    ras_axes,
    resample_grid,
    resample_like,
    resample_to_voxel_size,
)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def permuted_affine(rng, zooms=(1.0, 1.0, 1.0), tilt=0.2):
    """A voxel->world affine made of an axis permutation, flips, scaling, a small rotation."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], 3)
    m = np.zeros((3, 3))
    m[perm, np.arange(3)] = signs * np.asarray(zooms)
    small = np.eye(3) + tilt * rng.uniform(-1, 1, (3, 3))
    aff = np.eye(4)
    aff[:3, :3] = small @ m
    aff[:3, 3] = rng.uniform(-50, 50, 3)
    return aff


def world(aff, idx):
    return aff[:3, :3] @ np.asarray(idx, dtype=float) + aff[:3, 3]


@pytest.mark.parametrize("seed", range(12))
def test_ras_alignment_round_trip_and_world_coordinates(seed):
    rng = np.random.default_rng(seed)
    aff = permuted_affine(rng)
    shape = tuple(int(s) for s in rng.integers(3, 9, 3))
    vol = rng.normal(size=shape + (2,))
    al = RasAlignment.from_affine(aff)
    ras = al.to_ras(vol)
    # exact inverse
    np.testing.assert_array_equal(al.from_ras(ras), vol)
    assert ras.shape == al.ras_shape(shape + (2,))
    # the aligned affine is close to diagonal with positive diagonal
    ras_aff = al.ras_affine(aff, shape)
    assert np.all(np.diag(ras_aff)[:3] > 0)
    assert np.all(np.argmax(np.abs(ras_aff[:3, :3]), axis=0) == np.arange(3))
    # every voxel keeps its world position
    for _ in range(5):
        i = tuple(int(rng.integers(0, s)) for s in ras.shape[:3])
        j = np.linalg.solve(aff[:3, :3], world(ras_aff, i) - aff[:3, 3])
        j = tuple(int(round(v)) for v in j)
        np.testing.assert_array_equal(ras[i], vol[j])


def test_ras_axes_ties_give_a_permutation():
    # a 45 degree rotation in the x-y plane: both world axes prefer the same voxel axis
    c = np.sqrt(0.5)
    aff = np.array([[c, -c, 0, 0], [c, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    axes = ras_axes(aff)
    assert sorted(axes.tolist()) == [0, 1, 2]


def test_identity_and_lia_alignment():
    eye = RasAlignment.from_affine(np.eye(4))
    assert eye.permutation == (0, 1, 2) and not any(eye.flips)
    # FreeSurfer's conformed LIA orientation
    lia = np.array([[-1, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1.0]])
    al = RasAlignment.from_affine(lia)
    assert al.permutation == (0, 2, 1) and al.flips == (True, False, True)


def test_resampling_grid_and_values():
    # 1 x 1 x 3 mm: 3 slices become 9; positions as the original computes them
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    positions, new_aff = resample_grid(aff, (4, 4, 3))
    assert [len(p) for p in positions] == [4, 4, 9]
    np.testing.assert_allclose(positions[2][:3], [-1 / 3, 0, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(new_aff[:3, :3], np.eye(3))
    # the new grid's voxel k sits at the old position positions[k] (in world space)
    np.testing.assert_allclose(world(new_aff, (0, 0, 4)), world(aff, (0, 0, positions[2][4])))
    # a linear ramp along z stays a ramp (clamped at the ends)
    vol = np.broadcast_to(np.arange(3.0) * 10, (4, 4, 3)).copy()
    out, _ = resample_to_voxel_size(vol, aff)
    np.testing.assert_allclose(out[0, 0], np.clip(positions[2], 0, 2) * 10, atol=1e-9)


def test_resampling_matches_scipy_trilinear():
    from scipy.interpolate import RegularGridInterpolator

    rng = np.random.default_rng(3)
    vol = rng.normal(size=(5, 6, 4))
    aff = np.diag([1.3, 2.0, 3.0, 1.0])
    out, _ = resample_to_voxel_size(vol, aff)
    positions, _ = resample_grid(aff, vol.shape)
    clamped = [np.clip(p, 0, n - 1) for p, n in zip(positions, vol.shape)]
    interp = RegularGridInterpolator([np.arange(n) for n in vol.shape], vol)
    expected = interp(tuple(np.meshgrid(*clamped, indexing="ij")))
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_needs_resampling():
    assert not needs_resampling([1.0, 0.96, 1.04])
    assert needs_resampling([1.0, 1.0, 1.06])
    assert needs_resampling([0.9, 1.0, 1.0])


def test_resample_like_identity_and_nearest():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, (6, 6, 6))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(resample_like(seg, aff, seg.shape, aff, order=0), seg)
    # onto a 2 mm grid whose voxel centres coincide with even 1 mm voxels
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_array_equal(resample_like(seg, aff, (3, 3, 3), target, order=0), seg[::2, ::2, ::2])
