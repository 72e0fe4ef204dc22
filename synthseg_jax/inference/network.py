"""The network part of the pipeline as one jit-compiled function per padded input shape (the
robust cascade's first two stages, the parcellation in slabs and the finishing step are programs
of their own).

What it computes is what ``mri_synthseg``'s ``build_model`` wires up in Keras:

* 1.0 / 2.0: softmax, Gaussian blur (sigma 0.5) of the posteriors; unless ``fast``, the same on the
  left-right flipped image, flipped back with left/right channels swapped, and the two averaged;
* robust: the three-stage cascade (argmax/one-hot between stages), softmax, no blur, no flip;
* parcellation: argmax of the segmentation -> cortex mask -> parcellation U-Net on image + mask ->
  softmax -> blur;
* QC: argmax of the segmentation -> ``MakeShape`` crop (224^3) -> one-hot QC classes -> regressor.

In fast mode the original returns (and feeds QC with) different tensors depending on which extra
outputs are requested; ``Predictor`` reproduces those choices (see ``_forward``).

The forward also computes the masks post-processing labels on the host, and the post-processing
that follows on the device is compiled with it (both from ``postprocess.py``, which describes the
steps). Compiled executables are cached by padded shape; each compilation is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthseg_jax.inference.coarse import (
    box_posteriors,
    cell_bounds,
    plan_box,
    pool,
    upsample_linear,
)
from synthseg_jax.inference.postprocess import (
    add_float32_sums,
    channel_groups,
    clean_and_label,
    cleanup_masks,
    keep_masks,
    label_parcellation,
    original_sums,
    topology_groups,
)
from synthseg_jax.labels import LabelTableError, LabelTables
from synthseg_jax.nn.slabs import (
    SlabPlan,
    decode_slab,
    encode_in_slabs,
    plan_slabs,
    slabwise_logits,
    unet_slabwise,
)
from synthseg_jax.nn.synthseg import (
    QC_CROP_SIZE,
    RobustCascade,
    cascade_groups,
    cascade_last,
    crop_around_labels,
    in_cortex,
    parcellation_input,
    with_cortex_mask,
)
from synthseg_jax.nn.unet import UNet, UNetConfig
from synthseg_jax.weights.keras_h5 import WeightFileError
from synthseg_jax.weights.models_dir import MODEL_FILES, ModelsDir

log = logging.getLogger("synthseg_jax.inference")

POSTERIOR_BLUR_SIGMA = 0.5

# XLA:CPU's YNNPACK fusions (of the elementwise and reduction ops around the convolutions) never
# write over their operands, so each one holds a second buffer of its input's size: at 224x256x192
# the parcellation's softmax alone kept two 3 GB buffers. XLA's own fusions do reuse them.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# A U-Net whose input has more than WHOLE_VOXELS voxels runs its two shallowest levels in slabs
# along the first axis, each slab's first-level feature maps at most SLAB_BYTES (nn/slabs.py): at
# 256^3 with 24 features, 8 slabs of 32 rows instead of 1.6 GB maps. The MNI T1's padded
# 224x256x192 (11.0 M voxels, 7.2 GB peak) still runs whole, at full speed: slabs compute their
# halos twice. Larger slabs cost memory, smaller ones time.
WHOLE_VOXELS = 12 * 2**20
SLAB_BYTES = 256 * 2**20


class ModelError(ValueError):
    """A models/labels folder that cannot serve the requested mode (one line naming the file)."""


@dataclasses.dataclass(frozen=True)
class Mode:
    """Which of the original's networks and options a run uses."""

    robust: bool = False
    fast: bool = False
    v1: bool = False
    parc: bool = False
    qc: bool = False

    def __post_init__(self) -> None:
        if self.robust and self.v1:
            raise ValueError("robust cannot be combined with v1: SynthSeg-robust only exists for 2.0")

    @property
    def is_fast(self) -> bool:
        """The original turns fast on for robust."""
        return self.fast or self.robust

    @property
    def flip(self) -> bool:
        return not self.is_fast

    @property
    def version(self) -> str:
        return "1.0" if self.v1 else "2.0"

    @property
    def segmenter_kind(self) -> str:
        return "robust" if self.robust else self.version

    def describe(self) -> str:
        name = "SynthSeg-robust 2.0" if self.robust else f"SynthSeg {self.version}"
        if self.fast and not self.robust:
            name += " (fast)"
        extras = [e for e, on in (("parcellation", self.parc), ("QC", self.qc)) if on]
        return name + (" + " + " + ".join(extras) if extras else "")


@dataclasses.dataclass
class Networks:
    """The modules and weights a mode needs, with the label tables of its version."""

    tables: LabelTables
    segmenter: nn.Module
    variables: dict[str, Any]                 # {"seg": ..., "parc": ..., "qc": ...}
    parc: nn.Module | None = None
    qc: nn.Module | None = None
    seg_voxel_size: float = 1.0               # mm; a coarser model runs on a pooled image
    qc_voxel_size: float = 1.0                # mm; a coarser QC model sees the majority class per block
    qc_crop_size: int = QC_CROP_SIZE          # 1 mm voxels: the field the QC model was trained on


