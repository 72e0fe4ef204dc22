"""A U-Net evaluated slab by slab along the first spatial axis, with the same result as whole.

At 1 mm a scan's full-resolution feature maps dominate prediction's memory (24 features x 256^3 x
4 B = 1.6 GB each, and the decoder's last step reads a skip and writes the sum of two
convolutions at that size: nn/upconv.py). Convolutions are local and
inference BatchNorm is a per-channel affine map, so the ``n`` shallowest levels can be computed
on overlapping windows of the volume while the deeper levels (8x fewer voxels per level) run
whole:

1. encoder, levels ``0..n-1``, slab after slab: each window carries a halo as deep as those
   levels' receptive field; the exact rows of each level's skip and of the pooled output are
   kept (the skips at their levels' sizes, the one full-size tensor that must stay);
2. the deeper levels and their decoder steps, whole (an ordinary U-Net on the pooled volume);
3. decoder steps back to levels ``n-1..0``, slab after slab, each level on its own window (its
   halo: its convolutions' reach plus what the finer level's window needs), then the final
   1x1x1 convolution; each slab's logits go to the caller's ``emit``, which folds them into
   whatever it accumulates, so no full-size logits need exist.

Windows never leave the volume: near its ends they are shifted inwards, so 'SAME' zero padding
happens exactly where the whole-volume network has it; slab starts and halos are multiples of
``2^n``, so pooling and upsampling fall on the same voxels. Results equal the whole-volume
network's up to float rounding (tested in tests/nn/test_slabs.py). The slabs run in a
``lax.fori_loop``, so one slab's temporaries are live at a time and each part compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from synthseg_jax.nn.unet import UNetConfig, UNetPart, has_skip

AXIS = 1   # the slab axis of (B, X, Y, Z, C) volumes


@dataclasses.dataclass(frozen=True)
class SlabPlan:
    """How one U-Net input is cut: ``n_levels`` levels in slabs of ``rows`` output rows."""

    length: int         # the input's size along AXIS
    rows: int           # output rows per slab (a multiple of 2^n_levels dividing ``length``)
    n_levels: int       # how many of the shallowest levels run in slabs
    margin: int = 0     # logits emitted beyond each slab on every side (see unet_slabwise)

    @property
    def count(self) -> int:
        return self.length // self.rows


def level_reach(cfg: UNetConfig) -> int:
    """Rows a level's convolutions reach beyond an output row, at that level's resolution."""
    return cfg.nb_conv_per_level * (cfg.conv_size // 2)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def encoder_halo(cfg: UNetConfig, n: int) -> int:
    """Input rows each encoder window needs beyond its slab, so that the pooled output of level
    ``n-1`` and every skip are exact on the slab's rows."""
    return round_up(sum(level_reach(cfg) * 2**level for level in range(n)), 2**n)


def decoder_halos(cfg: UNetConfig, n: int, margin: int = 0) -> list[int]:
    """Per level ``0..n-1``, the rows (at that level's resolution) its decoder window extends
    beyond the slab: its convolutions' reach plus what the finer level's window needs (at level
    0: ``margin`` rows of output beyond the slab), even so that the window maps onto whole voxels
    of the coarser level."""
    halos, need = [], margin
    for _ in range(n):
        halos.append(round_up(need + level_reach(cfg), 2))
        need = -(-halos[-1] // 2)
    return halos


def plan_slabs(cfg: UNetConfig, length: int, max_rows: int, n_levels: int = 2,
               margin: int = 0) -> SlabPlan | None:
    """The slabs for an input ``length`` rows long, each at most ``max_rows`` rows (None: the
    whole volume in one piece, because it fits, or because the halos would not); ``margin``: as
    in ``unet_slabwise``."""
    n = min(n_levels, cfg.nb_levels - 1)
    unit = 2**n
    if n < 1 or length <= max_rows or length % unit:
        return None
    options = [r for r in range(unit, max_rows + 1, unit) if length % r == 0]
    if not options:
        return None
    rows = max(options)
    needed = max([rows + 2 * encoder_halo(cfg, n)]
                 + [rows // 2**level + 2 * h
                    for level, h in enumerate(decoder_halos(cfg, n, margin))])
    if needed > length:
        return None
    return SlabPlan(length=length, rows=rows, n_levels=n, margin=margin)


def _window(start: jax.Array, halo: int, size: int, length: int) -> jax.Array:
    """Start of the ``size``-row window around rows ``start - halo`` on, shifted inside [0, length)."""
    return jnp.clip(start - halo, 0, length - size)


def _rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis=AXIS)


