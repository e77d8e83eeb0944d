"""Frozen-encoder evaluation: a k-NN classifier and a linear probe on a labelled ImageFolder dataset.

The dataset is the ImageFolder layout of UC Merced, AID, NWPU-RESISC45 and EuroSAT RGB: one folder per
class under the train and the val root (class folders are matched by name). Each image is resized (shorter
side, bicubic) and centre-cropped to the encoder's img_size, then ImageNet-normalised, as in pretraining.

Features: the encoder's final (normalised) tokens, pooled to one vector per image, by default the mean of
the patch tokens (`pool="mean"`) rather than the class token (`pool="cls"`): MAE-style pretraining puts no
loss on the class token, so after a short run it carries little, while the patch tokens are what the decoder
was trained to read.

k-NN (DINO's protocol, Caron et al. 2021): features L2-normalised, the k = 20 training images of highest
cosine similarity each vote for their class with weight exp(similarity / 0.07); the class with the largest
summed weight wins. With every similarity near 1 the weights are near equal and this is a majority vote.

Linear probe: multinomial logistic regression on the features standardised with the training set's mean and
std, mean cross-entropy + l2 / 2 * |W|^2 (bias not penalised), fitted to convergence by full-batch L-BFGS in
float64 on the CPU: deterministic, no learning rate to tune, and no scikit-learn dependency.

Weights come from any source `rspretrain.weights` reads: a checkpoint or run folder, an exported safetensors
file, an official MAE or SelectiveMAE checkpoint. The random-init baseline builds the same model with the same seed as pretraining did (the
run's train.seed), so "pretrained minus random" is what the run bought; without weights it is the default
model of the given arch and img_size at seed 0.

Shapes: N batch, C channels, H/W pixels, L patches, D encoder width, M images, Q queries, k neighbours,
K classes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from rscurate.progress import NullProgress, Progress
from rspretrain.data import IMAGENET_MEAN, IMAGENET_STD
from rspretrain.model import ModelConfig
from rspretrain.splits import LabeledSet, load_labeled
from rspretrain.weights import build_encoder, load_weights

log = logging.getLogger(__name__)

POOLS = ("mean", "cls")


class ProbeError(ValueError):
    """A probe input the user can fix (weights, folders, options); the message says what to change."""


@dataclass
class ProbeConfig:
    k: int = 20  # neighbours of the k-NN vote
    temperature: float = 0.07  # of the k-NN vote weights exp(similarity / temperature)
    pool: str = "mean"  # "mean" of the patch tokens | "cls" token
    l2: float = 1e-3  # logistic regression penalty, per the mean loss (sklearn's C=1 at 1000 images)
    max_iter: int = 500  # L-BFGS iterations of the linear probe
    batch_size: int = 64
    workers: int = 0  # DataLoader workers of the feature extraction
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        if self.pool not in POOLS:
            raise ProbeError(f"--pool {self.pool!r}: use one of {', '.join(POOLS)}")
        if self.k < 1:
            raise ProbeError(f"--k {self.k}: must be at least 1")
        if self.temperature <= 0:
            raise ProbeError(f"--temperature {self.temperature}: must be positive")
        if self.l2 < 0:
            raise ProbeError(f"--l2 {self.l2}: must not be negative")
        if self.batch_size < 1 or self.max_iter < 1 or self.workers < 0:
            raise ProbeError("--batch-size and --max-iter must be at least 1, --workers at least 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ProbeError(f"--device {self.device!r}: use auto, cpu or cuda")


@dataclass
class Encoder:
    module: nn.Module  # rspretrain.model.ViTEncoder: (N, C, H, W) -> (N, 1 + L, D)
    model: ModelConfig
    source: str  # the weights file, or "random init"
    step: int | None  # pretraining steps behind the weights; None for random init
    method: str


# --------------------------------------------------------------------------- weights


def load_encoder(
    weights: str | Path | None,
    *,
    random_init: bool = False,
    arch: str | None = None,
    img_size: int | None = None,
    seed: int | None = None,
) -> Encoder:
    """The encoder of any source `rspretrain.weights` reads, or a random one of its (or the given) shape.

    `arch` and `img_size` are needed only without weights; `arch` may not contradict the weights, a different
    `img_size` resamples their position embedding. `seed` (default: the run's train.seed, else 0) seeds the
    random init exactly as `rspretrain train` does.
    """
    found = load_weights(weights, random_init=random_init, arch=arch, img_size=img_size, seed=seed)
    return Encoder(build_encoder(found).eval(), found.model, found.source, found.step, found.method)


# --------------------------------------------------------------------------- data and features


def image_folder(root: str | Path, img_size: int) -> Any:
    """torchvision ImageFolder (or a split file's images, `rspretrain.splits`) with resize + centre crop to
    img_size and ImageNet normalisation; `.classes` names the labels."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.exists():
        raise ProbeError(f"{root}: no such folder; give a folder with one sub-folder of images per class")
    transform = transforms.Compose(
        [
            transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    if root.is_file():
        return SplitImages(load_labeled(root), transform)
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ProbeError(f"{root}: {exc}; expected one sub-folder of images per class") from None


class SplitImages(Dataset[tuple[Tensor, int]]):
    """The images of a split file through `transform`: (image, label), as ImageFolder gives them."""

    def __init__(self, data: LabeledSet, transform: Callable[[Image.Image], Tensor]) -> None:
        self.data, self.transform, self.classes = data, transform, data.classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.data.paths[index]) as img:
            return self.transform(img.convert("RGB")), self.data.labels[index]


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Any,
    *,
    pool: str = "mean",
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pooled features (M, D) float32 and labels (M,) int64 of every image of `dataset`, in its order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    encoder = encoder.to(device).eval()
    feats, labels = [], []
    for imgs, target in loader:
        tokens = encoder(imgs.to(device))  # (N, 1 + L, D)
        pooled = tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]  # (N, D)
        feats.append(pooled.float().cpu())
        labels.append(target)
        if on_batch is not None:
            on_batch(len(target))
    return torch.cat(feats), torch.cat(labels).long()


# --------------------------------------------------------------------------- classifiers


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """DINO's weighted k-NN on cosine similarity: (M, D), (M,), (Q, D) -> (Q,) predicted classes."""
    train = F.normalize(train_feats.float(), dim=1)  # (M, D)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float(), dim=1)  # (Q, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (Q, k)
        votes = torch.zeros(q.shape[0], num_classes)  # (Q, K)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@dataclass
class LinearProbe:
    mean: Tensor  # (D,) of the training features
    std: Tensor  # (D,)
    weight: Tensor  # (K, D), on standardised features
    bias: Tensor  # (K,)

    def predict(self, feats: Tensor) -> Tensor:
        """(Q, D) -> (Q,) predicted classes."""
        z = (feats.double() - self.mean) / self.std  # (Q, D)
        return (z @ self.weight.T + self.bias).argmax(dim=1)


def fit_linear(
    feats: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 500
) -> LinearProbe:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS in float64."""
    x = feats.double()  # (M, D)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature stays 0, never blows up
    z = (x - mean) / std  # (M, D)
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


# --------------------------------------------------------------------------- the command


def default_json_path(weights: str | Path | None, random_init: bool, cfg: ModelConfig) -> Path:
    """Where the result goes without --json-out.

    Next to the weights: ``encoder.safetensors`` -> ``encoder.probe.json``, ``step-000000100.pt`` ->
    ``step-000000100.probe.json``, a run folder -> ``RUN/probe.json``; ``.probe-random.json`` for the
    random-init baseline. Without weights, in the current folder: ``probe-random-<arch>-<img_size>.json``.
    """
    tag = "probe-random" if random_init else "probe"
    if weights is None:
        return Path(f"{tag}-{cfg.arch}-{cfg.img_size}.json")
    weights = Path(weights)
    if weights.is_dir():
        return weights / f"{tag}.json"
    return weights.with_name(f"{weights.stem}.{tag}.json")


def run_probe(
    weights: str | Path | None,
    train_dir: str | Path,
    val_dir: str | Path,
    cfg: ProbeConfig | None = None,
    *,
    random_init: bool = False,
    arch: str | None = None,
    img_size: int | None = None,
    seed: int | None = None,
    json_out: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """k-NN and linear-probe top-1 accuracy of the frozen encoder; writes and returns the result."""
    cfg = cfg or ProbeConfig()
    cfg.validate()
    progress = progress or NullProgress()
    started = time.perf_counter()
    enc = load_encoder(weights, random_init=random_init, arch=arch, img_size=img_size, seed=seed)
    if enc.model.in_chans != 3:
        raise ProbeError(f"the encoder takes {enc.model.in_chans} bands; the probe reads RGB images")
    train_set = image_folder(train_dir, enc.model.img_size)
    val_set = image_folder(val_dir, enc.model.img_size)
    classes: list[str] = list(train_set.classes)
    if len(classes) < 2:
        raise ProbeError(f"{train_dir}: {len(classes)} class folder; a probe needs at least 2")
    unknown = sorted(set(val_set.classes) - set(classes))
    if unknown:
        raise ProbeError(f"{val_dir}: class folders {unknown} are not in {train_dir}")
    device = _device(cfg.device)

    features: dict[str, tuple[Tensor, Tensor]] = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        progress.start(f"{name} features", len(dataset), "img")
        feats, labels = extract_features(
            enc.module,
            dataset,
            pool=cfg.pool,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=device,
            on_batch=progress.advance,
        )
        if name == "val":  # val's own class indices -> train's
            remap = torch.tensor([classes.index(c) for c in dataset.classes])
            labels = remap[labels]
        features[name] = (feats, labels)
    (xt, yt), (xv, yv) = features["train"], features["val"]
    progress.start("k-NN", 1, "pass")
    knn = knn_predict(xt, yt, xv, len(classes), cfg.k, cfg.temperature)
    progress.advance()
    progress.start("linear", 1, "fit")
    probe = fit_linear(xt, yt, len(classes), cfg.l2, cfg.max_iter)
    progress.advance()
    progress.finish()

    result: dict[str, Any] = {
        "weights": enc.source,
        "random_init": random_init,
        "method": enc.method,
        "step": enc.step,
        "arch": enc.model.arch,
        "img_size": enc.model.img_size,
        "knn_top1": accuracy(knn, yv),
        "linear_top1": accuracy(probe.predict(xv), yv),
        "linear_train_top1": accuracy(probe.predict(xt), yt),
        "train_images": len(yt),
        "val_images": len(yv),
        "classes": len(classes),
        "feature_dim": int(xt.shape[1]),
        "probe": asdict(cfg) | {"k": min(cfg.k, len(yt))},
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(json_out) if json_out is not None else default_json_path(weights, random_init, enc.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["json"] = str(out)
    out.write_text(json.dumps(result | {"class_names": classes}, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", out)
    return result


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeError(f"--device {name}: torch sees no GPU; use --device cpu")
    return torch.device(name)
