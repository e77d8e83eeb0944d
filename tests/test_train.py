"""The typed config and the training loop, on a tiny ViT on CPU: learning, resume, extension, non-finite stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _shards import MemorySource, flat_images, random_images, tiny_config, torch_threads, write_shards

from rspretrain import checkpoint as ckpt
from rspretrain.config import Config, ConfigError, from_dict, load_config, to_dict
from rspretrain.data import Batch, StreamState
from rspretrain.train import TrainingError, plan_run, train


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# ---------------------------------------------------------------------------------------------- config


def test_config_layers_defaults_yaml_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {arch: vit_small_patch16, mask_ratio: 0.8}\ntrain: {batch_size: 32, epochs: 800}\n"
        "optim: {warmup_epochs: 30}\n"
    )
    cfg = load_config(path, {"train.batch_size": 8, "train.steps": 100, "optim.warmup_steps": 5})
    assert cfg.model.arch == "vit_small_patch16" and cfg.model.mask_ratio == 0.8  # YAML over defaults
    assert cfg.train.batch_size == 8  # flags over YAML
    assert cfg.train.steps == 100 and cfg.train.epochs is None  # setting one of a pair clears the other
    assert cfg.optim.warmup_steps == 5 and cfg.optim.warmup_epochs is None
    assert cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95)  # defaults


def test_config_unknown_key_and_wrong_type_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {bach_size: 32}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.bach_size'"):
        load_config(path)
    path.write_text("optim: {blr: fast}\n")
    with pytest.raises(ConfigError, match=r"optim\.blr: expected a number, got 'fast'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"the command line: train\.steps: expected an integer"):
        load_config(None, {"train.steps": 1.5})
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        load_config(None, {"nope.x": 1})
    with pytest.raises(ConfigError, match=r"model\.arch"):
        load_config(None, {"model.arch": "vit_giant"})
    with pytest.raises(ConfigError, match=r"optim\.betas: expected 2 values"):
        load_config(None, {"optim.betas": [0.9]})
    with pytest.raises(ConfigError, match="set only one of"):
        load_config(None, {"train.steps": 5, "train.epochs": 2})
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 .* use bf16 with --fsdp"):
        load_config(None, {"train.fsdp": True, "train.precision": "fp16"})
    with pytest.raises(ConfigError, match=r"data\.url_timeout"):
        load_config(None, {"data.url_timeout": 0})


def test_shipped_configs_load_and_hold_the_paper_recipe() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("selectivemae_vitb_opticalrs13m", "selectivemae_vitl_opticalrs13m"):
        cfg = load_config(root / f"{name}.yaml")
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs, cfg.optim.blr) == (
            256,
            800,
            30,
            1.5e-4,
        )
        assert (cfg.model.mask_ratio, cfg.model.kept_mask_ratio, cfg.model.decoder_depth) == (0.85, 0.25, 12)
    assert load_config(root / "selectivemae_vitl_opticalrs13m.yaml").model.arch == "vit_large_patch16"
    mae = load_config(root / "mae_vitb_opticalrs13m.yaml").model
    assert (mae.method, mae.mask_ratio, mae.decoder_depth) == ("mae", 0.75, 8)
    assert load_config(root / "demo_cpu.yaml").model.arch == "vit_tiny_patch16"


def test_config_round_trips_through_plain_data() -> None:
    cfg = load_config(None, {"data.shards": ["a.tar", "b.tar"], "model.depth": 2, "train.steps": 3})
    plain = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(plain) == cfg
    assert isinstance(from_dict(plain).model.psts_stages, tuple)


def test_plan_lr_warmup_and_length() -> None:
    cfg = load_config(None, {"train.batch_size": 256, "train.epochs": 800, "optim.warmup_epochs": 30})
    plan = plan_run(cfg, samples_per_epoch=2048 * 1000 + 5, world_size=8)
    assert plan.global_batch == 2048 and plan.steps_per_epoch == 1000
    assert plan.total_steps == 800_000 and plan.warmup_steps == 30_000
    assert plan.peak_lr == pytest.approx(1.5e-4 * 2048 / 256)
    scaled = plan_run(load_config(None, {"train.steps": 10, "optim.lr_scale": "kept_over_mask"}), 1000, 1)
    assert scaled.peak_lr == pytest.approx(1.5e-4 * 64 / 256 * 0.25 / 0.85)
    with pytest.raises(TrainingError, match="--steps"):
        plan_run(load_config(None), 1000, 1)


# ---------------------------------------------------------------------------------------------- training


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_loss_falls_when_overfitting_one_batch(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path / "run",
        {
            "train.steps": 40,
            "train.batch_size": 4,
            "optim.lr": 3e-3,
            "optim.weight_decay": 0.0,
            "optim.warmup_steps": 3,
            "model.norm_pix_loss": False,
        },
    )
    summary = train(cfg, source=MemorySource(flat_images(4, 64), batch_size=4))
    losses = list(_losses(tmp_path / "run").values())
    assert summary["step"] == 40 and len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.25 * first, (first, last)


def test_run_writes_logs_config_checkpoints_and_param_groups(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(
        run, {"train.steps": 5, "train.batch_size": 2, "train.checkpoint_every": 2, "train.log_every": 2}
    )
    train(cfg, source=MemorySource(random_images(4, 64), batch_size=2))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "skipped"} <= set(records[0])
    assert from_dict(json.loads((run / "config.json").read_text())) == cfg
    assert list((run / "tb").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000000005.pt", "step-000000004.pt"]
    state = torch.load(ckpt.list_checkpoints(run)[0], weights_only=True)
    decays = sorted(g["weight_decay"] for g in state["optimizer"]["param_groups"])
    assert decays == [0.0, 0.05]
    assert state["step"] == 5 and from_dict(state["config"]) == cfg


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_log(record: dict) -> None:
        if record["step"] == step:
            raise _Crash

    return on_log


def test_resume_continues_with_the_losses_of_the_uninterrupted_run(tmp_path: Path) -> None:
    # real shards, 3 steps per epoch: the crash and resume fall in the middle of epoch 1
    shards = tmp_path / "shards"
    write_shards(shards, shards=2, per_shard=12, size=72)
    flags = {
        "data.shards": [str(shards)],
        "train.steps": 8,
        "train.batch_size": 8,
        "train.checkpoint_every": 4,
        "data.shuffle_buffer": 10,
        "data.shuffle_initial": 5,
    }
    train(tiny_config(tmp_path / "a", flags))
    want = _losses(tmp_path / "a")

    with pytest.raises(_Crash):  # killed after step 5; its last checkpoint is step 4
        train(tiny_config(tmp_path / "b", flags), on_log=_crash_at(5))
    summary = train(tiny_config(tmp_path / "b", flags), resume=True)
    got = _losses(tmp_path / "b")
    assert summary["step"] == 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # step 5, logged before the crash, is logged once
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_resume_with_more_steps_extends_a_finished_run(tmp_path: Path) -> None:
    run, images = tmp_path / "run", random_images(4, 64)
    base = {"train.batch_size": 2, "train.checkpoint_every": 100}
    train(tiny_config(run, {**base, "train.steps": 3}), source=MemorySource(images, 2))
    with pytest.raises(TrainingError, match="--resume"):  # a second run into the same folder is refused
        train(tiny_config(run, {**base, "train.steps": 3}), source=MemorySource(images, 2))
    summary = train(tiny_config(run, {**base, "train.steps": 5}), resume=True, source=MemorySource(images, 2))
    assert summary["step"] == 5
    assert list(_losses(run)) == [1, 2, 3, 4, 5]
    assert ckpt.list_checkpoints(run)[0].name == "step-000000005.pt"


class _PoisonedSource(MemorySource):
    """Good batches, then NaN images from micro-batch `bad_from` on."""

    def __init__(self, images: torch.Tensor, batch_size: int, bad_from: int) -> None:
        super().__init__(images, batch_size)
        self.bad_from = bad_from

    def epoch(self, epoch: int, state: StreamState | None = None):
        for batch in super().epoch(epoch, state):
            if epoch * self.batches_per_epoch + batch.cursor > self.bad_from:
                batch = Batch(torch.full_like(batch.images, float("nan")), 0, batch.cursor, 0)
            yield batch


@pytest.mark.parametrize("checkpoint_every", [2, 100])
def test_nonfinite_streak_stops_with_a_checkpoint_from_before_it(
    tmp_path: Path, checkpoint_every: int
) -> None:
    # steps 0-2 good, 3-5 not finite: the run stops at step 5 and leaves the state after 3 good steps on disk,
    # whether or not a periodic checkpoint came before the streak (checkpoint_every 100: none did)
    images = random_images(4, 64)
    common = {"train.steps": 20, "train.batch_size": 2, "train.max_nonfinite": 3}
    run = tmp_path / "run"
    cfg = tiny_config(run, {**common, "train.checkpoint_every": checkpoint_every})
    with pytest.raises(
        TrainingError, match=r"not finite for 3 steps in a row \(steps 3-5\).*step-000000003\.pt"
    ):
        train(cfg, source=_PoisonedSource(images, 2, bad_from=3))
    names = [p.name for p in ckpt.list_checkpoints(run)]
    want_names = (
        ["step-000000003.pt", "step-000000002.pt"] if checkpoint_every == 2 else ["step-000000003.pt"]
    )
    assert names == want_names
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 2]
    before = ckpt.load_checkpoint(ckpt.list_checkpoints(run)[0])
    assert before["step"] == 3 and before["nonfinite"] == 0

    # the same weights and optimiser as a clean run after 3 steps, and a resume takes step 4 as that run does
    clean = tmp_path / "clean"
    with pytest.raises(_Crash):
        cfg = tiny_config(clean, {**common, "train.checkpoint_every": 1})
        train(cfg, source=MemorySource(images, 2), on_log=_crash_at(4))
    want = ckpt.load_checkpoint(ckpt.checkpoint_path(clean, 3))
    assert before["data"] == want["data"] and before["epoch"] == want["epoch"]  # the stream position too
    for key, value in want["model"].items():
        assert torch.equal(before["model"][key], value), key
    for i, moments in want["optimizer"]["state"].items():
        assert torch.equal(before["optimizer"]["state"][i]["exp_avg"], moments["exp_avg"])
    with pytest.raises(_Crash):
        train(tiny_config(run, common), resume=True, source=MemorySource(images, 2), on_log=_crash_at(4))
    assert _losses(run)[4] == pytest.approx(_losses(clean)[4], abs=1e-6)


def test_isolated_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    class OneBad(MemorySource):
        def epoch(self, epoch, state=None):
            for batch in super().epoch(epoch, state):
                if epoch * self.batches_per_epoch + batch.cursor == 2:
                    batch = Batch(torch.full_like(batch.images, float("nan")), 0, batch.cursor, 0)
                yield batch

    cfg = tiny_config(tmp_path / "run", {"train.steps": 4, "train.batch_size": 2})
    summary = train(cfg, source=OneBad(random_images(4, 64), 2))
    assert summary["step"] == 4 and summary["nonfinite"] == 1
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    images = random_images(8, 64)
    common = {"train.steps": 3, "optim.lr": 1e-3, "optim.warmup_steps": 0}
    train(tiny_config(tmp_path / "full", {**common, "train.batch_size": 8}), source=MemorySource(images, 8))
    train(
        tiny_config(tmp_path / "accum", {**common, "train.batch_size": 4, "optim.accum_steps": 2}),
        source=MemorySource(images, 4),
    )
    full, accum = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    for step in full:
        assert accum[step] == pytest.approx(full[step], abs=1e-5)


def test_config_type_is_the_dataclass() -> None:
    assert isinstance(load_config(None), Config)
