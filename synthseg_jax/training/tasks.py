"""What each trainable SynthSeg network sees: its inputs, targets, network and losses.

One :class:`Task` per model kind (``configs/model/*.yaml``, key ``kind``):

``segmenter``
    SynthSeg 1.0 / 2.0, and the robust cascade's first stage (targets = the 5 denoiser groups):
    a synthetic image from the generator -> label channel indices. Weighted L2 then soft Dice.
``denoiser``
    The robust cascade's label-to-label network (``l2l``): a noisy one-hot group map -> the
    clean group map. The original trains it on (S1 prediction, ground truth) pairs computed offline
    from degraded real scans. Here the noisy input is a frozen segmenter's own prediction on the
    generated image, in groups (``inputs: predictions``), or the deformed ground truth corrupted
    online (``inputs: corrupted``: a small independent deformation, relabelled blobs, the
    original's random erosion, :func:`corrupt_labels`). The two differ materially
    (BENCHMARKS.md, "The denoiser's and QC model's inputs").
``second``
    The cascade's last segmenter (``unet2``): image + the one-hot groups of its own (deformed,
    dilated/eroded) ground truth -> the 2.0 labels, as the original's ``training_group.py``.
``parc``
    The parcellation U-Net: image + one-hot cortex mask -> cortical parcels. There are no
    parcellation label maps here: the parcels are *pseudo-parcellations* computed from each training
    map's cortex (angular sectors around each hemisphere's centroid, :func:`pseudo_parcellation`),
    which exercises the code path but does not teach a real atlas.
``qc``
    The QC regressor: one-hot QC classes of a segmentation (with the original's random partial
    field of view) -> its per-class Dice against the ground truth (``training_qc.py``). The
    segmentation is a frozen segmenter's own prediction on the generated image
    (``inputs: predictions``, the errors it must recognise, as the original's) or corrupted ground
    truth (``inputs: corrupted``).

Everything here is pure and jittable except the label-map loading at the bottom.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from generator import labels as glab
from generator import spatial
from generator.sampler import (GeneratorConfig, SamplerParams, build_params, list_label_maps,
                               load_label_maps, output_values, resolve_path, sample_labels,
                               sample_with_info)
from synthseg_jax.inference.coarse import pool
from synthseg_jax.nn.synthseg import QCRegressor, Segmenter
from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
from synthseg_jax.training import losses

KINDS = ("segmenter", "denoiser", "second", "parc", "qc")
INPUTS = ("corrupted", "predictions")
# Group tables are written against the 2.0 segmentation labels (55 entries each).
GROUP_TABLES = {"denoiser_2.0": "synthseg_denoiser_labels_2.0.npy",
                "qc_2.0": "synthseg_qc_labels_2.0.npy",
                "qc": "synthseg_qc_labels.npy"}
SEGMENTATION_TABLE_2 = "synthseg_segmentation_labels_2.0.npy"
PARCELLATION_TABLE = "synthseg_parcellation_labels.npy"
CORTEX = (3, 42)


@dataclasses.dataclass(frozen=True)
class Corruption:
    """How the noisy label maps of the denoiser and QC tasks are made from the ground truth."""

    # independent small deformation of the noisy map (the original's group-training bounds)
    scaling: float = 0.05
    rotation: float = 3.0
    shearing: float = 0.007
    translation: float = 2.0
    nonlin_std: float = 1.5
    nonlin_scale: float = 0.04
    # blobs (smooth random regions covering up to this fraction of the volume) get relabelled
    blob_fraction: float = 0.15
    blob_grid: int = 5
    # the original's RandomDilationErosion on the noisy map (radii in mm)
    erosion_prob: float = 0.3
    erosion_min_mm: float = 4.0
    erosion_max_mm: float = 5.0
    # unet2 training: per-group dilation/erosion of the group masks
    group_radius_mm: float = 1.0
    group_prob: float = 0.9
    group_deform_prob: float = 0.9
    # QC partial field of view
    fov_prob: float = 0.3
    fov_min_mm: float = 70.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A network to train (``configs/model/<name>.yaml``, without the generator/train parts)."""

    name: str = "synthseg_2.0"
    kind: str = "segmenter"
    export: str = "2.0"                 # key of models_dir.MODEL_FILES this network belongs to
    prefix: str = "unet"
    labels: Any = "2.0"                 # target labels: '1.0', '2.0', 'denoiser_2.0', 'qc_2.0', ...
    groups: str = "denoiser_2.0"        # second / denoiser: the group table
    corruption: Corruption = Corruption()
    # qc, denoiser: what the network sees, 'corrupted' ground truth or a frozen segmenter's 'predictions'
    inputs: str = "corrupted"
    segmenter: str | None = None        # predictions: its .h5 (architecture.json beside it);
                                        # None: the shipped default model
    segmenter_conv_dtype: str = "bfloat16"   # its convolutions' products (it only predicts)
    # label values (of the target table) counted as white / grey matter in the MNI validation
    mni_wm: tuple = ()
    mni_gm: tuple = ()
    # the network's hyper-parameters, written at the top level of the YAML: UNetConfig's fields
    # (EncoderConfig's for QC); what is not given takes that class's default
    architecture: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d) -> "ModelSpec":
        d = dict(_plain(d) or {})
        kind = d.get("kind", cls.kind)
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
        own = {f.name for f in dataclasses.fields(cls)} - {"architecture"}
        hyper = _network_fields(kind)
        unknown = sorted(set(d) - own - hyper)
        if unknown:
            raise ValueError(f"unknown model parameter(s): {', '.join(unknown)}")
        architecture = {k: d.pop(k) for k in sorted(hyper & set(d))}
        corruption = d.pop("corruption", None) or {}
        bad = sorted(set(corruption) - {f.name for f in dataclasses.fields(Corruption)})
        if bad:
            raise ValueError(f"unknown corruption parameter(s): {', '.join(bad)}")
        for key in ("mni_wm", "mni_gm"):
            if key in d:
                d[key] = tuple(int(v) for v in (d[key] or ()))
        if isinstance(d.get("labels"), list):
            d["labels"] = tuple(d["labels"])
        if d.get("inputs", cls.inputs) not in INPUTS:
            raise ValueError(f"unknown model inputs {d['inputs']!r}; expected one of {', '.join(INPUTS)}")
        if d.get("inputs") == "predictions" and kind not in ("qc", "denoiser"):
            raise ValueError(f"model inputs 'predictions' are for the qc and denoiser kinds, not {kind!r}")
        return cls(corruption=Corruption(**corruption), architecture=architecture, **d)

    def network_config(self, n_labels: int) -> UNetConfig | EncoderConfig:
        """The U-Net's hyper-parameters, or the QC encoder's (which has no label count)."""
        if self.kind == "qc":
            return EncoderConfig(prefix=self.prefix, **self.architecture)
        return UNetConfig(prefix=self.prefix, n_labels=n_labels, **self.architecture)

    def flat_dict(self, n_labels: int) -> dict:
        """The spec as one flat mapping, every hyper-parameter resolved (the checkpoints' meta)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "architecture"}
        network = dataclasses.asdict(self.network_config(n_labels))
        out.update((k, v) for k, v in network.items() if k not in ("prefix", "n_labels"))
        return out

    @property
    def nb_levels(self) -> int:
        return self.network_config(n_labels=1).nb_levels

    @property
    def size_multiple(self) -> int:
        """Crops must be multiples of this (QC: its encoder pools once more after the levels)."""
        return 2 ** self.nb_levels if self.kind == "qc" else 2 ** (self.nb_levels - 1)


def _network_fields(kind: str) -> set[str]:
    config = EncoderConfig if kind == "qc" else UNetConfig
    return {f.name for f in dataclasses.fields(config)} - {"prefix", "n_labels"}


def _plain(d):
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(d, DictConfig):
            return OmegaConf.to_container(d, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return d


# --------------------------------------------------------------------------- label tables

def _load_table(priors_dir: str, name: str) -> np.ndarray:
    return np.load(os.path.join(resolve_path(priors_dir), name))


def group_values(priors_dir: str, table: str, segmentation_values: Sequence[int]) -> np.ndarray:
    """Group of each 2.0 segmentation value, from a group table written against the 55-entry
    2.0 segmentation table (the pairing is position by position)."""
    seg = _load_table(priors_dir, SEGMENTATION_TABLE_2)
    groups = _load_table(priors_dir, GROUP_TABLES[table])
    if len(seg) != len(groups):
        raise ValueError(f"{GROUP_TABLES[table]}: {len(groups)} entries, {SEGMENTATION_TABLE_2} "
                         f"has {len(seg)}")
    mapping = {}
    for s, g in zip(seg.tolist(), groups.tolist()):
        if mapping.setdefault(s, g) != g:
            raise ValueError(f"{GROUP_TABLES[table]}: label {s} is in two groups")
    return np.array([mapping.get(int(v), 0) for v in segmentation_values], np.int64)


def target_values(params: SamplerParams, labels: Any) -> np.ndarray:
    """Target value of every generation label for a label spec ('2.0', 'denoiser_2.0', a list...).

    The group tables are mapped through the 2.0 segmentation labels rather than aligned directly
    with the generation labels, so that non-sided structures (ventricles, brainstem) land in their
    group instead of the background.
    """
    if isinstance(labels, str) and labels in GROUP_TABLES:
        return group_values(params.config.priors_dir, labels, output_values(params, "2.0"))
    return output_values(params, labels)


def to_indices(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channel index of each entry, sorted unique values = the network's channel order)."""
    uniq = np.unique(values)
    return np.searchsorted(uniq, values).astype(np.int32), uniq


