"""The training loop, top to bottom: distributed setup, model, data, optimiser and schedule, resume, steps,
logging, checkpoints.

One process on CPU or GPU, or one process per GPU under torchrun (NCCL on GPU, gloo on CPU; many nodes
through torchrun's rendezvous). Run as `rspretrain train ...` or `torchrun ... -m rspretrain train ...`.
Several processes replicate the model (DDP) or, with `train.fsdp`, shard it (rspretrain.fsdp); both write
the same checkpoint layout. A collective that waits longer than `train.dist_timeout` fails the rank, so a
dead or stuck peer brings the job down instead of hanging it.

Reproducibility: the masks of a sample come from `counter_uniform(seed, step, position in the global batch)`
and the data stream is a pure function of (seed, epoch, rank, worker), so a 2-rank run takes the same steps
as a 1-process run with the same global batch, and a resumed run takes the steps the uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from rspretrain import checkpoint as ckpt
from rspretrain import fsdp
from rspretrain.config import Config, to_dict
from rspretrain.data import BatchSource, ShardSource, StreamState
from rspretrain.masking import counter_uniform
from rspretrain.model import build_model
from rspretrain.visualize import TrainingFigures

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot start or go on; the message says what to change."""


@dataclass
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Plan:
    global_batch: int  # samples per optimiser step, over all ranks and accumulation steps
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def setup_process(device: str, timeout_s: float = 1800.0) -> Process:
    """Join the torchrun process group if there is one, and pick this process's device."""
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainingError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers of bf16 autocast
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return Process(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    dev = torch.device(device if device.startswith("cuda:") else "cuda") if want_cuda else torch.device("cpu")
    return Process(0, 1, 0, dev)


def plan_run(cfg: Config, samples_per_epoch: int, world_size: int) -> Plan:
    """Steps, warmup and peak lr from the config and the data size."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    global_batch = t.batch_size * world_size * o.accum_steps
    steps_per_epoch = max(1, samples_per_epoch // global_batch)
    if t.steps is not None:
        total = t.steps
    elif t.epochs is not None:
        total = max(1, round(t.epochs * steps_per_epoch))
    else:
        raise TrainingError("give the length of the run: --steps N or --epochs E")
    if o.warmup_steps is not None:
        warmup = o.warmup_steps
    else:
        warmup = round((o.warmup_epochs or 0.0) * steps_per_epoch)
    peak_lr = o.lr if o.lr is not None else o.blr * global_batch / 256
    if o.lr is None and o.lr_scale == "kept_over_mask":
        # The SelectiveMAE reference scales lr by the fraction of masked patches it reconstructs.
        peak_lr *= m.kept_mask_ratio / m.effective_mask_ratio
    return Plan(global_batch, steps_per_epoch, total, min(warmup, total - 1), peak_lr)


def train(
    cfg: Config,
    *,
    resume: bool = False,
    source: BatchSource | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train per `cfg`; returns a summary. `source` replaces the shard pipeline (tests); `on_log` gets each log record."""
    proc = setup_process(cfg.train.device, cfg.train.dist_timeout)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, proc, resume, source, on_log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: Config,
    proc: Process,
    resume: bool,
    source: BatchSource | None,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    if not t.out:
        raise TrainingError("give the run folder: --out RUN")
    run = Path(t.out)
    device = proc.device

    # ---- resume state, or refuse to clobber a run
    found = _find_resume_checkpoint(run, proc) if resume else None
    if not resume and ckpt.list_checkpoints(run):
        raise TrainingError(
            f"{run} already holds checkpoints; pass --resume to continue it, or pick another --out"
        )
    if resume and found is None:
        log.info("no checkpoint in %s yet; starting the run from step 0", run)

    # ---- data first: a wrong --shards should fail before a large model is built
    if source is None:
        source = ShardSource(
            cfg.data,
            img_size=cfg.model.img_size,
            batch_size=t.batch_size,
            seed=t.seed,
            rank=proc.rank,
            world_size=proc.world_size,
            pin_memory=device.type == "cuda",
        )
    plan = plan_run(cfg, source.samples_per_epoch, proc.world_size)
    log.info(
        "%d steps of %d samples (%d per epoch), warmup %d, peak lr %.3g, world size %d",
        plan.total_steps,
        plan.global_batch,
        plan.steps_per_epoch,
        plan.warmup_steps,
        plan.peak_lr,
        proc.world_size,
    )

    # ---- model: same init on every rank
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    num_patches = model.num_patches
    log.info(
        "%s %s: %.1fM parameters, %d patches per image",
        cfg.model.method,
        cfg.model.arch,
        sum(p.numel() for p in model.parameters()) / 1e6,
        num_patches,
    )

    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    sharded = t.fsdp and proc.world_size > 1
    if t.fsdp and not sharded:
        log.info("--fsdp with one process: nothing to shard, training unsharded")
    if found is not None:  # the weights go in before sharding: every rank holds the same full state
        model.load_state_dict(found[1]["model"])
    if sharded:
        fsdp.shard_model(model, bf16=precision == "bf16")

    # ---- optimiser, schedule, precision
    groups = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=plan.peak_lr, betas=o.betas, fused=True)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, plan.total_steps - plan.warmup_steps),
        lr_min=o.min_lr,
        warmup_t=plan.warmup_steps,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- counters, restored on resume
    step, skipped_before, nonfinite_total, bad_shards_before = 0, 0, 0, 0
    stream_state: StreamState | None = None
    saved: Path | None = None  # the last good checkpoint
    if found is not None:
        saved, resumed = found
        if sharded:
            fsdp.load_optimizer_state(model, optimizer, resumed["optimizer"])
        else:
            optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        step, skipped_before, nonfinite_total = resumed["step"], resumed["skipped"], resumed["nonfinite"]
        bad_shards_before = resumed.get("bad_shards", 0)
        rngs = resumed["rng"]
        ckpt.set_rng_state(rngs[proc.rank] if proc.rank < len(rngs) else rngs[0])
        stream_state = _restore_stream(resumed["data"], step, plan, o.accum_steps, proc, source.workers)
        log.info("resumed from %s at step %d", saved, step)
        del resumed, found  # the checkpoint's tensors are copied into the model and optimiser
    if step >= plan.total_steps:
        log.info("the run is already %d steps long; pass a larger --steps or --epochs to extend it", step)

    if t.compile:  # the transformers only: token selection changes its counts with progress
        model.encoder.compile()
        model.decoder.compile()
    ddp_model: torch.nn.Module = model
    if proc.world_size > 1 and not sharded:
        ddp_model = DistributedDataParallel(
            ddp_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- outputs (rank 0)
    writer, log_file = None, None
    if proc.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        writer = SummaryWriter(str(run / "tb"), purge_step=step)  # drops events past a resumed step
        _drop_log_records_after(run / "log.jsonl", step)
        log_file = open(run / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
    # A sharded model cannot run a forward pass on rank 0 alone.
    figures = TrainingFigures(run, t.figure_every, writer, cfg) if proc.main and t.figure_every else None
    if figures is not None and sharded:
        log.warning("train.figure_every: no figures under --fsdp (rank 0 cannot run the sharded model alone)")
        figures = None

    # ---- the loop
    epoch = step // plan.steps_per_epoch
    stream_state = stream_state or StreamState.fresh(source.workers)
    batches = source.epoch(epoch, stream_state if stream_state.batches else None)
    micro_per_epoch = plan.steps_per_epoch * o.accum_steps
    params = [p for p in model.parameters() if p.requires_grad]
    clip = o.clip_grad if o.clip_grad is not None else math.inf
    skipped_local, bad_shards_local, nonfinite_run, first_bad = 0, 0, 0, step
    before_streak: dict[str, Any] = {}  # what a checkpoint from before a non-finite streak needs
    window_losses: list[float] = []
    last: dict[str, Any] = {}
    start_step, t_start = step, time.perf_counter()
    t_window, step_window = t_start, step
    try:
        while step < plan.total_steps:
            if stream_state.batches >= micro_per_epoch:  # next epoch: a fresh, reseeded stream
                epoch += 1
                stream_state = StreamState.fresh(source.workers)
                batches = source.epoch(epoch)
            scheduler.step_update(step)
            before_step = (epoch, replace(stream_state, cursors=list(stream_state.cursors)), ckpt.rng_state())
            progress = step / plan.total_steps  # drives SelectiveMAE's PSTS stages
            loss_sum = torch.zeros((), device=device)
            for micro in range(o.accum_steps):
                batch = next(batches)
                stream_state.update(batch)
                skipped_local += batch.skipped
                bad_shards_local += batch.bad_shards
                imgs = batch.images.to(device, non_blocking=True)  # (N, C, H, W)
                n = imgs.shape[0]
                first = (micro * proc.world_size + proc.rank) * n  # this rank's slice of the global batch
                index = torch.arange(first, first + n, device=device)  # (N,)
                noise = counter_uniform(t.seed, step, index, (model.noise_channels, num_patches))  # (N, R, L)
                # DDP all-reduces (FSDP reduce-scatters) the gradients on the last micro-batch only
                sync = micro == o.accum_steps - 1 or proc.world_size == 1
                if sharded:
                    fsdp.set_gradient_sync(model, sync)
                with nullcontext() if sync or sharded else ddp_model.no_sync():  # type: ignore[operator]
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = ddp_model(imgs, progress=progress, noise=noise).loss / o.accum_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            if proc.world_size > 1:  # every rank takes the same skip decision from the mean loss
                dist.all_reduce(loss_sum)
                loss_sum /= proc.world_size
            scaler.unscale_(optimizer)
            grad_norm = fsdp.local_value(torch.nn.utils.clip_grad_norm_(params, clip))
            loss_value = loss_sum.item()
            if math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(grad_norm.item())):
                scaler.step(optimizer)
                nonfinite_run = 0
                window_losses.append(loss_value)
            else:
                nonfinite_total += 1
                nonfinite_run += 1
                if nonfinite_run == 1:  # skipped steps leave weights and optimiser as they were before it
                    first_bad = step
                    before_streak = {"at": before_step, "scaler": scaler.state_dict()}
                log.warning(
                    "step %d: loss %s, gradient norm %s; step skipped", step, loss_value, grad_norm.item()
                )
                if nonfinite_run >= t.max_nonfinite:
                    if saved is None or _step_of(saved) < first_bad:
                        streak_epoch, streak_stream, streak_rng = before_streak["at"]
                        model_state, optim_state = _full_state(model, optimizer, sharded)
                        snapshot = {
                            "model": model_state,
                            "optimizer": optim_state,
                            "scaler": before_streak["scaler"],
                            "step": first_bad,
                            "epoch": streak_epoch,
                            "skipped": skipped_before + _sum_over_ranks(skipped_local, device, proc),
                            "bad_shards": bad_shards_before + _sum_over_ranks(bad_shards_local, device, proc),
                            "nonfinite": nonfinite_total - nonfinite_run,
                            "config": to_dict(cfg),
                        }
                        saved = _save(run, snapshot, streak_stream, proc, t.keep_checkpoints, streak_rng)
                    raise TrainingError(
                        f"loss not finite for {nonfinite_run} steps in a row (steps {first_bad}-{step}); stopped. "
                        f"Checkpoint from before the streak: {saved}. Resume it with --resume and a lower "
                        "--blr or --clip-grad, or check the data."
                    )
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # ---- log
            done = step == plan.total_steps
            if step % t.log_every == 0 or done:
                skipped = skipped_before + _sum_over_ranks(skipped_local, device, proc)
                now = time.perf_counter()
                last = {
                    "step": step,
                    "epoch": round(step / plan.steps_per_epoch, 4),
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": (step - step_window) * plan.global_batch / max(now - t_window, 1e-9),
                    "skipped": skipped,
                    "bad_shards": bad_shards_before + _sum_over_ranks(bad_shards_local, device, proc),
                    "nonfinite": nonfinite_total,
                    "grad_norm": grad_norm.item(),
                    "total_steps": plan.total_steps,
                }
                window_losses, t_window, step_window = [], now, step
                if proc.main:
                    assert log_file is not None and writer is not None
                    log_file.write(json.dumps(last) + "\n")
                    log_file.flush()
                    for key in ("loss", "lr", "samples_per_s", "skipped", "grad_norm"):
                        writer.add_scalar(f"train/{key}", last[key], step)
                    if on_log is not None:
                        on_log(last)
            if figures is not None:
                figures(model, imgs, step, plan.total_steps)

            # ---- checkpoint (never in the middle of a non-finite streak)
            if (step % t.checkpoint_every == 0 or done) and nonfinite_run == 0:
                model_state, optim_state = _full_state(model, optimizer, sharded)
                snapshot = {
                    "model": model_state,
                    "optimizer": optim_state,
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "skipped": skipped_before + _sum_over_ranks(skipped_local, device, proc),
                    "bad_shards": bad_shards_before + _sum_over_ranks(bad_shards_local, device, proc),
                    "nonfinite": nonfinite_total,
                    "config": to_dict(cfg),
                }
                saved = _save(run, snapshot, stream_state, proc, t.keep_checkpoints)
    finally:
        if writer is not None:
            writer.close()
        if log_file is not None:
            log_file.close()

    elapsed = time.perf_counter() - t_start
    return {
        "run": str(run),
        "step": step,
        "epoch": round(step / plan.steps_per_epoch, 4),
        "loss": last.get("loss"),
        "samples_per_s": (step - start_step) * plan.global_batch / elapsed if step > start_step else None,
        "skipped": last.get("skipped", skipped_before),
        "bad_shards": last.get("bad_shards", bad_shards_before),
        "nonfinite": nonfinite_total,
        "checkpoint": str(saved) if saved else None,
        "world_size": proc.world_size,
        "global_batch": plan.global_batch,
        "peak_lr": plan.peak_lr,
    }


def _find_resume_checkpoint(run: Path, proc: Process) -> tuple[Path, dict[str, Any]] | None:
    """The newest good checkpoint, chosen by rank 0 so that every rank resumes from the same one."""
    if proc.world_size == 1:
        return ckpt.load_latest(run)
    choice: list[Any] = [None, None]  # path, error
    found = None
    if proc.main:
        try:
            found = ckpt.load_latest(run)
            choice[0] = str(found[0]) if found else None
        except ckpt.CheckpointError as exc:
            choice[1] = str(exc)
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ckpt.CheckpointError(choice[1])
    if choice[0] is None:
        return None
    if proc.main:
        return found
    return Path(choice[0]), ckpt.load_checkpoint(choice[0])


def _full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimiser state in the one checkpoint layout (gathered to rank 0 when sharded)."""
    if sharded:
        return fsdp.full_state(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def _step_of(path: Path) -> int:
    return int(path.stem.split("-")[-1])


def _sum_over_ranks(value: int, device: torch.device, proc: Process) -> int:
    if proc.world_size == 1:
        return value
    total = torch.tensor(value, device=device, dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def _drop_log_records_after(path: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: keep one line per step."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")


def _record_step(line: str) -> float:
    """The step of one log.jsonl line; a line cut short by a kill (no newline, or not JSON) counts as past."""
    if not line.endswith("\n"):
        return math.inf
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _restore_stream(
    data: dict[str, Any], step: int, plan: Plan, accum_steps: int, proc: Process, workers: int
) -> StreamState | None:
    """This rank's place in the epoch's stream, if the checkpoint's data layout still applies."""
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    cursors = data.get("cursors") or []
    same = (
        data.get("epoch") == epoch
        and data.get("batches") == in_epoch * accum_steps
        and data.get("world_size") == proc.world_size
        and len(cursors) == proc.world_size
        and len(cursors[proc.rank]) == max(1, workers)
    )
    if not same:
        if in_epoch:
            log.warning(
                "world size, workers or batch size changed since the checkpoint: the data stream of "
                "epoch %d restarts instead of resuming where it stopped",
                epoch,
            )
        return None
    return StreamState(int(data["batches"]), [int(c) for c in cursors[proc.rank]])


def _save(
    run: Path,
    state: dict[str, Any],
    stream_state: StreamState,
    proc: Process,
    keep: int,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Add every rank's stream position and RNG (now, or `rng`) to `state`; rank 0 writes it atomically."""
    rng = rng or ckpt.rng_state()
    positions: list[Any] = [[stream_state.batches, *stream_state.cursors]]
    rngs: list[Any] = [rng]
    if proc.world_size > 1:
        positions, rngs = [None] * proc.world_size, [None] * proc.world_size
        dist.all_gather_object(positions, [stream_state.batches, *stream_state.cursors])
        dist.all_gather_object(rngs, rng)
    path = ckpt.checkpoint_path(run, state["step"])
    if proc.main:
        state["rng"] = rngs
        state["data"] = {
            "epoch": state["epoch"],
            "batches": stream_state.batches,
            "world_size": proc.world_size,
            "cursors": [p[1:] for p in positions],
        }
        ckpt.save_checkpoint(state, path)
        ckpt.prune_checkpoints(run, keep)
        log.info("step %d: checkpoint %s", state["step"], path)
    if proc.world_size > 1:
        dist.barrier()
    return path
