"""Export: the encoder loads strictly into timm's VisionTransformer and computes the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from _shards import MemorySource, random_images, tiny_config, torch_threads
from safetensors import safe_open
from safetensors.torch import load_file

from rspretrain import checkpoint as ckpt
from rspretrain.config import from_dict
from rspretrain.export import export_encoder, load_timm_encoder, timm_model_args
from rspretrain.model import ModelConfig, build_model
from rspretrain.train import train


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    with torch_threads(1):
        cfg = tiny_config(run, {"train.steps": 3, "train.batch_size": 2, "optim.lr": 1e-2})
        train(cfg, source=MemorySource(random_images(4, 64), 2))
    return run


def test_export_loads_strictly_into_timm_with_the_same_features(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.safetensors"
    result = export_encoder(trained_run, out)
    assert result.step == 3 and result.checkpoint == ckpt.list_checkpoints(trained_run)[0]
    assert result.timm_name == "vit_tiny_patch16_224"
    assert result.timm_kwargs == {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2}

    state = ckpt.load_checkpoint(result.checkpoint)
    trained = build_model(from_dict(state["config"]).model)
    trained.load_state_dict(state["model"])
    trained.eval()

    vit = timm.create_model(result.timm_name, pretrained=False, num_classes=0, **result.timm_kwargs)
    vit.load_state_dict(load_file(str(out)), strict=True)  # the recipe the CLI prints
    vit.eval()
    imgs = random_images(3, 64, seed=7)
    with torch.no_grad():
        want = trained.encode(imgs)  # (N, 1 + L, D)
        got = vit.forward_features(imgs)
        pooled = vit(imgs)  # (N, D): class token after the final norm
    assert got.shape == want.shape == (3, 17, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want[:, 0], rtol=1e-5, atol=1e-5)
    # the export is the trained encoder, not a fresh one
    assert not torch.allclose(
        load_file(str(out))["blocks.0.attn.qkv.weight"],
        build_model(from_dict(state["config"]).model).encoder.blocks[0].attn.qkv.weight,
    )

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "vit_tiny_patch16" and meta["img_size"] == "64"
    assert meta["timm_model"] == "vit_tiny_patch16_224" and json.loads(meta["timm_kwargs"])["depth"] == 2
    assert "load_state_dict" in result.recipe and str(out) in result.recipe
    torch.testing.assert_close(load_timm_encoder(out).forward_features(imgs), want, rtol=1e-5, atol=1e-5)


def test_export_from_a_checkpoint_file(trained_run: Path, tmp_path: Path) -> None:
    older = ckpt.list_checkpoints(trained_run)[-1]
    result = export_encoder(older, tmp_path / "e.safetensors")
    assert result.checkpoint == older and result.step == int(older.stem.split("-")[1])


def test_timm_names_for_standard_sizes() -> None:
    assert timm_model_args(ModelConfig(arch="vit_base_patch16")) == ("vit_base_patch16_224", {})
    assert timm_model_args(ModelConfig(arch="vit_large_patch16", img_size=384)) == (
        "vit_large_patch16_384",
        {},
    )
    assert timm_model_args(ModelConfig(arch="vit_small_patch16", img_size=96)) == (
        "vit_small_patch16_224",
        {"img_size": 96},
    )


def test_full_size_encoder_keys_match_timm() -> None:
    # the standard preset at 224 px: the exact key set and shapes of timm's model, without building a file
    with torch.device("meta"):
        ours = build_model(
            ModelConfig(arch="vit_base_patch16", method="mae", decoder_depth=1)
        ).encoder.state_dict()
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_export_of_an_empty_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints"):
        export_encoder(tmp_path, tmp_path / "e.safetensors")
