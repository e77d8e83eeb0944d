"""Encoder weights from any MAE-family source, under timm's VisionTransformer names: the one loader of
`probe`, `linprobe` and `finetune`.

Sources (`load_weights`):

- `export`: an `rspretrain export` .safetensors (its metadata gives arch, img_size and the run's config);
- `checkpoint`: an `rspretrain` run folder (its newest good checkpoint) or checkpoint file (keys `encoder.*`);
- `mae`: an official MAE checkpoint (`{'model': state}` with timm names, from facebookresearch/mae's
  main_pretrain.py: possibly with its decoder, `mask_token` and the run's argparse `args`);
- `selectivemae`: an official SelectiveMAE checkpoint (the same, with a cross-attention decoder `decoder_embed1`,
  `decoder_blocks`, the token-probability head `get_token_probs*` and `pos_embed_probs`, and HOG buffers `hog.*`);
- `timm`: a plain state dict with timm names (a .safetensors without our metadata, or a .pth/.pt);
- `classifier`: an `rspretrain finetune` / `linprobe` run or checkpoint (its encoder; the head dropped);
- `random`: `--random-init`, the init `rspretrain train` starts from (`rspretrain.model`, seeded).

Only encoder tensors are kept (`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*`, and a
fine-tuned `fc_norm.*`); every other key must belong to a known pretraining or classification head, and what
was dropped is listed. The architecture is read off the tensors (width, depth, patch size, grid) and matched
with `rspretrain.model.ARCHS`; `--arch` is needed only when no preset matches. A different image size
resamples the position embedding with timm's `resample_abs_pos_embed` (bicubic, antialiased; class token
kept). `.pth` files are read with `weights_only=True`, admitting only `argparse.Namespace` (the `args` MAE
saves) beyond plain data and tensors: a pickle that would run code is refused.

Shapes: L patches, D encoder width, g = sqrt(L) grid side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rspretrain import checkpoint as ckpt
from rspretrain.config import from_dict
from rspretrain.model import ARCHS, ModelConfig, ModelConfigError, build_model

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
KINDS = ("export", "checkpoint", "mae", "selectivemae", "timm", "classifier", "random")
ENCODER_KEYS = re.compile(r"^(cls_token$|pos_embed$|patch_embed\.|blocks\.\d+\.|norm\.|fc_norm\.)")
# Keys of pretraining decoders and heads: dropped, and named in the log.
HEAD_KEYS = {
    "mae decoder": re.compile(r"^(decoder_|mask_token)"),
    "selectivemae token scorer": re.compile(r"^(get_token_probs|pos_embed_probs|hog\.|token_select\.)"),
    "classifier head": re.compile(r"^head\."),
}
SELECTIVEMAE_MARKERS = ("decoder_embed1.", "get_token_probs", "pos_embed_probs", "hog.")
STATE_KEYS = ("model", "state_dict", "module")  # where a checkpoint file keeps its weights


class WeightsError(ValueError):
    """Weights that cannot be used as given; the message names the file, what was found and what to change."""


@dataclass
class Weights:
    """An encoder's tensors under timm VisionTransformer names, and what they are."""

    state: dict[str, Tensor] | None  # None: random init (build it with `encoder_state`)
    model: ModelConfig  # arch, img_size, in_chans and dims (image size after any resampling)
    source: str  # the file, or "random init (...)"
    kind: str  # one of KINDS
    step: int | None = None  # pretraining steps behind the weights, when known
    method: str = "?"  # selectivemae | mae | ? (a timm state dict does not say)
    init_seed: int = 0  # the seed `rspretrain train` would build this model with
    dropped: dict[str, int] = field(default_factory=dict)  # key group -> tensors dropped
    sha256: str | None = None  # of the weights file
    resampled_from: int | None = None  # the image size of the position embedding in the file


def load_weights(
    spec: str | Path | None,
    *,
    random_init: bool = False,
    arch: str | None = None,
    img_size: int | None = None,
    seed: int | None = None,
    resample: bool = True,
) -> Weights:
    """The encoder weights of `spec` (see the module doc), or a random init of its shape with `random_init`.

    `arch` must agree with the weights (it is needed only where no preset matches them, or without weights).
    `img_size` different from the weights' resamples the position embedding when `resample`, else it is an
    error. `seed` (default: the run's train.seed, else 0) is the random init's.
    """
    if spec is None:
        if not random_init:
            raise WeightsError(
                "give WEIGHTS (a checkpoint, run folder, .safetensors or MAE .pth), or --random-init"
            )
        if arch is None or img_size is None:
            raise WeightsError("--random-init without WEIGHTS needs --arch and --img-size")
        model = _default_model(arch, img_size)
        weights = Weights(None, model, "random init", "random", method=model.method)
    else:
        weights = _read(Path(spec), arch)
    if arch is not None and arch != weights.model.arch:
        raise WeightsError(f"--arch {arch} contradicts the weights ({weights.model.arch}); leave it out")
    if seed is not None:
        weights.init_seed = seed
    if img_size is not None and img_size != weights.model.img_size:
        if not resample:
            raise WeightsError(
                f"--img-size {img_size} contradicts the weights ({weights.model.img_size}); leave it out"
            )
        weights = resize(weights, img_size)
    if random_init:
        m = weights.model
        weights = Weights(
            None,
            m,
            f"random init ({m.arch}, {m.img_size} px, seed {weights.init_seed})",
            "random",
            method=weights.method,
            init_seed=weights.init_seed,
        )
    return weights


