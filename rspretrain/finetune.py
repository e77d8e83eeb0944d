"""Fine-tuning and MAE linear probing of a ViT encoder on a labelled set, top to bottom: weights, data, model,
optimiser and schedule, resume, steps, evaluations, checkpoints, result.

One loop serves both protocols of `rspretrain.finetune_config` (as engine_finetune.py serves MAE's
main_finetune.py and main_linprobe.py): the model is timm's VisionTransformer with a linear head (linprobe:
frozen, BatchNorm1d(affine=False) before the head), augmentation is timm's `create_transform` and `Mixup`, the
optimiser timm's AdamW with layer-wise decay or timm's LARS, the per-step warmup + cosine schedule, process
setup, checkpoints and logs are `rspretrain.runtime`'s, the same as `rspretrain train`'s.

Reproducibility: epoch e visits the training set in the order of `torch.randperm` seeded with seed + e (as a
one-process DistributedSampler), global batch k is the k-th slice of it and each rank takes its part; each
image's augmentation is drawn from its own seed (seed, epoch, index), whatever process or worker decodes it;
mixup and drop path draw from the main process's RNG, which checkpoints carry. So a run resumed from any
checkpoint takes the steps the uninterrupted run would, and its result is identical on CPU.

What it reports (RUN/result.json): top-1 and top-5 of the LAST evaluation, made after the last step, on the
whole val set. The best top-1 over the evaluations during the run (what the reference scripts print as "max
accuracy") picks the epoch on the test set; it is written only with `train.report_max`, under
`test_set_selection`, never as the headline.

Shapes: N batch, C channels, H/W pixels, K classes, D encoder width.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, create_optimizer_v2
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from rspretrain import runtime
from rspretrain.config import to_dict
from rspretrain.data import DataError
from rspretrain.export import timm_model_args
from rspretrain.finetune_config import FinetuneConfig, load_finetune_config
from rspretrain.runtime import Plan, Process, RunLog, TrainingError
from rspretrain.splits import LabeledSet, load_labeled
from rspretrain.weights import Weights, encoder_state, load_weights

log = logging.getLogger(__name__)

RESULT = "result.json"
LOGGED = ("loss", "lr", "samples_per_s", "grad_norm")  # train records plotted in TensorBoard


# --------------------------------------------------------------------------- data


class LabeledImages(Dataset[tuple[Tensor, int, int]]):
    """`LabeledSet` images through `transform`; item (index, seed) -> (image (C, H, W), label, index).

    The seed seeds python's, numpy's and torch's RNGs around the transform (and they are restored after), so an
    image's augmentation depends only on its seed. An unreadable image comes back with label -1; the loop
    stops with its path.
    """

    def __init__(self, data: LabeledSet, transform: Callable[[Image.Image], Tensor], img_size: int) -> None:
        self.paths, self.labels, self.transform, self.img_size = data.paths, data.labels, transform, img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = item
        try:
            with Image.open(self.paths[index]) as opened:
                img = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros(3, self.img_size, self.img_size), -1, index
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed costs ~5 ms
        try:
            return self.transform(img), self.labels[index], index
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class EpochBatches:
    """This rank's micro-batches of one epoch, from global step `start` on: lists of (index, seed).

    The epoch's order is `torch.randperm(n)` seeded with seed + epoch; optimiser step k takes positions
    [k * G, (k + 1) * G) of it (G the global batch; the tail that fills no step is dropped, as drop_last),
    micro-batch m of it the part (m * world + rank) * B .. + B.
    """

    def __init__(
        self,
        n: int,
        plan: Plan,
        batch_size: int,
        accum: int,
        proc: Process,
        seed: int,
        epoch: int,
        start: int = 0,
    ) -> None:
        self.n, self.plan, self.batch_size, self.accum, self.proc = n, plan, batch_size, accum, proc
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        B, world = self.batch_size, self.proc.world_size
        for step in range(self.start, self.plan.steps_per_epoch):
            for micro in range(self.accum):
                first = step * self.plan.global_batch + (micro * world + self.proc.rank) * B
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[first : first + B]]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (64 bits, well spread)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).view(np.uint64)[0])


def _loader(
    dataset: LabeledImages, batches: Any, workers: int, device: torch.device, seed: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(
            seed
        ),  # the loader draws its worker seeds from here, not torch's RNG
    )


def train_transform(cfg: FinetuneConfig, img_size: int) -> Callable[[Image.Image], Tensor]:
    a = cfg.augment
    transform = create_transform(
        img_size,
        is_training=True,
        scale=a.scale,
        hflip=a.hflip,
        color_jitter=a.color_jitter,  # type: ignore[arg-type]  # None: none (timm's default would be 0.4)
        auto_augment=a.auto_augment,
        interpolation=a.interpolation,
        re_prob=a.re_prob,
        re_mode=a.re_mode,
        re_count=a.re_count,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    for step in getattr(transform, "transforms", []):
        if isinstance(step, auto_augment.RandAugment):
            for op in step.ops:
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = posterize
    return transform  # type: ignore[no-any-return]


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits giving the black image older Pillow gave. timm's PosterizeIncreasing reaches
    0 bits at magnitude 10 (m9 plus magnitude noise), which Pillow 13 refuses (bits must be 1-8); the reference
    ran on a Pillow that returned black."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)  # type: ignore[no-any-return]


def eval_transform(cfg: FinetuneConfig, img_size: int) -> Callable[[Image.Image], Tensor]:
    """Resize the shorter side to img_size / crop_pct, centre crop img_size (256 / 224 at 224 px)."""
    return create_transform(  # type: ignore[no-any-return]
        img_size,
        is_training=False,
        crop_pct=cfg.augment.crop_pct,
        interpolation=cfg.augment.interpolation,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


# --------------------------------------------------------------------------- model and optimiser


def build_classifier(cfg: FinetuneConfig, weights: Weights, num_classes: int) -> nn.Module:
    """timm's VisionTransformer with the encoder weights and a new linear head (MAE's init); for linprobe
    the head is BatchNorm1d(affine=False) + linear and only it trains."""
    m = cfg.model
    name, kwargs = timm_model_args(weights.model)
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        global_pool="avg" if m.pool == "avg" else "token",
        drop_path_rate=m.drop_path,
        **kwargs,
    )
    state = dict(encoder_state(weights))
    # avg pooling normalises the pooled features with fc_norm instead of the tokens with norm (timm, MAE)
    drop = "norm." if m.pool == "avg" else "fc_norm."
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {k for k in missing if k.startswith(("head.", "fc_norm."))}
    if unexpected or set(missing) - fresh:
        raise TrainingError(
            f"{weights.source}: does not fit timm's {name}: missing {sorted(set(missing) - fresh)}, "
            f"unexpected {sorted(unexpected)}"
        )
    head = model.get_classifier()  # type: ignore[operator]
    assert isinstance(head, nn.Linear)
    trunc_normal_(head.weight, std=m.head_init_std)
    nn.init.zeros_(head.bias)
    if cfg.protocol == "linprobe":
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        for name_, p in model.named_parameters():
            p.requires_grad = name_.startswith("head.")
    return model


def build_optimizer(cfg: FinetuneConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.opt == "adamw":  # timm's factory: weight decay off for 1-D params and tokens, layer-wise lr scales
        return create_optimizer_v2(
            model, "adamw", lr=lr, weight_decay=o.weight_decay, layer_decay=o.layer_decay, betas=o.betas
        )
    # MAE's LARS adapts (and decays) only weight matrices: timm's Lars, per group
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "always_adapt": True},
        {"params": [p for p in params if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0},
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: torch.dtype | None,
    proc: Process,
) -> dict[str, float]:
    """Top-1, top-5 (top-K with fewer classes) and mean cross-entropy over the whole set (all ranks)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@k, loss sum, images
    try:
        for imgs, labels, index in loader:
            _check_readable(loader.dataset, labels, index)
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(imgs).float()  # (N, K)
            top = logits.topk(k, dim=1).indices  # (N, k)
            hit = top == labels[:, None]  # (N, k)
            sums += torch.stack(
                [
                    hit[:, 0].sum().double(),
                    hit.any(dim=1).sum().double(),
                    nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                    torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
                ]
            )
    finally:
        model.train(was_training)
    if proc.world_size > 1:
        dist.all_reduce(sums)
    c1, ck, loss, n = sums.tolist()
    return {"top1": c1 / n, "top5": ck / n, "loss": loss / n, "images": int(n)}