# --------------------------------------------------------------------------- corruption

def relabel_blobs(key: jax.Array, labels: jax.Array, n_labels: int, max_fraction: float,
                  grid: int = 5) -> jax.Array:
    """Give smooth random blobs covering ``U(0, max_fraction)`` of the volume a random label
    permutation (each label in a blob becomes one random label)."""
    if max_fraction <= 0:
        return labels
    k_field, k_frac, k_lut = jax.random.split(key, 3)
    coarse = jax.random.normal(k_field, (grid,) * 3 + (1,), jnp.float32)
    frac = jax.random.uniform(k_frac) * max_fraction
    # the threshold is taken on the coarse grid: cheap, and close enough for a random corruption
    thr = jnp.quantile(coarse.reshape(-1), 1.0 - frac)
    field = spatial.resize_linear(coarse, labels.shape)[..., 0]
    lut = jax.random.randint(k_lut, (n_labels,), 0, n_labels)
    swapped = lut[labels.astype(jnp.int32)].astype(labels.dtype)
    return jnp.where(field > thr, swapped, labels)


def _radius(mm: float, voxel: float) -> int:
    return max(1, int(round(mm / voxel)))


def corrupt_labels(key: jax.Array, labels: jax.Array, n_labels: int, c: Corruption,
                   voxel: float, integration_factor: float = 0.25) -> jax.Array:
    """A plausible wrong segmentation of ``labels`` (channel indices): small independent
    deformation, relabelled blobs, then the original's random erosion of the foreground."""
    k_def, k_blob, k_ero = jax.random.split(key, 3)
    noisy = spatial.deform_and_crop(
        k_def, labels, labels.shape, scaling_bounds=c.scaling, rotation_bounds=c.rotation,
        shearing_bounds=c.shearing, translation_bounds=c.translation / voxel,
        nonlin_std=c.nonlin_std, nonlin_scale=c.nonlin_scale, integration_factor=integration_factor)
    noisy = relabel_blobs(k_blob, noisy, n_labels, c.blob_fraction, c.blob_grid)
    if c.erosion_prob > 0:
        noisy = glab.random_dilation_erosion(
            k_ero, noisy, _radius(c.erosion_min_mm, voxel), _radius(c.erosion_max_mm, voxel),
            c.erosion_prob)
    return noisy


