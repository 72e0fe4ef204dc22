"""The typed configuration of a training run, checked once when the run starts.

``configs/train.yaml`` (sections ``train`` and ``validation``, ``seed``) and its groups
``optim`` (:class:`OptimConfig`), ``model`` (:class:`~synthseg_jax.training.tasks.ModelSpec`) and
``generator`` (:class:`~generator.sampler.GeneratorConfig`) become one frozen
:class:`TrainConfig`. The YAML files are the only source of the training defaults: the fields of
:class:`TrainSection`, :class:`ValidationSection` and :class:`OptimConfig` have none, so a key the
composed YAML lacks is an error, like a key no field has or a value of the wrong type
(:class:`ConfigError`, one line naming the key).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Mapping, Optional, Tuple

from generator.sampler import GeneratorConfig
from synthseg_jax.package_data import config_dir
from synthseg_jax.training.tasks import ModelSpec

CONFIG_DIR = config_dir()
SCHEDULES = ("constant", "time_decay", "warmup_cosine", "step")


class ConfigError(ValueError):
    """A training configuration that cannot run; ``str(err)`` is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """``train:`` in ``configs/train.yaml`` (each key is described there)."""

    steps: int
    wl2_steps: int
    reset_optimizer_after_wl2: bool
    batch_size: int
    devices: Optional[int]
    label_dir: Optional[str]
    held_out: Tuple[str, ...]
    max_maps: Optional[int]
    label_downsample: int
    network_pooling: int
    checkpoint_every: int
    keep_checkpoints: Optional[int]
    async_checkpointing: bool
    resume: Literal["auto", "never", "must"]
    init: Optional[str]
    freeze: Tuple[str, ...]
    freeze_levels: int
    bn_running_stats: bool
    ema_decay: float
    export_h5: bool
    compilation_cache: Optional[str]
    distributed: bool
    out_dir: Optional[str]
    quiet: bool

    def check(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        _positive("train.checkpoint_every", self.checkpoint_every)
        _positive("train.label_downsample", self.label_downsample)
        _positive("train.network_pooling", self.network_pooling)
        for key in ("wl2_steps", "freeze_levels"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class ValidationSection:
    """``validation:`` in ``configs/train.yaml``."""

    every: int
    n_per_map: int
    seed: int
    mni: bool

    def check(self) -> None:
        for key in ("every", "n_per_map"):
            if getattr(self, key) < 0:
                raise ConfigError(f"validation.{key} must be >= 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """``configs/optim/adam.yaml``: Adam and its learning-rate schedule (``step.learning_rate``)."""

    name: Literal["adam"]
    lr: float
    b1: float
    b2: float
    eps: float
    schedule: Literal["constant", "time_decay", "warmup_cosine", "step"]
    decay: float
    warmup_steps: int
    end_lr: float
    boundaries: Tuple[int, ...]
    factor: float
    clip_norm: Optional[float]

    def check(self) -> None:
        _positive("optim.lr", self.lr)
        if self.decay < 0 or self.warmup_steps < 0 or self.end_lr < 0 or self.factor <= 0:
            raise ConfigError("optim.decay, optim.warmup_steps and optim.end_lr must be >= 0, "
                              "optim.factor > 0")
        used = {"time_decay": {"decay"}, "warmup_cosine": {"warmup_steps", "end_lr"},
                "step": {"boundaries", "factor"}}
        neutral = {"decay": 0.0, "warmup_steps": 0, "end_lr": 0.0, "boundaries": (), "factor": 0.1}
        for key, value in neutral.items():
            if getattr(self, key) != value and key not in used.get(self.schedule, ()):
                owner = next(s for s, keys in used.items() if key in keys)
                raise ConfigError(f"optim.{key} is used by optim.schedule={owner} only "
                                  f"(the schedule is {self.schedule})")
        if list(self.boundaries) != sorted(set(self.boundaries)) or any(b <= 0 for b in self.boundaries):
            raise ConfigError(f"optim.boundaries must be increasing positive steps, got "
                              f"{list(self.boundaries)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``train.py`` runs with."""

    seed: int
    train: TrainSection
    validation: ValidationSection
    optim: OptimConfig
    model: ModelSpec
    generator: GeneratorConfig
    raw: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)   # for config.yaml

    @classmethod
    def from_mapping(cls, cfg) -> "TrainConfig":
        """Check a composed config (an OmegaConf node or a plain mapping) once."""
        raw = _plain(cfg)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a training config is a mapping, not {type(raw).__name__}")
        expected = {"seed", "train", "validation", "optim", "model", "generator"}
        _no_unknown("", raw, expected)
        _no_missing("", raw, expected)
        seed = _coerce("seed", raw["seed"], int)
        sections = {name: _section(kind, name, raw[name]) for name, kind in
                    (("train", TrainSection), ("validation", ValidationSection),
                     ("optim", OptimConfig))}
        for section in sections.values():
            section.check()
        try:
            model = ModelSpec.from_dict(raw["model"])
            generator = GeneratorConfig.from_dict(raw["generator"])
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err).splitlines()[0]) from None
        return cls(seed=seed, model=model, generator=generator, raw=raw, **sections)


def load(overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """``configs/train.yaml`` composed with Hydra overrides (``key=value``), checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return TrainConfig.from_mapping(compose(config_name="train", overrides=list(overrides)))


def of_run(run_dir: str) -> TrainConfig:
    """The configuration a run folder's ``config.yaml`` recorded, with the keys added since it was
    written taken from the current YAML (its model's)."""
    from omegaconf import OmegaConf
    saved = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    current = load([f"model={saved.model.name}"]).raw
    return TrainConfig.from_mapping(OmegaConf.merge(OmegaConf.create(dict(current)), saved))


# --------------------------------------------------------------------------- checking

def _plain(cfg):
    from omegaconf import DictConfig, OmegaConf
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _no_unknown(where: str, given: Mapping, names: set) -> None:
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + str(k) for k in unknown)}; "
                          f"expected {', '.join(sorted(names))}")


def _no_missing(where: str, given: Mapping, names: set) -> None:
    missing = sorted(names - set(given))
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(where + k for k in missing)} "
                          f"(configs/train.yaml and its groups give every key)")


def _section(cls, name: str, given) -> Any:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{name} must be a mapping of keys, got {given!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _no_unknown(f"{name}.", given, names)
    _no_missing(f"{name}.", given, names)
    return cls(**{k: _coerce(f"{name}.{k}", given[k], hints[k]) for k in names})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, Optional, Literal, Tuple[X, ...])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {hint}")  # pragma: no cover - a coding error


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
