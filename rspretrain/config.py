"""The typed training config: defaults < YAML file (configs/) < command-line flags.

Four sections, each a dataclass: `model` (rspretrain.model.ModelConfig), `data`, `optim`, `train`.
Every layer is checked as it is applied: an unknown key or a wrong type is a `ConfigError` naming the key
and the layer it came from. A layer that sets one of a pair of alternatives (`train.steps` / `train.epochs`,
`optim.warmup_steps` / `optim.warmup_epochs`) clears the other, so `--steps 100` overrides `epochs: 800`.

The resolved config travels as plain data (`to_dict`): into RUN/config.json and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rscurate import schema
from rscurate.schema import build
from rspretrain.model import ModelConfig, ModelConfigError

ALTERNATIVES = (("train.steps", "train.epochs"), ("optim.warmup_steps", "optim.warmup_epochs"))
LR_SCALES = ("none", "kept_over_mask", "mask_over_kept")


class ConfigError(ValueError):
    """A mistake in a config file or flag that the user can fix."""


@dataclass
class DataConfig:
    shards: tuple[str, ...] = ()  # brace patterns, globs, folders, paths or URLs
    samples_per_epoch: int | None = None  # None: read from sizes.json / _info.json next to the shards
    resampled: bool = True  # False: split shards over ranks x workers, each sample once per epoch
    shuffle_buffer: int = 5000
    shuffle_initial: int = 1000
    workers: int | None = None  # DataLoader workers per process; None: its cores minus the trainer's
    decode: str = "cpu"  # cpu: workers decode and crop (uint8 batches); device: JPEGs decoded on the device
    crop_scale: tuple[float, float] = (0.2, 1.0)
    url_timeout: float = 60.0  # seconds for an HTTP(S) shard's connect and for each read of it
    url_retries: int = 3  # extra tries to open an HTTP(S) shard before skipping it
    url_backoff: float = 1.0  # seconds before the first retry; doubles with each


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * effective batch / 256 (times the lr_scale factor)
    lr: float | None = None  # absolute peak lr; overrides blr
    # "none": lr = blr * batch / 256. "kept_over_mask": also times kept_mask_ratio / mask_ratio, as the
    # SelectiveMAE reference code does by default (its --no_lr_scale turns it off); "mask_over_kept": times
    # the inverse (the reference's --inverse_lr). selectivemae only; the paper configs use kept_over_mask.
    lr_scale: str = "none"
    min_lr: float = 0.0
    weight_decay: float = 0.05  # not applied to norms, biases and model.no_weight_decay()
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None
    warmup_epochs: float | None = None  # neither set: no warmup
    accum_steps: int = 1
    clip_grad: float | None = None  # max global gradient norm; None: no clipping


@dataclass
class TrainConfig:
    out: str = ""  # the run folder
    batch_size: int = 64  # per process; effective batch = batch_size * world size * accum_steps
    steps: int | None = None  # total optimiser steps of the run (resume with more to extend it)
    epochs: float | None = None  # or the total in epochs of data.samples_per_epoch samples
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32
    seed: int = 0
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 20
    figure_every: int = 0  # steps between reconstruction figures (RUN/figures/, TensorBoard); 0: none
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    compile: bool = False
    threads: int | None = None  # torch threads of the training process; None: torch's default
    fsdp: bool = False  # shard parameters, gradients and optimiser state over the processes (FSDP2)
    dist_timeout: float = 1800.0  # seconds a collective may wait for the other ranks before the job fails


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- public API


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < `base` (a saved config, on resume) < YAML file at `path` < `overrides` ({"train.steps": 10})."""
    cfg = Config()
    for where, merged in merged_layers(path, overrides, base):
        cfg = from_dict(merged, where)
    check(cfg)
    return cfg


