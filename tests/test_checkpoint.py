"""Checkpoints: atomic writes, weights_only loads, refusal of pickled code, fall back past a corrupt newest."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
import torch
from _shards import MemorySource, random_images, tiny_config, torch_threads

from rspretrain import checkpoint as ckpt
from rspretrain.config import from_dict
from rspretrain.train import train


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    with torch_threads(1):
        cfg = tiny_config(run, {"train.steps": 6, "train.batch_size": 2, "train.checkpoint_every": 2})
        train(cfg, source=MemorySource(random_images(4, 64), 2))
    return run


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_training_checkpoint_loads_with_weights_only_and_holds_plain_data(trained_run: Path) -> None:
    paths = ckpt.list_checkpoints(trained_run)
    assert [p.name for p in paths] == ["step-000000006.pt", "step-000000004.pt"]  # the last two kept
    state = torch.load(paths[0], weights_only=True)  # plain torch, no allow-listed globals
    assert {"model", "optimizer", "scaler", "step", "epoch", "rng", "config", "data"} <= set(state)
    assert state["step"] == 6
    cfg = from_dict(state["config"])
    assert cfg.train.steps == 6 and cfg.model.depth == 2

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_checkpoint(_state(2), path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_state(99), path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 2  # the old file is untouched
    assert os.listdir(path.parent) == [path.name]  # and no temporary file is left behind


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = ckpt.checkpoint_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 1, "x": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match="refused.*GLOBAL"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint of the run can be loaded"):
        ckpt.load_latest(tmp_path)
    assert not marker.exists()


def test_corrupt_newest_falls_back_to_the_previous_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (2, 4):
        ckpt.save_checkpoint(_state(step), ckpt.checkpoint_path(tmp_path, step))
    newest = ckpt.checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:300])  # truncated, as after a crash mid-copy
    with caplog.at_level(logging.ERROR):
        path, state = ckpt.load_latest(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 2) and state["step"] == 2
    assert str(newest) in caplog.text and "truncated or corrupt" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=str(newest)):
        ckpt.load_checkpoint(newest)


@pytest.mark.parametrize("damage", ["zeros", "truncated"])
def test_resume_falls_back_when_the_newest_checkpoint_is_corrupt(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    newest = ckpt.list_checkpoints(run)[0]
    data = newest.read_bytes()
    newest.write_bytes(b"\x00" * 64 if damage == "zeros" else data[: len(data) // 2])
    cfg = tiny_config(run, {"train.steps": 8, "train.batch_size": 2, "train.checkpoint_every": 2})
    with caplog.at_level(logging.ERROR):
        summary = train(cfg, resume=True, source=MemorySource(random_images(4, 64), 2))
    assert f"{newest}: truncated or corrupt" in caplog.text  # the bad file is named
    assert summary["step"] == 8
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 8  # steps 5 and 6 were run again from the step-4 checkpoint, logged once


def test_not_ours_and_missing(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an rspretrain checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")
    assert ckpt.load_latest(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints"):
        ckpt.resolve_checkpoint(tmp_path)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 10, 2, 30):
        ckpt.save_checkpoint(_state(step), ckpt.checkpoint_path(tmp_path, step))
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000030.pt", "step-000000010.pt"]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rng.pt"
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, path)
    want = (torch.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]
