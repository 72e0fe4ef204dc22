"""Random spatial deformation: affine (scaling, rotation, shearing, translation) composed with a
diffeomorphic non-linear field (a small stationary velocity field, upsampled and integrated by
scaling and squaring), followed by a random crop.  The label map is resampled exactly once
(nearest neighbour) through the composed transform, and only at the voxels of the output crop.

Conventions follow SynthSeg's labels-to-image model (voxel coordinates, 'ij' indexing):

* the affine acts on voxel coordinates centred on the middle of the input volume,
  ``A = diag(scaling) @ shearing @ Rx @ Ry @ Rz`` (angles in degrees);
* the velocity field is drawn on a grid of ``ceil(nonlin_scale * shape)`` nodes with a std
  drawn from ``U(0, nonlin_std)``, linearly resized to half the input shape, integrated with
  ``int_steps`` scaling-and-squaring steps there, and linearly resized to the input shape; its
  values are used as voxel displacements without rescaling (as in the original);
* a voxel ``x`` of the deformed volume takes the label found at
  ``A @ (x - c + u(x)) + t + c`` where ``c`` is the volume centre;
* the output is a crop of the deformed volume at an offset drawn from ``U{0, shape - crop - 1}``.

All functions are pure and shape-static; randomness only comes from the explicit keys.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------- random parameters

def bounds_to_range(bounds, centre: float, n: int) -> Optional[np.ndarray]:
    """Turn a bounds specification into a (2, n) array of [low, high].

    ``False``/``None`` -> None (disabled); a number ``b`` -> ``[centre - b, centre + b]``; a pair
    ``[lo, hi]`` -> those bounds for every axis; a (2, n) nested list -> as given.
    """
    if bounds is None or bounds is False:
        return None
    arr = np.asarray(bounds, dtype=np.float64)
    if arr.ndim == 0:
        return np.stack([np.full(n, centre - float(arr)), np.full(n, centre + float(arr))])
    if arr.shape == (2,):
        return np.stack([np.full(n, arr[0]), np.full(n, arr[1])])
    if arr.shape == (2, n):
        return arr
    raise ValueError(f"bounds must be a number, a [low, high] pair or a (2, {n}) array, got {bounds!r}")


def _scale(u: Array, rng: np.ndarray) -> Array:
    lo = jnp.asarray(rng[0], jnp.float32)
    hi = jnp.asarray(rng[1], jnp.float32)
    return lo + (hi - lo) * u


def rotation_matrix(angles_deg: Array) -> Array:
    """3-D rotation ``Rx(a0) @ Ry(a1) @ Rz(a2)`` for angles in degrees."""
    a = jnp.deg2rad(angles_deg)
    c, s = jnp.cos(a), jnp.sin(a)
    one, zero = jnp.ones_like(c[0]), jnp.zeros_like(c[0])
    rx = jnp.array([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
    ry = jnp.array([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
    rz = jnp.array([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
    return rx @ ry @ rz


def shearing_matrix(shear: Array) -> Array:
    """Shearing matrix with ones on the diagonal and the six values off-diagonal (row-major)."""
    one = jnp.ones_like(shear[0])
    return jnp.array([[one, shear[0], shear[1]],
                      [shear[2], one, shear[3]],
                      [shear[4], shear[5], one]])


def sample_affine(key: Array, scaling_bounds=0.2, rotation_bounds=15.0, shearing_bounds=0.012,
                  translation_bounds=False) -> dict:
    """Draw a random affine transform.

    Returns a dict with the drawn ``rotation`` (deg, 3), ``scaling`` (3), ``shearing`` (6),
    ``translation`` (voxels, 3) and the resulting 3x3 ``matrix`` ``S @ Sh @ R``.
    """
    # one draw for all parameters (fewer PRNG call sites keep the compile time down)
    u = jax.random.uniform(key, (15,), jnp.float32)
    rot_r = bounds_to_range(rotation_bounds, 0.0, 3)
    sh_r = bounds_to_range(shearing_bounds, 0.0, 6)
    sc_r = bounds_to_range(scaling_bounds, 1.0, 3)
    tr_r = bounds_to_range(translation_bounds, 0.0, 3)
    rotation = _scale(u[0:3], rot_r) if rot_r is not None else jnp.zeros(3, jnp.float32)
    shearing = _scale(u[3:9], sh_r) if sh_r is not None else jnp.zeros(6, jnp.float32)
    scaling = _scale(u[9:12], sc_r) if sc_r is not None else jnp.ones(3, jnp.float32)
    translation = _scale(u[12:15], tr_r) if tr_r is not None else jnp.zeros(3, jnp.float32)
    matrix = jnp.diag(scaling) @ shearing_matrix(shearing) @ rotation_matrix(rotation)
    return dict(rotation=rotation, scaling=scaling, shearing=shearing, translation=translation,
                matrix=matrix)


# --------------------------------------------------------------------------- linear resizing

def resize_weights(n_in: int, positions: Array) -> Tuple[Array, Array, Array, Array]:
    """Indices/weights for 1-D linear interpolation at ``positions`` (clamped to the edges)."""
    p = jnp.clip(positions, 0.0, n_in - 1.0)
    i0 = jnp.clip(jnp.floor(positions), 0, n_in - 1)
    i1 = jnp.clip(i0 + 1, 0, n_in - 1)
    w0 = i1 - p
    w1 = 1.0 - w0
    return i0.astype(jnp.int32), i1.astype(jnp.int32), w0, w1


def interp_matrix(n_in: int, positions: Array) -> Array:
    """``[len(positions), n_in]`` matrix of 1-D linear interpolation (edge-clamped)."""
    i0, i1, w0, w1 = resize_weights(n_in, positions)
    return (jax.nn.one_hot(i0, n_in, dtype=jnp.float32) * w0[:, None]
            + jax.nn.one_hot(i1, n_in, dtype=jnp.float32) * w1[:, None])


def interp_axis(x: Array, axis: int, positions: Array, method: str = 'matrix') -> Array:
    """Linearly interpolate ``x`` along ``axis`` at the given (1-D) positions, edge-clamped.

    ``method='matrix'`` is a small matrix product: XLA:CPU handles it much better than a gather
    whose operand is produced by a fusible op of the same computation (it may fuse the producer
    and recompute it per output element).  ``'gather'`` (two takes) is faster when the operand is
    large and already materialised (e.g. the output of the integration loop).
    """
    if method == 'gather':
        i0, i1, w0, w1 = resize_weights(x.shape[axis], positions)
        shape = [1] * x.ndim
        shape[axis] = positions.shape[0]
        return (jnp.take(x, i0, axis=axis) * w0.reshape(shape)
                + jnp.take(x, i1, axis=axis) * w1.reshape(shape))
    w = interp_matrix(x.shape[axis], positions)
    y = jnp.tensordot(w, jnp.moveaxis(x, axis, 0), axes=(1, 0), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, 0, axis)


def resize_linear(x: Array, new_shape: Sequence[int], n_spatial: int = 3) -> Array:
    """Linear resize of the first ``n_spatial`` axes (neuron's 'zoom' convention): output voxel
    ``j`` along an axis of size ``n -> m`` reads input position ``j * n / m`` (edge-clamped)."""
    for ax in range(n_spatial):
        n, m = x.shape[ax], int(new_shape[ax])
        if n == m:
            continue
        pos = jnp.arange(m, dtype=jnp.float32) * (n / m)
        x = interp_axis(x, ax, pos)
    return x


def resize_linear_crop(x: Array, full_shape: Sequence[int], offsets: Array, crop_shape: Sequence[int]) -> Array:
    """The ``crop_shape`` block at ``offsets`` of ``resize_linear(x, full_shape)``, without
    computing the rest."""
    for ax in range(3):
        n, m = x.shape[ax], int(full_shape[ax])
        pos = (offsets[ax] + jnp.arange(crop_shape[ax])).astype(jnp.float32) * (n / m)
        x = interp_axis(x, ax, pos, method='gather')
    return x


# --------------------------------------------------------------------------- velocity field

def trilinear_vector(field: Array, pos: Array) -> Array:
    """Sample a vector field ``[X, Y, Z, C]`` at voxel positions ``[..., 3]`` (edge-clamped)."""
    shp = field.shape[:3]
    flat = field.reshape(-1, field.shape[-1])
    lo, hi, wlo, whi = [], [], [], []
    for d in range(3):
        i0, i1, w0, w1 = resize_weights(shp[d], pos[..., d])
        lo.append(i0), hi.append(i1), wlo.append(w0), whi.append(w1)
    out = None
    for cx in (0, 1):
        ix, wx = (lo[0], wlo[0]) if cx == 0 else (hi[0], whi[0])
        for cy in (0, 1):
            iy, wy = (lo[1], wlo[1]) if cy == 0 else (hi[1], whi[1])
            for cz in (0, 1):
                iz, wz = (lo[2], wlo[2]) if cz == 0 else (hi[2], whi[2])
                idx = (ix * shp[1] + iy) * shp[2] + iz
                val = jnp.take(flat, idx.reshape(-1), axis=0).reshape(pos.shape[:-1] + (field.shape[-1],))
                term = (wx * wy * wz)[..., None] * val
                out = term if out is None else out + term
    return out


def integrate_svf(vel: Array, steps: int = 7) -> Array:
    """Scaling and squaring: displacement of the flow at time 1 of the stationary field ``vel``
    (``[X, Y, Z, 3]``, voxel units), with linear interpolation and edge clamping."""
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in vel.shape[:3]],
                                  indexing='ij'), -1)
    disp = vel / (2.0 ** steps)

    def body(_, d):
        return d + trilinear_vector(d, grid + d)

    return jax.lax.fori_loop(0, steps, body, disp)


def svf_shapes(label_shape: Sequence[int], nonlin_scale: float, integration_factor: float):
    """Static shapes of the velocity field: (small sampled grid, original half-size grid,
    grid on which we integrate)."""
    small = [math.ceil(s * nonlin_scale) for s in label_shape]
    half = [max(int(s / 2), sm) for s, sm in zip(label_shape, small)]
    integ = [max(int(s * integration_factor), sm) for s, sm in zip(label_shape, small)]
    return small, half, integ


def sample_displacement(key: Array, label_shape: Sequence[int], nonlin_std: float, nonlin_scale: float,
                        int_steps: int = 7, integration_factor: float = 0.5,
                        std: Optional[Array] = None) -> Tuple[Array, Array]:
    """Draw the integrated non-linear displacement on the integration grid.

    Returns ``(disp, std)`` where ``disp`` is ``[*integ_shape, 3]`` in units of voxels of the
    original's half-size grid (which the original applies unchanged as full-size voxels), and
    ``std`` the drawn standard deviation of the small velocity field.

    ``integration_factor`` 0.5 integrates on the original's half-size grid; smaller values
    integrate the same (rescaled) field on a coarser grid: ~7x cheaper at 0.25, at the price of
    a larger discretisation error (RMS ~0.1 voxel from the half-grid result at the largest std;
    see BENCHMARKS.md).
    """
    small, half, integ = svf_shapes(label_shape, nonlin_scale, integration_factor)
    k_std, k_field = jax.random.split(key)
    if std is None:
        std = jax.random.uniform(k_std, (), jnp.float32) * nonlin_std
    vel = jax.random.normal(k_field, tuple(small) + (3,), jnp.float32) * std
    # rescale so that displacements are expressed in voxels of the integration grid
    ratio = jnp.asarray([i / h for i, h in zip(integ, half)], jnp.float32)
    vel = resize_linear(vel, integ) * ratio
    disp = integrate_svf(vel, int_steps) / ratio
    return disp, std


# --------------------------------------------------------------------------- composed transform

def sample_crop_offset(key: Array, in_shape: Sequence[int], crop_shape: Sequence[int]) -> Array:
    """Random crop corner, ``floor(U(0, in - crop))`` per axis (0 if no room)."""
    room = jnp.asarray([max(i - c, 0) for i, c in zip(in_shape, crop_shape)], jnp.float32)
    u = jax.random.uniform(key, (3,), jnp.float32)
    return jnp.floor(u * room).astype(jnp.int32)


def source_positions(matrix: Array, translation: Array, disp: Optional[Array], label_shape: Sequence[int],
                     crop_offset: Array, crop_shape: Sequence[int]) -> Array:
    """Positions (voxels of the input label map) sampled by each voxel of the output crop.

    ``disp`` is the integrated displacement on its own (coarse) grid, resized linearly to the
    label shape (only the crop's part is evaluated).
    """
    centre = jnp.asarray([(s - 1) / 2.0 for s in label_shape], jnp.float32)
    axes = [(crop_offset[d] + jnp.arange(crop_shape[d])).astype(jnp.float32) - centre[d] for d in range(3)]
    # affine part of A @ x_c is separable: sum of three broadcast 1-D terms
    bshape = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    if disp is not None:
        disp = resize_linear_crop(disp, label_shape, crop_offset, crop_shape)
    out = []
    for i in range(3):
        p = translation[i] + centre[i]
        for j in range(3):
            p = p + matrix[i, j] * axes[j].reshape(bshape[j])
            if disp is not None:
                p = p + matrix[i, j] * disp[..., j]
        out.append(jnp.broadcast_to(p, tuple(crop_shape)))
    return jnp.stack(out, -1)


def nearest_resample(volume: Array, pos: Array) -> Array:
    """Nearest-neighbour lookup (round half to even, edge-clamped) of ``volume`` at ``pos``."""
    # materialise the positions first: otherwise XLA:CPU may fuse their whole computation into
    # the gather (seen under vmap: ~10x slower)
    pos = jax.lax.optimization_barrier(pos)
    shp = volume.shape
    idx = None
    for d in range(3):
        i = jnp.clip(jnp.round(pos[..., d]), 0, shp[d] - 1).astype(jnp.int32)
        idx = i if idx is None else idx * shp[d] + i
    return volume.reshape(-1).at[idx.reshape(-1)].get(mode='promise_in_bounds').reshape(pos.shape[:-1])


def deform_and_crop(key: Array, label_map: Array, crop_shape: Sequence[int], *, scaling_bounds=0.2,
                    rotation_bounds=15.0, shearing_bounds=0.012, translation_bounds=False,
                    nonlin_std=4.0, nonlin_scale=0.04, int_steps=7, integration_factor=0.5,
                    return_params: bool = False):
    """Deform ``label_map`` (any integer dtype) with a random affine + diffeomorphic transform and
    crop it to ``crop_shape``; one nearest-neighbour resampling, evaluated only inside the crop."""
    label_shape = label_map.shape
    crop_shape = [min(c, s) for c, s in zip(crop_shape, label_shape)]
    k_aff, k_nl, k_crop = jax.random.split(key, 3)
    aff = sample_affine(k_aff, scaling_bounds, rotation_bounds, shearing_bounds, translation_bounds)
    disp, std = (None, jnp.zeros((), jnp.float32))
    if nonlin_std and nonlin_std > 0:
        disp, std = sample_displacement(k_nl, label_shape, nonlin_std, nonlin_scale, int_steps,
                                        integration_factor)
    offset = sample_crop_offset(k_crop, label_shape, crop_shape)
    pos = source_positions(aff['matrix'], aff['translation'], disp, label_shape, offset, crop_shape)
    out = nearest_resample(label_map, pos)
    if return_params:
        return out, dict(aff, nonlin_std=std, crop_offset=offset, positions=pos)
    return out
