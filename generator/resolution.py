"""Resolution randomisation: sample an acquisition resolution and slice thickness, blur with the
matching Gaussian, downsample (nearest) to that resolution and upsample (linear) back.

Follows SynthSeg's ``SampleResolution``, ``blurring_sigma_for_downsampling``,
``DynamicGaussianBlur`` and ``MimicAcquisition``:

* with probability ``prob_min`` the resolution is the label maps' own; otherwise, with
  probability ``prob_iso``, each axis is drawn from ``U(min_res, max_res_iso)`` (the original
  draws the three axes independently, despite its docstring), else one random axis is drawn
  from ``U(min_res, max_res_aniso)`` and the others keep ``min_res``;
* thickness ``~ U(min_res, resolution)`` per axis; blur sigma (voxels) is
  ``0.75 * thickness / atlas_res`` (0.5 where the thickness equals the atlas resolution), each
  multiplied by ``U(1 / blur_range, blur_range)``; kernels are truncated to a window of
  ``2 * floor(ceil(2.5 * max_sigma) / 2) + 1`` taps where ``max_sigma = 0.75 * max_res``, and
  normalised; convolution is zero-padded ('SAME');
* downsampling keeps voxel ``round(i * n / d)`` for ``d = int(n * atlas_res / res)``; upsampling
  interpolates linearly at ``j * d / n_out``.

All three steps are linear and separable, so per axis they are folded into one small
``n_out x n`` matrix (blur, then down, then up) applied with three matrix products.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sample_resolution(key: Array, min_res: Sequence[float], max_res_iso: Optional[Sequence[float]] = None,
                      max_res_aniso: Optional[Sequence[float]] = None, prob_iso: float = 0.1,
                      prob_min: float = 0.05) -> Tuple[Array, Array]:
    """Draw ``(resolution, thickness)`` in mm, each of shape ``[3]``."""
    min_np = np.asarray(min_res, np.float64).reshape(-1)
    n = min_np.shape[0]
    if max_res_iso is not None and np.array_equal(np.asarray(max_res_iso, float), min_np):
        max_res_iso = None
    if max_res_aniso is not None and np.array_equal(np.asarray(max_res_aniso, float), min_np):
        max_res_aniso = None
    min_res = jnp.asarray(min_np, jnp.float32)
    u = jax.random.uniform(key, (3 * n + 3,), jnp.float32)     # one draw (fewer PRNG call sites)
    u_iso, u_aniso, u_thick = u[:n], u[n:2 * n], u[2 * n:3 * n]
    dim = jnp.minimum(jnp.floor(u[3 * n] * n).astype(jnp.int32), n - 1)
    u_choice, u_min = u[3 * n + 1], u[3 * n + 2]
    mask = jnp.arange(n) == dim

    def uni(v, hi):
        hi = jnp.asarray(hi, jnp.float32)
        return min_res + (hi - min_res) * v

    if max_res_iso is None and max_res_aniso is None:
        res = min_res
    elif max_res_aniso is None:
        res = uni(u_iso, max_res_iso)
    elif max_res_iso is None:
        res = jnp.where(mask, uni(u_aniso, max_res_aniso), min_res)
    else:
        iso = uni(u_iso, max_res_iso)
        aniso = jnp.where(mask, uni(u_aniso, max_res_aniso), min_res)
        res = jnp.where(u_choice < prob_iso, iso, aniso)
    if not (max_res_iso is None and max_res_aniso is None):
        res = jnp.where(u_min < prob_min, min_res, res)
    thickness = min_res + (res - min_res) * u_thick
    return res, thickness


def blur_sigma(atlas_res: Sequence[float], resolution: Array, thickness: Optional[Array] = None) -> Array:
    """Gaussian std (voxels) to blur before downsampling to ``resolution`` with slice
    ``thickness``: ``0.75 * min(res, thickness) / atlas_res``, or 0.5 where that equals the
    atlas resolution, and 0 where it is 0."""
    cur = jnp.asarray(atlas_res, jnp.float32)
    down = resolution if thickness is None else jnp.minimum(resolution, thickness)
    sigma = jnp.where(down == cur, 0.5, 0.75 * down / cur)
    return jnp.where(down == 0, 0.0, sigma)


def window_radius(max_sigma: float) -> int:
    """Half-width of the blurring window for a maximum sigma (original's window size rule)."""
    size = int(np.int32(np.ceil(2.5 * max_sigma) / 2)) * 2 + 1
    return (size - 1) // 2


def gaussian_matrix(n: int, sigma: Array, radius: int) -> Array:
    """``n x n`` matrix of a zero-padded 'SAME' convolution with a normalised Gaussian truncated
    at ``radius`` taps (identity if ``radius == 0`` or ``sigma == 0``)."""
    i = jnp.arange(n)
    d = (i[None, :] - i[:, None]).astype(jnp.float32)
    safe = jnp.where(sigma > 0, sigma, 1.0)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    g = jnp.exp(-taps ** 2 / (2 * safe ** 2))
    z = jnp.sum(g)
    m = jnp.where(jnp.abs(d) <= radius, jnp.exp(-d ** 2 / (2 * safe ** 2)) / z, 0.0)
    return jnp.where(sigma > 0, m, jnp.eye(n, dtype=jnp.float32))


def acquisition_matrices(n: int, n_out: int, resolution: Array, atlas_res: float):
    """Per-axis nearest-downsampling ``[n, n]`` (only the first ``d`` rows are meaningful) and
    linear-upsampling ``[n_out, n]`` matrices of MimicAcquisition for one axis."""
    d = jnp.floor((jnp.float32(n * atlas_res) / resolution)).astype(jnp.int32)
    d = jnp.maximum(d, 1)
    down_zoom = d.astype(jnp.float32) / jnp.float32(n)
    loc = jnp.arange(n, dtype=jnp.float32) / down_zoom
    loc = jnp.clip(loc, 0.0, float(n))
    idx = jnp.clip(jnp.round(loc), 0, n - 1).astype(jnp.int32)
    down = jax.nn.one_hot(idx, n, dtype=jnp.float32)                      # [n, n]
    up_zoom = jnp.float32(n_out) / d.astype(jnp.float32)
    up_loc = jnp.arange(n_out, dtype=jnp.float32) / up_zoom
    p = jnp.clip(up_loc, 0.0, n - 1.0)
    i0 = jnp.clip(jnp.floor(up_loc), 0, n - 1)
    i1 = jnp.clip(i0 + 1, 0, n - 1)
    w0 = i1 - p
    w1 = 1.0 - w0
    up = (jax.nn.one_hot(i0.astype(jnp.int32), n, dtype=jnp.float32) * w0[:, None]
          + jax.nn.one_hot(i1.astype(jnp.int32), n, dtype=jnp.float32) * w1[:, None])  # [n_out, n]
    return down, up, d


def axis_operators(shape: Sequence[int], out_shape: Sequence[int], sigma: Array, resolution: Array,
                   atlas_res: float, radius, downsample: bool = True):
    """The three per-axis matrices ``up @ down @ blur`` (``radius``: int or one per axis)."""
    radii = [int(r) for r in np.broadcast_to(np.asarray(radius), (3,))]
    mats = []
    for ax in range(3):
        b = gaussian_matrix(shape[ax], sigma[ax], radii[ax])
        if downsample:
            down, up, _ = acquisition_matrices(shape[ax], out_shape[ax], resolution[ax], atlas_res)
            b = up @ (down @ b)
        mats.append(b)
    return mats


def apply_axis_operators(x: Array, mats) -> Array:
    """Apply one matrix per spatial axis of a 3-D volume."""
    x = jnp.einsum('ia,ajk->ijk', mats[0], x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum('jb,ibk->ijk', mats[1], x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum('kc,ijc->ijk', mats[2], x, precision=jax.lax.Precision.HIGHEST)
    return x


def randomise_resolution(key: Array, image: Array, out_shape: Sequence[int], atlas_res: float = 1.0,
                         max_res_iso: Optional[float] = 4.0, max_res_aniso: Optional[float] = 8.0,
                         prob_iso: float = 0.1, prob_min: float = 0.05, blur_range: float = 1.03,
                         return_params: bool = False):
    """Random low-resolution acquisition of one channel (the randomise_res path)."""
    k_res, k_blur = jax.random.split(key)
    min_res = [atlas_res] * 3
    iso = None if max_res_iso is None else [max_res_iso] * 3
    aniso = None if max_res_aniso is None else [max_res_aniso] * 3
    res, thick = sample_resolution(k_res, min_res, iso, aniso, prob_iso, prob_min)
    max_res = max(v for v in (max_res_iso, max_res_aniso) if v is not None)
    radius = window_radius(0.75 * max_res / atlas_res)
    sigma = blur_sigma(min_res, res, thick)
    if blur_range and blur_range != 1:
        sigma = sigma * jax.random.uniform(k_blur, (3,), jnp.float32, 1.0 / blur_range, blur_range)
    mats = axis_operators(image.shape, out_shape, sigma, res, atlas_res, radius)
    out = apply_axis_operators(image, mats)
    if return_params:
        return out, dict(resolution=res, thickness=thick, sigma=sigma, radius=radius)
    return out


def fixed_resolution(key: Array, image: Array, out_shape: Sequence[int], atlas_res: float = 1.0,
                     data_res: Optional[Sequence[float]] = None, thickness: Optional[Sequence[float]] = None,
                     blur_range: float = 1.03) -> Array:
    """Blur (and resample) for a given acquisition resolution (the non-random path; with
    ``data_res=None`` this is the original's slight 0.5-voxel blur)."""
    res = np.asarray(data_res if data_res is not None else [atlas_res] * 3, np.float64).reshape(-1)
    res = np.broadcast_to(res, (3,))
    thick = res if thickness is None else np.broadcast_to(np.asarray(thickness, np.float64).reshape(-1), (3,))
    sig = 0.75 * np.minimum(res, thick) / atlas_res
    sig[np.minimum(res, thick) == atlas_res] = 0.5
    radius = [window_radius(float(v)) for v in sig]
    sigma = jnp.asarray(sig, jnp.float32)
    if blur_range and blur_range != 1:
        sigma = sigma * jax.random.uniform(key, (3,), jnp.float32, 1.0 / blur_range, blur_range)
    mats = axis_operators(image.shape, out_shape, sigma, jnp.asarray(res, jnp.float32), atlas_res, radius)
    return apply_axis_operators(image, mats)
