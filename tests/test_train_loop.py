"""The training step's bookkeeping without host syncs: non-finite steps skipped on the device and judged only
every few steps (with the same stop and checkpoint as a per-step check), the loader's rate in the log, uint8
batches from real shards normalised in the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _shards import MemorySource, random_images, tiny_config, torch_threads, write_shards

from rspretrain import checkpoint as ckpt
from rspretrain.data import Batch, StreamState
from rspretrain.train import MAX_PENDING, TrainingError, train


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class _NaNFrom(MemorySource):
    """Good batches, then NaN images from micro-batch `bad_from` on (to `bad_to`, exclusive)."""

    def __init__(self, images: torch.Tensor, batch_size: int, bad_from: int, bad_to: int = 10**9) -> None:
        super().__init__(images, batch_size)
        self.bad_from, self.bad_to = bad_from, bad_to

    def epoch(self, epoch: int, state: StreamState | None = None):
        for batch in super().epoch(epoch, state):
            if self.bad_from < epoch * self.batches_per_epoch + batch.cursor <= self.bad_to:
                batch = Batch(torch.full_like(batch.images, float("nan")), 0, batch.cursor, 0)
            yield batch


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def on_log(record: dict) -> None:
        if record["step"] == step:
            raise _Stop

    return on_log


def test_a_streak_judged_between_log_lines_stops_as_a_per_step_check_would(tmp_path: Path) -> None:
    # log every 8 steps: steps 3-5 are skipped on the device and judged at step 8; the run stops naming them,
    # and the checkpoint from before the streak holds the weights and optimiser of a clean run's step 3
    images = random_images(4, 64)
    common = {"train.steps": 20, "train.batch_size": 2, "train.max_nonfinite": 3, "train.log_every": 8}
    run = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"not finite for 3 steps in a row \(steps 3-5\).*step-000000003\.pt"
    ):
        train(tiny_config(run, {**common, "train.checkpoint_every": 100}), source=_NaNFrom(images, 2, 3))
    before = ckpt.load_checkpoint(ckpt.checkpoint_path(run, 3))
    assert before["step"] == 3 and before["nonfinite"] == 0
    clean = tmp_path / "clean"  # the same run's schedule, stopped after step 4, checkpointed every step
    with pytest.raises(_Stop):
        train(
            tiny_config(clean, {**common, "train.log_every": 1, "train.checkpoint_every": 1}),
            source=MemorySource(images, 2),
            on_log=_stop_at(4),
        )
    want = ckpt.load_checkpoint(ckpt.checkpoint_path(clean, 3))
    assert before["data"] == want["data"]
    for key, value in want["model"].items():
        assert torch.equal(before["model"][key], value), key
    for i, moments in want["optimizer"]["state"].items():
        assert torch.equal(before["optimizer"]["state"][i]["exp_avg"], moments["exp_avg"])
        assert torch.equal(before["optimizer"]["state"][i]["step"], moments["step"])  # skips left it alone


def test_skipped_steps_leave_weights_as_they_were_and_are_counted_at_the_log_line(tmp_path: Path) -> None:
    images = random_images(4, 64)
    flags = {"train.steps": 8, "train.batch_size": 2, "train.log_every": 8, "train.checkpoint_every": 2,
             "train.keep_checkpoints": 10}  # fmt: skip
    run = tmp_path / "run"
    summary = train(tiny_config(run, flags), source=_NaNFrom(images, 2, 2, 4))  # steps 2 and 3 not finite
    assert summary["step"] == 8 and summary["nonfinite"] == 2
    (record,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert record["nonfinite"] == 2 and record["step"] == 8 and record["loss"] > 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        f"step-00000000{s}.pt" for s in (8, 6, 2)
    ]  # none mid-streak
    after6 = ckpt.load_checkpoint(ckpt.checkpoint_path(run, 6))
    assert all(torch.isfinite(v).all() for v in after6["model"].values())
    # AdamW took 4 of the 6 steps: the skipped ones left its step count (and everything else) alone
    assert all(int(state["step"]) == 4 for state in after6["optimizer"]["state"].values())


def test_the_step_does_not_wait_for_the_device_between_log_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every .item() / .tolist() is a host sync on a GPU: the loop makes them at log lines and checkpoints only
    calls = {"n": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(fn):
        def wrapper(self, *args, **kwargs):
            calls["n"] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counted(item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(tolist))
    steps = 2 * MAX_PENDING
    flags = {
        "train.steps": steps,
        "train.batch_size": 2,
        "train.log_every": steps,
        "train.checkpoint_every": steps,
    }
    train(tiny_config(tmp_path / "run", flags), source=MemorySource(random_images(4, 64), 2))
    assert (
        calls["n"] <= 6
    )  # two judgements of MAX_PENDING steps, one log line, one checkpoint; not one per step


def test_real_shards_train_and_log_the_loaders_rate(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, shards=2, per_shard=6, size=72)
    flags = {"data.shards": [str(shards)], "train.steps": 4, "train.batch_size": 2, "train.log_every": 2}
    summary = train(tiny_config(tmp_path / "run", {**flags, "data.workers": 0}))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert summary["step"] == 4 and len(records) == 2
    for r in records:
        assert r["loader_samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert r["grad_norm"] > 0 and r["loss"] > 0
    # the device decode path trains the same way
    summary = train(tiny_config(tmp_path / "dev", {**flags, "data.workers": 0, "data.decode": "device"}))
    assert summary["step"] == 4 and summary["skipped"] == 0


_FAULTS_SCRIPT = """
import ctypes, ctypes.util, resource
from rspretrain import runtime

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults_per_step():
    # a CPU step's pattern: many blocks of a few MiB (activations), written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        blocks = [libc.malloc(4 << 20) for _ in range(40)]  # 160 MiB
        for block in blocks:
            ctypes.memset(block, 1, 4 << 20)
        for block in blocks:
            libc.free(block)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

faults_per_step()
default = faults_per_step()
applied = runtime.keep_host_memory()
faults_per_step()
print(applied, default, faults_per_step())
"""


def test_keep_host_memory_stops_page_faults_between_steps():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    applied, default, kept = out[0] == "True", float(out[1]), float(out[2])
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc): keep_host_memory is a no-op here")
    # glibc by default gives the 160 MiB back and faults it in again: 40,960 pages of 4 KiB a step
    assert default > 20_000, default
    assert kept < 100, kept
