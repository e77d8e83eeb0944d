"""The typed config of `rspretrain finetune` and `rspretrain linprobe`: defaults < the protocol's defaults < YAML
(configs/finetune_*.yaml, configs/linprobe_*.yaml) < command-line flags, through `rspretrain.config`'s layers.

Two protocols share one config and one loop (`rspretrain.finetune`), as facebookresearch/mae's main_finetune.py
and main_linprobe.py share engine_finetune.py:

- `finetune` (the defaults below): the whole ViT trains with a linear head. The SelectiveMAE reference's
  classification recipe (Classification/main_finetune.py + class-train.sh): AdamW, blr 1e-3 x batch / 256,
  layer decay 0.75, weight decay 0.05, 100 epochs with 5 of warmup, min lr 1e-6, drop path 0.1, batch 1024;
  timm RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel), bicubic; mixup 0.8, cutmix 1.0, label
  smoothing 0.1 (SoftTargetCrossEntropy). Pooling: the mean of the patch tokens through fc_norm
  (facebookresearch/mae's default; `pool: cls` is the SelectiveMAE script's).
- `linprobe` (`LINPROBE` below): facebookresearch/mae's main_linprobe.py. Frozen encoder, class token,
  BatchNorm1d(affine=False) + linear head, LARS at blr 0.1 (no weight decay), 90 epochs with 10 of warmup,
  min lr 0, batch 512, RandomResizedCrop + flip, no mixup or smoothing.

Both evaluate with Resize(img_size / crop_pct, bicubic) + CenterCrop(img_size) (256 / 224 at 224 px).
docs/fidelity.md ("Evaluation") lists each default's source and every departure.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rscurate.schema import build
from rspretrain.config import ConfigError, check_run, merged_layers

PROTOCOLS = ("finetune", "linprobe")
POOLS = ("avg", "cls")
OPTIMIZERS = ("adamw", "lars")


@dataclass
class FtModelConfig:
    weights: str | None = None  # the encoder: export, run, checkpoint, MAE / SelectiveMAE .pth
    arch: str | None = None  # None: read off the weights; needed with --random-init and no weights
    img_size: int | None = None  # None: the weights'; another size resamples the position embedding
    pool: str = "avg"  # avg: mean of the patch tokens + fc_norm | cls: the class token after the final norm
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear in depth)
    random_init: bool = False  # the baseline: the init `rspretrain train` starts from
    init_seed: int | None = None  # of --random-init; None: the weights' run seed, else 0
    head_init_std: float = 2e-5  # trunc-normal std of the new head's weight (MAE: 2e-5; linear probe 0.01)


@dataclass
class FtDataConfig:
    train: str = ""  # a folder (one sub-folder per class) or a split file
    val: str = ""
    data_root: str | None = None  # where split files' images live, if not where they say
    workers: int | None = (
        None  # DataLoader workers per process; None: the cores this process may use, up to 8
    )


@dataclass
class FtAugmentConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm policy; null: none
    color_jitter: float | None = None  # only without auto_augment (timm); null: none
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    interpolation: str = "bicubic"
    re_prob: float = 0.25  # random erasing
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.8  # alpha; 0: off
    cutmix: float = 1.0  # alpha; 0: off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1  # label smoothing
    crop_pct: float = 224 / 256  # evaluation: resize to img_size / crop_pct, centre crop img_size


@dataclass
class FtOptimConfig:
    opt: str = "adamw"  # adamw (with layer decay) | lars (timm's, adapting weights only, as MAE's LARS)
    blr: float = 1e-3  # lr = blr x effective batch / 256
    lr: float | None = None  # absolute peak lr; overrides blr
    layer_decay: float | None = 0.75  # lr x layer_decay^(depth + 1 - layer); null: none
    weight_decay: float = 0.05  # not on norms, biases, tokens and position embeddings
    betas: tuple[float, float] = (0.9, 0.999)  # adamw (torch's defaults, as MAE)
    momentum: float = 0.9  # lars
    min_lr: float = 1e-6
    warmup_epochs: float | None = 5.0
    warmup_steps: int | None = None
    accum_steps: int = 1
    clip_grad: float | None = None


@dataclass
class FtTrainConfig:
    out: str = ""  # the run folder
    batch_size: int = 1024  # per process; effective = batch_size x world size x accum_steps
    epochs: float | None = 100.0
    steps: int | None = None  # or the total in optimiser steps
    eval_every: int = 10  # epochs between evaluations on val; one is always made at the end
    report_max: bool = (
        False  # also report the best val top-1 over the evaluations (labelled test-set selection)
    )
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32
    seed: int = 0
    checkpoint_every: int | None = None  # steps between extra checkpoints; one is written after every epoch
    keep_checkpoints: int = 2
    log_every: int = 20  # steps between log lines
    threads: int | None = None
    dist_timeout: float = 1800.0


@dataclass
class FinetuneConfig:
    protocol: str = "finetune"  # finetune | linprobe
    model: FtModelConfig = field(default_factory=FtModelConfig)
    data: FtDataConfig = field(default_factory=FtDataConfig)
    augment: FtAugmentConfig = field(default_factory=FtAugmentConfig)
    optim: FtOptimConfig = field(default_factory=FtOptimConfig)
    train: FtTrainConfig = field(default_factory=FtTrainConfig)


# facebookresearch/mae main_linprobe.py, over the fine-tuning defaults above.
LINPROBE: dict[str, Any] = {
    "protocol": "linprobe",
    "model": {"pool": "cls", "drop_path": 0.0, "head_init_std": 0.01},
    "augment": {
        "auto_augment": None,
        "re_prob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "smoothing": 0.0,
    },
    "optim": {
        "opt": "lars",
        "blr": 0.1,
        "layer_decay": None,
        "weight_decay": 0.0,
        "min_lr": 0.0,
        "warmup_epochs": 10.0,
    },
    "train": {"batch_size": 512, "epochs": 90.0, "eval_every": 1},
}


def load_finetune_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    protocol: str = "finetune",
) -> FinetuneConfig:
    """Defaults < the protocol's < `base` (the saved config, on resume) < YAML at `path` < `overrides`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    defaults = (f"the {protocol} protocol", LINPROBE if protocol == "linprobe" else {"protocol": "finetune"})
    cfg = FinetuneConfig()
    for where, merged in merged_layers(path, overrides, base, defaults):
        cfg = finetune_from_dict(merged, where)
    if cfg.protocol != protocol:
        raise ConfigError(
            f"protocol: the config says {cfg.protocol!r}; run `rspretrain {cfg.protocol}` instead"
        )
    check_finetune(cfg)
    return cfg


