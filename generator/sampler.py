"""The composed generator: ``sample(key, label_map, params) -> (image, target)``.

Order of operations (SynthSeg's labels-to-image model): spatial deformation + crop (one nearest
resampling), left/right flip, GMM sampling, bias field, clip / normalise / gamma, resolution
randomisation (blur, down- and up-sampling), conversion to the segmentation labels.

* :class:`GeneratorConfig` -- frozen dataclass mirroring ``configs/generator/*.yaml``;
* :func:`load_config` -- Hydra compose of a generator config with overrides;
* :class:`SamplerParams` -- the config with its label tables resolved (hashable; the static
  argument of the jitted sampler); :func:`output_values` maps its labels through another table;
* :func:`load_label_maps` -- read a folder of label maps once into one device array of
  generation-label indices, with one-line errors naming any bad file;
* :func:`sample`, :func:`sample_with_info`, :func:`sample_from_bank`, :func:`make_sampler`;
  :func:`sample_labels`, the deformed labels of a sample without its image.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from synthseg_jax.package_data import config_dir

from . import intensity as inten
from . import labels as lab
from . import resolution as reso
from . import spatial

Array = jax.Array

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(config_dir(), 'generator')   # package data: also found from a wheel

LABEL_TABLES = {
    # short names accepted for output_labels
    '1.0': 'synthseg_segmentation_labels.npy',
    '2.0': 'synthseg_segmentation_labels_2.0.npy',
    'denoiser_2.0': 'synthseg_denoiser_labels_2.0.npy',
    'qc': 'synthseg_qc_labels.npy',
    'qc_2.0': 'synthseg_qc_labels_2.0.npy',
}


class LabelMapError(ValueError):
    """A label map that cannot be used (unreadable, wrong shape, unknown labels...)."""


# --------------------------------------------------------------------------- configuration

def _freeze(v):
    """Lists (possibly nested) -> tuples so the config stays hashable."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass(frozen=True)
class GeneratorConfig:
    """All generator parameters; defaults are SynthSeg's published training setup
    (``BrainGenerator`` defaults / tutorial 3, with the 2.0 segmentation labels)."""
    # data
    label_dir: str = '../shared/data/synthseg/training_label_maps'
    priors_dir: str = '../shared/data/synthseg/labels_classes_priors'
    generation_labels: Any = 'generation_labels.npy'      # file, list, or None (= from the maps)
    n_neutral_labels: Optional[int] = 18
    generation_classes: Any = 'generation_classes.npy'    # file, list, or None (one per label)
    output_labels: Any = '2.0'                             # '1.0', '2.0', file, list, None (= identity)
    target: str = 'values'                                 # 'values' or 'indices' (softmax order)
    # output
    output_shape: Tuple[int, ...] = (160, 160, 160)
    n_channels: int = 1
    atlas_res: float = 1.0
    # GMM
    prior_distributions: str = 'uniform'
    prior_means: Any = None                                # None -> U(0, 250)
    prior_stds: Any = None                                 # None -> U(0, 30)
    use_specific_stats_for_channel: bool = False
    mix_prior_and_random: bool = False
    background_zero_prob: float = 0.05
    background_low_prob: float = 0.25
    background_low_mean: float = 15.0
    background_low_std: float = 5.0
    # spatial
    flipping: bool = True
    flip_prob: float = 0.5
    scaling_bounds: Any = 0.2
    rotation_bounds: Any = 15.0
    shearing_bounds: Any = 0.012
    translation_bounds: Any = False
    nonlin_std: float = 4.0
    nonlin_scale: float = 0.04
    nonlin_int_steps: int = 7
    nonlin_integration_factor: float = 0.5                 # integration grid / label shape (0.5 = original)
    # bias field
    bias_field_std: float = 0.7
    bias_scale: float = 0.025
    bias_prob: float = 0.95
    # intensity augmentation
    clip: float = 300.0
    normalise: bool = True
    gamma_std: float = 0.5
    # resolution
    randomise_res: bool = True
    max_res_iso: Optional[float] = 4.0
    max_res_aniso: Optional[float] = 8.0
    prob_iso: float = 0.1
    prob_min: float = 0.05
    blur_range: float = 1.03
    data_res: Any = None
    thickness: Any = None

    @classmethod
    def from_dict(cls, d) -> 'GeneratorConfig':
        """Build from a dict / OmegaConf node; unknown keys are an error."""
        try:
            from omegaconf import DictConfig, OmegaConf
            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        d = dict(d or {})
        d.pop('_target_', None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown generator parameter(s): {', '.join(unknown)}")
        d = {k: _freeze(v) for k, v in d.items()}
        if 'output_shape' in d:
            s = d['output_shape']
            d['output_shape'] = (int(s),) * 3 if isinstance(s, (int, float)) else tuple(int(v) for v in s)
        return cls(**d)

    def replace(self, **kw) -> 'GeneratorConfig':
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in kw.items()})


