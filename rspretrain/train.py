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

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from rspretrain import checkpoint as ckpt
from rspretrain import fsdp, runtime
from rspretrain.augment import normalize
from rspretrain.config import Config, to_dict
from rspretrain.data import BatchSource, ShardSource, StreamState
from rspretrain.masking import counter_uniform
from rspretrain.model import build_model
from rspretrain.runtime import Plan, Process, RunLog, StepHook, TrainingError, sum_over_ranks

log = logging.getLogger(__name__)

# the log keys plotted in TensorBoard
LOGGED = ("loss", "lr", "samples_per_s", "loader_samples_per_s", "data_wait", "skipped", "grad_norm")
MAX_PENDING = 16  # steps run before their losses are looked at on the host, at most


def plan_run(cfg: Config, samples_per_epoch: int | None, world_size: int) -> Plan:
    """Steps, warmup and peak lr from the config and the data size (None: unknown, and the run, given in
    steps, is one epoch)."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    global_batch = t.batch_size * world_size * o.accum_steps
    if samples_per_epoch is None:
        if t.steps is None or o.warmup_epochs is not None:
            raise TrainingError(
                "the data size is unknown: give --samples-per-epoch, or the run and warmup in steps"
            )
        samples_per_epoch = t.steps * global_batch
    plan = runtime.make_plan(
        samples_per_epoch,
        global_batch,
        steps=t.steps,
        epochs=t.epochs,
        warmup_steps=o.warmup_steps,
        warmup_epochs=o.warmup_epochs,
        lr=o.lr,
        blr=o.blr,
    )
    if o.lr is None and o.lr_scale != "none":
        # The SelectiveMAE reference scales lr by kept_mask_ratio / mask_ratio (its default) or by the inverse
        # (its --inverse_lr), which one reading of the paper's text suggests; docs/fidelity.md.
        ratio = m.kept_mask_ratio / m.effective_mask_ratio
        plan = replace(plan, peak_lr=plan.peak_lr * (ratio if o.lr_scale == "kept_over_mask" else 1 / ratio))
    return plan


def train(
    cfg: Config,
    *,
    resume: bool = False,
    source: BatchSource | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    figures: StepHook | None = None,
) -> dict[str, Any]:
    """Train per `cfg`; returns a summary. `source` replaces the shard pipeline (tests); `on_log` gets each log
    record; `figures` (visualize.TrainingFigures) is called after every step on rank 0."""
    with runtime.process(cfg.train.device, cfg.train.dist_timeout, cfg.train.threads) as proc:
        return _train(cfg, proc, resume, source, on_log, figures)


def _train(
    cfg: Config,
    proc: Process,
    resume: bool,
    source: BatchSource | None,
    on_log: Callable[[dict[str, Any]], None] | None,
    figures: StepHook | None,
) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    if not t.out:
        raise TrainingError("give the run folder: --out RUN")
    run = Path(t.out)
    device = proc.device

    # ---- resume state, or refuse to clobber a run
    runtime.refuse_to_clobber(run, resume)
    found = runtime.find_resume_checkpoint(run, proc) if resume else None
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
            trainer_threads=torch.get_num_threads() if device.type == "cpu" else (t.threads or 1),
            need_epoch_size=t.steps is None or o.warmup_epochs is not None,
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

    precision = runtime.precision_of(t.precision, device)
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
    scheduler = runtime.lr_schedule(optimizer, plan, o.min_lr)
    amp_dtype = runtime.autocast_dtype(precision)
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
        runtime.restore_rng(resumed, proc)
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
    run_log = RunLog(run, to_dict(cfg), step, enabled=proc.main)
    if not proc.main:
        figures = None
    # A sharded model cannot run a forward pass on rank 0 alone.
    if figures is not None and sharded:
        log.warning("train.figure_every: no figures under --fsdp (rank 0 cannot run the sharded model alone)")
        figures = None

    # ---- the loop
    epoch = step // plan.steps_per_epoch
    stream_state = stream_state or StreamState.fresh(source.workers)
    batches = source.epoch(epoch, stream_state if stream_state.batches else None)
    micro_per_epoch = plan.steps_per_epoch * o.accum_steps
    params = [p for p in model.parameters() if p.requires_grad]
    # Steps are judged on the host (loss finite?) only every few steps: the optimiser skips a non-finite
    # step on the device, so no step waits for the device. fp16's scaler and FSDP's sharded optimiser
    # decide on the host, every step.
    host_each_step = scaler.is_enabled() or sharded
    pending: list[
        tuple[int, Any, Tensor, Tensor]
    ] = []  # (step, state before it, loss, finite) not judged yet
    grad_norm: Tensor | None = None
    skipped_local, bad_shards_local, nonfinite_run, first_bad = 0, 0, 0, step
    before_streak: dict[str, Any] = {}  # what a checkpoint from before a non-finite streak needs
    window_losses: list[float] = []
    loaded, load_s, wait_s = 0, 0.0, 0.0  # this window: samples, the loader's seconds, the trainer's wait
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
            done = step + 1 == plan.total_steps
            log_now = (step + 1) % t.log_every == 0 or done
            loss_sum = torch.zeros((), device=device)
            for micro in range(o.accum_steps):
                waited = time.perf_counter()
                batch = next(batches)
                stream_state.update(batch)
                pixels, dropped = batch.images_on(device)  # (N, C, H, W) uint8
                wait_s += time.perf_counter() - waited
                loaded, load_s = loaded + len(batch), load_s + batch.load_s
                skipped_local += batch.skipped + dropped
                bad_shards_local += batch.bad_shards
                n = pixels.shape[0]
                first = (micro * proc.world_size + proc.rank) * t.batch_size  # this rank's slice of the batch
                index = torch.arange(first, first + n, device=device)  # (N,)
                noise = counter_uniform(t.seed, step, index, (model.noise_channels, num_patches))  # (N, R, L)
                # DDP all-reduces (FSDP reduce-scatters) the gradients on the last micro-batch only
                sync = micro == o.accum_steps - 1 or proc.world_size == 1
                if sharded:
                    fsdp.set_gradient_sync(model, sync)
                with nullcontext() if sync or sharded else ddp_model.no_sync():  # type: ignore[operator]
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        imgs = normalize(pixels)  # (N, C, H, W) float32, ImageNet-normalised
                        loss = ddp_model(imgs, progress=progress, noise=noise).loss / o.accum_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            if proc.world_size > 1:  # every rank takes the same skip decision from the mean loss
                dist.all_reduce(loss_sum)
                loss_sum /= proc.world_size
            # The gradient norm is a pass over every gradient: taken to clip, or for the log line.
            scaler.unscale_(optimizer)
            grad_norm = None
            if o.clip_grad is not None:
                grad_norm = fsdp.local_value(torch.nn.utils.clip_grad_norm_(params, o.clip_grad))
            elif log_now:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = fsdp.local_value(torch.nn.utils.get_total_norm(grads))
            finite = torch.isfinite(loss_sum)
            if grad_norm is not None and not scaler.is_enabled():
                finite &= torch.isfinite(grad_norm)
            if host_each_step:
                if finite.item():
                    scaler.step(optimizer)
            else:
                _step_unless(optimizer, ~finite)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending.append((step, before_step, loss_sum, finite))
            step += 1
            checkpoint_now = step % t.checkpoint_every == 0 or done

            # ---- judge the pending steps: one host sync for all of them
            if host_each_step or log_now or checkpoint_now or len(pending) >= MAX_PENDING:
                values = torch.stack(
                    [torch.stack([loss_t, ok_t.float()]) for _, _, loss_t, ok_t in pending]
                ).tolist()
                for (at, before, _, _), (loss_value, ok) in zip(pending, values, strict=True):
                    if ok:
                        nonfinite_run = 0
                        window_losses.append(loss_value)
                        continue
                    nonfinite_total += 1
                    nonfinite_run += 1
                    if nonfinite_run == 1:  # skipped steps leave weights and optimiser as they were before it
                        first_bad = at
                        before_streak = {"at": before, "scaler": scaler.state_dict()}
                    log.warning("step %d: loss %s or its gradient not finite; step skipped", at, loss_value)
                    if nonfinite_run >= t.max_nonfinite:
                        if saved is None or runtime.step_of(saved) < first_bad:
                            streak_epoch, streak_stream, streak_rng = before_streak["at"]
                            model_state, optim_state = runtime.full_state(model, optimizer, sharded)
                            snapshot = {
                                "model": model_state,
                                "optimizer": optim_state,
                                "scaler": before_streak["scaler"],
                                "step": first_bad,
                                "epoch": streak_epoch,
                                "skipped": skipped_before + sum_over_ranks(skipped_local, device, proc),
                                "bad_shards": bad_shards_before
                                + sum_over_ranks(bad_shards_local, device, proc),
                                "nonfinite": nonfinite_total - nonfinite_run,
                                "config": to_dict(cfg),
                            }
                            saved = _save(run, snapshot, streak_stream, proc, t.keep_checkpoints, streak_rng)
                        raise TrainingError(
                            f"loss not finite for {nonfinite_run} steps in a row (steps {first_bad}-{at}); "
                            f"stopped. Checkpoint from before the streak: {saved}. Resume it with --resume and "
                            "a lower --blr or --clip-grad, or check the data."
                        )
                pending = []

            # ---- log
            if log_now:
                skipped = skipped_before + sum_over_ranks(skipped_local, device, proc)
                now = time.perf_counter()
                last = {
                    "step": step,
                    "epoch": round(step / plan.steps_per_epoch, 4),
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": (step - step_window) * plan.global_batch / max(now - t_window, 1e-9),
                    # what the loader alone could deliver (its workers side by side), and the share of
                    # the window the trainer waited for it: which of the two is the bottleneck
                    "loader_samples_per_s": loaded * max(1, source.workers) / load_s if load_s else None,
                    "data_wait": wait_s / max(now - t_window, 1e-9),
                    "skipped": skipped,
                    "bad_shards": bad_shards_before + sum_over_ranks(bad_shards_local, device, proc),
                    "nonfinite": nonfinite_total,
                    "grad_norm": grad_norm.item() if grad_norm is not None else None,
                    "total_steps": plan.total_steps,
                }
                window_losses, t_window, step_window = [], now, step
                loaded, load_s, wait_s = 0, 0.0, 0.0
                run_log.write(last, runtime.scalars(last, LOGGED, "train"))
                if proc.main and on_log is not None:
                    on_log(last)
            if figures is not None:
                figures(model, imgs, step, plan.total_steps, run_log.writer)

            # ---- checkpoint (never in the middle of a non-finite streak)
            if checkpoint_now and nonfinite_run == 0:
                model_state, optim_state = runtime.full_state(model, optimizer, sharded)
                snapshot = {
                    "model": model_state,
                    "optimizer": optim_state,
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "skipped": skipped_before + sum_over_ranks(skipped_local, device, proc),
                    "bad_shards": bad_shards_before + sum_over_ranks(bad_shards_local, device, proc),
                    "nonfinite": nonfinite_total,
                    "config": to_dict(cfg),
                }
                saved = _save(run, snapshot, stream_state, proc, t.keep_checkpoints)
    finally:
        run_log.close()

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


def _step_unless(optimizer: torch.optim.Optimizer, nonfinite: Tensor) -> None:
    """optimizer.step(), skipped on the device when `nonfinite` is True, without waiting for it on the host.

    Fused AdamW reads `found_inf` (the hook torch.amp.GradScaler uses) and then leaves weights, moments and
    its step count as they were.
    """
    optimizer.found_inf = nonfinite.float()  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


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
    """Add every rank's stream position to `state` and save it with every rank's RNG (now, or `rng`)."""
    positions = runtime.gather([stream_state.batches, *stream_state.cursors], proc)
    state["data"] = {
        "epoch": state["epoch"],
        "batches": stream_state.batches,
        "world_size": proc.world_size,
        "cursors": [p[1:] for p in positions],
    }
    return runtime.save(run, state, proc, keep, rng)