# --------------------------------------------------------------------------- tasks

class Task:
    """Inputs/targets sampler, network and losses of one model kind.

    ``sample(key, label_map)`` draws one training pair from a map ``[X, Y, Z]`` of generation-label
    indices; it is pure, so the loop vmaps and jits it.
    """

    def __init__(self, spec: ModelSpec, params: SamplerParams,
                 frozen: "FrozenSegmenter | None" = None, pooling: int = 1):
        """``params``: the generator's resolved tables for this task's label maps
        (:attr:`TrainingData.params`); ``frozen``: the segmenter whose predictions a QC or
        denoiser task with ``inputs: predictions`` learns from (:func:`load_frozen_segmenter`);
        ``pooling`` (``train.network_pooling``): the network works this many times coarser than
        the generator, on the average-pooled image, against each cell's share of every label."""
        if (spec.inputs == "predictions") != (frozen is not None):
            raise ValueError("a frozen segmenter goes with model inputs 'predictions', and only with them")
        if pooling > 1 and spec.kind != "segmenter":
            raise ValueError(f"train.network_pooling {pooling} is for segmenters, not a {spec.kind} model")
        bad = [s for s in params.config.output_shape if s % pooling]
        if bad:
            raise ValueError(f"generator.output_shape {list(params.config.output_shape)} must be a "
                             f"multiple of train.network_pooling {pooling}")
        self.spec = spec
        self.frozen = frozen
        self.pooling = int(pooling)
        self.gparams = params.with_config(target="indices")
        self.gcfg = self.gparams.config
        self.voxel = float(self.gcfg.atlas_res)
        self.network_voxel = self.voxel * self.pooling
        kind = spec.kind
        labels = spec.labels
        if kind == "denoiser":
            labels = spec.groups
        elif kind == "second":
            labels = "2.0" if spec.labels in (None, "") else spec.labels
        values = target_values(self.gparams, labels) if kind != "parc" else \
            np.asarray(self.gparams.output_values)
        self.target_lut, self.target_labels = to_indices(values)
        self.n_outputs = len(self.target_labels)
        if kind in ("second", "denoiser"):
            gvals = target_values(self.gparams, spec.groups)
            self.group_lut, groups = to_indices(gvals)
            self.n_groups = len(groups)
        n_channels = int(self.gcfg.n_channels)
        self.in_channels = {"segmenter": n_channels, "second": n_channels + getattr(self, "n_groups", 0),
                            "denoiser": self.n_outputs, "parc": n_channels + 2,
                            "qc": self.n_outputs}[kind]
        self.phases = ("qc",) if kind == "qc" else ("wl2", "dice")
        if frozen is not None:
            # the segmenter's channels -> this task's target channels, through its group table
            table = spec.labels if kind == "qc" else spec.groups
            if table not in GROUP_TABLES:
                raise ValueError(f"model inputs 'predictions' need a group table as the targets "
                                 f"({', '.join(GROUP_TABLES)}), got {table!r}")
            values = group_values(self.gcfg.priors_dir, table, frozen.labels)
            missing = sorted(set(values.tolist()) - set(self.target_labels.tolist()))
            if missing:
                raise ValueError(f"the frozen segmenter's {table} groups {missing} are not among the "
                                 f"task's targets {self.target_labels.tolist()}")
            self.prediction_lut = np.searchsorted(self.target_labels, values).astype(np.int32)

    # ---- network
    def module(self) -> nn.Module:
        if self.spec.kind == "qc":
            return QCRegressor(n_qc_labels=self.n_outputs, encoder=self.spec.network_config(self.n_outputs))
        return Segmenter(self.spec.network_config(self.n_outputs))

    @property
    def crop_shape(self) -> tuple[int, ...]:
        """The network's input shape (the generator's crop, pooled)."""
        return tuple(int(s) // self.pooling for s in self.gcfg.output_shape)

    # ---- data
    @property
    def aux(self) -> Any:
        """What :meth:`sample` needs besides the key and the map (the frozen segmenter's
        variables), passed as an argument so that jit does not embed it as a constant."""
        return None if self.frozen is None else self.frozen.variables

    def sample(self, key: jax.Array, label_map: jax.Array, aux: Any = None) -> tuple[jax.Array, jax.Array]:
        """One ``(inputs, targets)`` pair from a label map of generation-label indices;
        ``aux``: :attr:`aux`."""
        k_gen, k_extra = jax.random.split(key)
        kind = self.spec.kind
        lut = jnp.asarray(self.target_lut)
        c = self.spec.corruption
        if self.frozen is not None:
            image, _, info = sample_with_info(k_gen, label_map, self.gparams)
            target = lut[info["labels"].astype(jnp.int32)]
            logits = self.frozen.module.apply(aux, image[None])[0]
            predicted = jnp.asarray(self.prediction_lut)[jnp.argmax(logits, -1)]
            if kind == "denoiser":
                return losses.one_hot(predicted, self.n_outputs), target
            return self._qc_pair(k_extra, predicted, target)
        if kind in ("denoiser", "qc"):
            target = lut[sample_labels(k_gen, label_map, self.gparams).astype(jnp.int32)]
            k_cor, k_fov = jax.random.split(k_extra)
            noisy = corrupt_labels(k_cor, target, self.n_outputs, c, self.voxel,
                                   self.gcfg.nonlin_integration_factor)
            if kind == "denoiser":
                return losses.one_hot(noisy, self.n_outputs), target
            return self._qc_pair(k_fov, noisy, target)
        image, _, info = sample_with_info(k_gen, label_map, self.gparams)
        labels = info["labels"].astype(jnp.int32)
        target = lut[labels]
        if kind == "segmenter":
            if self.pooling > 1:
                return (pool(image[None], self.pooling)[0],
                        pool(losses.one_hot(target[None], self.n_outputs, image.dtype), self.pooling)[0])
            return image, target
        if kind == "parc":
            cortex = (target > 0).astype(jnp.int32)
            return jnp.concatenate([image, losses.one_hot(cortex, 2, image.dtype)], -1), target
        # second: image + dilated/eroded one-hot groups of a slightly deformed ground truth
        groups = jnp.asarray(self.group_lut)[labels]
        k_def, k_apply, k_morph = jax.random.split(k_extra, 3)
        moved = spatial.deform_and_crop(
            k_def, groups, groups.shape, scaling_bounds=c.scaling, rotation_bounds=c.rotation,
            shearing_bounds=c.shearing, translation_bounds=c.translation / self.voxel,
            nonlin_std=c.nonlin_std, nonlin_scale=c.nonlin_scale,
            integration_factor=self.gcfg.nonlin_integration_factor)
        groups = jnp.where(jax.random.uniform(k_apply) < c.group_deform_prob, moved, groups)
        masks = glab.corrupt_groups(k_morph, groups, self.n_groups,
                                    _radius(c.group_radius_mm, self.voxel), c.group_prob)
        return jnp.concatenate([image, masks.astype(image.dtype)], -1), target

    def _qc_pair(self, key: jax.Array, segmentation: jax.Array, target: jax.Array):
        """The QC regressor's input (one-hot, after the random partial field of view) and its
        per-class Dice against the target."""
        c = self.spec.corruption
        min_fov = min(_radius(c.fov_min_mm, self.voxel), target.shape[0] - 1)
        return glab.simulate_partial_fov(key, segmentation, target, self.n_outputs, target.shape,
                                         min_fov, c.fov_prob)

    # ---- losses and metrics
    def loss(self, phase: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        if phase == "qc":
            return losses.qc_regression_loss(outputs, targets)
        return losses.segmentation_loss(phase, outputs, targets)

    def evaluate(self, outputs: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        """Validation scores of one batch: mean hard Dice over the foreground labels present in
        the target (segmentation kinds) or mean absolute error of the predicted Dice (QC)."""
        if self.spec.kind == "qc":
            return {"qc_mae": jnp.mean(jnp.abs(outputs - targets))}
        if targets.ndim == outputs.ndim:        # label shares (network_pooling): their argmax
            targets = jnp.argmax(targets, -1)
        pred = jnp.argmax(outputs, -1)
        dice, present = jax.vmap(lambda p, t: losses.hard_dice(p, t, self.n_outputs))(pred, targets)
        present = present.at[:, 0].set(False)
        mean = jnp.sum(dice * present, -1) / jnp.maximum(jnp.sum(present, -1), 1)
        return {"dice": jnp.mean(mean)}


# --------------------------------------------------------------------------- pseudo-parcellation

def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar),
                     np.cos(polar)], -1)