def load_config(name: str = 'default', overrides: Sequence[str] = ()) -> GeneratorConfig:
    """Compose ``configs/generator/<name>.yaml`` with Hydra overrides (``key=value``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides))
    return GeneratorConfig.from_dict(cfg)


def resolve_path(path: str, base: Optional[str] = None) -> str:
    """Absolute path: as given if it exists from the working directory, else relative to
    ``base`` (default: the repository root)."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.normpath(os.path.join(base or REPO_ROOT, path))


def _table(value, priors_dir: str, what: str) -> Optional[np.ndarray]:
    if value is None:
        return None
    if isinstance(value, str):
        value = LABEL_TABLES.get(value, value)
        p = resolve_path(value, resolve_path(priors_dir))
        if not os.path.exists(p):
            p2 = resolve_path(value)
            if not os.path.exists(p2):
                raise FileNotFoundError(f"{what}: no such file {p}")
            p = p2
        return np.load(p)
    return np.asarray(value)


@dataclass(frozen=True)
class SamplerParams:
    """A config with its tables resolved; hashable, used as the static argument of the sampler."""
    config: GeneratorConfig
    generation_labels: Tuple[int, ...]
    n_neutral_labels: int
    class_of_label: Tuple[int, ...]
    n_classes: int
    flip_lut: Tuple[int, ...]
    output_values: Tuple[int, ...]       # generation-label index -> output label value
    output_indices: Tuple[int, ...]      # generation-label index -> softmax channel
    prior_means: Any                     # nested tuples or None
    prior_stds: Any

    @property
    def n_labels(self) -> int:
        return len(self.generation_labels)

    @property
    def segmentation_labels(self) -> Tuple[int, ...]:
        """Sorted unique output values (the segmentation network's channel order)."""
        return tuple(int(v) for v in np.unique(self.output_values))

    def with_config(self, **changes) -> 'SamplerParams':
        """The same resolved tables with other sampling settings (crop, resolution, target...);
        a key that names or changes a table needs ``build_params``."""
        tables = sorted(set(changes) & TABLE_KEYS)
        if tables:
            raise ValueError(f"{', '.join(tables)} change the label tables: use build_params")
        return dataclasses.replace(self, config=self.config.replace(**changes))


TABLE_KEYS = {'priors_dir', 'generation_labels', 'n_neutral_labels', 'generation_classes',
              'output_labels', 'prior_means', 'prior_stds'}


