"""Benchmark: one loader worker of rspretrain.data (shards -> decode -> RandomResizedCrop -> flip ->
normalise -> batch) against the same transform applied to images already decoded in memory.

Shards are written with rscurate's shard writer (the sample contract: `{key}.jpg` + `{key}.json`) from
synthetic aerial tiles, JPEG q95 4:2:0 as the pipeline encodes them, at two sizes: 256 px (a
scene-classification chip kept whole) and 512 px (a tile cut from a large scene). The streaming side is
`ShardStream` iterated in this process, which is exactly what one DataLoader worker runs (tar reading,
shuffle buffer, per-sample seeded crop, batching). The in-memory side calls the same `augment` with the
same per-sample seeding on decoded PIL images and stacks the same batches. One thread, as the trainer's
loader workers (pin_worker_threads). Runs alternate, and the ratio is the median of per-pair ratios.

    .venv/bin/python benchmarks/bench_loader.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

_common.pin_threads(1)

import numpy as np  # noqa: E402  (after pinning threads)
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rscurate import shard as rshard  # noqa: E402
from rscurate.sample import encode_metadata, make_key  # noqa: E402
from rscurate.synth import aerial  # noqa: E402
from rspretrain import data  # noqa: E402

TARGET_RATIO = 0.80
# ICCV 2025 SelectiveMAE, ViT-B: about 556,000 images per minute on 8 A100s.
PAPER_IMAGES_PER_MIN = 556_000
PAPER_GPUS = 8
BATCH = 64
IMG_SIZE = 224
SCALE = (0.2, 1.0)
PER_SHARD = 128


def write_shards(folder: Path, size: int, count: int, seed: int) -> tuple[list[str], list[bytes]]:
    """count JPEG tiles of size px in shards of PER_SHARD; returns the shard paths and the JPEG bytes."""
    blobs = []
    for i in range(count):
        rgb = aerial(40_000 * (i % 97) + 7 * seed, 40_000 * (i // 97) + 13 * size, size, size, seed)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling="4:2:0", optimize=False)
        blobs.append(buf.getvalue())
    paths = []
    for s in range(math.ceil(count / PER_SHARD)):
        samples = []
        for i in range(s * PER_SHARD, min(count, (s + 1) * PER_SHARD)):
            key = make_key("bench", f"{size:04d}{i:012d}", 0, 0)
            meta = {
                "source": "bench",
                "path": f"{i}.jpg",
                "x": 0,
                "y": 0,
                "width": size,
                "height": size,
                "phash": "0" * 16,
                "task": "bench",
            }
            samples.append(rshard.Sample(key, "jpg", blobs[i], encode_metadata(meta)))
        path = folder / f"bench{size}-{s:06d}.tar"
        rshard.write_shard(path, samples)
        paths.append(str(path))
    return paths, blobs


def stream_run(shards: list[str], count: int, epoch: int) -> int:
    """One worker's stream: `count` images in batches of BATCH; returns the images produced."""
    stream = data.ShardStream(
        shards=shards,
        img_size=IMG_SIZE,
        batch_size=BATCH,
        seed=0,
        epoch=epoch,
        rank=0,
        world_size=1,
        resampled=False,
        shuffle_buffer=1000,
        shuffle_initial=100,
        crop_scale=SCALE,
    )
    produced = 0
    for batch in itertools.islice(iter(stream), count // BATCH):
        produced += batch.images.shape[0]
    return produced


def memory_run(images: list[Image.Image], epoch: int) -> int:
    """The same transform and batching on decoded images: no tar, no shuffle buffer, no decode."""
    produced = 0
    out: list[torch.Tensor] = []
    for cursor, img in enumerate(images, start=1):
        rng = random.Random(data.mix_seed(0, epoch, 0, cursor))
        out.append(data.augment(img, rng, IMG_SIZE, SCALE))  # (C, H, W)
        if len(out) == BATCH:
            produced += torch.stack(out).shape[0]  # (N, C, H, W)
            out = []
    return produced


def _timed(fn: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (under a minute)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    info = _common.machine()
    count = 256 if args.quick else 512
    repeats = 3 if args.quick else 5
    per_gpu = PAPER_IMAGES_PER_MIN / 60 / PAPER_GPUS

    rows = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rspretrain-bench-loader-") as tmp:
        for size in (256, 512):
            shards, blobs = write_shards(Path(tmp), size, count, seed=size)
            decoded = [data.decode_rgb({"jpg": b}) for b in blobs]
            # Decode alone, for the breakdown (not part of the comparison).
            decode_wall, decode_cpu, _ = _timed(
                lambda blobs=blobs: [data.decode_rgb({"jpg": b}) for b in blobs]
            )
            stream_run(shards, BATCH, epoch=99)  # warm-up: imports, page cache, allocator
            runs: dict[str, list[tuple[float, float]]] = {"stream": [], "memory": []}
            for r in range(repeats):
                w, c, n = _timed(lambda r=r, shards=shards: stream_run(shards, count, epoch=r))
                assert n == count, n
                runs["stream"].append((w, c))
                w, c, n = _timed(lambda r=r, decoded=decoded: memory_run(decoded, epoch=r))
                assert n == count, n
                runs["memory"].append((w, c))
            wall_ratio = statistics.median(
                m[0] / s[0] for s, m in zip(runs["stream"], runs["memory"], strict=True)
            )
            cpu_ratio = statistics.median(
                m[1] / s[1] for s, m in zip(runs["stream"], runs["memory"], strict=True)
            )
            stream_rate = count / statistics.median(w for w, _ in runs["stream"])
            stream_cpu_rate = count / statistics.median(c for _, c in runs["stream"])
            memory_rate = count / statistics.median(w for w, _ in runs["memory"])
            memory_cpu_rate = count / statistics.median(c for _, c in runs["memory"])
            results[str(size)] = {
                "images": count,
                "mean_jpeg_kb": float(np.mean([len(b) for b in blobs]) / 1024),
                "stream_img_s": stream_rate,
                "stream_img_cpu_s": stream_cpu_rate,
                "memory_img_s": memory_rate,
                "memory_img_cpu_s": memory_cpu_rate,
                "ratio_wall": wall_ratio,
                "ratio_cpu": cpu_ratio,
                "decode_ms": decode_cpu / count * 1e3,
                "workers_per_gpu": per_gpu / stream_cpu_rate,
                "runs": runs,
            }
            for what, rate, cpu_rate in (
                ("streaming worker (shards)", stream_rate, stream_cpu_rate),
                ("same transform, decoded in memory", memory_rate, memory_cpu_rate),
            ):
                rows.append(
                    {
                        "tile px": size,
                        "what": what,
                        "img/s": rate,
                        "img/CPU-s": cpu_rate,
                        "ms/img (CPU)": 1e3 / cpu_rate,
                    }
                )
            rows.append(
                {
                    "tile px": size,
                    "what": "**ratio** (streaming / in memory)",
                    "img/s": f"**{wall_ratio:.0%}** (wall)",
                    "img/CPU-s": f"**{cpu_ratio:.0%}** (CPU)",
                    "ms/img (CPU)": f"decode alone {decode_cpu / count * 1e3:.2f}",
                }
            )

    gpu_rows = [
        {
            "tile px": size,
            "img/s per worker (CPU-s)": r["stream_img_cpu_s"],
            "workers for 1 GPU": f"{r['workers_per_gpu']:.1f} -> {math.ceil(r['workers_per_gpu'])}",
            "for 8 GPUs": math.ceil(r["workers_per_gpu"]) * PAPER_GPUS,
        }
        for size, r in results.items()
    ]
    sections = [
        f"Target: a streaming worker at least {TARGET_RATIO:.0%} of the in-memory transform's throughput.",
        "",
        _common.markdown_table(rows, ["tile px", "what", "img/s", "img/CPU-s", "ms/img (CPU)"]),
        "",
        f"{count} images per run ({count // BATCH} batches of {BATCH}), {repeats} alternating repeats, "
        f"one thread; JPEG q95 4:2:0, mean {results['256']['mean_jpeg_kb']:.0f} KB at 256 px and "
        f"{results['512']['mean_jpeg_kb']:.0f} KB at 512 px. img/CPU-s counts only this process's CPU, so it "
        "is what a worker with a core to itself would reach.",
        "",
        f"Loader workers per GPU at the paper's rate (ICCV 2025, ViT-B SelectiveMAE: about "
        f"{PAPER_IMAGES_PER_MIN:,} images/min on {PAPER_GPUS} A100s, {per_gpu:,.0f} per GPU per second), "
        "from the per-worker CPU rate above:",
        "",
        _common.markdown_table(
            gpu_rows, ["tile px", "img/s per worker (CPU-s)", "workers for 1 GPU", "for 8 GPUs"]
        ),
        "",
        "Each worker needs a core of its own, besides the trainer's process per GPU. A data-centre core "
        "is typically faster than this shared one, so these are upper bounds on the count; "
        "configs/selectivemae_vitb_opticalrs13m.yaml asks for 10 workers per GPU.",
        "",
        f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
    ]
    text = _common.report("Data loading: one streaming worker vs the in-memory transform", sections, info)
    print(text)
    _common.write_json(args.json, {"benchmark": "loader", "results": results, "machine": info})


if __name__ == "__main__":
    main()
