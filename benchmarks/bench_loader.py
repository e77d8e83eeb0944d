"""Benchmark: one loader worker of rspretrain.data in each of its outputs, side by side, on real remote-sensing
tiles, against the loader as it was: webdataset's tar reader and the float path (decode, crop, flip, normalise
in the worker). Then the float path on rspretrain's own tar reader (what the reader alone buys), uint8 crops
normalised on the device (``data.decode: cpu``, the default), and device decode (``data.decode: device``: the
worker reads the JPEG header and passes bytes and crop; decode and crop happen in the training process, timed
here on the CPU as a separate row).

The tiles are the real aerial and satellite scenes of RS_REAL_DATA (default ../shared/data/rs-real) curated by
``rscurate run`` into 256 px and 512 px tiles (JPEG q95, the shard contract); without that folder, synthetic
aerial-like tiles stand in and the section says so. Each mode runs `ShardStream` in this process, which is
exactly what one DataLoader worker runs (tar reading, shuffle buffer, per-sample seeded crop, batching), one
thread, batches of 64 at 224 px. Modes alternate within each repeat; figures are medians, and ratios are
medians of per-repeat ratios. img/CPU-s counts this process's CPU only, so it is what a worker with a core to
itself reaches; cores per GPU at 6,200 img/s (an H200 training ViT-B SelectiveMAE in bf16, docs/benchmarks.md)
follow from it.

    .venv/bin/python benchmarks/bench_loader.py [--quick] [--data RS_REAL] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import _common

_common.pin_threads(1)

import numpy as np  # noqa: E402  (after pinning threads)
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from webdataset.tariterators import tar_file_expander  # noqa: E402

from rspretrain import data  # noqa: E402

BATCH = 64
IMG_SIZE = 224
SCALE = (0.2, 1.0)
PER_SHARD = 128
GPU_RATE = 6_200  # img/s: one H200, ViT-B SelectiveMAE, bf16 (docs/benchmarks.md, GPU section)
TARGETS = {256: 1.45, 512: 1.2}  # uint8 / float, img per CPU-s
MODES = ("before", "float", "uint8", "encoded")
LABELS = {
    "before": "**before**: webdataset's tar reader, float path (normalised in the worker)",
    "float": "float path on rspretrain's tar reader",
    "uint8": "uint8 crops, normalised on the device (`data.decode: cpu`)",
    "encoded": "device decode, worker part (`data.decode: device`)",
    "device_cpu": "device decode, training-process part run on the CPU (decode_jpeg + batched crop)",
}


def synthetic(size: int, out: Path, count: int = 512) -> list[str]:
    """Stand-in tiles when no real data is at hand: rscurate's synthetic aerial texture, JPEG q95 4:2:0."""
    from rscurate import shard as rshard
    from rscurate.sample import encode_metadata, make_key
    from rscurate.synth import aerial

    paths = []
    for s in range(math.ceil(count / PER_SHARD)):
        samples = []
        for i in range(s * PER_SHARD, min(count, (s + 1) * PER_SHARD)):
            rgb = aerial(40_000 * (i % 97), 40_000 * (i // 97) + 13 * size, size, size, size)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling="4:2:0")
            meta = {"source": "bench", "path": f"{i}.jpg", "x": 0, "y": 0, "width": size, "height": size,
                    "phash": "0" * 16, "task": "bench"}  # fmt: skip
            key = make_key("bench", f"{size:04d}{i:012d}", 0, 0)
            samples.append(rshard.Sample(key, "jpg", buf.getvalue(), encode_metadata(meta)))
        path = out / f"synth{size}-{s:06d}.tar"
        rshard.write_shard(path, samples)
        paths.append(str(path))
    return paths


def _webdataset_tar_files(sources: Any, handler: Any) -> Any:
    """The tar reading of the loader before rspretrain.shards.tar_members: webdataset's tarfile-based one."""
    return tar_file_expander(sources, handler=handler)


def stream(shards: list[str], mode: str, count: int, epoch: int) -> list[data.Batch]:
    """One worker's stream in `mode`: `count` images in batches of BATCH."""
    if mode == "before":
        with mock.patch.object(data, "_tar_files", _webdataset_tar_files):
            return stream(shards, "float", count, epoch)
    worker = data.ShardStream(
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
        output=mode,
    )
    return list(itertools.islice(iter(worker), count // BATCH))


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def measure(shards: list[str], count: int, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in (*MODES, "device_cpu")}
    for mode in MODES:  # warm-up: imports, page cache, allocator
        stream(shards, mode, BATCH, epoch=99)
    cpu = torch.device("cpu")
    for r in range(repeats):
        encoded: list[data.Batch] = []
        for mode in MODES:
            wall, cpu_s, batches = _timed(lambda mode=mode, r=r: stream(shards, mode, count, epoch=r))
            assert sum(len(b) for b in batches) == count
            runs[mode].append((wall, cpu_s))
            if mode == "encoded":
                encoded = batches
        wall, cpu_s, decoded = _timed(lambda encoded=encoded: [b.images_on(cpu)[0] for b in encoded])
        assert sum(d.shape[0] for d in decoded) == count
        runs["device_cpu"].append((wall, cpu_s))
    rates = {
        mode: {
            "img_s": count / statistics.median(w for w, _ in r),
            "img_cpu_s": count / statistics.median(c for _, c in r),
        }
        for mode, r in runs.items()
    }
    ratios = {
        mode: {
            "wall": statistics.median(f[0] / m[0] for f, m in zip(runs["before"], runs[mode], strict=True)),
            "cpu": statistics.median(f[1] / m[1] for f, m in zip(runs["before"], runs[mode], strict=True)),
        }
        for mode in ("float", "uint8", "encoded")
    }
    return {"images": count, "rates": rates, "ratios": ratios, "runs": runs}


def jpeg_facts(shards: list[str]) -> dict[str, float]:
    """Mean JPEG size and Pillow decode time per image of the shards' tiles."""
    import tarfile

    blobs = []
    for path in shards:
        with tarfile.open(path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]  # type: ignore[union-attr]
    _, cpu_s, _ = _timed(lambda: [data.decode_rgb({"jpg": b}) for b in blobs])
    return {"tiles": len(blobs), "mean_kb": float(np.mean([len(b) for b in blobs]) / 1024),
            "decode_ms": cpu_s / len(blobs) * 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (under a minute)")
    parser.add_argument(
        "--data",
        type=Path,
        default=_common.real_data_folder(),
        help="real scenes to curate into tiles (default: $RS_REAL_DATA, else ../shared/data/rs-real)",
    )
    parser.add_argument(
        "--work", type=Path, help="keep the curated tiles here and reuse them (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    info = _common.machine()
    count = 256 if args.quick else 512
    repeats = 3 if args.quick else 5
    real = args.data.is_dir()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rspretrain-bench-loader-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in (256, 512):
            shards = (
                _common.curated_tiles(args.data, size, work, PER_SHARD) if real else synthetic(size, work)
            )
            results[str(size)] = {**measure(shards, count, repeats), "jpeg": jpeg_facts(shards)}

    rows, core_rows, targets = [], [], []
    for size, r in results.items():
        for mode in (*MODES, "device_cpu"):
            rate = r["rates"][mode]
            ratio = r["ratios"].get(mode)
            rows.append(
                {
                    "tile px": size,
                    "mode": LABELS[mode],
                    "img/s": rate["img_s"],
                    "img/CPU-s": rate["img_cpu_s"],
                    "vs before (CPU)": f"**{ratio['cpu']:.2f}x**" if ratio else "",
                    "vs before (wall)": f"{ratio['wall']:.2f}x" if ratio else "",
                }
            )
        for mode in MODES:
            cores = GPU_RATE / r["rates"][mode]["img_cpu_s"]
            core_rows.append({"tile px": size, "mode": LABELS[mode], "cores per GPU": f"{cores:.1f}"})
        goal = TARGETS[int(size)]
        uint8 = r["ratios"]["uint8"]
        targets.append(
            {
                "target": f"12.1 uint8 loader worker vs the loader before, {size} px real tiles",
                "value": f"{uint8['cpu']:.2f}x (CPU), {uint8['wall']:.2f}x (wall); "
                f"{GPU_RATE / r['rates']['uint8']['img_cpu_s']:.1f} cores per GPU at {GPU_RATE:,} img/s",
                "goal": f">= {goal}x",
                "status": "**met**" if uint8["cpu"] >= goal and uint8["wall"] >= goal else "**not met**",
            }
        )
        targets.append(
            {
                "target": f"12.2 device-decode loader worker, {size} px real tiles",
                "value": f"{GPU_RATE / r['rates']['encoded']['img_cpu_s']:.2f} cores per GPU at {GPU_RATE:,} img/s "
                f"({r['ratios']['encoded']['cpu']:.1f}x the img/CPU-s of the loader before)",
                "goal": "measure",
                "status": "measured (decode on a GPU not measured)",
            }
        )
    tiles = (
        "real remote-sensing tiles (RS_REAL_DATA curated by `rscurate run`)"
        if real
        else ("SYNTHETIC tiles (no real data folder found)")
    )
    facts = ", ".join(
        f"{s} px: {r['jpeg']['tiles']} tiles, mean {r['jpeg']['mean_kb']:.0f} KB, Pillow decode "
        f"{r['jpeg']['decode_ms']:.2f} ms" for s, r in results.items()
    )  # fmt: skip
    sections = [
        "Targets: the uint8 worker at least 1.45x the images per CPU-second of the loader before this change "
        "at 256 px tiles and 1.2x at 512 px.",
        "",
        _common.markdown_table(
            rows, ["tile px", "mode", "img/s", "img/CPU-s", "vs before (CPU)", "vs before (wall)"]
        ),
        "",
        f"{count} images per run ({count // BATCH} batches of {BATCH} at {IMG_SIZE} px), {repeats} repeats with "
        f"the modes alternating, one thread; {tiles}: {facts}. 'Before' is this ShardStream with its tar reading "
        "swapped back to webdataset's tar_file_expander, and the float path kept as it was (torchvision's "
        "functional transforms). All give the same images (tests/test_data.py), the device path the same "
        "crops, resampled with Pillow's filter on the device.",
        "",
        f"Loader CPU cores per GPU at {GPU_RATE:,} img/s (one H200, ViT-B SelectiveMAE, bf16), from img/CPU-s:",
        "",
        _common.markdown_table(core_rows, ["tile px", "mode", "cores per GPU"]),
        "",
        "With device decode the worker only reads tar members and JPEG headers; the decode (nvjpeg) and the "
        "crops run on the GPU, where they have not been measured yet (benchmarks/bench_gpu_loop.py is the "
        "prepared script). The 'training-process part run on the CPU' row is what that work costs a CPU: it "
        "shows the work moved, not what it costs a GPU; on a GPU nvjpeg's Huffman stage still runs on a host "
        "thread of the training process.",
        "",
        f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
    ]
    text = _common.report("Data loading: float, uint8 and device-decode loader workers", sections, info)
    print(text)
    _common.write_json(
        args.json,
        {"benchmark": "loader", "results": results, "real_data": real, "targets": targets, "machine": info},
    )


if __name__ == "__main__":
    main()