def build_params(cfg: GeneratorConfig, generation_labels: Optional[Sequence[int]] = None) -> SamplerParams:
    """Resolve the label tables of ``cfg`` (``generation_labels`` overrides the config's, e.g.
    when derived from the label maps)."""
    gl = np.asarray(generation_labels) if generation_labels is not None else \
        _table(cfg.generation_labels, cfg.priors_dir, 'generation_labels')
    if gl is None:
        raise ValueError("generation_labels is None: load the label maps to derive them")
    gl = gl.astype(np.int64).reshape(-1)
    n = len(gl)
    n_neutral = n if cfg.n_neutral_labels is None else int(cfg.n_neutral_labels)
    classes = _table(cfg.generation_classes, cfg.priors_dir, 'generation_classes')
    classes = np.arange(n) if classes is None else classes.astype(np.int64).reshape(-1)
    if len(classes) != n:
        raise ValueError(f"generation_classes has {len(classes)} entries for {n} generation labels")
    n_classes = int(classes.max()) + 1
    if not np.array_equal(np.unique(classes), np.arange(n_classes)):
        raise ValueError("generation_classes must cover 0..K-1")
    out = _output_values(cfg.output_labels, cfg.priors_dir, gl, n_neutral)
    means = cfg.prior_means
    stds = cfg.prior_stds
    if isinstance(means, str):
        means = _freeze(_table(means, cfg.priors_dir, 'prior_means').tolist())
    if isinstance(stds, str):
        stds = _freeze(_table(stds, cfg.priors_dir, 'prior_stds').tolist())
    return SamplerParams(
        config=cfg,
        generation_labels=tuple(int(v) for v in gl),
        n_neutral_labels=n_neutral,
        class_of_label=tuple(int(v) for v in classes),
        n_classes=n_classes,
        flip_lut=tuple(int(v) for v in lab.flip_lut(n, n_neutral)),
        output_values=tuple(int(v) for v in out),
        output_indices=tuple(int(v) for v in lab.index_lut(out)),
        prior_means=means,
        prior_stds=stds,
    )


def _output_values(output_labels, priors_dir: str, generation_labels: np.ndarray,
                   n_neutral: int) -> np.ndarray:
    out = _table(output_labels, priors_dir, 'output_labels')
    if out is None:
        return generation_labels.copy()
    return lab.align_table(out.reshape(-1), generation_labels, n_neutral)


def output_values(params: SamplerParams, output_labels: Any) -> np.ndarray:
    """The output value of every generation label for another ``output_labels`` (a name of
    :data:`LABEL_TABLES`, a file, a list or None), as ``build_params`` would resolve it, without
    resolving the other tables again."""
    return _output_values(output_labels, params.config.priors_dir,
                          np.asarray(params.generation_labels, np.int64), params.n_neutral_labels)


# --------------------------------------------------------------------------- label-map loading

@dataclass(frozen=True, eq=False)
class LabelBank:
    """Label maps of one folder as generation-label indices on the device, ``[N, X, Y, Z]``."""
    maps: Array
    paths: Tuple[str, ...]
    voxel_size: float
    generation_labels: Tuple[int, ...]

    def __len__(self):
        return len(self.paths)


NIFTI_EXT = ('.nii.gz', '.nii', '.mgz', '.mgh')


def list_label_maps(label_dir: str) -> list:
    path = resolve_path(label_dir)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise LabelMapError(f"{path}: label-map folder does not exist")
    files = sorted(f for f in glob.glob(os.path.join(path, '*')) if f.endswith(NIFTI_EXT))
    if not files:
        raise LabelMapError(f"{path}: no label maps (.nii.gz/.nii/.mgz) in this folder")
    return files


def _read_label_map(path: str):
    import nibabel as nib
    try:
        img = nib.as_closest_canonical(nib.load(path))       # RAS axes, as the original's aff_ref=eye(4)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file name
        raise LabelMapError(f"{path}: cannot read label map ({type(e).__name__}: {e})".replace('\n', ' ')) from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise LabelMapError(f"{path}: label map must be 3-D, got shape {data.shape}")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.issubdtype(data.dtype, np.integer):
        r = np.rint(data)
        if not np.array_equal(r, data):
            raise LabelMapError(f"{path}: label map has non-integer values")
        data = r
    return data.astype(np.int32), zooms


