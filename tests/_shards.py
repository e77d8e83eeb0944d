"""Test helpers: tiny seeded shards written through the rscurate sample contract, and an in-memory batch source."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from rscurate.sample import encode_metadata, make_key
from rspretrain.data import Batch, StreamState


def tile_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth, aerial-ish RGB tile: low-frequency colour fields plus a little noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        channels.append(np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    arr = (np.stack(channels, axis=-1) * 90 + 128 + rng.normal(0, 8, (size, size, 3))).clip(0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
    return buf.getvalue()


def write_shards(
    folder: Path,
    *,
    shards: int = 2,
    per_shard: int = 8,
    size: int = 48,
    seed: int = 0,
    corrupt: Sequence[tuple[int, int]] = (),
    name: str = "tiles",
    sizes_json: bool = True,
) -> list[Path]:
    """Write `shards` tars of `per_shard` samples each; (shard, index) pairs in `corrupt` get garbage .jpg bytes.

    Every other sample is PNG, the rest JPEG. Writes sizes.json (basename -> count) like rscurate does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, sizes = [], {}
    for s in range(shards):
        path = folder / f"{name}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                fmt = "png" if i % 2 else "jpg"
                key = make_key("synthetic", f"scene{s}", i * size, 0)
                meta = {
                    "source": "synthetic",
                    "path": f"scene{s}.tif",
                    "x": i * size,
                    "y": 0,
                    "width": size,
                    "height": size,
                    "phash": "0" * 16,
                    "task": "test",
                }
                data = encode(tile_image(rng, size), fmt)
                if (s, i) in corrupt:
                    fmt, data = "jpg", b"this is not a jpeg" + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
                sink.write({"__key__": key, fmt: data, "json": encode_metadata(meta)})
        paths.append(path)
        sizes[path.name] = per_shard
    if sizes_json:
        (folder / "sizes.json").write_text(json.dumps(sizes))
    return paths


class MemorySource:
    """A deterministic in-memory BatchSource: step-by-step global batches sliced by rank.

    Global micro-batch `k` of the run holds images ``(k * global_micro + arange(global_micro)) % len(images)``,
    and rank `r` takes its contiguous slice, so a 2-rank run sees exactly the global batches of a 1-process run.
    """

    workers = 1

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        samples_per_epoch: int | None = None,
    ) -> None:
        self.images = images  # (M, C, H, W)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.samples_per_epoch = samples_per_epoch or len(images)
        self.batches_per_epoch = self.samples_per_epoch // (batch_size * world_size)

    def epoch(self, epoch: int, state: StreamState | None = None) -> Iterator[Batch]:
        start = state.batches if state else 0
        global_micro = self.batch_size * self.world_size
        for k in range(start, 10**9):
            first = (epoch * self.batches_per_epoch + k) * global_micro + self.rank * self.batch_size
            index = torch.arange(first, first + self.batch_size) % len(self.images)
            yield Batch(self.images[index], worker=0, cursor=k + 1, skipped=0)


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) ImageNet-normalised-looking tensors with spatial structure."""
    rng = np.random.default_rng(seed)
    arr = np.stack([np.asarray(tile_image(rng, size), dtype=np.float32) / 255.0 for _ in range(n)])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# A ViT small enough for CPU tests: 2 blocks of width 64 over 64 px images (16 patches).
TINY = {
    "model.arch": "vit_tiny_patch16",
    "model.depth": 2,
    "model.embed_dim": 64,
    "model.num_heads": 2,
    "model.img_size": 64,
    "model.decoder_embed_dim": 32,
    "model.decoder_num_heads": 2,
    "model.decoder_depth": 1,
    "train.device": "cpu",
    "train.log_every": 1,
    "data.workers": 0,
}


def tiny_config(out: Path | str, overrides: dict | None = None):
    """A resolved Config for a tiny CPU run into `out` (defaults < TINY < overrides)."""
    from rspretrain.config import load_config

    return load_config(None, {**TINY, "train.out": str(out), **(overrides or {})})


def tiny_set_flags(overrides: dict | None = None) -> list[str]:
    """TINY (+ overrides) as repeated `--set key=value` CLI arguments."""
    args: list[str] = []
    for key, value in {**TINY, **(overrides or {})}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def flat_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size): a colour per image plus a gentle ramp, so masked patches are predictable."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(-1, 1, size).view(1, 1, 1, size) * 0.3 * torch.randn(n, 3, 1, 1, generator=g)
    return (base + ramp).expand(n, 3, size, size).contiguous()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared 2-core box, more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
