"""Every training recipe under configs/ loads, and the paper's recipes say what the paper says."""

from __future__ import annotations

from pathlib import Path

import pytest

from rspretrain.config import load_config
from rspretrain.model import ModelConfig, build_model

CONFIGS = sorted(
    p
    for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
    if not p.name.startswith(("finetune_", "linprobe_"))  # evaluation recipes: tests/test_finetune.py
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_builds_on_the_meta_device(path: Path) -> None:
    import torch

    cfg = load_config(path)
    assert isinstance(cfg.model, ModelConfig)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.num_visible > 0 and model.num_targets > 0


@pytest.mark.parametrize("arch", ["vitb", "vitl"])
def test_paper_recipes(arch: str) -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"selectivemae_{arch}_opticalrs13m.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.method, m.mask_ratio, m.kept_mask_ratio, m.decoder_depth) == ("selectivemae", 0.85, 0.25, 12)
    assert (t.batch_size, t.epochs, o.warmup_epochs, o.blr) == (256, 800, 30, 1.5e-4)
    assert (o.weight_decay, tuple(o.betas)) == (0.05, (0.9, 0.95))


def test_vith_recipe_uses_fsdp_and_keeps_the_effective_batch() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "selectivemae_vith_opticalrs13m.yaml")
    assert cfg.train.fsdp and cfg.model.grad_checkpointing
    assert cfg.train.batch_size * 8 * cfg.optim.accum_steps == 2048
