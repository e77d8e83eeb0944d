"""Reconstruction figures of a SelectiveMAE / MAE run: what the encoder saw, what was rebuilt, and how well.

One row per sample, five columns:

1. input (ImageNet normalisation undone);
2. HOG score per patch (`masking.hog_scores`, 0-1) over the greyed input: the semantic distribution
   SelectiveMAE samples from. MAE runs and `score: uniform` runs do not use it; it is shown for reference and
   the column title says so;
3. the V patches fed to the encoder, the rest greyed;
4. the K patches chosen for reconstruction, the rest greyed (MAE: every masked patch);
5. the predictions of those K patches pasted over the input and outlined, with the sample's loss. With
   norm_pix_loss the model predicts per-patch normalised pixels; they are mapped back with the mean and
   std of the true patch, exactly as the loss normalised them.

Masks are drawn as in training, from `counter_uniform` noise, but with a fixed seed and step 0, so two
figures differ only by the model and the run's progress (which drives PSTS). Progress is the checkpoint's
step over the run's total steps.

`rspretrain visualize RUN` draws one figure from a checkpoint and shard samples (the first `n` decodable
samples in shard order, resized and centre-cropped, no augmentation). `TrainingFigures` does it during
training every `train.figure_every` steps, on rank 0, into RUN/figures/ and TensorBoard: the CLI builds it and
hands it to `train.train` (a `runtime.StepHook`), so the training loop does not import this module.

Shapes: N batch, C channels, H/W pixels, p patch size, L patches, V visible, K reconstructed,
P = p * p * C pixels per patch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from rspretrain import masking
from rspretrain.checkpoint import resolve_checkpoint
from rspretrain.config import Config, from_dict
from rspretrain.data import IMAGENET_MEAN, IMAGENET_STD, DataError, count_samples, decode_rgb, expand_shards
from rspretrain.model import PretrainModel, build_model
from rspretrain.train import plan_run

log = logging.getLogger(__name__)

FIGURES = "figures"  # RUN/figures/step_0000100.png
TAG = "reconstruction"  # TensorBoard image tag
GREY = 0.82  # greyed-out patches: mostly this light grey, with a ghost of the image
GHOST = 0.25


class VisualizeError(ValueError):
    """A visualize input the user can fix; the message says what to change."""


@dataclass
class Panels:
    """Everything one figure shows, on the CPU."""

    images: Tensor  # (N, 3, H, W) in [0, 1]
    scores: Tensor  # (N, L) HOG scores in [0, 1)
    visible: Tensor  # (N, L) bool: fed to the encoder
    targets: Tensor  # (N, L) bool: reconstructed
    reconstruction: Tensor  # (N, 3, H, W) in [0, 1]: input with the target patches replaced by predictions
    loss: Tensor  # (N,) the training loss of each sample
    grid: tuple[int, int]  # (H / p, W / p)
    patch_size: int


@dataclass
class FigureInfo:
    """What the figure's title says about the run."""

    method: str
    arch: str
    score: str  # the run's model.score
    step: int
    total_steps: int
    progress: float
    seed: int
    norm_pix_loss: bool = True
    psts_stages: tuple[float, float, float, float] = masking.DEFAULT_PSTS_STAGES
    run: str = ""
    keys: Sequence[str] = ()  # row labels


# --------------------------------------------------------------------------- computing the panels