def load_label_maps(label_dir: str, generation_labels: Optional[Sequence[int]] = None,
                    max_maps: Optional[int] = None) -> LabelBank:
    """Read every label map of ``label_dir`` once (RAS-reoriented), check them and store them
    on the device as generation-label indices (uint8).  With ``generation_labels=None`` the
    sorted union of the maps' labels is used.  Errors are one line naming the bad file."""
    files = list_label_maps(label_dir)
    if max_maps:
        files = files[:max_maps]
    gl = None if generation_labels is None else np.asarray(generation_labels, dtype=np.int64)
    maps, shape, vox = [], None, None
    for f in files:
        data, zooms = _read_label_map(f)
        if shape is None:
            shape, vox = data.shape, zooms
        elif data.shape != shape:
            raise LabelMapError(f"{f}: shape {data.shape} differs from {shape} of {files[0]}")
        if not np.allclose(zooms, vox, atol=1e-3):
            raise LabelMapError(f"{f}: voxel size {tuple(zooms)} differs from {tuple(vox)} of {files[0]}")
        if gl is not None:          # encode at once (uint8): 4x less host memory than int32 maps
            try:
                data = lab.encode_label_map(data, gl)
            except ValueError as e:
                raise LabelMapError(f"{f}: {e}") from None
        maps.append(data)
    if not np.allclose(vox, vox[0], atol=1e-3):
        raise LabelMapError(f"{files[0]}: anisotropic voxels {tuple(vox)} are not supported")
    if gl is None:                  # derive the generation labels from the maps, then encode
        gl = np.unique(np.concatenate([np.unique(m) for m in maps]))
        maps = [lab.encode_label_map(m, gl) for m in maps]
    return LabelBank(maps=jnp.asarray(np.stack(maps)), paths=tuple(files), voxel_size=float(vox[0]),
                     generation_labels=tuple(int(v) for v in gl))


# --------------------------------------------------------------------------- the sampler

def _split(key: Array, cfg: GeneratorConfig) -> Array:
    # one split for everything (each PRNG call site costs compile time)
    return jax.random.split(key, 2 + 5 * cfg.n_channels)


def _deformed_labels(keys: Array, label_map: Array, params: SamplerParams, info: Optional[dict]):
    """Steps 1-2: deformed, cropped, flipped generation-label indices, and the two uniform draws
    (flip, bias-field application) of the sample."""
    cfg = params.config
    k_spatial, k_misc = keys[0], keys[1]
    u_misc = jax.random.uniform(k_misc, (2,), jnp.float32)     # flip, bias-field application
    out_shape = tuple(min(int(o), int(s)) for o, s in zip(cfg.output_shape, label_map.shape))

    # 1. spatial deformation and crop: one nearest-neighbour resampling
    labels, sp = spatial.deform_and_crop(
        k_spatial, label_map, out_shape, scaling_bounds=cfg.scaling_bounds, rotation_bounds=cfg.rotation_bounds,
        shearing_bounds=cfg.shearing_bounds, translation_bounds=cfg.translation_bounds,
        nonlin_std=cfg.nonlin_std, nonlin_scale=cfg.nonlin_scale, int_steps=cfg.nonlin_int_steps,
        integration_factor=cfg.nonlin_integration_factor, return_params=True)
    if info is not None:
        info.update({k: v for k, v in sp.items() if k != 'positions'})
        info['labels_before_flip'] = labels

    # 2. left/right flip (RAS axis 0) with label swap
    if cfg.flipping:
        do_flip = u_misc[0] < cfg.flip_prob
        labels = lab.flip_lr(labels, do_flip, np.asarray(params.flip_lut, np.int32), axis=0)
        if info is not None:
            info['flipped'] = do_flip
    if info is not None:
        info['labels'] = labels
    return labels, u_misc


