"""Keras ``Conv3D(padding='same')`` with two backends: XLA's convolution and oneDNN's.

XLA:CPU lowers ``lax.conv_general_dilated`` to a slow generic kernel (~20 GFLOP/s on 2 cores for
our 3-D U-Nets). The jaxlib wheels also carry oneDNN's convolution kernels, reachable through the
XLA:CPU custom call ``__onednn$convolution`` (the one XLA's own oneDNN rewriter emits); this module
emits that call directly from a JAX primitive, with the bias (and optionally an ELU/ReLU) fused.

Backends (:func:`resolve_backend`):

* ``xla``: ``lax.conv_general_dilated``, exactly what ``flax.linen.Conv`` computes;
* ``onednn``: the custom call, forward and backward (a :func:`jax.custom_vjp`: the input gradient
  is a convolution of the output gradient with the flipped, in/out-swapped kernel (the padding
  transposed), through
  ``__onednn$convolution``; the kernel gradient one ``__onednn$matmul`` per kernel offset; the
  bias gradient an XLA sum);
* ``auto`` (default): ``onednn`` only when JAX's default backend is CPU *and* the installed jaxlib
  is the version this was verified on (:data:`VERIFIED_JAXLIB`); otherwise ``xla``.

The custom call is an internal XLA interface (its backend-config proto changes between XLA
versions), hence the exact pin. The environment variable ``SYNTHSEG_JAX_CONV=auto|xla|onednn``
overrides the default of every layer whose backend is not given explicitly; it is read when the
layer is traced, so set it before the first jit.

Limitations:

* placement: the primitives lower to the custom calls on CPU only; on other platforms they lower
  to XLA's convolution and dot, so a forced ``onednn`` is still correct there;
* sharding: the custom calls carry no partitioning rule, so under SPMD partitioning
  (``jax.sharding``, e.g. the data-parallel Trainer on several devices) XLA gathers their operands
  and every device computes the whole batch's convolutions. The numbers are right (tested on a
  2-device CPU mesh) but the convolutions are not split between devices; for multi-device runs
  compare with ``SYNTHSEG_JAX_CONV=xla``;
* XLA cannot serialise executables holding these custom calls: the persistent compilation cache
  warns ("Error writing persistent compilation cache entry ... std::bad_alloc") and recompiles;
* ``vmap`` over the input only (the frozen segmenter inside a batched sampler): the mapped axis
  is folded into the convolution's batch axis; no ``vmap`` over the kernel, no forward-mode
  (``jvp``) rule.

Mixed precision (``conv_dtype='bfloat16'``): the convolution's inputs (activations and kernel)
are cast to bfloat16, oneDNN accumulates in float32 and returns float32, so the bias, activation,
BatchNorm, softmax and loss stay float32 and the weights are float32 masters; the backward pass
casts the output gradient to bfloat16 for its two products, which again return float32. On CPUs
without native bfloat16 (no ``avx512_bf16``/``amx_bf16`` in ``/proc/cpuinfo``) jaxlib's oneDNN
has no bf16 convolution (on an AVX2-only AMD EPYC: no primitive descriptor, or an illegal
instruction that kills the process) and XLA's would be emulated, slower than float32, so
:func:`effective_conv_dtype` falls back to float32 with one log line.

Parameters are those of ``flax.linen.Conv`` (``kernel`` (k, k, k, in, out), Glorot-uniform;
``bias`` (out,), zeros), so Keras ``.h5`` import/export and orbax checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

# The jaxlib whose __onednn$convolution custom call (config layout, offsets, fusions) this module
# was verified against; pyproject.toml pins jax and jaxlib to it.
VERIFIED_JAXLIB = "0.10.2"
ENV_VAR = "SYNTHSEG_JAX_CONV"
BACKENDS = ("auto", "xla", "onednn")
ACTIVATIONS = (None, "elu", "relu")
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# lax.conv_general_dilated's layout of Keras' channels-last 3-D convolution.
_KERAS_DNUMS = ("NDHWC", "DHWIO", "NDHWC")


def installed_jaxlib() -> str:
    import jaxlib.version

    return jaxlib.version.__version__


def resolve_backend(backend: str | None = None) -> str:
    """``'xla'`` or ``'onednn'``: ``backend``, else ``$SYNTHSEG_JAX_CONV``, else ``'auto'``."""
    choice = backend if backend else os.environ.get(ENV_VAR, "") or "auto"
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"convolution backend must be one of {BACKENDS}, got {choice!r}")
    if choice != "auto":
        return choice
    if jax.default_backend() == "cpu" and installed_jaxlib() == VERIFIED_JAXLIB:
        return "onednn"
    return "xla"


# --------------------------------------------------------------------------- the primitive
#
# onednn_conv(x, w[, b]; dnums, padding, fusions) is a stride-1, undilated cross-correlation with
# lax's dimension-number convention: dnums = (lhs_spec, rhs_spec, out_spec), each a tuple of axis
# indices: lhs/out (batch, feature, spatial...), rhs (out feature, in feature, spatial...).
# fusions: ('bias', 'elu'|'relu'|None); with 'bias', b is the third operand, shape (out feature,).

_conv_p = Primitive("synthseg_onednn_conv")


def _out_shape(x_shape, w_shape, dnums, padding):
    lhs, rhs, out = dnums
    shape = [0] * len(x_shape)
    shape[out[0]] = x_shape[lhs[0]]
    shape[out[1]] = w_shape[rhs[0]]
    for i, (lo, hi) in enumerate(padding):
        shape[out[2 + i]] = x_shape[lhs[2 + i]] + lo + hi - w_shape[rhs[2 + i]] + 1
    return tuple(shape)


def _check_operand_dtypes(a, b, what: str) -> None:
    if a.dtype != b.dtype or a.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"onednn {what} takes two float32 or two bfloat16 operands, "
                        f"got {a.dtype} and {b.dtype}")


def _abstract_eval(x, w, *rest, dnums, padding, fusions):
    """float32 out whatever the operands: bfloat16 products accumulate in float32."""
    _check_operand_dtypes(x, w, "convolution")
    if x.shape[dnums[0][1]] != w.shape[dnums[1][1]]:
        raise ValueError(f"input features {x.shape[dnums[0][1]]} != kernel's {w.shape[dnums[1][1]]}")
    return jax.core.ShapedArray(_out_shape(x.shape, w.shape, dnums, padding), jnp.float32)


def _apply_activation(y, activation):
    if activation == "elu":
        return jax.nn.elu(y)
    if activation == "relu":
        return jax.nn.relu(y)
    return y


def _xla_conv(x, w, *rest, dnums, padding, fusions):
    """The same computation with lax (the lowering off CPU, and the reference of the tests)."""
    lhs, rhs, out = dnums
    ndim = len(lhs)
    y = lax.conv_general_dilated(
        x, w, (1,) * (ndim - 2), list(padding),
        dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, out),
        preferred_element_type=jnp.float32)
    if "bias" in fusions:
        shape = [1] * ndim
        shape[out[1]] = -1
        y = y + rest[0].reshape(shape)
    return _apply_activation(y, _activation_of(fusions))


def _activation_of(fusions):
    acts = [f for f in fusions if f in ("elu", "relu")]
    return acts[0] if acts else None


_FUSION_KINDS = {"bias": "BIAS", "relu": "RELU", "elu": "ELU"}


def _backend_config(dnums, padding, fusions, ndim) -> str:
    """The XLA:CPU BackendConfig (JSON) of one convolution: layouts as axis indices, window as is,
    dilations stored +1 (oneDNN counts a plain window as dilation 0), as jaxlib 0.10.2 reads it."""
    lhs, rhs, out = dnums
    n_sp = ndim - 2

    def data(spec):
        return {"dims": ndim, "data": {"batch_dim": spec[0], "feature_dim": spec[1],
                                       "spatial_dims": list(spec[2:])}}

    conv = {
        "dims": ndim,
        "input": data(lhs),
        "kernel": {"dims": ndim, "filter": {"input_feature_dim": rhs[1], "output_feature_dim": rhs[0],
                                            "spatial_dims": list(rhs[2:])}},
        "output": data(out),
        "window": {"pad_left": [p[0] for p in padding], "pad_right": [p[1] for p in padding],
                   "strides": [1] * n_sp, "window_dilations": [1] * n_sp},
        "feature_groups": 1,
    }
    ops = [_FUSION_KINDS[f] for f in fusions if f]
    if ops:
        conv["fusions"] = {"ops": ops}
    return json.dumps({"onednn_conv_config": conv})


def _cpu_lowering(ctx, x, w, *rest, dnums, padding, fusions):
    aval_out, = ctx.avals_out
    ndim = len(aval_out.shape)
    operands = [x, w, *rest]
    row_major = lambda a: list(range(len(a.shape) - 1, -1, -1))  # noqa: E731
    from jax._src.interpreters.mlir import custom_call

    op = custom_call(
        "__onednn$convolution",
        result_types=[mlir.aval_to_ir_type(ctx.module_context, aval_out)],
        operands=operands,
        backend_config=_backend_config(dnums, padding, fusions, ndim),
        api_version=1,
        operand_layouts=[row_major(a) for a in ctx.avals_in],
        result_layouts=[row_major(aval_out)],
    )
    return op.results


def _impl_of(prim, *args, **params):
    from jax._src import dispatch

    return dispatch.apply_primitive(prim, *args, **params)


def _conv_batch_rule(args, dims, **params):
    """``vmap`` of the input: fold the mapped axis into the convolution's batch axis (one call)."""
    if any(d is not None for d in dims[1:]):    # None: not mapped
        raise NotImplementedError("vmap of the oneDNN convolution over its kernel or bias; "
                                  "use SYNTHSEG_JAX_CONV=xla")
    x, *rest = args
    lhs_batch, out_batch = params["dnums"][0][0], params["dnums"][2][0]
    x = jnp.moveaxis(x, dims[0], lhs_batch)
    n_mapped, n_batch = x.shape[lhs_batch], x.shape[lhs_batch + 1]
    x = x.reshape(x.shape[:lhs_batch] + (n_mapped * n_batch,) + x.shape[lhs_batch + 2:])
    y = _conv_p.bind(x, *rest, **params)
    return y.reshape(y.shape[:out_batch] + (n_mapped, n_batch) + y.shape[out_batch + 1:]), out_batch