def _denormalise(x: Tensor) -> Tensor:
    """(N, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def _index_mask(index: Tensor, num_patches: int) -> Tensor:
    """(N, k) patch indices -> (N, L) bool."""
    mask = torch.zeros(index.shape[0], num_patches, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)


@torch.no_grad()
def reconstruct(model: PretrainModel, imgs: Tensor, progress: float, seed: int = 0) -> Panels:
    """Run the model on ImageNet-normalised `imgs` (N, 3, H, W) with fixed-seed masks; -> CPU panels."""
    if model.cfg.in_chans != 3:
        raise VisualizeError(f"the model takes {model.cfg.in_chans} bands; figures show RGB models only")
    was_training = model.training
    model.eval()
    try:
        N = imgs.shape[0]
        index = torch.arange(N, device=imgs.device)  # (N,)
        shape = (model.noise_channels, model.num_patches)
        noise = masking.counter_uniform(seed, 0, index, shape)  # (N, R, L)
        out = model(imgs, progress=progress, noise=noise)
    finally:
        model.train(was_training)
    p, L = model.patch_size, model.num_patches
    at_targets = out.target_index[:, :, None].expand_as(out.pred)  # (N, K, P)
    target = model.patchify(imgs).gather(1, at_targets).float()  # (N, K, P)
    pred = out.pred.float()  # (N, K, P)
    if model.cfg.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)  # (N, K, 1)
        var = target.var(dim=-1, keepdim=True)  # (N, K, 1), unbiased as in the loss
        loss = (pred - (target - mean) / (var + 1e-6).sqrt()).square().mean(dim=(1, 2))  # (N,)
        pred = pred * (var + 1e-6).sqrt() + mean  # back to ImageNet-normalised pixels
    else:
        loss = (pred - target).square().mean(dim=(1, 2))  # (N,)
    patches = model.patchify(imgs.float())  # (N, L, P)
    patches = patches.scatter(1, at_targets, pred)  # (N, L, P)
    scores = masking.hog_scores(imgs, p, pixel_std=model.pixel_std, eps=model.cfg.hog_eps)  # (N, L)
    H, W = imgs.shape[-2:]
    return Panels(
        images=_denormalise(imgs.float()).cpu(),
        scores=scores.cpu(),
        visible=_index_mask(out.visible_index, L).cpu(),
        targets=_index_mask(out.target_index, L).cpu(),
        reconstruction=_denormalise(model.unpatchify(patches)).cpu(),
        loss=loss.cpu(),
        grid=(H // p, W // p),
        patch_size=p,
    )


def _pixel_mask(mask: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """(N, L) bool per patch -> (N, 1, H, W) bool per pixel."""
    h, w = grid
    m = mask.view(-1, 1, h, w)  # (N, 1, h, w)
    return m.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (N, 1, H, W)


def _greyed(images: Tensor, keep: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """(N, 3, H, W) with the patches not in `keep` (N, L) faded to light grey."""
    faded = GHOST * images + (1 - GHOST) * GREY
    return torch.where(_pixel_mask(keep, grid, p), images, faded)


# --------------------------------------------------------------------------- drawing


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, nothing to close
    return fig


def _hwc(x: Tensor) -> Any:
    return x.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


def score_title(method: str, score: str) -> str:
    if method == "selectivemae" and score == "hog":
        return "HOG score\n(sampling weight)"
    return "HOG score\n(reference only)"  # the suptitle says how the run masks


def render(panels: Panels, info: FigureInfo) -> Any:
    """A matplotlib Figure (Agg canvas): one row per sample, one titled column per panel."""
    from matplotlib.patches import Rectangle

    n = panels.images.shape[0]
    L = panels.scores.shape[1]
    V = int(panels.visible[0].sum())
    K = int(panels.targets[0].sum())
    p = panels.patch_size
    h, w = panels.grid
    # Outline the smaller set in the last column: the targets (SelectiveMAE) or the visible patches (MAE).
    outline_targets = K <= L - K
    outlined = panels.targets if outline_targets else panels.visible
    titles = (
        "input",
        score_title(info.method, info.score),
        f"encoder input\n{V} of {L} patches visible",
        f"reconstruction targets\n{K} of {L} patches",
        f"pasted reconstruction\n({'targets' if outline_targets else 'visible'} outlined)",
    )
    cell = 1.75
    fig = _figure(cell * len(titles) + 0.5, cell * n + 0.9)
    axes = fig.subplots(n, len(titles), squeeze=False)
    grey = panels.images.mean(dim=1)  # (N, H, W)
    visible = _greyed(panels.images, panels.visible, panels.grid, p)
    targets = _greyed(panels.images, panels.targets, panels.grid, p)
    heat = None
    for i in range(n):
        row = axes[i]
        row[0].imshow(_hwc(panels.images[i]))
        row[1].imshow(grey[i].numpy(), cmap="gray", vmin=0, vmax=1)
        heat = row[1].imshow(
            panels.scores[i].view(h, w).numpy(),
            cmap="magma",
            vmin=0,
            vmax=1,
            alpha=0.75,
            interpolation="nearest",
            extent=(-0.5, w * p - 0.5, h * p - 0.5, -0.5),
        )
        row[2].imshow(_hwc(visible[i]))
        row[3].imshow(_hwc(targets[i]))
        row[4].imshow(_hwc(panels.reconstruction[i]))
        for j in outlined[i].nonzero().flatten().tolist():
            y, x = divmod(j, w)
            row[4].add_patch(
                Rectangle((x * p - 0.5, y * p - 0.5), p, p, fill=False, edgecolor="#00e5ff", linewidth=0.7)
            )
        row[4].set_xlabel(f"loss {float(panels.loss[i]):.3f}", fontsize=8)
        if i < len(info.keys):
            row[0].set_ylabel(_short(info.keys[i]), fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=9)
    if heat is not None:
        bar = fig.colorbar(heat, ax=axes[:, 1].tolist(), location="bottom", shrink=0.9, aspect=15, pad=0.01)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("HOG score", fontsize=7)
    fig.suptitle(_suptitle(info, V, K), fontsize=9)
    return fig


def _suptitle(info: FigureInfo, V: int, K: int) -> str:
    head = f"{info.run + ': ' if info.run else ''}{info.method} {info.arch}, step {info.step:,} of {info.total_steps:,}"
    if info.method == "selectivemae":
        near, far, rand = masking.psts_stage_weights(info.progress, info.psts_stages)
        tail = (
            f"progress {info.progress:.2f}: PSTS expansion near {near:.2f} / far {far:.2f} / random {rand:.2f}; "
            f"{'HOG' if info.score == 'hog' else info.score} sampling; mask seed {info.seed}"
        )
    else:
        tail = f"progress {info.progress:.2f}: random masks (HOG shown for reference); mask seed {info.seed}"
    if info.norm_pix_loss:
        tail += "\npredictions are per-patch normalised: shown with the true patch's mean and std"
    return f"{head}\n{tail}"


def _short(key: str, width: int = 22) -> str:
    return key if len(key) <= width else "…" + key[-(width - 1) :]


def save_png(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No Software/date chunks: the same figure gives the same bytes.
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return path


# --------------------------------------------------------------------------- from a checkpoint and shards


def load_samples(shards: str | Sequence[str], n: int, img_size: int) -> tuple[Tensor, list[str]]:
    """The first `n` decodable samples in shard order, resized (shorter side, bicubic) and centre-cropped to
    img_size, ImageNet-normalised: (N, 3, img_size, img_size) and their keys. No shuffle, no augmentation."""
    import webdataset as wds

    images: list[Tensor] = []
    keys: list[str] = []
    urls = ({"url": url} for url in expand_shards(shards))
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(urls):
        try:
            img = decode_rgb(sample)
        except Exception as exc:  # an undecodable sample is skipped, as in training
            log.warning("skipping sample %s: cannot decode (%s)", sample.get("__key__"), exc)
            continue
        img = TF.center_crop(TF.resize(img, img_size, InterpolationMode.BICUBIC), [img_size, img_size])
        images.append(TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD))  # (3, H, W)
        keys.append(str(sample["__key__"]))
        if len(images) == n:
            break
    if not images:
        raise DataError(f"no decodable sample in {shards}; check --shards")
    return torch.stack(images), keys  # (N, 3, H, W)


def total_steps(cfg: Config, state: dict[str, Any]) -> int | None:
    """The length of the run a checkpoint belongs to: train.steps, or train.epochs over the data size."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    try:
        samples = cfg.data.samples_per_epoch or count_samples(expand_shards(list(cfg.data.shards)))
    except DataError:
        samples = None
    if not samples:
        return None
    world_size = int((state.get("data") or {}).get("world_size", 1))
    return plan_run(cfg, samples, world_size).total_steps