def finetune_from_dict(data: Mapping[str, Any], where: str = "config") -> FinetuneConfig:
    return typing.cast(FinetuneConfig, build(FinetuneConfig, data, where, "", ConfigError))


def check_finetune(cfg: FinetuneConfig) -> None:
    """Values out of range or choice; types were checked when the config was built."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    m, d, a, o, t = cfg.model, cfg.data, cfg.augment, cfg.optim, cfg.train
    if m.pool not in POOLS:
        fail("model.pool", f"{m.pool!r}: use avg or cls")
    if not 0.0 <= m.drop_path < 1.0:
        fail("model.drop_path", "must be in [0, 1)")
    if m.img_size is not None and m.img_size < 1:
        fail("model.img_size", "must be positive")
    if m.head_init_std <= 0:
        fail("model.head_init_std", "must be positive")
    if d.workers is not None and d.workers < 0:
        fail("data.workers", "must be 0 or more, or null to fit the machine")
    if not 0 < a.scale[0] <= a.scale[1] <= 1:
        fail("augment.scale", "give (min, max) with 0 < min <= max <= 1")
    for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob", "smoothing"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            fail(f"augment.{key}", "must be in [0, 1]")
    if a.mixup < 0 or a.cutmix < 0:
        fail("augment.mixup", "mixup and cutmix alphas must be 0 (off) or more")
    if a.mixup_mode not in ("batch", "pair", "elem"):
        fail("augment.mixup_mode", f"{a.mixup_mode!r}: use batch, pair or elem")
    if not 0.0 < a.crop_pct <= 1.0:
        fail("augment.crop_pct", "must be in (0, 1]")
    if a.interpolation not in ("bicubic", "bilinear", "nearest"):
        fail("augment.interpolation", f"{a.interpolation!r}: use bicubic, bilinear or nearest")
    if o.opt not in OPTIMIZERS:
        fail("optim.opt", f"{o.opt!r}: use adamw or lars")
    if o.layer_decay is not None and not 0.0 < o.layer_decay <= 1.0:
        fail("optim.layer_decay", "must be in (0, 1], or null for none")
    for key in ("min_lr", "weight_decay", "blr"):
        if getattr(o, key) < 0:
            fail(f"optim.{key}", "must not be negative")
    check_run(o, t)
    for key in ("eval_every", "keep_checkpoints", "log_every"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", "must be at least 1")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        fail("train.checkpoint_every", "must be at least 1, or null (after every epoch only)")
