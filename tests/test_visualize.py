"""rspretrain visualize: panels from a tiny model (masks, un-normalised pastes, loss), figures from a checkpoint
through the CLI, and figures during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _shards import MemorySource, random_images, tiny_config, torch_threads, write_shards
from PIL import Image
from typer.testing import CliRunner

from rspretrain import checkpoint as ckpt
from rspretrain.cli import app
from rspretrain.config import ConfigError, to_dict
from rspretrain.model import build_model
from rspretrain.train import train
from rspretrain.visualize import FIGURES, TrainingFigures, reconstruct, total_steps


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def tiny_model(method: str = "selectivemae", **model: object):
    torch.manual_seed(0)
    overrides = {"model.method": method, **{f"model.{k}": v for k, v in model.items()}}
    return build_model(tiny_config("unused", overrides).model)


def _pixels(mask: torch.Tensor) -> torch.Tensor:
    """(N, 16) patch mask of a 64 px image -> (N, 1, 64, 64) pixel mask."""
    return mask.view(-1, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)


def test_selectivemae_panels_masks_paste_and_loss() -> None:
    model = tiny_model()  # 16 patches: 2 visible, 4 reconstructed
    imgs = random_images(3, 64, seed=1)
    panels = reconstruct(model, imgs, progress=0.5, seed=0)
    assert panels.visible.sum(1).tolist() == [2, 2, 2] and panels.targets.sum(1).tolist() == [4, 4, 4]
    assert not (panels.visible & panels.targets).any()
    assert panels.scores.shape == (3, 16) and 0 <= panels.scores.min() and panels.scores.max() < 1
    # outside the targets the pasted image is the input; inside, the model's own pixels
    keep = ~_pixels(panels.targets)
    assert torch.allclose(panels.reconstruction * keep, panels.images * keep, atol=1e-6)
    assert not torch.allclose(panels.reconstruction, panels.images, atol=1e-3)
    assert 0 <= panels.reconstruction.min() and panels.reconstruction.max() <= 1
    # a fixed seed gives the same masks, another seed others
    again = reconstruct(model, imgs, progress=0.5, seed=0)
    assert torch.equal(again.visible, panels.visible) and torch.equal(again.loss, panels.loss)
    other = reconstruct(model, imgs, progress=0.5, seed=1)
    assert not torch.equal(other.targets, panels.targets)
    assert model.training  # restored after the eval-mode pass


def test_loss_matches_the_model_loss_for_the_same_masks() -> None:
    from rspretrain.masking import counter_uniform

    model = tiny_model().eval()
    imgs = random_images(2, 64, seed=2)
    noise = counter_uniform(0, 0, torch.arange(2), (model.noise_channels, model.num_patches))
    with torch.no_grad():
        loss = model(imgs, progress=0.2, noise=noise).loss
    panels = reconstruct(model, imgs, progress=0.2, seed=0)
    assert torch.allclose(panels.loss.mean(), loss, rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_pastes_the_input_back(monkeypatch, norm_pix_loss: bool) -> None:
    """Un-normalising with the true patch's mean and std inverts the loss's normalisation exactly."""
    model = tiny_model(norm_pix_loss=norm_pix_loss)
    forward = model.forward

    def perfect(imgs, progress, noise=None):
        out = forward(imgs, progress, noise)
        index = out.target_index[:, :, None].expand_as(out.pred)  # (N, K, P)
        target = model.patchify(imgs).gather(1, index)  # (N, K, P)
        if norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        out.pred = target
        return out

    monkeypatch.setattr(model, "forward", perfect)
    panels = reconstruct(model, random_images(2, 64, seed=3), progress=0.0)
    assert torch.allclose(panels.reconstruction, panels.images, atol=1e-4)
    assert panels.loss.max() < 1e-10


def test_mae_reconstructs_every_masked_patch() -> None:
    model = tiny_model("mae")  # mask 0.75 of 16: 4 visible, 12 reconstructed
    panels = reconstruct(model, random_images(2, 64), progress=1.0)
    assert panels.visible.sum(1).tolist() == [4, 4] and panels.targets.sum(1).tolist() == [12, 12]
    assert (panels.visible ^ panels.targets).all()  # a partition of the patches
    assert panels.scores.shape == (2, 16)  # HOG for reference


def _checkpoint(run: Path, method: str, step: int, overrides: dict) -> Path:
    cfg = tiny_config(run, {"model.method": method, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "step": step, "config": to_dict(cfg), "data": {"world_size": 1}}
    return ckpt.save_checkpoint(state, ckpt.checkpoint_path(run, step))


def test_total_steps_from_steps_or_epochs(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, {"train.steps": 40})
    assert total_steps(cfg, {}) == 40
    cfg = tiny_config(tmp_path, {"train.epochs": 2, "data.samples_per_epoch": 40, "train.batch_size": 4})
    assert total_steps(cfg, {"data": {"world_size": 2}}) == 10  # 40 // (4 x 2) = 5 steps per epoch
    assert total_steps(tiny_config(tmp_path, {"train.epochs": 2}), {}) is None  # no data size to go by


def test_cli_draws_a_figure_of_a_checkpoint(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, shards=2, per_shard=2, size=72, corrupt=[(0, 0)])
    run = tmp_path / "run"
    _checkpoint(run, "selectivemae", 5, {"train.steps": 20, "data.shards": [str(shards)]})
    out = tmp_path / "fig.png"
    result = CliRunner().invoke(app, ["visualize", str(run), "--out", str(out), "--n", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 5 and summary["total_steps"] == 20 and summary["progress"] == 0.25
    assert (summary["samples"], summary["visible"], summary["reconstructed"], summary["patches"]) == (
        2,
        2,
        4,
        16,
    )
    width, height = Image.open(out).size
    assert width > 800 and 300 < height < width  # five columns, two rows
    # --shards and --progress override the run's; the table summary names the figure
    result = CliRunner().invoke(
        app,
        ["visualize", str(run), "--out", str(out), "--n", "1", "--shards", str(shards / "tiles-000001.tar")]
        + ["--progress", "0.9"],
    )
    assert result.exit_code == 0, result.output
    assert "rspretrain visualize" in result.stdout and "0.9" in result.stdout
    for args, message in ((["--n", "0"], "--n 0"), (["--progress", "2"], "--progress 2")):
        bad = CliRunner().invoke(app, ["visualize", str(run), "--out", str(out), *args])
        assert bad.exit_code == 2 and message in bad.stderr


def test_mae_checkpoint_figure(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, shards=1, per_shard=2, size=64)
    run = tmp_path / "mae"
    _checkpoint(run, "mae", 3, {"train.steps": 3, "data.shards": [str(shards)]})
    result = CliRunner().invoke(app, ["visualize", str(run), "--out", str(tmp_path / "m.png"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "mae" and summary["samples"] == 2 and summary["reconstructed"] == 12


def test_figures_during_training_land_in_the_run_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(run, {"train.steps": 4, "train.figure_every": 2, "train.batch_size": 2})
    train(cfg, source=MemorySource(random_images(4, 64), batch_size=2), figures=TrainingFigures(cfg))
    assert sorted(p.name for p in (run / FIGURES).iterdir()) == ["step_0000002.png", "step_0000004.png"]
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("reconstruction")] == [2, 4]

    quiet = tmp_path / "quiet"
    train(tiny_config(quiet, {"train.steps": 2}), source=MemorySource(random_images(2, 64), batch_size=2))
    assert not (quiet / FIGURES).exists()
    with pytest.raises(ConfigError, match="train.figure_every"):
        tiny_config(tmp_path, {"train.figure_every": -1})