def _check_readable(dataset: Any, labels: Tensor, index: Tensor) -> None:
    bad = (labels < 0).nonzero().flatten()
    if len(bad):
        path = dataset.paths[int(index[bad[0]])]
        raise DataError(f"{path}: cannot read the image; fix or remove it and write the split again")


# --------------------------------------------------------------------------- the run


def finetune(
    cfg: FinetuneConfig, *, resume: bool = False, on_log: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Fine-tune (or linearly probe, per cfg.protocol); returns the result written to RUN/result.json."""
    with runtime.process(cfg.train.device, cfg.train.dist_timeout, cfg.train.threads) as proc:
        return _finetune(cfg, proc, resume, on_log)


def run_finetune(
    weights: str | Path | None,
    train: str | Path,
    val: str | Path,
    out: str | Path,
    *,
    protocol: str = "finetune",
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The library form of `rspretrain finetune|linprobe WEIGHTS --train T --val V --out RUN [-c C] [--set k=v]`."""
    flags: dict[str, Any] = {
        "model.weights": str(weights) if weights is not None else None,
        "data.train": str(train),
    }
    flags |= {"data.val": str(val), "train.out": str(out)} | (overrides or {})
    if weights is None:
        flags["model.random_init"] = True
    cfg = load_finetune_config(config, {k: v for k, v in flags.items() if v is not None}, protocol=protocol)
    return finetune(cfg, resume=resume)


def _finetune(
    cfg: FinetuneConfig, proc: Process, resume: bool, on_log: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if not t.out:
        raise TrainingError("give the run folder: --out RUN")
    if not d.train or not d.val:
        raise TrainingError("give the labelled images: --train DIR|SPLITFILE --val DIR|SPLITFILE")
    run, device = Path(t.out), proc.device
    runtime.refuse_to_clobber(run, resume)
    found = runtime.find_resume_checkpoint(run, proc) if resume else None

    # ---- labelled data and weights first: a wrong path fails before anything is built
    train_set = load_labeled(d.train, d.data_root)
    val_set = load_labeled(d.val, d.data_root).relabel(train_set.classes)
    num_classes = len(train_set.classes)
    if num_classes < 2:
        raise TrainingError(f"{d.train}: {num_classes} class; a classifier needs at least 2")
    weights = load_weights(
        m.weights, random_init=m.random_init, arch=m.arch, img_size=m.img_size, seed=m.init_seed
    )
    if weights.model.in_chans != 3:
        raise TrainingError(f"the encoder takes {weights.model.in_chans} bands; fine-tuning reads RGB images")
    img_size = weights.model.img_size
    global_batch = t.batch_size * proc.world_size * o.accum_steps
    if len(train_set) < global_batch:
        raise TrainingError(
            f"{d.train}: {len(train_set)} training images, fewer than one global batch of {global_batch}; "
            "lower --batch-size"
        )
    mixup = _mixup(cfg, num_classes)
    if mixup is not None and t.batch_size % 2:
        raise TrainingError(
            f"--batch-size {t.batch_size}: mixup / cutmix pair images, give an even batch size"
        )
    plan = runtime.make_plan(
        len(train_set),
        global_batch,
        steps=t.steps,
        epochs=t.epochs,
        warmup_steps=o.warmup_steps,
        warmup_epochs=o.warmup_epochs,
        lr=o.lr,
        blr=o.blr,
    )
    log.info(
        "%s of %s on %d classes: %d train / %d val images, %d steps of %d (%d per epoch), warmup %d, peak lr %.3g",
        cfg.protocol,
        weights.source,
        num_classes,
        len(train_set),
        len(val_set),
        plan.total_steps,
        plan.global_batch,
        plan.steps_per_epoch,
        plan.warmup_steps,
        plan.peak_lr,
    )

    # ---- model, optimiser, schedule, precision: the same init on every rank, then each rank's own stream
    _seed_everything(t.seed)
    model = build_classifier(cfg, weights, num_classes).to(device)
    _seed_everything(t.seed + proc.rank)  # mixup and drop path (MAE seeds seed + rank likewise)
    if found is not None:
        model.load_state_dict(found[1]["model"])
    optimizer = build_optimizer(cfg, model, plan.peak_lr)
    scheduler = runtime.lr_schedule(optimizer, plan, o.min_lr)
    precision = runtime.precision_of(t.precision, device)
    amp = runtime.autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = SoftTargetCrossEntropy() if mixup is not None else _plain_loss(cfg.augment.smoothing)

    # ---- state restored on resume
    step, saved = 0, None
    history: dict[str, list[Any]] = {"evals": [], "epoch_seconds": []}
    if found is not None:
        saved, resumed = found
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        step, history = int(resumed["step"]), resumed["history"]
        runtime.restore_rng(resumed, proc)
        log.info("resumed from %s at step %d", saved, step)
        del resumed, found
    ddp_model: nn.Module = model
    if proc.world_size > 1:
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    workers = d.workers if d.workers is not None else _default_workers()
    train_images = LabeledImages(train_set, train_transform(cfg, img_size), img_size)
    val_images = LabeledImages(val_set, eval_transform(cfg, img_size), img_size)
    mine = list(range(proc.rank, len(val_set), proc.world_size))  # this rank's share of the evaluation
    val_batches = [[(i, 0) for i in mine[s : s + t.batch_size]] for s in range(0, len(mine), t.batch_size)]
    val_loader = _loader(val_images, val_batches, workers, device, t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = o.clip_grad if o.clip_grad is not None else math.inf

    # ---- the loop
    run_log = RunLog(run, to_dict(cfg), step, enabled=proc.main)
    started = time.perf_counter()
    losses: list[float] = []
    epoch_losses: list[float] = []
    t_window, step_window, t_epoch, epoch_first_step = started, step, started, step
    try:
        while step < plan.total_steps:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            batches = EpochBatches(
                len(train_set), plan, t.batch_size, o.accum_steps, proc, t.seed, epoch, in_epoch
            )
            stop = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch)
            micro_batches = iter(_loader(train_images, batches, workers, device, t.seed + epoch))
            while step < stop:
                scheduler.step_update(step)
                loss_sum = torch.zeros((), device=device)
                for micro in range(o.accum_steps):
                    imgs, labels, index = next(micro_batches)
                    _check_readable(train_images, labels, index)
                    imgs = imgs.to(device, non_blocking=True)  # (N, C, H, W)
                    targets = labels.to(device, non_blocking=True)  # (N,)
                    if mixup is not None:
                        imgs, targets = mixup(imgs, targets)  # targets (N, K) soft labels
                    sync = micro == o.accum_steps - 1 or proc.world_size == 1
                    with nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            loss = criterion(ddp_model(imgs), targets) / o.accum_steps
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach().float()
                if proc.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= proc.world_size
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                loss_value = loss_sum.item()
                if not math.isfinite(loss_value):  # MAE's fine-tuning stops here too
                    raise TrainingError(
                        f"step {step}: loss {loss_value}; stopped. Last checkpoint: {saved}. Resume it with "
                        "--resume and a lower --blr or a --clip-grad, or check the data."
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss_value)
                epoch_losses.append(loss_value)

                if step % t.log_every == 0 or step == stop:
                    now = time.perf_counter()
                    record = {
                        "step": step,
                        "kind": "train",
                        "epoch": round(step / plan.steps_per_epoch, 4),
                        "loss": sum(losses) / len(losses),
                        "lr": max(g["lr"] for g in optimizer.param_groups),
                        "samples_per_s": (step - step_window) * plan.global_batch / max(now - t_window, 1e-9),
                        "grad_norm": float(grad_norm),
                        "total_steps": plan.total_steps,
                    }
                    losses, t_window, step_window = [], now, step
                    run_log.write(record, runtime.scalars(record, LOGGED, "train"))
                    if proc.main and on_log is not None:
                        on_log(record)

                epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
                if epoch_end:  # the time of a whole epoch, from the steps this process ran of it
                    seconds = (
                        (time.perf_counter() - t_epoch) * plan.steps_per_epoch / (step - epoch_first_step)
                    )
                    history["epoch_seconds"].append(seconds)
                    epochs_done = step / plan.steps_per_epoch
                    record = {
                        "step": step,
                        "kind": "epoch",
                        "epoch": round(epochs_done, 4),
                        "seconds": seconds,
                    }
                    record["train_loss"] = sum(epoch_losses) / len(epoch_losses)
                    run_log.write(
                        record, {"epoch/seconds": seconds, "epoch/train_loss": record["train_loss"]}
                    )
                    epoch_losses = []
                    if step == plan.total_steps or round(epochs_done) % t.eval_every == 0:
                        t_eval = time.perf_counter()
                        scores = evaluate(model, val_loader, num_classes, device, amp, proc)
                        evaluation = {"step": step, "kind": "eval", "epoch": round(epochs_done, 4), **scores}
                        evaluation["seconds"] = time.perf_counter() - t_eval
                        history["evals"].append(evaluation)
                        run_log.write(
                            evaluation, runtime.scalars(evaluation, ("top1", "top5", "loss"), "val")
                        )
                        log.info(
                            "epoch %.4g: val top-1 %.4f, top-5 %.4f",
                            epochs_done,
                            scores["top1"],
                            scores["top5"],
                        )
                if epoch_end or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    state = {
                        "task": "classify",
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "epoch": step / plan.steps_per_epoch,
                        "history": history,
                        "config": to_dict(cfg),
                        "classes": train_set.classes,
                    }
                    saved = runtime.save(run, state, proc, t.keep_checkpoints)
                if epoch_end:
                    t_epoch, epoch_first_step = time.perf_counter(), step
    finally:
        run_log.close()

    result = _result(cfg, weights, train_set, val_set, plan, history, proc, img_size, step)
    if proc.main:
        run.mkdir(parents=True, exist_ok=True)
        _write_json(run / RESULT, result)
    return result | {"run": str(run), "checkpoint": str(saved) if saved else None}


def _result(
    cfg: FinetuneConfig,
    weights: Weights,
    train_set: LabeledSet,
    val_set: LabeledSet,
    plan: Plan,
    history: dict[str, list[Any]],
    proc: Process,
    img_size: int,
    step: int,
) -> dict[str, Any]:
    evals = history["evals"]
    last = evals[-1] if evals else {}
    seconds = history["epoch_seconds"]
    result: dict[str, Any] = {
        "protocol": cfg.protocol,
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "evaluated_at": {"step": last.get("step"), "epoch": last.get("epoch"), "images": last.get("images")},
        "weights": {
            "source": weights.source,
            "kind": weights.kind,
            "method": weights.method,
            "pretraining_steps": weights.step,
            "sha256": weights.sha256,
            "dropped": weights.dropped,
            "pos_embed_resampled_from": weights.resampled_from,
        },
        "train_split": _split_info(train_set),
        "val_split": _split_info(val_set),
        "classes": train_set.classes,
        "model": {"arch": weights.model.arch, "img_size": img_size, "pool": cfg.model.pool},
        "epochs": round(step / plan.steps_per_epoch, 4),
        "steps": step,
        "global_batch": plan.global_batch,
        "peak_lr": plan.peak_lr,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        "world_size": proc.world_size,
        "device": str(proc.device),
        "evaluations": [{k: e[k] for k in ("step", "epoch", "top1", "top5")} for e in evals],
        "config": to_dict(cfg),
    }
    if cfg.train.report_max and evals:
        best = max(evals, key=lambda e: e["top1"])
        result["test_set_selection"] = {
            "note": "the best val top-1 over the evaluations of the run: the epoch is chosen on the test set, "
            "so this is not a held-out accuracy; report `top1`",
            "max_top1": best["top1"],
            "at_step": best["step"],
        }
    return result


def _split_info(data: LabeledSet) -> dict[str, Any]:
    return {"source": data.source, "sha256": data.sha256, "images": len(data), "layout": data.layout}


def _mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    a = cfg.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mixup_prob,
        switch_prob=a.mixup_switch_prob,
        mode=a.mixup_mode,
        label_smoothing=a.smoothing,
        num_classes=num_classes,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain_loss(smoothing: float) -> nn.Module:
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()


def _default_workers() -> int:
    """The cores this process may use, less one for the training thread, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