def merged_layers(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    defaults: tuple[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The layers of a config, `defaults` (named) < `base` < YAML at `path` < `overrides`, each merged onto
    the ones before: [(where, merged data so far)]. Building each in turn makes an error name its layer.
    Shared by the training config and the fine-tuning config (rspretrain.finetune_config)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if defaults is not None:
        layers.append((defaults[0], _plain(dict(defaults[1]))))
    if base is not None:
        layers.append(("the saved config", _plain(dict(base))))
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    if overrides:
        layers.append(("the command line", _nest(overrides)))
    merged: dict[str, Any] = {}
    result = []
    for where, layer in layers:
        merged = _merge(merged, layer)
        result.append((where, merged))
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = schema.read_yaml(path, "config", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, optim, train")
    return data


def from_dict(data: Mapping[str, Any], where: str = "config") -> Config:
    """Build and type-check a Config from nested plain data (lists become tuples)."""
    data_section = data.get("data")
    if isinstance(data_section, Mapping) and isinstance(data_section.get("shards"), str):
        data = {
            **data,
            "data": {**data_section, "shards": [data_section["shards"]]},
        }  # "a.tar" means ("a.tar",)
    return typing.cast(Config, build(Config, data, where, "", ConfigError))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (Config, FinetuneConfig) as plain nested data (dicts, lists, numbers, strings, None):
    for JSON, YAML and checkpoints."""
    return typing.cast(dict[str, Any], _plain(dataclasses.asdict(cfg)))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`section.key=value` (value read as YAML: 2, 0.5, true, null, [a, b]) -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. model.depth=2")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: cannot read the value") from None


def check(cfg: Config) -> None:
    """Values out of range or choice; types were checked by from_dict."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    try:
        m.validate()
    except ModelConfigError as exc:
        raise ConfigError(str(exc)) from None
    if d.workers is not None and d.workers < 0:
        fail("data.workers", "must be 0 or more, or null to fit the machine")
    if d.decode not in ("cpu", "device"):
        fail("data.decode", f"{d.decode!r}: use cpu or device")
    if d.samples_per_epoch is not None and d.samples_per_epoch < 1:
        fail("data.samples_per_epoch", "must be at least 1")
    if d.shuffle_buffer < 1 or d.shuffle_initial < 1:
        fail("data.shuffle_buffer", "buffer sizes must be at least 1")
    if d.url_timeout <= 0:
        fail("data.url_timeout", "must be positive")
    if d.url_retries < 0:
        fail("data.url_retries", "must be 0 or more")
    if d.url_backoff < 0:
        fail("data.url_backoff", "must not be negative")
    if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        fail("data.crop_scale", "give (min, max) with 0 < min <= max <= 1")
    if o.lr_scale not in LR_SCALES:
        fail("optim.lr_scale", f"{o.lr_scale!r}: use one of {', '.join(LR_SCALES)}")
    if o.lr_scale != "none" and m.method != "selectivemae":
        fail("optim.lr_scale", f"{o.lr_scale} applies to selectivemae only")
    check_run(o, t)
    if t.fsdp and t.precision == "fp16":
        fail("train.precision", "fp16 needs a loss scaler FSDP does not shard; use bf16 with --fsdp")
    for key in ("checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", "must be at least 1")
    if t.figure_every < 0:
        fail("train.figure_every", "must be 0 (no figures) or more")


def check_run(o: Any, t: Any) -> None:
    """The `optim` and `train` settings every training command shares (pretraining and fine-tuning):
    accumulation, clipping, warmup, batch, run length, device, precision, threads, collective timeout."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    if o.accum_steps < 1:
        fail("optim.accum_steps", "must be at least 1")
    if o.clip_grad is not None and o.clip_grad <= 0:
        fail("optim.clip_grad", "must be positive, or null for no clipping")
    for key in ("warmup_steps", "warmup_epochs"):
        value = getattr(o, key)
        if value is not None and value < 0:
            fail(f"optim.{key}", "must not be negative")
    if t.batch_size < 1:
        fail("train.batch_size", "must be at least 1")
    if t.steps is not None and t.steps < 1:
        fail("train.steps", "must be at least 1")
    if t.epochs is not None and t.epochs <= 0:
        fail("train.epochs", "must be positive")
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        fail("train.device", f"{t.device!r}: use auto, cpu or cuda")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        fail("train.precision", f"{t.precision!r}: use auto, bf16, fp16 or fp32")
    if t.dist_timeout <= 0:
        fail("train.dist_timeout", "must be positive (seconds)")
    if t.threads is not None and t.threads < 1:
        fail("train.threads", "must be at least 1, or null for torch's default")


# --------------------------------------------------------------------------- helpers


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.steps": 10} -> {"train": {"steps": 10}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"{key!r}: write section.key, e.g. train.steps")
        nested.setdefault(section, {})[name] = value
    return nested


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in layer.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    for first, second in ALTERNATIVES:  # the layer that sets one of a pair clears the other
        (s1, k1), (s2, k2) = first.split("."), second.split(".")
        sets1 = isinstance(layer.get(s1), dict) and layer[s1].get(k1) is not None
        sets2 = isinstance(layer.get(s2), dict) and layer[s2].get(k2) is not None
        if sets1 and sets2:
            raise ConfigError(f"set only one of {first} and {second}")
        if sets1 and isinstance(merged.get(s2), dict):
            merged[s2][k2] = None
        if sets2 and isinstance(merged.get(s1), dict):
            merged[s1][k1] = None
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