def load_networks(models_dir: str, mode: Mode, labels_dir: str | None = None,
                  conv_dtype: str = "float32", model: str | None = None) -> Networks:
    """Read every network ``mode`` needs from a FreeSurfer-style models folder, its convolutions'
    products in ``conv_dtype`` ('float32' or 'bfloat16'); ``model``: another file for the
    segmenter (FreeSurfer 8's ``--model``).

    Any missing or unusable file is a ``ModelError`` naming it, raised before anything is written.
    """
    if not os.path.isdir(models_dir):
        raise ModelError(f"{models_dir}: models folder not found")
    if labels_dir is not None and not os.path.isdir(labels_dir):
        raise ModelError(f"{labels_dir}: labels folder not found")
    overrides = {mode.segmenter_kind: model} if model else {}
    models = ModelsDir(models_dir, labels_dir=labels_dir, overrides=overrides)
    kinds = [mode.segmenter_kind] + (["parc"] if mode.parc else []) + (["qc"] if mode.qc else [])
    loaded, voxel_sizes = {}, {}
    kind = "labels"
    try:
        tables = models.labels(mode.version)
        for kind in kinds:
            loaded[kind] = models.load_network(kind, conv_dtype)
            voxel_sizes[kind] = models.voxel_size(kind, loaded[kind][1])
            supported = {mode.segmenter_kind: (1.0, 2.0, 4.0), "qc": (1.0, 2.0)}.get(kind, (1.0,))
            if voxel_sizes[kind] not in supported:
                raise ModelError(f"{models.weights_file(kind)}: trained at {voxel_sizes[kind]:g} "
                                 f"mm; supported: {', '.join(f'{s:g}' for s in supported)} mm")
        field = models.training_field_mm("qc") if mode.qc else None
        qc_crop_size = int(round(field)) if field else QC_CROP_SIZE
    except (WeightFileError, LabelTableError) as err:
        raise ModelError(str(err).splitlines()[0]) from None
    except (OSError, KeyError, ValueError) as err:
        raise ModelError(f"{models_dir}: cannot load {MODEL_FILES.get(kind, kind)} ({err})") from None
    seg_module, seg_vars = loaded[mode.segmenter_kind]
    variables = {"seg": seg_vars}
    parc_module = qc_module = None
    if mode.parc:
        parc_module, variables["parc"] = loaded["parc"]
    if mode.qc:
        qc_module, variables["qc"] = loaded["qc"]
    return Networks(tables=tables, segmenter=seg_module, variables=variables, parc=parc_module,
                    qc=qc_module, seg_voxel_size=voxel_sizes[mode.segmenter_kind],
                    qc_voxel_size=voxel_sizes.get("qc", 1.0), qc_crop_size=qc_crop_size)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def at_voxel_size(network: Any, x: jax.Array, voxel_size: float,
                  coarse: Callable[[jax.Array], jax.Array] = lambda logits: logits) -> jax.Array:
    """Run ``network`` on the 1 mm image ``x`` average-pooled to ``voxel_size`` mm, and bring its
    logits back to 1 mm linearly: how a model trained at 2 mm serves the 1 mm pipeline.

    ``coarse`` is applied to the logits before they are upsampled: an operation that commutes
    with the upsampling (the flip and the left/right channel swap of flip averaging) costs an
    eighth there of what it costs at 1 mm."""
    factor = int(round(voxel_size))
    if factor <= 1:
        return coarse(network(x))
    logits = coarse(network(pool(x, factor)))
    for axis in (1, 2, 3):
        logits = upsample_linear(logits, axis, factor)
    return logits


def gaussian_weights(sigma: float) -> np.ndarray:
    """The original's fixed blur kernel along one axis: width ceil(2.5 sigma) rounded to odd,
    normalised (its 3-D kernel is the outer product of these)."""
    half = int(np.ceil(2.5 * sigma) / 2)
    x = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-x**2 / (2 * sigma**2))
    return (w / w.sum()).astype(np.float32)


def blur_margin(sigma: float = POSTERIOR_BLUR_SIGMA) -> int:
    """How many voxels the blur reaches beyond each one."""
    return len(gaussian_weights(sigma)) // 2


def blur_padded_scaled(padded: jax.Array, scale: jax.Array | None = None,
                       sigma: float = POSTERIOR_BLUR_SIGMA) -> jax.Array:
    """The blur of ``padded * scale`` (``scale`` broadcast over the channels, e.g. a softmax's
    per-voxel normaliser), ``padded`` being the input already zero-padded (or ``scale`` zero) by
    ``blur_margin(sigma)`` voxels around the spatial axes of (B, X, Y, Z, C); the result has the
    unpadded size.

    Written as one weighted sum of the shifted input (27 terms for sigma 0.5), which XLA fuses
    into a single pass with no intermediate: the separable form (three passes) kept two more
    posterior-sized buffers alive (at 224x256x192 with the parcellation's 69 channels, 8.6 GB of
    temporaries against 2.9 GB) and was slower on CPU."""
    weights = gaussian_weights(sigma)
    half = len(weights) // 2
    n = [s - 2 * half for s in padded.shape[1:4]]
    out = None
    for i, wi in enumerate(weights):
        for j, wj in enumerate(weights):
            for k, wk in enumerate(weights):
                window = (slice(None), slice(i, i + n[0]), slice(j, j + n[1]), slice(k, k + n[2]))
                shifted = padded[window] if scale is None else padded[window] * scale[window]
                term = float(wi * wj * wk) * shifted
                out = term if out is None else out + term
    return out