def _sample(key: Array, label_map: Array, params: SamplerParams, with_info: bool):
    cfg = params.config
    keys = _split(key, cfg)
    info = {} if with_info else None
    labels, u_misc = _deformed_labels(keys, label_map, params, info)
    out_shape = labels.shape

    class_of_label = jnp.asarray(params.class_of_label, jnp.int32)
    bias_apply = u_misc[1] < cfg.bias_prob
    channels, ch_info = [], []
    for c in range(cfg.n_channels):
        kc = keys[2 + 5 * c:7 + 5 * c]
        # 3. GMM
        means, stds = inten.sample_gmm_params(
            kc[0], params.n_classes, cfg.prior_distributions, params.prior_means, params.prior_stds,
            channel=c, use_specific_stats_for_channel=cfg.use_specific_stats_for_channel,
            mix_prior_and_random=cfg.mix_prior_and_random, background_zero_prob=cfg.background_zero_prob,
            background_low_prob=cfg.background_low_prob, background_low_mean=cfg.background_low_mean,
            background_low_std=cfg.background_low_std)
        im = inten.sample_gmm(kc[1], labels, means[class_of_label], stds[class_of_label])
        ci = dict(class_means=means, class_stds=stds)
        if with_info:
            ci['gmm'] = im
        # 4. bias field
        if cfg.bias_field_std > 0:
            im, ci['bias_std'] = inten.apply_bias_field(kc[2], im, cfg.bias_field_std, cfg.bias_scale,
                                                        bias_apply)
        # 5. clip, normalise, gamma
        im = inten.intensity_augmentation(kc[3], im, cfg.clip, cfg.normalise, cfg.gamma_std)
        # 6. resolution
        if cfg.randomise_res:
            im, rp = reso.randomise_resolution(kc[4], im, out_shape, cfg.atlas_res, cfg.max_res_iso,
                                               cfg.max_res_aniso, cfg.prob_iso, cfg.prob_min, cfg.blur_range,
                                               return_params=True)
            ci.update(resolution=rp['resolution'], thickness=rp['thickness'], sigma=rp['sigma'])
        else:
            im = reso.fixed_resolution(kc[4], im, out_shape, cfg.atlas_res, cfg.data_res, cfg.thickness,
                                       cfg.blur_range)
        channels.append(im)
        ch_info.append(ci)
    image = jnp.stack(channels, -1)

    # 7. label conversion
    table = params.output_values if cfg.target == 'values' else params.output_indices
    if cfg.target not in ('values', 'indices'):
        raise ValueError(f"target must be 'values' or 'indices', got {cfg.target!r}")
    target = lab.convert(labels, np.asarray(table, np.int32))
    if with_info:
        info['bias_applied'] = bias_apply
        info['channels'] = ch_info
        return image, target, info
    return image, target


@partial(jax.jit, static_argnames=('params',))
def sample(key: Array, label_map: Array, params: SamplerParams) -> Tuple[Array, Array]:
    """One synthetic training pair from a label map of generation-label indices ``[X, Y, Z]``.

    Returns ``image`` ``[*output_shape, n_channels]`` float32 in [0, 1] and ``target``
    ``[*output_shape]`` int32 (segmentation label values, or softmax indices with
    ``target='indices'``).  Pure: the same key gives the same sample.  Vmappable over ``key``
    and ``label_map``.
    """
    return _sample(key, label_map, params, False)


@partial(jax.jit, static_argnames=('params',))
def sample_labels(key: Array, label_map: Array, params: SamplerParams) -> Array:
    """The deformed, cropped and flipped generation-label indices from which :func:`sample` draws
    its image with the same key, without the image (label-to-label training, e.g. a denoiser)."""
    return _deformed_labels(_split(key, params.config), label_map, params, None)[0]


@partial(jax.jit, static_argnames=('params',))
def sample_with_info(key: Array, label_map: Array, params: SamplerParams):
    """:func:`sample` plus a dict of the drawn parameters and intermediate volumes (tests,
    debugging)."""
    return _sample(key, label_map, params, True)


def sample_from_bank(key: Array, maps: Array, params: SamplerParams) -> Tuple[Array, Array]:
    """Pick a label map uniformly from ``maps`` ``[N, X, Y, Z]`` and sample from it."""
    k_pick, k_sample = jax.random.split(key)
    idx = jax.random.randint(k_pick, (), 0, maps.shape[0])
    return _sample(k_sample, maps[idx], params, False)


def make_sampler(params: SamplerParams, batch_size: Optional[int] = None):
    """Jitted ``fn(key, maps) -> (image, target)`` drawing from a label bank; with
    ``batch_size`` the outputs get a leading batch axis (one vmapped computation)."""
    if batch_size is None:
        return jax.jit(partial(sample_from_bank, params=params))

    def batched(key, maps):
        keys = jax.random.split(key, batch_size)
        return jax.vmap(partial(sample_from_bank, params=params), in_axes=(0, None))(keys, maps)

    return jax.jit(batched)