def _put(x: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(x, rows, start, axis=AXIS)


def encode_in_slabs(cfg: UNetConfig, variables: dict[str, Any], x: jax.Array,
                    plan: SlabPlan) -> tuple[dict[int, jax.Array], jax.Array]:
    """Steps 1 and 2: the skips of the slabbed levels that the decoder joins ({level: volume})
    and the deeper levels' output (whole, at level ``n``'s resolution)."""
    n, rows, length = plan.n_levels, plan.rows, plan.length
    part = lambda name, lo=0, hi=0: UNetPart(cfg, name, lo, hi)   # noqa: E731
    halo = encoder_halo(cfg, n)
    size = rows + 2 * halo
    shape = lambda level, c: (x.shape[0], length // 2**level, *[s // 2**level for s in x.shape[2:4]], c)  # noqa: E731
    kept = [level for level in range(n) if has_skip(cfg, level)]
    skips = {level: jnp.zeros(shape(level, cfg.level_features(level)), jnp.float32) for level in kept}
    pooled = jnp.zeros(shape(n, cfg.level_features(n - 1)), jnp.float32)

    def encode(k, state):
        skips, pooled = state
        start = k * rows
        w = _window(start, halo, size, length)
        level_skips, out = part("encode", 0, n).apply(variables, _rows(x, w, size))
        skips = {level: _put(skips[level], _rows(level_skips[level], (start - w) // 2**level,
                                                 rows // 2**level), start // 2**level)
                 for level in kept}
        pooled = _put(pooled, _rows(out, (start - w) // 2**n, rows // 2**n), start // 2**n)
        return skips, pooled

    skips, pooled = lax.fori_loop(0, plan.count, encode, (skips, pooled))
    deep_skips, deep = part("encode", n, cfg.nb_levels).apply(variables, pooled)
    coarse = part("decode", n, cfg.nb_levels - 1).apply(
        variables, deep, tuple(s if has_skip(cfg, level) else None
                               for level, s in zip(range(n, cfg.nb_levels - 1), deep_skips)))
    return skips, coarse


def decode_slab(cfg: UNetConfig, variables: dict[str, Any], skips: dict[int, jax.Array],
                coarse: jax.Array, plan: SlabPlan, k: jax.Array) -> jax.Array:
    """Step 3 for slab ``k``: its logits (rows ``k * plan.rows - m`` on, see ``unet_slabwise``)."""
    n, rows, length, m = plan.n_levels, plan.rows, plan.length, plan.margin
    halos = decoder_halos(cfg, n, m)
    start = k * rows
    y, y_start = coarse, 0               # the coarser level's output and where it starts
    for level in reversed(range(n)):
        h = halos[level]
        size_l, len_l = rows // 2**level + 2 * h, length // 2**level
        w = _window(start // 2**level, h, size_l, len_l)
        below = _rows(y, w // 2 - y_start, size_l // 2)
        skip = _rows(skips[level], w, size_l) if level in skips else None
        y = UNetPart(cfg, "decode", level, level + 1).apply(variables, below, (skip,))
        y_start = w
    if m:
        y = jnp.pad(y, [(0, 0)] + [(m, m)] * 3 + [(0, 0)])
    y = _rows(y, start - y_start, rows + 2 * m)
    return UNetPart(cfg, "likelihood").apply(variables, y)


def unet_slabwise(cfg: UNetConfig, variables: dict[str, Any], x: jax.Array, plan: SlabPlan,
                  emit: Callable[[Any, jax.Array, jax.Array], Any], carry: Any) -> Any:
    """Run the U-Net ``cfg`` (its own variables: {'params', 'batch_stats'} of the UNet) on ``x``
    (B, X, Y, Z, C) in the slabs of ``plan``; ``emit(carry, start, logits)`` receives each slab's
    logits and returns the new carry, which is returned at the end.

    The logits are those of rows ``start - m`` to ``start + plan.rows + m`` (``m =
    plan.margin``), grown by ``m`` voxels on each side of the other two axes too; where that
    ring lies outside the volume they are what ``UNet(pad_output=m)`` gives there (the bias),
    so a caller that blurs them masks the ring as it does for the whole volume."""
    skips, coarse = encode_in_slabs(cfg, variables, x, plan)

    def decode(k, carry):
        return emit(carry, k * plan.rows, decode_slab(cfg, variables, skips, coarse, plan, k))

    return lax.fori_loop(0, plan.count, decode, carry)


def slabwise_logits(cfg: UNetConfig, variables: dict[str, Any], x: jax.Array, plan: SlabPlan,
                    transform: Callable[[jax.Array], jax.Array] = lambda logits: logits) -> jax.Array:
    """The U-Net's whole logits (or a voxel-wise ``transform`` of them, applied slab by slab),
    computed in slabs."""
    def write(out, start, logits):
        return _put(out, transform(logits), start)

    out = jnp.zeros(x.shape[:-1] + (cfg.n_labels,), jnp.float32)
    return unet_slabwise(cfg, variables, x, dataclasses.replace(plan, margin=0), write, out)