def gaussian_blur(x: jax.Array, sigma: float = POSTERIOR_BLUR_SIGMA) -> jax.Array:
    """Blur over the spatial axes of (B, X, Y, Z, C), zero padding ('SAME' convolution), with the
    original's kernel (the outer product of ``gaussian_weights``)."""
    half = blur_margin(sigma)
    if half == 0:
        return x
    return blur_padded_scaled(jnp.pad(x, [(0, 0)] + [(half, half)] * 3 + [(0, 0)]), None, sigma)


def gaussian_blur_in_slabs(x: jax.Array, rows: int, scale: float = 1.0,
                           sigma: float = POSTERIOR_BLUR_SIGMA) -> jax.Array:
    """``gaussian_blur(scale * x)`` computed ``rows`` rows at a time (a divisor of x's first
    spatial size) into x's own buffer: no second volume of x's size. Each step keeps the
    original rows just before its slab, which the step before has overwritten."""
    half = blur_margin(sigma)
    n = x.shape[1]
    if half == 0:
        return x * scale
    other_axes = [(0, 0), (0, 0), (half, half), (half, half), (0, 0)]

    def step(k: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x, before = state
        start = k * rows
        slab = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)
        after = jax.lax.dynamic_slice_in_dim(x, jnp.minimum(start + rows, n - half), half, axis=1)
        after = jnp.where(start + rows < n, after, 0.0)
        block = jnp.pad(jnp.concatenate([before, slab, after], axis=1) * scale, other_axes)
        x = jax.lax.dynamic_update_slice_in_dim(x, blur_padded_scaled(block, None, sigma), start, 1)
        return x, slab[:, rows - half:]

    before = jnp.zeros(x.shape[:1] + (half,) + x.shape[2:], x.dtype)
    return jax.lax.fori_loop(0, n // rows, step, (x, before))[0]


def softmax_blurred(network: Any, x: jax.Array, sigma: float = POSTERIOR_BLUR_SIGMA) -> jax.Array:
    """``gaussian_blur(softmax(network(x)))`` for a U-Net whose logits can come out padded
    (``UNet(pad_output=...)``), holding one buffer of the posteriors' size besides the result."""
    logits = network(x, pad_output=blur_margin(sigma))
    return blur_padded_softmax(logits, (0, 0, 0), x.shape[1:4], sigma)


def blur_padded_softmax(logits: jax.Array, starts: tuple, sizes: tuple,
                        sigma: float = POSTERIOR_BLUR_SIGMA) -> jax.Array:
    """The blurred softmax of ``logits`` (B, X, Y, Z, C), a block grown by ``blur_margin`` voxels
    on each side that starts at voxel ``starts`` of a volume of ``sizes``: zero outside the volume.

    The softmax is split as XLA computes it, ``exp(l - max) * (1 / sum)``: the exponentials can
    overwrite the logits, and the per-voxel factor, zero on the padding ring, is applied inside
    the blur's single pass. Blurring ``softmax`` padded afterwards kept three buffers of that
    size at once (2.9 GB each with the parcellation's 69 channels at 224x256x192)."""
    half = blur_margin(sigma)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    factor = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
    if half == 0:
        return e * factor
    for axis, (start, n) in enumerate(zip(starts, sizes), start=1):
        idx = jax.lax.broadcasted_iota(jnp.int32, factor.shape, axis) + start - half
        factor = jnp.where((idx >= 0) & (idx < n), factor, 0.0)
    return blur_padded_scaled(e, factor, sigma)


def unet_variables(variables: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The variables of the U-Net ``prefix`` inside a network's (``Segmenter``, ``RobustCascade``)."""
    return {kind: tree[prefix] for kind, tree in variables.items() if prefix in tree}


@dataclasses.dataclass(frozen=True)
class SlabBudget:
    """When and how finely U-Nets run in slabs (see WHOLE_VOXELS)."""

    slab_bytes: int = SLAB_BYTES
    whole_voxels: int = WHOLE_VOXELS

    def plan(self, cfg: UNetConfig, x: jax.Array, margin: int = 0) -> SlabPlan | None:
        """How the U-Net ``cfg`` runs on ``x`` (B, X, Y, Z, C): None (whole) when it has at most
        ``whole_voxels`` voxels, else in slabs whose first-level maps are at most ``slab_bytes``."""
        if int(np.prod(x.shape[1:4])) <= self.whole_voxels:
            return None
        row_bytes = int(np.prod(x.shape[2:4])) * cfg.nb_features * 4
        return plan_slabs(cfg, x.shape[1], max(1, self.slab_bytes // row_bytes), margin=margin)


def run_unet(cfg: UNetConfig, variables: dict[str, Any], x: jax.Array, slabs: SlabBudget,
             transform: Callable[[jax.Array], jax.Array] = lambda logits: logits) -> jax.Array:
    """``transform`` of the logits of U-Net ``cfg`` (its own variables) on ``x``, whole or in
    slabs (then applied slab by slab: a voxel-wise ``transform`` such as the softmax needs no
    second buffer of the output's size)."""
    plan = slabs.plan(cfg, x)
    if plan is None:
        return transform(UNet(cfg).apply(variables, x))
    return slabwise_logits(cfg, variables, x, plan, transform)


def network_posteriors(module: nn.Module, variables: dict[str, Any], x: jax.Array,
                       slabs: SlabBudget, denoised: jax.Array | None = None) -> jax.Array:
    """A segmenter's (``Segmenter`` or ``RobustCascade``) softmax, its U-Nets in slabs where large;
    the cascade runs its last stage here, on ``denoised`` (``robust_groups``' program)."""
    softmax = lambda logits: jax.nn.softmax(logits, axis=-1)  # noqa: E731
    if isinstance(module, RobustCascade):
        return cascade_last(module.stage_configs(), x, denoised, lambda cfg, z: run_unet(
            cfg, unet_variables(variables, cfg.prefix), z, slabs, softmax))
    cfg = module.config
    return run_unet(cfg, unet_variables(variables, cfg.prefix), x, slabs, softmax)


def robust_groups(module: RobustCascade, variables: dict[str, Any], x: jax.Array,
                  slabs: SlabBudget) -> jax.Array:
    """The cascade's first two stages, compiled as a program of their own: in one program with
    the last stage, XLA kept the first stage's buffers (its skips, its slabs' temporaries) apart
    from the last's, 8.3 GB planned at 256^3 against 5.3 GB for the last stage alone."""
    return cascade_groups(module.stage_configs(), x, lambda cfg, z: run_unet(
        cfg, unet_variables(variables, cfg.prefix), z, slabs))


def qc_one_hot(seg_index: jax.Array, qc_class: jax.Array, n_qc: int, size: int,
               factor: int = 1) -> jax.Array:
    """(B, X, Y, Z) segmentation indices -> one-hot QC classes of the ``size``^3 MakeShape crop.

    ``factor`` > 1 (a QC model trained at ``factor`` mm): each ``factor``^3 block becomes its
    majority class, the hard segmentation at that voxel size that the model was trained on."""
    cropped = jax.vmap(lambda s: crop_around_labels(s, size))(seg_index)
    onehot = jax.nn.one_hot(qc_class[cropped], n_qc, dtype=jnp.float32)
    if factor <= 1:
        return onehot
    b, x, y, z, c = onehot.shape
    votes = onehot.reshape(b, x // factor, factor, y // factor, factor, z // factor, factor, c)
    return jax.nn.one_hot(jnp.argmax(votes.sum(axis=(2, 4, 6)), axis=-1), n_qc, dtype=jnp.float32)


@dataclasses.dataclass
class PaddedResult:
    """``Predictor.predict``'s results, still on the padded RAS grid (host arrays)."""

    seg: np.ndarray                       # (X, Y, Z) int32 labels (parcellation in the cortex)
    posteriors: np.ndarray | None         # (X, Y, Z, C) float32 cleaned posteriors, if asked for
    sums: np.ndarray                      # per non-background channel, inside the unpadded region
                                          # (as the original sums them: see original_sums)
    parc_sums: np.ndarray | None
    parc_posteriors: np.ndarray | None    # (X, Y, Z, n_parc) cleaned, with the posteriors
    qc_scores: np.ndarray | None
    seconds: dict[str, float]


@dataclasses.dataclass
class NetworkOutput:
    posteriors: np.ndarray                 # (X, Y, Z, n_labels) float32, padded grid
    parc_posteriors: np.ndarray | None     # (X, Y, Z, n_parc) float32
    qc_scores: np.ndarray | None           # (n_qc,) raw regressor outputs


class Predictor:
    """Runs the networks of one mode; one compiled executable per padded shape, kept for reuse."""

    def __init__(self, networks: Networks, mode: Mode, qc_crop_size: int | None = None,
                 slabs: SlabBudget = SlabBudget(), box: bool = True) -> None:
        self.networks = networks
        self.mode = mode
        self._factor = int(round(networks.seg_voxel_size))
        # a coarse segmenter's 1 mm work inside the box that can hold brain (coarse.py); False:
        # on the whole grid, as __call__ always does
        self.box = box and self._factor > 1 and not mode.robust and not mode.parc
        self.qc_crop_size = qc_crop_size or networks.qc_crop_size
        self.slabs = slabs
        tables = networks.tables
        self._flip = jnp.asarray(tables.flip, dtype=jnp.int32)
        self._labels = jnp.asarray(tables.segmentation, dtype=jnp.int32)
        self._qc_class = jnp.asarray(tables.qc_class, dtype=jnp.int32)
        self._n_qc = int(tables.n_qc)
        self._parc_labels = jnp.asarray(tables.parcellation, dtype=jnp.int32)
        # cleaned topological classes: their channels (static), and each channel's class (0: none)
        self._groups = [tuple(int(c) for c in g) for g in topology_groups(tables.topology_classes)]
        self._channel_group = channel_groups(self._groups, tables.n_labels)
        self._variables = jax.device_put(networks.variables)
        self._compiled: dict[tuple[int, ...], Any] = {}
        self._compiled_finish: dict[tuple[int, ...], Any] = {}
        self._compiled_parc: dict[tuple[int, ...], Any] = {}
        self._compiled_groups: dict[tuple[int, ...], Any] = {}   # robust: the first two stages
        self._compiled_coarse: dict[tuple[int, ...], Any] = {}   # box path: the network
        self._compiled_box: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}
        self.compile_seconds: dict[tuple[int, ...], float] = {}

    # The traced function -------------------------------------------------------------------
    def _forward(self, variables: dict[str, Any], image: jax.Array,
                 denoised: jax.Array | None = None) -> dict[str, jax.Array]:
        mode, nets = self.mode, self.networks
        x = image[None, ..., None]

        coarse_model = round(nets.seg_voxel_size) > 1

        def segment(inp: jax.Array,
                    at_coarse: Callable[[jax.Array], jax.Array] = lambda logits: logits
                    ) -> jax.Array:
            if not coarse_model:
                return network_posteriors(nets.segmenter, variables["seg"], inp, self.slabs,
                                          denoised)
            logits = at_voxel_size(lambda z: nets.segmenter.apply(variables["seg"], z), inp,
                                   nets.seg_voxel_size, at_coarse)
            return jax.nn.softmax(logits, axis=-1)

        if mode.robust:
            seg_out = parc_in = qc_in = segment(x)
        elif mode.flip:
            # The original blurs both posteriors, then averages; the blur is linear and
            # commutes with the flip (its kernel and zero padding are symmetric) and with the
            # channel swap, so one blur of the average gives the same (up to float rounding)
            # with one posterior-sized pass and buffer less.
            # The two passes run as a loop, one after the other: unrolled, XLA interleaves the
            # two U-Nets and keeps both decoders' activations alive at once (+2.2 GB of
            # temporaries at 224x256x192), and compiles the U-Net twice. The sum is first + back.
            x_flipped = jnp.flip(x, axis=1)
            zeros = jnp.zeros(x.shape[:-1] + (nets.tables.n_labels,), x.dtype)
            flip_back = lambda post: jnp.take(jnp.flip(post, axis=1), self._flip, axis=-1)  # noqa: E731
            plan = self._segmenter_plan(x)

            def add_pass(i: jax.Array, total: jax.Array) -> jax.Array:
                inp = jnp.where(i == 0, x, x_flipped)
                if coarse_model:
                    # flipped back as logits at the network's resolution: the linear
                    # upsampling and the softmax commute with the flip and the channel swap
                    # (exact up to float rounding; the swap's gather cost 3.3 s at 1 mm on
                    # the MNI T1, benchmarks/bench_lowres_path.py)
                    return total + segment(
                        inp, lambda logits: jnp.where(i == 0, logits, flip_back(logits)))
                if plan is None:
                    post = segment(inp)
                    return total + jnp.where(i == 0, post, flip_back(post))

                def add_slab(total: jax.Array, start: jax.Array, logits: jax.Array) -> jax.Array:
                    # each slab's posteriors go straight into the sum (flipped back: the
                    # mirrored rows), so neither pass's whole posteriors ever exist
                    post = jax.nn.softmax(logits, axis=-1)
                    rows = jnp.where(i == 0, start, x.shape[1] - start - plan.rows)
                    here = jax.lax.dynamic_slice_in_dim(total, rows, plan.rows, axis=1)
                    add = jnp.where(i == 0, post, flip_back(post))
                    return jax.lax.dynamic_update_slice_in_dim(total, here + add, rows, axis=1)

                cfg = nets.segmenter.config
                return unet_slabwise(cfg, unet_variables(variables["seg"], cfg.prefix), inp,
                                     plan, add_slab, total)

            total = jax.lax.fori_loop(0, 2, add_pass, zeros)
            blurred = (gaussian_blur(0.5 * total) if plan is None
                       else gaussian_blur_in_slabs(total, plan.rows, 0.5))
            seg_out = parc_in = qc_in = blurred
        else:
            raw = segment(x)
            plan = self._segmenter_plan(x)
            if plan is None or mode.parc or mode.qc:
                blurred = gaussian_blur(raw)
            else:     # raw is not needed after its blur
                blurred = gaussian_blur_in_slabs(raw, plan.rows)
            # fast: the original's outputs are its 'unet_prediction' layer (before the blur)
            # whenever parcellation or QC is requested, the blurred tensor otherwise; the
            # parcellation always sees the blurred one, QC the blurred one only without parc.
            seg_out = raw if (mode.parc or mode.qc) else blurred
            parc_in = blurred
            qc_in = raw if mode.parc else blurred

        # with the masks of post-processing's connected components (the rest is _finish)
        out = {"seg": seg_out[0], **cleanup_masks(seg_out[0], self._groups, mode.is_fast)}
        if mode.parc and self._parc_plan(image.shape) is not None:
            # in slabs after the clean-up (parcellate): only the network's cortex mask now
            out["parc_cortex"] = in_cortex(jnp.argmax(parc_in, axis=-1)[0], self._labels)
        elif mode.parc:
            parc_x = parcellation_input(x, jnp.argmax(parc_in, axis=-1), self._labels)
            unet = lambda z, **kw: nets.parc.apply(variables["parc"], z, **kw)  # noqa: E731
            out["parc"] = softmax_blurred(unet, parc_x)[0]
        if mode.qc:
            onehot = qc_one_hot(jnp.argmax(qc_in, axis=-1), self._qc_class, self._n_qc,
                                self.qc_crop_size, int(round(nets.qc_voxel_size)))
            out["qc"] = nets.qc.apply(variables["qc"], onehot)[0]
        return out

    # The box path of a coarse segmenter (coarse.py) ------------------------------------------
    def _coarse_stage(self, variables: dict[str, Any], image: jax.Array) -> dict[str, jax.Array]:
        """The network's passes as logits at its voxel size (the flipped one flipped back), and
        the bounds that place the box."""
        x = pool(image[None, ..., None], self._factor)
        net = lambda z: self.networks.segmenter.apply(variables["seg"], z)  # noqa: E731
        logits = net(x)
        if self.mode.flip:
            back = jnp.take(jnp.flip(net(jnp.flip(x, axis=1)), axis=1), self._flip, axis=-1)
            logits = jnp.concatenate([logits, back])
        return {"logits": logits, **cell_bounds(logits)}

    def _box_stage(self, variables: dict[str, Any], logits: jax.Array, start: jax.Array,
                   size: tuple[int, int, int]) -> dict[str, jax.Array]:
        """``_forward``'s 1 mm part inside the box: posteriors, clean-up masks, QC (whose input,
        the whole grid's labels, is background outside the box)."""
        mode, factor = self.mode, self._factor
        # fast mode's segmentation is the unblurred posteriors when QC is requested (_forward)
        two_consumers = mode.is_fast and mode.qc
        raw = box_posteriors(logits, start, size, factor, margin=1)
        # computed once: XLA would otherwise fuse the upsampling (raw, when the segmentation
        # also reads it) and the blur's 27 terms into each consumer
        raw = jax.lax.optimization_barrier(raw) if two_consumers else raw
        blurred = jax.lax.optimization_barrier(blur_padded_scaled(raw[None])[0])
        seg = raw[1:-1, 1:-1, 1:-1] if two_consumers else blurred
        out = {"seg": seg, **cleanup_masks(seg, self._groups, mode.is_fast)}
        if mode.qc:
            grid = tuple(n * factor for n in logits.shape[1:4])
            index = jax.lax.dynamic_update_slice(jnp.zeros(grid, jnp.int32),
                                                 jnp.argmax(blurred, axis=-1).astype(jnp.int32),
                                                 tuple(start * factor))
            onehot = qc_one_hot(index[None], self._qc_class, self._n_qc, self.qc_crop_size,
                                int(round(self.networks.qc_voxel_size)))
            out["qc"] = self.networks.qc.apply(variables["qc"], onehot)[0]
        return out

    def _compiled_box_path(self, shape: tuple[int, ...], size: tuple[int, int, int] | None = None):
        """The box path's network program for ``shape`` or, given the box ``size`` (cells), its
        1 mm program and finishing program."""
        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        if size is None:
            if shape not in self._compiled_coarse:
                log.info("compiling %s (network) for padded shape %s", self.mode.describe(), shape)
                lowered = jax.jit(self._coarse_stage).lower(self._variables, spec)
                self._compiled_coarse[shape] = lowered.compile(compiler_options=COMPILER_OPTIONS)
            return self._compiled_coarse[shape]
        if (shape, size) not in self._compiled_box:
            log.info("compiling %s (1 mm box of %s cells) for padded shape %s",
                     self.mode.describe(), size, shape)
            logits = jax.eval_shape(self._coarse_stage, self._variables, spec)["logits"]
            lowered = jax.jit(functools.partial(self._box_stage, size=size)).lower(
                self._variables, logits, jax.ShapeDtypeStruct((3,), jnp.int32))
            # with XLA's default fusions (YNNPACK's): 1.8x faster here than COMPILER_OPTIONS's,
            # which keep the whole grid's posteriors single; the box's are a fraction of those.
            # The finishing program is 2x slower so and keeps them.
            box_shape = tuple(n * self._factor for n in size)
            self._compiled_box[shape, size] = (lowered.compile(), self._compile_finish(box_shape))
        return self._compiled_box[shape, size]

    def _predict_in_box(self, image: np.ndarray, pad_idx: np.ndarray, posteriors: bool,
                        volume_dtype, alignment) -> PaddedResult:
        """``predict`` by the box path: the same results, the 1 mm work only inside the box."""
        shape = tuple(image.shape)
        seconds = {}
        start = time.perf_counter()
        if shape not in self._compiled_coarse:
            self._compiled_box_path(shape)
            self.compile_seconds[shape] = time.perf_counter() - start
        seconds["compile"] = time.perf_counter() - start
        start = time.perf_counter()
        first = self._compiled_coarse[shape](self._variables, image)
        plan = plan_box(np.asarray(first["share"]), np.asarray(first["sure"]), pad_idx,
                        self._factor)
        seconds["network"] = time.perf_counter() - start
        start = time.perf_counter()
        box_stage, finish = self._compiled_box_path(shape, plan.size)
        seconds["compile"] += time.perf_counter() - start
        start = time.perf_counter()
        out = box_stage(self._variables, first["logits"], np.asarray(plan.start, np.int32))
        brain = np.asarray(out["brain"])
        class_masks = None if self.mode.is_fast else np.asarray(out["classes"])
        seconds["network"] += time.perf_counter() - start
        start = time.perf_counter()
        lo = np.asarray(plan.voxel_start)
        box_idx = np.concatenate([np.clip(pad_idx[:3] - lo, 0, plan.voxel_size),
                                  np.clip(pad_idx[3:] - lo, 0, plan.voxel_size)]).astype(np.int32)
        brain_keep, class_keep = keep_masks(brain, class_masks, box_idx, self.mode.is_fast)
        seconds["components"] = time.perf_counter() - start
        start = time.perf_counter()
        fin = finish(out["seg"], brain_keep, class_keep, None)
        seg = np.full(shape, int(self._labels[0]), dtype=np.int32)
        seg[plan.window()] = np.asarray(fin["seg"])
        post_box = np.asarray(fin["posteriors"])
        post = None
        if posteriors:   # background 1 outside the box, as post-processing leaves it
            post = np.zeros(shape + post_box.shape[-1:], np.float32)
            post[..., 0] = 1.0
            post[plan.window()] = post_box
        seconds["postprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        # outside the box every non-background posterior is 0: the sums skip only zeros
        sums = original_sums(post_box, box_idx, volume_dtype, alignment)
        seconds["volumes"] = time.perf_counter() - start
        return PaddedResult(seg=seg, posteriors=post, sums=sums, parc_sums=None,
                            parc_posteriors=None,
                            qc_scores=np.asarray(out["qc"]) if "qc" in out else None,
                            seconds=seconds)

    def _robust_groups(self, variables: dict[str, Any], image: jax.Array) -> jax.Array:
        return robust_groups(self.networks.segmenter, variables["seg"], image[None, ..., None],
                             self.slabs)

    def _segmenter_plan(self, x: jax.Array) -> SlabPlan | None:
        """The slabs of a single-U-Net segmenter at 1 mm (None: whole, or another kind)."""
        nets = self.networks
        if isinstance(nets.segmenter, RobustCascade) or round(nets.seg_voxel_size) > 1:
            return None
        return self.slabs.plan(nets.segmenter.config, x)

    # The parcellation in slabs -------------------------------------------------------------
    # With large feature maps the parcellation U-Net runs after the clean-up, slab by slab: each
    # slab's blurred posteriors are labelled (label_parcellation) and summed for the volumes on
    # the host at once (add_float32_sums, the original's order), so its posteriors (69 channels,
    # 4.6 GB at 256^3) never exist whole.
    def _parc_plan(self, shape: tuple[int, ...]) -> SlabPlan | None:
        spec = jax.ShapeDtypeStruct((1, *shape, 3), jnp.float32)
        return self.slabs.plan(self.networks.parc.config, spec, margin=blur_margin())

    def _parc_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
        return unet_variables(variables["parc"], self.networks.parc.config.prefix)

    def _parc_encode(self, variables: dict[str, Any], image: jax.Array, cortex: jax.Array):
        x = with_cortex_mask(image[None, ..., None], cortex[None])
        return encode_in_slabs(self.networks.parc.config, self._parc_variables(variables), x,
                               self._parc_plan(image.shape))

    def _parc_slab(self, variables: dict[str, Any], skips: dict[int, jax.Array],
                   coarse: jax.Array, seg: jax.Array, k: jax.Array) -> dict[str, jax.Array]:
        plan = self._parc_plan(seg.shape)
        logits = decode_slab(self.networks.parc.config, self._parc_variables(variables), skips,
                             coarse, plan, k)
        start = k * plan.rows
        parc = blur_padded_softmax(logits, (start, 0, 0), seg.shape)[0]
        rows = jax.lax.dynamic_slice_in_dim(seg, start, plan.rows, axis=0)
        rows, parc = label_parcellation(rows, parc, self._parc_labels)
        return {"seg": rows.astype(jnp.int32), "parc": parc}

    def _compile_parcellation(self, shape: tuple[int, ...]):
        spec = lambda s, t=jnp.float32: jax.ShapeDtypeStruct(s, t)  # noqa: E731
        args = (self._variables, spec(shape), spec(shape, jnp.bool_))
        encode = jax.jit(self._parc_encode).lower(*args).compile(compiler_options=COMPILER_OPTIONS)
        skips, coarse = jax.eval_shape(self._parc_encode, *args)
        slab = jax.jit(self._parc_slab).lower(
            self._variables, skips, coarse, spec(shape, jnp.int32), spec((), jnp.int32)
        ).compile(compiler_options=COMPILER_OPTIONS)
        return encode, slab

    def parcellate(self, image: np.ndarray, cortex: jax.Array, seg_device: jax.Array,
                   pad_idx: np.ndarray, keep_posteriors: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The labels with the parcellation in the cortex, the parcellation's float32 sums
        inside ``pad_idx`` (as ``original_sums`` takes them) and, if ``keep_posteriors``, its
        cleaned posteriors (whole: only when an output needs them)."""
        shape = tuple(image.shape)
        plan = self._parc_plan(shape)
        encode, slab = self._compiled_parc[shape]
        skips, coarse = encode(self._variables, image, cortex)
        seg = np.empty(shape, np.int32)
        n_parc = len(self.networks.tables.parcellation)
        kept = np.empty(shape + (n_parc,), np.float32) if keep_posteriors else None
        sums = None
        for k in range(plan.count):
            out = slab(self._variables, skips, coarse, seg_device, np.int32(k))
            start = k * plan.rows
            seg[start:start + plan.rows] = np.asarray(out["seg"])
            if kept is not None:
                kept[start:start + plan.rows] = np.asarray(out["parc"])
            lo, hi = max(int(pad_idx[0]), start), min(int(pad_idx[3]), start + plan.rows)
            if lo < hi:
                rows = np.asarray(out["parc"])[lo - start:hi - start, pad_idx[1]:pad_idx[4],
                                               pad_idx[2]:pad_idx[5], 1:]
                sums = add_float32_sums(sums, rows)
            del out
        if sums is None:
            sums = np.zeros(n_parc - 1, np.float32)
        return seg, sums, kept

    def _finish(self, post: jax.Array, brain_keep: jax.Array, class_keep: jax.Array | None,
                parc: jax.Array | None) -> dict[str, jax.Array]:
        """Post-processing on the device once the connected components are known."""
        return clean_and_label(post, brain_keep, class_keep, parc, self._channel_group,
                               self._labels, self._parc_labels)

    # Compilation cache -----------------------------------------------------------------------
    def compiled(self, shape: tuple[int, ...]):
        shape = tuple(int(s) for s in shape)
        if shape not in self._compiled:
            log.info("compiling %s for padded shape %s", self.mode.describe(), shape)
            start = time.perf_counter()
            spec = jax.ShapeDtypeStruct(shape, jnp.float32)
            args = (self._variables, spec)
            if self.mode.robust:
                groups = jax.jit(self._robust_groups).lower(*args)
                self._compiled_groups[shape] = groups.compile(compiler_options=COMPILER_OPTIONS)
                args += (jax.eval_shape(self._robust_groups, *args),)
            lowered = jax.jit(self._forward).lower(*args)
            self._compiled[shape] = lowered.compile(compiler_options=COMPILER_OPTIONS)
            self._compiled_finish[shape] = self._compile_finish(shape)
            if self.mode.parc and self._parc_plan(shape) is not None:
                self._compiled_parc[shape] = self._compile_parcellation(shape)
            self.compile_seconds[shape] = time.perf_counter() - start
            log.info("compiled in %.1f s (%d shape(s) cached)", self.compile_seconds[shape],
                     len(self._compiled))
        return self._compiled[shape]

    def _run_forward(self, image: np.ndarray) -> dict[str, jax.Array]:
        """The compiled forward of ``image``'s shape (robust: after its first two stages)."""
        shape = tuple(image.shape)
        if self.mode.robust:
            denoised = self._compiled_groups[shape](self._variables, image)
            return self._compiled[shape](self._variables, image, denoised)
        return self._compiled[shape](self._variables, image)

    def compiled_finish(self, shape: tuple[int, ...]):
        """The finishing program (post-processing on the device) for ``shape``, compiled with the
        forward; benchmarks read its memory plan."""
        self.compiled(shape)
        return self._compiled_finish[tuple(int(s) for s in shape)]

    def _compile_finish(self, shape: tuple[int, ...]):
        tables = self.networks.tables
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
        boolean = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)
        n_groups = len(self._groups)
        parc = self.mode.parc and self._parc_plan(shape) is None   # else: parcellate()
        args = (f32(*shape, tables.n_labels), boolean(*shape),
                None if self.mode.is_fast else boolean(n_groups, *shape),
                f32(*shape, len(tables.parcellation)) if parc else None)
        # the forward's posteriors are not used again: their buffers may hold the results
        donate = (0, 3) if parc else (0,)
        lowered = jax.jit(self._finish, donate_argnums=donate).lower(*args)
        return lowered.compile(compiler_options=COMPILER_OPTIONS)

    def predict(self, image: np.ndarray, pad_idx: np.ndarray, posteriors: bool = False,
                volume_dtype=np.float32, alignment=None) -> PaddedResult:
        """The networks and the whole post-processing but the geometry: ``image`` is the padded
        network input, ``pad_idx`` where the scan sits in it. Posteriors are returned only if
        asked for. The volumes' sums are taken on the host as the original takes them
        (``original_sums``: ``volume_dtype`` float32 unless the scan was cropped, then float64;
        ``alignment`` the scan's RAS alignment, which sets the order of the additions)."""
        image = np.asarray(image, dtype=np.float32)
        pad_idx = np.asarray(pad_idx, dtype=np.int32)
        if self.box:
            return self._predict_in_box(image, pad_idx, posteriors, volume_dtype, alignment)
        seconds = {}
        start = time.perf_counter()
        self.compiled(image.shape)
        seconds["compile"] = time.perf_counter() - start
        start = time.perf_counter()
        out = self._run_forward(image)
        brain = np.asarray(out["brain"])
        class_masks = None if self.mode.is_fast else np.asarray(out["classes"])
        seconds["network"] = time.perf_counter() - start
        start = time.perf_counter()
        brain_keep, class_keep = keep_masks(brain, class_masks, pad_idx, self.mode.is_fast)
        seconds["components"] = time.perf_counter() - start
        start = time.perf_counter()
        fin = self._compiled_finish[tuple(image.shape)](out["seg"], brain_keep, class_keep,
                                                        out.get("parc"))
        seg = np.asarray(fin["seg"])
        post = np.asarray(fin["posteriors"])
        parc = np.asarray(fin["parc"]) if "parc" in fin else None
        seconds["postprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        sums = original_sums(post, pad_idx, volume_dtype, alignment)
        # the original sums the parcellation posteriors on the RAS grid, always in float32
        parc_sums = original_sums(parc, pad_idx, np.float32) if parc is not None else None
        seconds["volumes"] = time.perf_counter() - start
        if "parc_cortex" in out:
            start = time.perf_counter()
            seg_device = fin["seg"]
            if not posteriors:
                del fin, post    # the segmentation's posteriors were only needed for the sums
            seg, parc_sums, parc = self.parcellate(image, out["parc_cortex"], seg_device, pad_idx,
                                                   keep_posteriors=posteriors)
            seconds["parcellation"] = time.perf_counter() - start
        return PaddedResult(seg=seg, posteriors=np.asarray(post) if posteriors else None, sums=sums,
                            parc_sums=parc_sums, parc_posteriors=parc if posteriors else None,
                            qc_scores=np.asarray(out["qc"]) if "qc" in out else None, seconds=seconds)

    def __call__(self, image: np.ndarray) -> NetworkOutput:
        image = np.asarray(image, dtype=np.float32)
        self.compiled(image.shape)
        out = jax.device_get(self._run_forward(image))
        return NetworkOutput(posteriors=np.asarray(out["seg"]),
                             parc_posteriors=np.asarray(out["parc"]) if "parc" in out else None,
                             qc_scores=np.asarray(out["qc"]) if "qc" in out else None)
