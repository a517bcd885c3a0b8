"""Typed training configs: frozen dataclasses loaded from TOML with `--set key=value` overrides.

A TOML file holds one table per config name, e.g.::

    [vae]
    steps = 3000
    lr = 1e-3

Unknown keys and wrongly typed values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from icd.io import file_problem
from icd.runtime import PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's fields."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every training component shares; each component's config subclasses it and sets its defaults.
    Validation raises `ConfigError` naming the field."""

    out_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    lr_min: float = 0.0  # end of the learning-rate decay
    n_images: int = 60000  # world renders in the training set
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 0  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        name = type(self).__name__
        if not str(self.out_dir).strip():
            raise ConfigError(f"{name}.out_dir must name a folder, got {self.out_dir!r}")
        for f in ("steps", "batch_size", "n_images", "checkpoint_every", "log_every"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{name}.{f} must be positive, got {getattr(self, f)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{name}.lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.lr_min) and 0 <= self.lr_min <= self.lr):
            raise ConfigError(f"{name}.lr_min must lie in [0, lr], got {self.lr_min}")
        if self.threads < 0:
            raise ConfigError(f"{name}.threads must be >= 0, got {self.threads}")


LOGGERS = ("none", "tensorboard", "wandb")


def _parent_post_init(config, mixin: type) -> None:
    """Run the next ``__post_init__`` after `mixin`'s in `config`'s MRO (the config mixins chain their checks)."""
    parent = getattr(super(mixin, config), "__post_init__", None)
    if parent is not None:
        parent()


@dataclass(frozen=True)
class DataConfig:
    """Where a trainer's images and captions come from (`icd.train.sources`, docs/training.md §1)."""

    data: str = "world"  # "world" (rendered shapes), a folder / .csv / .jsonl / .tar shards / saved dataset / hub id
    data_format: str = "auto"  # auto | imagefolder | csv | webdataset | hf
    caption_column: str = "text"  # caption field (metadata column, .json field or shard member extension)
    image_column: str = ""  # image field ("" = file_name for folders and CSV, image for datasets)
    resolution: int = 0  # training size in pixels (0 = the model's native size); shorter side resized, then cropped
    random_crop: bool = False  # random instead of centre crop (drawn per row and step)
    caption_dropout: float = 0.0  # probability of training a row on the empty prompt
    latent_cache: bool = False  # keep each example's VAE latent in <out_dir>/cache (centre crops only)

    def __post_init__(self):
        _parent_post_init(self, DataConfig)
        name = type(self).__name__
        if not str(self.data).strip():
            raise ConfigError(f"{name}.data must name a dataset or 'world', got {self.data!r}")
        if self.resolution < 0:
            raise ConfigError(f"{name}.resolution must be >= 0 (0: the model's native size), got {self.resolution}")
        if not (math.isfinite(self.caption_dropout) and 0.0 <= self.caption_dropout < 1.0):
            raise ConfigError(f"{name}.caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.latent_cache and self.random_crop:
            raise ConfigError(f"{name}: latent_cache needs centre crops (random_crop = false): a random crop's "
                              "latent differs every time")
        if self.data == "world" and (self.random_crop or self.latent_cache or self.caption_dropout):
            raise ConfigError(f"{name}: random_crop, latent_cache and caption_dropout apply to real data; "
                              "data = 'world' renders its own")


@dataclass(frozen=True)
class ProcessConfig:
    """Devices, precision, memory and trackers of a training run (docs/training.md §3); `icd.train.scaffold` reads
    them for every trainer whose config has them."""

    device: str = "auto"  # "auto": this process's accelerator under `accelerate launch`, else cuda if present, else cpu
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (autocast; fp32 weights, losses and DDIM jumps)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~30 % slower)
    gradient_accumulation: int = 1  # micro-batches per process and step; global batch = batch_size
    log_to: str = "none"  # "none" | "tensorboard" | "wandb" (when installed) besides log.csv

    def __post_init__(self):
        _parent_post_init(self, ProcessConfig)
        name = type(self).__name__
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"{name}.mixed_precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {self.mixed_precision!r}")
        if self.log_to not in LOGGERS:
            raise ConfigError(f"{name}.log_to must be one of {', '.join(LOGGERS)}, got {self.log_to!r}")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"{name}.gradient_accumulation must be >= 1, got {self.gradient_accumulation}")


@dataclass(frozen=True)
class ScaleConfig(ProcessConfig):
    """`ProcessConfig` plus validation on a fixed set of images (the guidance and iCD stages)."""

    validate_every: int = 0  # steps between validations (0: only at the end of a real-data run; world: never)
    validation_prompts: tuple[str, ...] = ()  # prompts of the sample grid ("" = the validation images' captions)
    n_validation: int = 4  # fixed validation images: the first N examples of the dataset (0: no validation)

    def __post_init__(self):
        _parent_post_init(self, ScaleConfig)
        name = type(self).__name__
        if self.n_validation < 0:
            raise ConfigError(f"{name}.n_validation must be >= 0 (0: no validation), got {self.n_validation}")
        if self.validate_every < 0:
            raise ConfigError(f"{name}.validate_every must be >= 0, got {self.validate_every}")


def _coerce(cls: type, name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{cls.__name__}.{name}: expected {annotation.__name__}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(cls, name, v, item) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(cls, name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{cls.__name__}.{name}: {value!r} does not match {annotation}")
    return value


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build config `cls` from a mapping, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(cls, k, v, hints[k]) for k, v in data.items()})


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (bare words are taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(cls: type[C], path: str | Path | None, section: str, overrides: list[str] = ()) -> C:
    """Load table `section` of TOML file `path` (or the defaults) into `cls`, then apply `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        problem = file_problem(path)  # a FIFO is refused before it is opened: reading it would block
        if problem == "not found":
            raise ConfigError(f"config file not found: {path}")
        if problem:
            raise ConfigError(f"config file {path}: {problem}")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        if section not in doc:
            raise ConfigError(f"{path}: no [{section}] table (found: {', '.join(doc) or 'none'})")
        if not isinstance(doc[section], dict):
            raise ConfigError(f"{path}: [{section}] is not a table (got {doc[section]!r})")
        data.update(doc[section])
    data.update(parse_override(o) for o in overrides)
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
