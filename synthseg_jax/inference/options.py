"""Prediction's options: one typed definition, ``PredictOptions``, whose defaults live only in
``configs/predict.yaml``, checked once when a run starts.

Every entry point builds its options here: ``predict.py`` (Hydra keys), ``mri_synthseg_jax`` (the
original's flags mapped onto the same names) and the Python API (``PredictOptions.create``). A key
that is unknown or whose value does not fit its type is refused with one line naming the key.
The output paths (``o``, ``post``, ``vol``, ...) are the keys of the output table
(``outputs.OUTPUT_KINDS``) and are gathered into ``PredictOptions.outputs``.

    >>> PredictOptions.create(i="t1.nii.gz", o="seg.nii.gz", fast="yes").fast
    True
    >>> PredictOptions.create(fast="maybe")
    Traceback (most recent call last):
    ...
    synthseg_jax.inference.options.UsageError: fast: expected true or false (also yes/no, on/off, 1/0), got 'maybe'
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from synthseg_jax.inference.cohort import Shard
from synthseg_jax.inference.outputs import OUTPUT_KINDS
from synthseg_jax.package_data import config_dir

CONFIG_NAME = "predict.yaml"
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}
Size3 = tuple[int, int, int]
Names = tuple[str, ...]
Device = Literal["auto", "cpu", "gpu", "tpu"]
Precision = Literal["float32", "bf16"]
Channels = Literal["mean", "first"]


class UsageError(ValueError):
    """Options that cannot work (alone or together); nothing has been written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """One run's settings; names follow ``mri_synthseg``'s flags. No defaults here: they are
    ``configs/predict.yaml``'s (``create`` fills them in). A value is parsed by its field's type
    (``_parse``); a check of a range or of options together goes in one place, ``__post_init__``."""

    i: str | None
    outputs: Mapping[str, str]          # output kind key (o, post, vol, ...) -> path, given ones only
    bids: str | None                    # a BIDS dataset instead of i (o: its derivatives folder)
    participant_label: Names | None
    suffix: Names
    parc: bool
    robust: bool
    fast: bool
    v1: bool
    crop: Size3 | None
    autocrop: bool
    ct: bool
    keepgeom: bool
    addctab: bool
    channels: Channels
    model_file: str | None              # --model (Hydra reads "model=" as the training group)
    models_dir: str | None
    labels_dir: str | None
    threads: int | None
    device: Device
    precision: Precision
    progress: bool
    overwrite: bool                     # segment scans whose outputs are complete again
    shard: Shard | None                 # this process's part of the scans (K/N)
    overlap: bool                       # read scan k+1 and write scan k-1 while scan k runs
    qc_crop_size: int | None            # for tests only: the QC network's MakeShape size
    min_pad: Size3 | None               # for tests only: null is the original's rule

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 0:
            raise UsageError(f"threads: expected a number of threads, or 0 for all cores, "
                             f"got {self.threads}")
        if self.qc_crop_size is not None and self.qc_crop_size <= 0:
            raise UsageError(f"qc_crop_size: expected a positive integer, got {self.qc_crop_size}")
        if self.robust and self.v1:
            raise UsageError("robust cannot be combined with v1: SynthSeg-robust only exists for 2.0")
        if self.autocrop and self.crop is not None:
            raise UsageError("autocrop cannot be combined with crop: give one of them")
        if self.model_file is not None and self.robust:
            raise UsageError("model_file (--model) cannot be combined with robust: it replaces the "
                             "2.0 (or 1.0) segmenter, robust runs its own cascade")
        if self.model_file is not None and not self.model_file.lower().endswith(".h5"):
            raise UsageError(f"model_file: expected a Keras .h5 weight file, got "
                             f"{self.model_file!r}")
        if self.bids is not None and self.i is not None:
            raise UsageError("give either i (an image, folder or .txt list) or bids (a BIDS "
                             "dataset), not both")
        if self.bids is None and self.participant_label is not None:
            raise UsageError("participant_label needs bids=<BIDS dataset>")
        if not self.suffix:
            raise UsageError("suffix: expected one or more BIDS suffixes, e.g. [T1w,T2w]")

    @classmethod
    def create(cls, **values: Any) -> "PredictOptions":
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PredictOptions":
        """The defaults with ``values`` over them, each checked against its type (``UsageError``)."""
        check_keys(values)
        merged = {**predict_defaults(), **values}
        outputs = {key: _parse(key, str | None, merged.pop(key)) for key in OUTPUT_KINDS}
        hints = typing.get_type_hints(cls)
        fields = {name: _parse(name, hints[name], merged[name]) for name in _settings()}
        return cls(outputs={k: v for k, v in outputs.items() if v}, **fields)

    def output(self, key: str) -> str | None:
        """The path given for the output kind ``key``, or None."""
        if key not in OUTPUT_KINDS:
            raise KeyError(f"no output kind {key!r}")
        return self.outputs.get(key)


def check_keys(keys: Any) -> None:
    """``UsageError`` naming every key that is not an option."""
    known = predict_defaults()
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(known)})")


def _settings() -> list[str]:
    return [f.name for f in dataclasses.fields(PredictOptions) if f.name != "outputs"]


@functools.cache
def predict_defaults() -> dict[str, Any]:
    """Every key of ``configs/predict.yaml`` (Hydra's own entries left out) with its default."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(os.path.join(config_dir(), CONFIG_NAME)))
    values = {k: v for k, v in values.items() if k not in ("defaults", "hydra")}
    expected = set(_settings()) | set(OUTPUT_KINDS)
    if set(values) != expected:
        raise RuntimeError(f"{CONFIG_NAME} and PredictOptions disagree on the keys: "
                           f"{sorted(set(values) ^ expected)}")
    return values


# ------------------------------------------------------------------------------------------------
# One parser per type
# ------------------------------------------------------------------------------------------------

def _parse(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` (``X | None``, bool, int, str, ``Shard``, ``Size3``, a
    ``Literal``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or value == "":
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        return _boolean(name, value)
    if hint is int:
        return _integer(name, value)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UsageError(f"{name}: expected a path or name, got {value!r}")
    if hint is Shard:
        try:
            return Shard.parse(value)
        except ValueError as err:
            raise UsageError(f"{name}: {err}") from None
    if hint == Size3:
        return _size3(name, value)
    if hint == Names:
        return _names(name, value)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    raise TypeError(f"{name}: no parser for {hint!r}")


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    raise UsageError(f"{name}: expected true or false (also yes/no, on/off, 1/0), got {value!r}")


def _integer(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise UsageError(f"{name}: expected an integer, got {value!r}")


def _size3(name: str, value: Any) -> Size3:
    """One positive integer or three (``crop=160``, ``crop=[160,192,160]``, ``--crop 160 192 160``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        sizes = [_integer(name, v) for v in values]
    except UsageError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or any(s <= 0 for s in sizes):
        raise UsageError(f"{name}: expected one positive integer or three, got {value!r}")
    return tuple(sizes)


def _names(name: str, value: Any) -> Names:
    """One name or several (``suffix=T1w``, ``suffix=[T1w,T2w]``, ``--suffix T1w T2w``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip()
               for v in values):
        raise UsageError(f"{name}: expected a name or a list of names, got {value!r}")
    return tuple(str(v).strip() for v in values)