_conv_p.def_impl(functools.partial(_impl_of, _conv_p))
_conv_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[_conv_p] = _conv_batch_rule
mlir.register_lowering(_conv_p, mlir.lower_fun(_xla_conv, multiple_results=False))
mlir.register_lowering(_conv_p, _cpu_lowering, platform="cpu")


_matmul_p = Primitive("synthseg_onednn_matmul_tn")


def _matmul_abstract(a, b):
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a^T b needs (L, m) and (L, n), got {a.shape} and {b.shape}")
    _check_operand_dtypes(a, b, "matmul")
    return jax.core.ShapedArray((a.shape[1], b.shape[1]), jnp.float32)


def _matmul_cpu_lowering(ctx, a, b):
    aval_out, = ctx.avals_out
    from jax._src.interpreters.mlir import custom_call

    config = json.dumps({"onednn_matmul_config": {"transpose_a": True, "transpose_b": False}})
    return custom_call(
        "__onednn$matmul",
        result_types=[mlir.aval_to_ir_type(ctx.module_context, aval_out)],
        operands=[a, b], backend_config=config, api_version=1,
        operand_layouts=[[1, 0], [1, 0]], result_layouts=[[1, 0]]).results


_matmul_p.def_impl(functools.partial(_impl_of, _matmul_p))
_matmul_p.def_abstract_eval(_matmul_abstract)
mlir.register_lowering(_matmul_p, mlir.lower_fun(
    lambda a, b: jnp.matmul(a.T, b, preferred_element_type=jnp.float32), multiple_results=False))
