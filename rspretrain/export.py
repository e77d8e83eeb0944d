"""Encoder weights to safetensors under timm's VisionTransformer names.

The file holds `model.encoder.state_dict()`, which loads with strict=True into
`timm.create_model(<timm name>, num_classes=0, **kwargs)`; the timm name and kwargs ride in the file's
metadata, and `loading_recipe` prints the one line that loads it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from rspretrain.checkpoint import resolve_checkpoint
from rspretrain.config import from_dict
from rspretrain.model import ModelConfig, build_model

FORMAT = "rspretrain-encoder"


@dataclass
class Exported:
    path: Path
    checkpoint: Path
    step: int
    timm_name: str
    timm_kwargs: dict[str, Any]
    tensors: int

    @property
    def recipe(self) -> str:
        return loading_recipe(self.path, self.timm_name, self.timm_kwargs)


def timm_model_args(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The timm model name and kwargs whose state_dict matches the encoder of `cfg`."""
    name = f"{cfg.arch}_{cfg.img_size}"
    kwargs: dict[str, Any] = {}
    if not timm.is_model(name):  # timm registers few image sizes; any other is a kwarg of the 224 model
        name = f"{cfg.arch}_224"
        kwargs["img_size"] = cfg.img_size
    if cfg.in_chans != 3:
        kwargs["in_chans"] = cfg.in_chans
    for key in ("depth", "embed_dim", "num_heads"):  # overrides of the preset (tiny test models)
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    return name, kwargs


def loading_recipe(path: str | Path, name: str, kwargs: dict[str, Any]) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"import timm, safetensors.torch; m = timm.create_model({name!r}, num_classes=0{args}); "
        f"m.load_state_dict(safetensors.torch.load_file({str(path)!r}), strict=True)"
    )


def export_encoder(run_or_checkpoint: str | Path, out: str | Path) -> Exported:
    """Write the encoder of a run's newest good checkpoint (or of one checkpoint file) to `out`."""
    source, state = resolve_checkpoint(run_or_checkpoint)
    cfg = from_dict(state["config"], where=str(source))
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    # safetensors wants contiguous tensors that share no storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.encoder.state_dict().items()}
    name, kwargs = timm_model_args(cfg.model)
    metadata = {
        "format": FORMAT,
        "arch": cfg.model.arch,
        "img_size": str(cfg.model.img_size),
        "method": cfg.model.method,
        "step": str(state["step"]),
        "timm_model": name,
        "timm_kwargs": json.dumps(kwargs),
        "config": json.dumps(state["config"]),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Exported(out, source, int(state["step"]), name, kwargs, len(tensors))


def load_timm_encoder(path: str | Path) -> torch.nn.Module:
    """The timm VisionTransformer an exported file describes, with its weights loaded strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an rspretrain encoder export")
    model = timm.create_model(
        meta["timm_model"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"])
    )
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
