"""What every training command shares: the process (torchrun / DDP) setup, the run's length and per-step
warmup + cosine schedule, checkpoint save and resume with every rank's RNG, and the run's log (log.jsonl and
TensorBoard, trimmed on resume).

`rspretrain train` (train.py) and `rspretrain finetune` (finetune.py) are written on top of these pieces, so a
resumed fine-tune restores its state exactly the way a resumed pretraining run does, and both logs read alike.
Checkpoint files themselves (atomic writes, weights_only loads, fall back to the previous good one) are
`rspretrain.checkpoint`; this module adds what needs the process group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from rspretrain import checkpoint as ckpt
from rspretrain import fsdp

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot start or go on; the message says what to change."""


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_host_memory() -> bool:
    """Stop glibc's malloc handing a CPU training step's freed activations back to the kernel. -> applied?

    By default glibc serves blocks above a threshold (which it raises as it goes) with fresh mmap()s, and
    trims the free top of its heap, so each step of a CPU run can take its activations from the kernel
    again: on ViT-B SelectiveMAE at batch 8, about 90,000 page faults and 7% of the step in the kernel
    (none where another, larger model keeps the heap from shrinking, as it did in `rspretrain bench`).
    Serving blocks up to 32 MiB (the most glibc accepts) from the heap and never trimming it keeps a step's
    memory in the process for the next step: the process holds its peak, which the next step needs anyway.
    Blocks above 32 MiB are still mapped afresh. A no-op where the C library has no mallopt (macOS; musl's
    is a stub) or with RSPRETRAIN_KEEP_HOST_MEMORY=0. Forked loader workers inherit it.
    """
    if os.environ.get("RSPRETRAIN_KEEP_HOST_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never


@contextmanager
def process(device: str, timeout_s: float = 1800.0, threads: int | None = None) -> Iterator[Process]:
    """`setup_process`, torch threads, host memory kept between CPU steps (`keep_host_memory`), and the
    process group torn down however the run ends."""
    proc = setup_process(device, timeout_s)
    if proc.device.type == "cpu":
        keep_host_memory()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield proc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def precision_of(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU and fp32 on the CPU."""
    return precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype of torch.autocast for a resolved precision; None: no autocast."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def sum_over_ranks(value: int, device: torch.device, proc: Process) -> int:
    if proc.world_size == 1:
        return value
    total = torch.tensor(value, device=device, dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def gather(value: Any, proc: Process) -> list[Any]:
    """Every rank's `value` (plain data), in rank order, on every rank."""
    if proc.world_size == 1:
        return [value]
    values: list[Any] = [None] * proc.world_size
    dist.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------- length and schedule


@dataclass
class Plan:
    global_batch: int  # samples per optimiser step, over all ranks and accumulation steps
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def make_plan(
    samples_per_epoch: int,
    global_batch: int,
    *,
    steps: int | None,
    epochs: float | None,
    warmup_steps: int | None,
    warmup_epochs: float | None,
    lr: float | None,
    blr: float,
) -> Plan:
    """Steps, warmup and peak lr (`lr`, else blr x global batch / 256) of a run over `samples_per_epoch`."""
    steps_per_epoch = max(1, samples_per_epoch // global_batch)
    if steps is not None:
        total = steps
    elif epochs is not None:
        total = max(1, round(epochs * steps_per_epoch))
    else:
        raise TrainingError("give the length of the run: --steps N or --epochs E")
    warmup = warmup_steps if warmup_steps is not None else round((warmup_epochs or 0.0) * steps_per_epoch)
    peak_lr = lr if lr is not None else blr * global_batch / 256
    return Plan(global_batch, steps_per_epoch, total, min(warmup, total - 1), peak_lr)


def lr_schedule(optimizer: torch.optim.Optimizer, plan: Plan, min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0 over plan.warmup_steps, then a half cosine to `min_lr`, stepped per optimiser step
    (`scheduler.step_update(step)`). Each param group's "lr_scale" (layer-wise decay) multiplies its lr."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, plan.total_steps - plan.warmup_steps),
        lr_min=min_lr,
        warmup_t=plan.warmup_steps,
        warmup_prefix=True,
        t_in_epochs=False,
    )


# --------------------------------------------------------------------------- checkpoints


def refuse_to_clobber(run: Path, resume: bool) -> None:
    if not resume and ckpt.list_checkpoints(run):
        raise TrainingError(
            f"{run} already holds checkpoints; pass --resume to continue it, or pick another --out"
        )


def find_resume_checkpoint(run: Path, proc: Process) -> tuple[Path, dict[str, Any]] | None:
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


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimiser state in the one checkpoint layout (gathered to rank 0 when sharded)."""
    if sharded:
        return fsdp.full_state(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def step_of(path: Path) -> int:
    return int(path.stem.split("-")[-1])


def save(
    run: Path, state: dict[str, Any], proc: Process, keep: int, rng: dict[str, Any] | None = None
) -> Path:
    """Add every rank's RNG (now, or `rng`) to `state` as state["rng"][rank]; rank 0 writes it atomically to
    RUN/checkpoints/step-N.pt (N = state["step"]) and keeps the newest `keep`. Every rank calls this."""
    rngs = gather(rng or ckpt.rng_state(), proc)
    path = ckpt.checkpoint_path(run, state["step"])
    if proc.main:
        state["rng"] = rngs
        ckpt.save_checkpoint(state, path)
        ckpt.prune_checkpoints(run, keep)
        log.info("step %d: checkpoint %s", state["step"], path)
    if proc.world_size > 1:
        dist.barrier()
    return path


def restore_rng(state: dict[str, Any], proc: Process) -> None:
    """This rank's RNG from a checkpoint `save` wrote (rank 0's if the run had fewer ranks)."""
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[proc.rank] if proc.rank < len(rngs) else rngs[0])


# --------------------------------------------------------------------------- log.jsonl and TensorBoard


class StepHook(Protocol):
    """Called by the training loop after every optimiser step on rank 0 (e.g. visualize.TrainingFigures)."""

    def __call__(
        self, model: nn.Module, imgs: Tensor, step: int, total_steps: int, writer: SummaryWriter | None
    ) -> object: ...


class RunLog:
    """RUN/config.json, RUN/log.jsonl (one JSON record per line) and RUN/tb (TensorBoard), on rank 0 only.

    Opened at `step` (0, or the resumed checkpoint's): log records and TensorBoard events past it, left by the
    run that was killed, are dropped, so the log holds one line per step however often the run was resumed.
    On the other ranks every method does nothing.
    """

    def __init__(self, run: Path, config: Mapping[str, Any], step: int, enabled: bool = True) -> None:
        self.writer: SummaryWriter | None = None
        self._file: Any = None
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.writer = SummaryWriter(str(run / "tb"), purge_step=step)  # drops events past a resumed step
        drop_log_records_after(run / "log.jsonl", step)
        self._file = open(run / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: Mapping[str, Any], scalars: Mapping[str, float] | None = None) -> None:
        """One line of log.jsonl; `scalars` ({"train/loss": 0.3}) go to TensorBoard at record["step"]."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for tag, value in (scalars or {}).items():
                self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scalars(record: Mapping[str, Any], keys: Iterable[str], prefix: str) -> dict[str, float]:
    """{"prefix/key": record[key]} for the keys of `record` to plot."""
    return {f"{prefix}/{key}": record[key] for key in keys if record.get(key) is not None}


def drop_log_records_after(path: Path, step: int) -> None:
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