def encoder_state(weights: Weights) -> dict[str, Tensor]:
    """The tensors to load: the file's, or the init `rspretrain train` starts from (seeded, caller's RNG kept)."""
    if weights.state is not None:
        return weights.state
    return {k: v.detach().clone() for k, v in _seeded_encoder(weights).state_dict().items()}


def build_encoder(weights: Weights) -> nn.Module:
    """rspretrain's ViTEncoder ((N, C, H, W) -> (N, 1 + L, D) normalised tokens) with the weights, strictly."""
    encoder = _seeded_encoder(weights)
    if weights.state is not None:
        state = {k: v for k, v in weights.state.items() if not k.startswith("fc_norm.")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"{weights.source}: does not fit {weights.model.arch}: missing {missing}, unexpected {unexpected}"
            )
    return encoder


def _seeded_encoder(weights: Weights) -> nn.Module:
    """The encoder `rspretrain train` builds for this model and seed (the caller's RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.init_seed)
        try:
            return build_model(weights.model).encoder
        except ModelConfigError as exc:
            raise WeightsError(str(exc)) from None


def resize(weights: Weights, img_size: int) -> Weights:
    """The same weights for another input size: the position embedding resampled to the new grid."""
    p = int(weights.model.encoder_dims()["patch_size"])
    if img_size % p:
        raise WeightsError(f"--img-size {img_size} must be a multiple of the patch size {p}")
    model = _with_size(weights.model, img_size)
    if weights.state is None:
        return replace(weights, model=model)
    from timm.layers import resample_abs_pos_embed

    state = dict(weights.state)
    old = weights.model.img_size // p
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], [img_size // p] * 2, [old] * 2, num_prefix_tokens=1
    )  # (1, 1 + g_old^2, D) -> (1, 1 + g_new^2, D)
    log.info(
        "position embedding resampled from %dx%d to %dx%d patches", old, old, img_size // p, img_size // p
    )
    return replace(weights, state=state, model=model, resampled_from=weights.model.img_size)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- readers


def _read(path: Path, arch: str | None) -> Weights:
    if path.is_dir():
        return _read_checkpoint(path, arch)
    if str(path).endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path, arch)
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: no such checkpoint file")
    data = ckpt.load_trusted(path)
    if isinstance(data, dict) and data.get("format") == ckpt.FORMAT:
        return _read_checkpoint(path, arch)
    return _read_state_file(path, data, arch)


def _read_checkpoint(path: Path, arch: str | None) -> Weights:
    source, state = ckpt.resolve_checkpoint(path)  # CheckpointError names the file
    if state.get("task") == "classify":  # a finetune / linprobe run: timm names, its head dropped
        weights = _from_state(source, state["model"], arch, file_sha256(source), "classifier")
        weights.step = int(state["step"])
        return weights
    run_cfg = from_dict(state["config"], where=str(source))
    prefix = "encoder."
    tensors = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    return Weights(
        tensors,
        run_cfg.model,
        str(source),
        "checkpoint",
        step=int(state["step"]),
        method=run_cfg.model.method,
        init_seed=run_cfg.train.seed,
        sha256=file_sha256(source),
    )


def _read_safetensors(path: Path, arch: str | None) -> Weights:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from rspretrain.export import FORMAT

    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: cannot read it as safetensors ({exc})") from None
    sha = file_sha256(path)
    if meta.get("format") != FORMAT:  # a timm state dict saved as safetensors
        return _from_state(path, tensors, arch, sha, "timm")
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    if meta.get("config"):  # the run's full config: its random init is the one the run started from
        run_cfg = from_dict(json.loads(meta["config"]), where=str(path))
        return Weights(
            tensors,
            run_cfg.model,
            str(path),
            "export",
            step,
            run_cfg.model.method,
            run_cfg.train.seed,
            sha256=sha,
        )
    kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    cfg = _default_model(meta["arch"], int(meta["img_size"]))
    cfg.in_chans = int(kwargs.get("in_chans", 3))
    cfg.depth, cfg.embed_dim, cfg.num_heads = (
        kwargs.get("depth"),
        kwargs.get("embed_dim"),
        kwargs.get("num_heads"),
    )
    return Weights(tensors, cfg, str(path), "export", step, meta.get("method", "?"), 0, sha256=sha)


def _read_state_file(path: Path, data: Any, arch: str | None) -> Weights:
    """An official MAE / SelectiveMAE checkpoint, or any state dict with timm names."""
    state = data
    if isinstance(data, dict):
        for key in STATE_KEYS:
            if isinstance(data.get(key), dict):
                state = data[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise WeightsError(
            f"{path}: not a checkpoint we can read: expected an rspretrain checkpoint, an MAE / SelectiveMAE "
            f"checkpoint ({{'model': state dict}}) or a state dict of tensors; found {found}"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper
    if any(k.startswith(SELECTIVEMAE_MARKERS) for k in state):
        kind = "selectivemae"
    elif any(HEAD_KEYS["mae decoder"].match(k) for k in state) or (
        isinstance(data, dict) and "model" in data
    ):
        kind = "mae"
    else:
        kind = "timm"
    return _from_state(path, state, arch, file_sha256(path), kind)


def _from_state(path: Path, state: dict[str, Tensor], arch: str | None, sha: str, kind: str) -> Weights:
    """Keep the encoder tensors, drop known heads (counted), refuse anything else; infer the architecture."""
    kept: dict[str, Tensor] = {}
    dropped: dict[str, int] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if ENCODER_KEYS.match(key):
            kept[key] = value
            continue
        group = next((name for name, pattern in HEAD_KEYS.items() if pattern.match(key)), None)
        if group is None:
            unknown.append(key)
        else:
            dropped[group] = dropped.get(group, 0) + 1
    if unknown:
        raise WeightsError(
            f"{path}: {len(unknown)} keys are neither a ViT encoder's nor a known head's, e.g. {unknown[:5]}"
        )
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if name not in kept:
            raise WeightsError(
                f"{path}: no {name!r}; this is not a ViT encoder with timm names (found {sorted(kept)[:5]})"
            )
    model = _infer_model(path, kept, arch)
    if dropped:
        log.info("%s: dropped %s", path, ", ".join(f"{n} {name}" for name, n in dropped.items()))
    method = kind if kind in ("mae", "selectivemae") else "?"
    return Weights(kept, model, str(path), kind, None, method, 0, dropped, sha)


def _infer_model(path: Path, state: dict[str, Tensor], arch: str | None) -> ModelConfig:
    """The preset (and image size) whose encoder has these tensors."""
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    width, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    tokens = int(state["pos_embed"].shape[1]) - 1  # (1, 1 + L, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise WeightsError(f"{path}: pos_embed holds {tokens} patch positions, not a square grid")
    found = dict(patch_size=patch, embed_dim=width, depth=depth)
    matches = [name for name, dims in ARCHS.items() if all(dims[k] == v for k, v in found.items())]
    if arch is not None:
        if arch not in ARCHS:
            raise WeightsError(f"--arch {arch!r} is unknown; use one of {sorted(ARCHS)}")
        if ARCHS[arch]["patch_size"] != patch:
            raise WeightsError(
                f"{path}: patch size {patch}, but --arch {arch} has {ARCHS[arch]['patch_size']}"
            )
        name = arch
    elif matches:
        name = matches[0]
    else:
        raise WeightsError(
            f"{path}: an encoder of width {width}, depth {depth}, patch {patch} matches no preset; "
            f"give --arch (one of {sorted(ARCHS)}) for its number of heads"
        )
    cfg = _default_model(name, grid * patch)
    cfg.in_chans = in_chans
    dims = ARCHS[name]
    if width != dims["embed_dim"]:  # a non-standard encoder with a preset's patch size and heads
        cfg.embed_dim = width
    if depth != dims["depth"]:
        cfg.depth = depth
    return cfg


def _default_model(arch: str, img_size: int) -> ModelConfig:
    """The model of `rspretrain train --arch A --img-size S`; for images too small for its masking (a
    handful of patches), an MAE model that masks nothing, which always fits: only the encoder is used."""
    cfg = ModelConfig(arch=arch, img_size=img_size)
    try:
        cfg.validate()
    except ModelConfigError as exc:
        if "patches" not in str(exc):
            raise WeightsError(str(exc)) from None
        cfg = ModelConfig(arch=arch, img_size=img_size, method="mae", mask_ratio=0.0)
    return cfg


def _with_size(cfg: ModelConfig, img_size: int) -> ModelConfig:
    """`cfg` at another image size; masking settings that no longer fit give way to an MAE that masks
    nothing (only the encoder is used for evaluation)."""
    resized = replace(cfg, img_size=img_size)
    try:
        resized.validate()
    except ModelConfigError:
        resized = replace(cfg, img_size=img_size, method="mae", mask_ratio=0.0)
        try:
            resized.validate()
        except ModelConfigError as exc:
            raise WeightsError(str(exc)) from None
    return resized