def pseudo_parcellation(index_map: np.ndarray, left: int, right: int, n_parcels: int) -> np.ndarray:
    """Split each hemisphere's cortex (indices ``left``/``right`` of an RAS map) into ``n_parcels``
    angular sectors around the hemisphere's centroid, in coordinates scaled by its spread, with
    the right hemisphere mirrored so that parcel ``k`` is homologous on both sides.

    Returns parcel numbers ``1..n_parcels`` in the cortex, 0 elsewhere. Not an anatomical atlas:
    a stand-in with the same number of consistent, compact cortical regions.
    """
    directions = fibonacci_directions(n_parcels)
    out = np.zeros(index_map.shape, np.int16)
    for index, mirror in ((left, False), (right, True)):
        coords = np.argwhere(index_map == index)
        if not len(coords):
            continue
        x = coords.astype(np.float32)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-3)
        if mirror:
            x[:, 0] = -x[:, 0]
        out[tuple(coords.T)] = np.argmax(x @ directions.T.astype(np.float32), axis=1) + 1
    return out


def parcellation_generator_config(base: SamplerParams) -> tuple[GeneratorConfig, np.ndarray, Any]:
    """The generator config of the parcellation task: the parcels become generation labels
    (sided, sharing the intensity class of their hemisphere's cortex) whose output values are the
    parcellation labels; everything else maps to 0.

    Returns ``(config, remap, parcels)`` where ``remap`` maps old generation indices to new ones and
    ``parcels(index_map) -> new index map`` converts a loaded map."""
    gcfg = base.config
    gl = np.asarray(base.generation_labels)
    classes = np.asarray(base.class_of_label)
    n_neutral = base.n_neutral_labels
    n_side = (len(gl) - n_neutral) // 2
    parc = np.unique(_load_table(gcfg.priors_dir, PARCELLATION_TABLE))
    left_parc, right_parc = parc[(parc > 0) & (parc < 2000)], parc[parc >= 2000]
    if len(left_parc) != len(right_parc):
        raise ValueError(f"{PARCELLATION_TABLE}: {len(left_parc)} left and {len(right_parc)} right labels")
    n_p = len(left_parc)
    left_end = n_neutral + n_side
    new_gl = np.concatenate([gl[:left_end], left_parc, gl[left_end:], right_parc])
    i_left, i_right = int(np.where(gl == CORTEX[0])[0][0]), int(np.where(gl == CORTEX[1])[0][0])
    new_classes = np.concatenate([classes[:left_end], np.full(n_p, classes[i_left]),
                                  classes[left_end:], np.full(n_p, classes[i_right])])
    new_out = np.concatenate([np.zeros(left_end, np.int64), left_parc,
                              np.zeros(n_side, np.int64), right_parc])
    remap = np.concatenate([np.arange(left_end), np.arange(left_end, len(gl)) + n_p])
    first_left, first_right = left_end, len(gl) + n_p

    def parcels(index_map: np.ndarray) -> np.ndarray:
        sectors = pseudo_parcellation(index_map, i_left, i_right, n_p)
        out = remap[index_map.astype(np.int64)]
        lmask = index_map == i_left
        rmask = index_map == i_right
        out[lmask] = first_left + sectors[lmask] - 1
        out[rmask] = first_right + sectors[rmask] - 1
        return out.astype(np.uint8 if len(new_gl) <= 256 else np.int32)

    new_cfg = gcfg.replace(generation_labels=tuple(int(v) for v in new_gl),
                           generation_classes=tuple(int(v) for v in new_classes),
                           output_labels=tuple(int(v) for v in new_out))
    return new_cfg, remap, parcels