def visualize(
    run_or_checkpoint: str | Path,
    out: str | Path,
    *,
    shards: str | Sequence[str] | None = None,
    n: int = 8,
    seed: int = 0,
    progress: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Draw the figure of a run's newest good checkpoint (or one checkpoint file) into `out` (PNG)."""
    if n < 1:
        raise VisualizeError(f"--n {n}: must be at least 1")
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise VisualizeError(f"--progress {progress}: must be in [0, 1]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VisualizeError(f"--device {device}: torch sees no GPU; use --device cpu")
    source, state = resolve_checkpoint(run_or_checkpoint)
    cfg = from_dict(state["config"], where=str(source))
    step = int(state["step"])
    total = total_steps(cfg, state)
    if progress is None:
        if total is None:
            log.warning("cannot tell the run's total steps (no train.steps, no data size); taking progress 1")
        progress = min(1.0, step / total) if total else 1.0
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.to(device)
    imgs, keys = load_samples(shards or list(cfg.data.shards), n, cfg.model.img_size)
    panels = reconstruct(model, imgs.to(device), progress, seed)
    info = FigureInfo(
        method=cfg.model.method,
        arch=cfg.model.arch,
        score=cfg.model.score,
        step=step,
        total_steps=total or step,
        progress=progress,
        seed=seed,
        norm_pix_loss=cfg.model.norm_pix_loss,
        psts_stages=tuple(cfg.model.psts_stages),  # type: ignore[arg-type]
        run=Path(cfg.train.out).name if cfg.train.out else source.parent.parent.name,
        keys=keys,
    )
    path = save_png(render(panels, info), out)
    return {
        "figure": str(path),
        "checkpoint": str(source),
        "method": info.method,
        "step": step,
        "total_steps": info.total_steps,
        "progress": round(progress, 4),
        "samples": len(keys),
        "visible": int(panels.visible[0].sum()),
        "reconstructed": int(panels.targets[0].sum()),
        "patches": panels.scores.shape[1],
        "mean_loss": float(panels.loss.mean()),
        "seed": seed,
    }


# --------------------------------------------------------------------------- during training


class TrainingFigures:
    """During training, on rank 0: every `cfg.train.figure_every` steps a figure into
    RUN/figures/step_XXXXXXX.png and the run's TensorBoard (tag `reconstruction`). The images are the first `n`
    of the batch at the first figure, kept for the whole run, so successive figures show the same samples.
    Hand it to `rspretrain.train.train(cfg, figures=TrainingFigures(cfg))`."""

    def __init__(self, cfg: Config, n: int = 8) -> None:
        if cfg.train.figure_every < 1:
            raise VisualizeError(
                f"train.figure_every={cfg.train.figure_every}: figures need a step interval >= 1"
            )
        self.folder = Path(cfg.train.out) / FIGURES
        self.every, self.cfg, self.n = cfg.train.figure_every, cfg, n
        self.images: Tensor | None = None  # (n, 3, H, W) on the CPU

    def __call__(
        self, model: torch.nn.Module, imgs: Tensor, step: int, total_steps: int, writer: Any = None
    ) -> Path | None:
        if step % self.every:
            return None
        assert isinstance(model, PretrainModel)
        if self.images is None:
            self.images = imgs[: self.n].detach().float().cpu().clone()
        m = self.cfg.model
        progress = min(1.0, step / total_steps)
        device = next(model.parameters()).device
        panels = reconstruct(model, self.images.to(device), progress, self.cfg.train.seed)
        info = FigureInfo(
            method=m.method,
            arch=m.arch,
            score=m.score,
            step=step,
            total_steps=total_steps,
            progress=progress,
            seed=self.cfg.train.seed,
            norm_pix_loss=m.norm_pix_loss,
            psts_stages=tuple(m.psts_stages),  # type: ignore[arg-type]
            run=Path(self.cfg.train.out).name,
        )
        fig = render(panels, info)
        path = save_png(fig, self.folder / f"step_{step:07d}.png")
        if writer is not None:
            writer.add_figure(TAG, fig, step, close=True)
            writer.add_scalar("train/figure_loss", float(panels.loss.mean()), step)
        log.info("step %d: figure %s", step, path)
        return path
