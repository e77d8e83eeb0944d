"""Data parallel on CPU with gloo: 2 ranks take the same steps as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _shards import MemorySource, random_images, tiny_config, tiny_set_flags, torch_threads, write_shards

from rspretrain import checkpoint as ckpt
from rspretrain.train import train

pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = {"train.steps": STEPS, "optim.lr": 2e-3, "optim.warmup_steps": 1, "train.checkpoint_every": 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, run: str, images_path: str, batch_size: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    images = torch.load(images_path, weights_only=True)
    cfg = tiny_config(run, {**COMMON, "train.batch_size": batch_size})
    train(cfg, source=MemorySource(images, batch_size, rank=rank, world_size=world_size))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    images = random_images(16, 64)
    images_path = tmp_path / "images.pt"
    torch.save(images, images_path)

    with torch_threads(1):
        train(
            tiny_config(tmp_path / "one", {**COMMON, "train.batch_size": 8}), source=MemorySource(images, 8)
        )
    mp.spawn(
        _rank_main, args=(2, _free_port(), str(tmp_path / "two"), str(images_path), 4), nprocs=2, join=True
    )

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)
    assert one[0] != one[-1]  # the model moved
    w1 = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "one")[0])["model"]
    w2 = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "two")[0])["model"]
    for key in w1:
        # gloo's all-reduce sums in another order than one process does; Adam's update divides by sqrt(v),
        # so a weight whose gradient is near zero may differ by a few 1e-5 (seen: 1.01e-5)
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=5e-5)


def test_torchrun_cli_on_shards(tmp_path: Path) -> None:
    """`torchrun -m rspretrain train` on real shards, split over 2 ranks without resampling."""
    shards = tmp_path / "shards"
    write_shards(shards, shards=4, per_shard=6, size=64)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "rspretrain",
        "train",
        "--shards",
        str(shards),
        "--out",
        str(run),
        "--steps",
        "3",
        "--batch-size",
        "3",
        "--no-resampled",
        "--workers",
        "1",
        "--checkpoint-every",
        "2",
        "--quiet",
        *tiny_set_flags(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(run)[0])
    assert state["step"] == 3 and state["data"]["world_size"] == 2
    # each rank's stream position, for an exact resume: 3 batches of 3 from its one worker, in epoch 0 of 4 steps
    assert state["data"]["epoch"] == 0 and state["data"]["cursors"] == [[9], [9]]

    resume = [*cmd[: cmd.index("--shards")], "--out", str(run), "--resume", "--steps", "6", "--quiet"]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # across the epoch boundary at step 4
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(run)[0])
    assert state["step"] == 6 and state["data"]["epoch"] == 1 and state["data"]["cursors"] == [[6], [6]]