# --------------------------------------------------------------------------- data

@dataclasses.dataclass
class TrainingData:
    params: SamplerParams        # the generator's tables fitted to the data (atlas_res, parc labels)
    train_maps: np.ndarray       # [N, X, Y, Z] generation-label indices
    val_maps: np.ndarray
    train_paths: tuple
    val_paths: tuple

    @property
    def gcfg(self) -> GeneratorConfig:
        return self.params.config


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def load_training_data(spec: ModelSpec, gcfg: GeneratorConfig, held_out: Sequence[str] = (),
                       max_maps: int | None = None, downsample: int = 1,
                       label_dir: str | None = None) -> TrainingData:
    """Read the label maps once (train / held-out split by file stem), optionally keep one voxel
    in ``downsample`` along each axis (nearest), and resolve the generator's tables once for them:
    ``atlas_res`` = voxel size x ``downsample``; parcellation task: pseudo-parcels as extra
    generation labels."""
    files = list_label_maps(label_dir or gcfg.label_dir)
    held = set(held_out or ())
    val_files = [f for f in files if _stem(f) in held]
    train_files = [f for f in files if _stem(f) not in held]
    missing = held - {_stem(f) for f in val_files}
    if missing:
        raise FileNotFoundError(f"held-out label map(s) {sorted(missing)} not in "
                                f"{resolve_path(label_dir or gcfg.label_dir)}")
    if max_maps:
        train_files = train_files[: int(max_maps)]
    if not train_files:
        raise ValueError("no training label maps left after holding out the validation maps")
    params = build_params(gcfg)
    base_gl = params.generation_labels
    convert = None
    if spec.kind == "parc":
        parc_cfg, _, convert = parcellation_generator_config(params)
        params = build_params(parc_cfg)
    f = int(downsample)

    def read(paths):
        out, voxel = [], None
        for p in paths:
            bank = load_label_maps(p, base_gl)
            m = np.asarray(bank.maps[0])
            if convert is not None:
                m = convert(m)
            out.append(m[::f, ::f, ::f])
            voxel = bank.voxel_size
        return (np.stack(out) if out else None), voxel

    train, voxel = read(train_files)
    val, _ = read(val_files)
    return TrainingData(params=params.with_config(atlas_res=float(voxel) * f),
                        train_maps=train, val_maps=val,
                        train_paths=tuple(train_files), val_paths=tuple(val_files))