mlir.register_lowering(_matmul_p, _matmul_cpu_lowering, platform="cpu")


def onednn_matmul_tn(a, b):
    """``a.T @ b`` (float32) for a (L, m), b (L, n) through oneDNN's matmul (XLA off CPU)."""
    return _matmul_p.bind(a, b)


def onednn_conv(x, w, b=None, *, dnums, padding, activation=None):
    """One call of the primitive (no autodiff rule: see :func:`conv3d_padded`)."""
    fusions = (("bias",) if b is not None else ()) + ((activation,) if activation else ())
    operands = (x, w) if b is None else (x, w, b)
    return _conv_p.bind(*operands, dnums=tuple(map(tuple, dnums)),
                        padding=tuple(map(tuple, padding)), fusions=fusions)


# --------------------------------------------------------------------------- stride 1, NDHWC

def same_padding(kernel_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """TensorFlow/lax 'SAME' at stride 1: the extra pixel of an even kernel goes at the end."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_shape)


# NDHWC input and output, DHWIO kernel (lax specs: batch/out-feature first, then feature/in).
_FWD = ((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))
# input gradient: dy (NDHWC) with the kernel read as DHWOI (its out axis is the contraction).
_BWD_INPUT = ((0, 4, 1, 2, 3), (3, 4, 0, 1, 2), (0, 4, 1, 2, 3))


def _act_grad_from_output(y, activation):
    """d act / d z as a function of act(z): ELU' = 1 (y > 0) or y + 1; ReLU' = 1 (y > 0) or 0."""
    if activation == "elu":
        return jnp.where(y > 0, 1.0, y + 1.0).astype(y.dtype)
    return (y > 0).astype(y.dtype)


def _kernel_grad(x, g, kernel_shape, pad):
    """dw[a, b, c] = sum over voxels of x_pad[v + (a, b, c)]^T g[v]: one (C_in, C_out) oneDNN
    matmul per kernel offset over the flattened batch and voxels, in a ``lax.scan`` (the unrolled
    27 slices + matmuls run as fast but compile 2-3x slower).

    Measured alternatives (2 cores, 96^3, 24 -> 24): this ~1.5 s; XLA's own kernel gradient
    3-5 s; oneDNN's forward convolution (the only one XLA exposes) asked for the reduction with
    the output gradient as a 96^3 kernel runs out of memory, and in 8^3 blocks takes ~4 s;
    grouping offsets into wider matmuls costs more in copies than it saves.
    """
    c_in = x.shape[-1]
    n, *spatial, c_out = g.shape       # the output's size: the windows' (any padding)
    xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    gf = g.reshape(-1, c_out)
    offsets = list(itertools.product(*(range(k) for k in kernel_shape[:3])))
    if len(offsets) == 1:
        return onednn_matmul_tn(xp.reshape(-1, c_in), gf).reshape(kernel_shape)

    def one(_, offset):
        start = (0, offset[0], offset[1], offset[2], 0)
        window = lax.dynamic_slice(xp, start, (n, *spatial, c_in))
        return None, onednn_matmul_tn(window.reshape(-1, c_in), gf)

    _, blocks = lax.scan(one, None, jnp.asarray(offsets, jnp.int32))
    return blocks.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _onednn_conv3d(x, w, b, activation, conv_dtype, padding):
    return onednn_conv(x.astype(conv_dtype), w.astype(conv_dtype), b, dnums=_FWD,
                       padding=padding, activation=activation)


def _fwd(x, w, b, activation, conv_dtype, padding):
    xc, wc = x.astype(conv_dtype), w.astype(conv_dtype)   # the residuals, at half size in bf16
    y = onednn_conv(xc, wc, b, dnums=_FWD, padding=padding, activation=activation)
    return y, (xc, wc, y if activation else None)


def _bwd(activation, conv_dtype, padding, res, g):
    xc, wc, y = res
    if activation:
        g = g * _act_grad_from_output(y, activation)
    db = jnp.sum(g, axis=(0, 1, 2, 3))
    g = g.astype(conv_dtype)
    flipped = jnp.flip(wc, axis=(0, 1, 2))
    # the transposed convolution: a tap that reached lo voxels before the input now reaches
    # k - 1 - lo after it
    transposed = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(wc.shape[:3], padding))
    dx = onednn_conv(g, flipped, dnums=_BWD_INPUT, padding=transposed)
    dw = _kernel_grad(xc, g, wc.shape, padding)
    return dx, dw, db   # float32, as the primal x and w


_onednn_conv3d.defvjp(_fwd, _bwd)


def xla_conv3d(x, w, b, padding, activation=None, conv_dtype=jnp.float32):
    y = lax.conv_general_dilated(x.astype(conv_dtype), w.astype(conv_dtype), (1, 1, 1), list(padding),
                                 dimension_numbers=_KERAS_DNUMS, preferred_element_type=jnp.float32)
    return _apply_activation(y + b, activation)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@functools.lru_cache(maxsize=None)
def effective_conv_dtype(requested: str | None) -> jnp.dtype:
    """The dtype convolutions run their products in: ``requested`` ('float32' or 'bfloat16'),
    except bfloat16 on a CPU without native support (one log line, float32)."""
    name = str(requested or "float32").strip().lower()
    if name in ("bf16", "bfloat16"):
        if jax.default_backend() == "cpu" and not cpu_has_native_bf16():
            print("[synthseg_jax] this CPU has no native bfloat16 (avx512_bf16/amx_bf16): "
                  "convolutions run in float32", flush=True)
            return jnp.dtype(jnp.float32)
        return jnp.dtype(jnp.bfloat16)
    if name in ("fp32", "float32"):
        return jnp.dtype(jnp.float32)
    raise ValueError(f"convolution dtype must be float32 or bfloat16, got {requested!r}")


def conv3d_padded(x: jax.Array, w: jax.Array, b: jax.Array, *,
                  padding: Sequence[tuple[int, int]] | None = None, backend: str | None = None,
                  activation: str | None = None, conv_dtype: str | None = None) -> jax.Array:
    """``act(conv(x, w) + b)``: x (N, D, H, W, C_in), w (k, k, k, C_in, C_out), b (C_out,), all
    float32. ``padding``: (low, high) zeros per spatial axis, None for 'SAME' (Keras'); ``backend``
    as in :func:`resolve_backend`; ``activation`` None, 'elu' or 'relu'; ``conv_dtype`` 'float32'
    (default) or 'bfloat16' (mixed precision, see the module docstring); the result is float32."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dtype = effective_conv_dtype(conv_dtype)
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"conv3d_padded takes float32 operands, got {x.dtype}, {w.dtype}, {b.dtype}")
    padding = same_padding(w.shape[:3]) if padding is None else tuple(map(tuple, padding))
    if resolve_backend(backend) == "onednn":
        return _onednn_conv3d(x, w, b, activation, dtype, padding)
    return xla_conv3d(x, w, b, padding, activation, dtype)


def conv_parameters(module: nn.Module, kernel_size: int | Sequence[int], in_features: int,
                    features: int, kernel_init: Callable, bias_init: Callable
                    ) -> tuple[jax.Array, jax.Array]:
    """``module``'s ``kernel`` (k, k, k, in, out) and ``bias`` (out,), as ``nn.Conv`` names and
    initialises them."""
    ks = tuple(kernel_size) if isinstance(kernel_size, Sequence) else (kernel_size,) * 3
    if len(ks) != 3:
        raise ValueError(f"Conv3D needs a 3-D kernel size, got {ks}")
    kernel = module.param("kernel", kernel_init, ks + (in_features, features), jnp.float32)
    bias = module.param("bias", bias_init, (features,), jnp.float32)
    return kernel, bias


class Conv3D(nn.Module):
    """Keras ``Conv3D(features, kernel_size, padding='same')`` (+ an optional fused activation).

    Drop-in for ``nn.Conv(features, (k,) * 3, padding='SAME')``: same parameter names, shapes and
    initialisers. ``backend``: 'auto', 'xla', 'onednn' or None (= ``$SYNTHSEG_JAX_CONV``, default
    'auto'), resolved when the layer is traced. ``conv_dtype``: 'float32' (None) or 'bfloat16'.
    """

    features: int
    kernel_size: int | Sequence[int]
    backend: str | None = None
    activation: str | None = None
    conv_dtype: str | None = None
    kernel_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = conv_parameters(self, self.kernel_size, x.shape[-1], self.features,
                                       self.kernel_init, self.bias_init)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=None)
        batch_shape = x.shape[:-4]
        if len(batch_shape) != 1:  # like nn.Conv: no batch axis, or several, are flattened to one
            x = x.reshape((int(np.prod(batch_shape)),) + x.shape[-4:])
        y = conv3d_padded(x, kernel, bias, backend=self.backend, activation=self.activation,
                          conv_dtype=self.conv_dtype)
        if len(batch_shape) != 1:
            y = y.reshape(batch_shape + y.shape[1:])
        return y


class ConvWeights(nn.Module):
    """A ``Conv3D``'s parameters alone (same names, shapes and initialisers), for convolutions
    computed together with others of the same input (``sibling_convs``)."""

    features: int
    kernel_size: int | Sequence[int]
    kernel_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return conv_parameters(self, self.kernel_size, in_features, self.features,
                               self.kernel_init, self.bias_init)


def sibling_convs(x: jax.Array, weights: Sequence[tuple[jax.Array, jax.Array]],
                  conv_dtype: str | None = None) -> list[jax.Array]:
    """The 'SAME' convolutions of one input ``x`` (N, D, H, W, C) by several kernels of one size,
    computed as one convolution with their output channels side by side: each output channel is
    the same sum as alone, and a convolution with few input channels is faster for twice the
    outputs than two are (the QC encoder's 9 one-hot channels at 224^3: 3.0 s against 2 x 2.0 s,
    BENCHMARKS.md)."""
    kernel = jnp.concatenate([k for k, _ in weights], axis=-1)
    bias = jnp.concatenate([b for _, b in weights])
    y = conv3d_padded(x, kernel, bias, conv_dtype=conv_dtype)
    return jnp.split(y, np.cumsum([b.shape[0] for _, b in weights])[:-1], axis=-1)
