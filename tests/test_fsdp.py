"""FSDP on CPU with gloo (fp32): 2 sharded ranks take the steps of 1 process with the same global batch, and
their checkpoints have the DDP layout: they resume sharded or not, and export strictly into timm."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _shards import MemorySource, random_images, tiny_config, torch_threads

from rspretrain import checkpoint as ckpt
from rspretrain.export import export_encoder, load_timm_encoder
from rspretrain.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

# 16 images, global batch 8: 2 steps per epoch, so the step-2 checkpoint sits on an epoch boundary and a
# resume with another world size reads the same batches as the uninterrupted run.
STEPS = 4
COMMON = {
    "train.steps": STEPS,
    "optim.lr": 2e-3,
    "optim.warmup_steps": 1,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 3,
    "train.dist_timeout": 60.0,
}


class _Stop(Exception):
    pass


class _StopAt(MemorySource):
    """Stops every rank at once when micro-batch `stop_at` of the run is asked for (a collective-free crash)."""

    def __init__(self, *args, stop_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def epoch(self, epoch, state=None):
        for batch in super().epoch(epoch, state):
            if epoch * self.batches_per_epoch + batch.cursor > self.stop_at:
                raise _Stop
            yield batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, ports: list[int], run: str, images_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    images = torch.load(images_path, weights_only=True)
    # with activation checkpointing: recomputing a block re-gathers its shards in backward
    cfg = tiny_config(
        run, {**COMMON, "train.batch_size": 4, "train.fsdp": True, "model.grad_checkpointing": True}
    )
    os.environ["MASTER_PORT"] = str(ports[0])
    try:  # steps 1-2 and their checkpoint, then every rank stops
        train(cfg, source=_StopAt(images, 4, rank=rank, world_size=2, stop_at=2))
    except _Stop:
        pass
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh process group for the sharded resume: steps 3-4
    train(cfg, resume=True, source=MemorySource(images, 4, rank=rank, world_size=2))


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def test_fsdp_matches_one_process_and_writes_ddp_checkpoints(tmp_path: Path) -> None:
    images = random_images(16, 64)
    images_path = tmp_path / "images.pt"
    torch.save(images, images_path)
    with torch_threads(1):
        train(
            tiny_config(tmp_path / "one", {**COMMON, "train.batch_size": 8}), source=MemorySource(images, 8)
        )
    sharded = tmp_path / "fsdp"
    # fork: the ranks reuse this process's imports (spawn would import torch twice more on a 2-core box)
    mp.start_processes(
        _rank_main,
        args=([_free_port(), _free_port()], str(sharded), str(images_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )

    one, two = _losses(tmp_path / "one"), _losses(sharded)
    assert list(one) == list(two) == [1, 2, 3, 4]  # 1-2 before the stop, 3-4 from the sharded resume
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), (one, two)
    assert one[1] != one[4]  # the model moved

    # the sharded run's checkpoint has the layout and (nearly) the values of the 1-process one
    want = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "one", 2))
    got = ckpt.load_checkpoint(ckpt.checkpoint_path(sharded, 2))
    assert set(got) == set(want) and got["data"] == {**want["data"], "world_size": 2, "cursors": [[2], [2]]}
    assert list(got["model"]) == list(want["model"])
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-5)
    assert [g["params"] for g in got["optimizer"]["param_groups"]] == [
        g["params"] for g in want["optimizer"]["param_groups"]
    ]
    assert [sorted(g) for g in got["optimizer"]["param_groups"]] == [
        sorted(g) for g in want["optimizer"]["param_groups"]
    ]
    assert set(got["optimizer"]["state"]) == set(want["optimizer"]["state"])
    for i, moments in want["optimizer"]["state"].items():
        assert set(got["optimizer"]["state"][i]) == set(moments)
        for name, value in moments.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][name], value, rtol=1e-4, atol=1e-6)

    # an unsharded 1-process resume from the sharded step-2 checkpoint takes the same steps 3-4
    plain = tmp_path / "plain"
    shutil.copytree(sharded, plain)
    for later in ckpt.list_checkpoints(plain)[:-1]:
        later.unlink()
    with torch_threads(1):
        cfg = tiny_config(plain, {**COMMON, "train.batch_size": 8})
        summary = train(cfg, resume=True, source=MemorySource(images, 8))
    assert summary["step"] == STEPS
    resumed = _losses(plain)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(one[step], abs=1e-5)

    # and the sharded run exports like any other: strict load into timm, the trained weights
    out = tmp_path / "encoder.safetensors"
    result = export_encoder(sharded, out)
    assert result.step == STEPS
    vit = load_timm_encoder(out)  # strict=True inside
    final = ckpt.load_checkpoint(result.checkpoint)["model"]
    torch.testing.assert_close(
        vit.state_dict()["blocks.1.mlp.fc2.weight"], final["encoder.blocks.1.mlp.fc2.weight"]
    )