@dataclasses.dataclass(frozen=True)
class FrozenSegmenter:
    """A trained segmenter that only predicts: its predictions are the QC or denoiser task's inputs."""

    module: nn.Module
    variables: Any
    labels: np.ndarray           # the 2.0 segmentation label of each of its output channels


def load_frozen_segmenter(spec: ModelSpec, voxel_size: float,
                          labels_dir: str | None = None) -> FrozenSegmenter:
    """Read ``spec.segmenter`` (default: the shipped model) and the label of each of its output
    channels (the 2.0 segmentation table).

    Refused if it was trained at another voxel size than the task's data: its predictions would
    then show errors it does not make at its own resolution."""
    from synthseg_jax.package_data import default_models_dir, label_tables_dir
    from synthseg_jax.weights.models_dir import MODEL_FILES, ModelsDir

    path = os.path.expanduser(spec.segmenter or os.path.join(default_models_dir(), MODEL_FILES["2.0"]))
    models = ModelsDir(os.path.dirname(path) or ".", labels_dir=labels_dir or label_tables_dir(),
                       overrides={"2.0": path})
    module, variables = models.load_network("2.0", spec.segmenter_conv_dtype)
    trained_at = models.voxel_size("2.0", variables)
    if abs(trained_at - voxel_size) > 1e-6:
        raise ValueError(f"{path}: trained at {trained_at:g} mm, the task's data are at "
                         f"{voxel_size:g} mm (train.label_downsample)")
    return FrozenSegmenter(module=module, variables=variables,
                           labels=np.asarray(models.labels("2.0").segmentation))
