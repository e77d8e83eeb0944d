"""GPU benchmark (prepared, not yet run on a GPU): the loader alone and full ViT-B SelectiveMAE and MAE training
steps, `data.decode: cpu` against `device`, bf16, with and without torch.compile; MFU of each; loader CPU cores
per GPU.

Everything runs through the library as a user's run does: `ShardSource` for the loader, `rspretrain.train.train`
for the steps (its log records give the steady-state rate), `rspretrain.bench.run_bench` for the bare step.
Shards are real tiles (RS_REAL_DATA curated by `rscurate run`, 512 px by default, like a tile cut from a large
scene). Loader CPU is measured as the CPU seconds of the loader's worker processes (reaped children) and of the
training process (decode on the device still runs nvjpeg's Huffman stage on a host thread), per image.

    python benchmarks/bench_gpu_loop.py --json OUT.json            # on a machine with a GPU (about 8 min)
    python benchmarks/bench_gpu_loop.py --dry-run                  # every code path, tiny, on the CPU

Written to fit one call of a rented GPU: `--budget-s` stops starting new runs when the time is spent, and
every finished measurement is already in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

METHODS = ("selectivemae", "mae")
DECODES = ("cpu", "device")


def loader_rate(
    shards: str, decode: str, workers: int, batch: int, img_size: int, batches: int
) -> dict[str, Any]:
    """Images per second of the loader alone (batches made and moved to the device; with decode device, also
    decoded and cropped there), and the CPU seconds per image of its workers and of this process."""
    import torch

    from rspretrain.config import DataConfig
    from rspretrain.data import ShardSource

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DataConfig(
        shards=(shards,), workers=workers, decode=decode, shuffle_buffer=1000, shuffle_initial=200
    )
    source = ShardSource(cfg, img_size=img_size, batch_size=batch, seed=0, pin_memory=device.type == "cuda")
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stream = source.epoch(0)
    for _ in range(max(2, workers)):  # workers started and buffers filled: not part of the rate
        next(stream).images_on(device)
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(batches):
        pixels, _ = next(stream).images_on(device)
        images += pixels.shape[0]
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del stream  # ends the DataLoader: its workers are joined, and their CPU time lands in RUSAGE_CHILDREN
    time.sleep(0.5)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (children.ru_utime + children.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return {
        "decode": decode,
        "workers": workers,
        "img_s": images / wall,
        # the workers' CPU covers their warm-up batches too: per image over every batch they made
        "worker_cpu_ms_per_img": worker_cpu / (images + max(2, workers) * batch) * 1e3,
        "trainer_cpu_ms_per_img": cpu / images * 1e3,
    }


def train_rate(
    method: str, shards: str, out: str, decode: str, compile: bool, batch: int, steps: int, tail: int,
    arch: str, img_size: int, workers: int | None, precision: str, device: str, model: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Steady-state samples/s of `rspretrain train` (the last `tail` steps), its MFU, and the training
    process's CPU per image."""
    import torch

    from rspretrain.bench import peak_tflops
    from rspretrain.config import load_config
    from rspretrain.flops import training_gflops_per_image
    from rspretrain.train import train

    cfg = load_config(
        None,
        {
            "data.shards": [shards], "data.decode": decode, "data.workers": workers,
            "model.method": method, "model.arch": arch, "model.img_size": img_size,
            "train.out": out, "train.batch_size": batch, "train.steps": steps, "train.log_every": tail,
            "train.checkpoint_every": 10**6, "train.device": device, "train.precision": precision,
            "train.compile": compile, **model,
        },
    )  # fmt: skip
    records: list[dict[str, Any]] = []

    def on_log(record: dict[str, Any]) -> None:
        records.append({**record, "wall": time.perf_counter(), "cpu": time.process_time()})

    train(cfg, on_log=on_log)
    first, last = records[-2], records[-1]
    img_s = tail * batch / (last["wall"] - first["wall"])
    gflops = training_gflops_per_image(cfg.model)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = peak_tflops(dev)
    return {
        "method": method, "decode": decode, "compile": compile, "img_s": img_s,
        "gflops_per_img": gflops, "mfu": gflops * 1e9 * img_s / (peak * 1e12) if peak else None,
        "trainer_cpu_ms_per_img": (last["cpu"] - first["cpu"]) / (tail * batch) * 1e3,
        "data_wait": last["data_wait"], "loader_samples_per_s": last["loader_samples_per_s"],
        "memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }  # fmt: skip


def bare_steps(
    arch: str, batch: int, img_size: int, device: str, dtype: str, compile: bool, steps: int
) -> dict[str, Any]:
    from rspretrain.bench import run_bench

    r = run_bench(arch=arch, batch_size=batch, steps=steps, warmup=max(1, steps // 3), img_size=img_size,
                  device=device, dtype=dtype, compile=compile)  # fmt: skip
    return {m: {"img_s": r[m]["images_per_s"], "mfu": r[m]["mfu"]} for m in METHODS} | {"compile": compile}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    if kind == "loader":
        return loader_rate(**spec)
    if kind == "train":
        return train_rate(**spec)
    return bare_steps(**spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every code path on the CPU, tiny and short")
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch (default 256, the paper's)")
    parser.add_argument("--tile", type=int, default=512, help="tile side of the curated shards")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: fitted)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no run after this many seconds")
    parser.add_argument("--data", type=Path, default=_common.real_data_folder())
    parser.add_argument("--work", type=Path, help="keep the curated tiles here")
    parser.add_argument("--json", type=Path, help="write the results here (after every run)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], json.loads(args.worker[1]))))
        return

    import torch

    if args.dry_run:
        torch.set_num_threads(1)
    started = time.perf_counter()
    info = _common.machine()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise SystemExit(
            "no GPU: run on a machine with one, or pass --dry-run to check the code paths on the CPU"
        )
    info["gpu"] = torch.cuda.get_device_name(0) if gpu else None
    arch, img, batch = ("vit_base_patch16", 224, args.batch) if gpu else ("vit_tiny_patch16", 64, 4)
    device, precision, dtype = ("cuda", "bf16", "bfloat16") if gpu else ("cpu", "fp32", "float32")
    steps, tail, loader_batches = (60, 20, 40) if gpu else (4, 2, 3)
    # --dry-run: the test suite's tiny ViT (2 blocks of width 64) for the training runs
    tiny = {} if gpu else {"model.depth": 2, "model.embed_dim": 64, "model.num_heads": 2,
                           "model.decoder_embed_dim": 32, "model.decoder_num_heads": 2, "model.decoder_depth": 1}  # fmt: skip
    workers = args.workers if args.workers is not None else (None if gpu else 0)
    compiles = [False] if args.no_compile or not gpu else [False, True]
    results: dict[str, Any] = {"loader": [], "train": [], "bare": [], "settings": {
        "arch": arch, "img_size": img, "batch": batch, "precision": precision, "tile": args.tile,
        "steps": steps, "tail": tail, "dry_run": args.dry_run}}  # fmt: skip

    def save() -> None:
        _common.write_json(args.json, {"benchmark": "gpu_loop", "results": results, "machine": info})

    with tempfile.TemporaryDirectory(prefix="rspretrain-bench-gpu-") as tmp:
        work = args.work or Path(tmp)
        shards = str(Path(_common.curated_tiles(args.data, args.tile, work)[0]).parent)
        from rspretrain.data import fitted_workers

        loader_workers = workers if workers is not None else fitted_workers(1)
        jobs: list[tuple[str, str, dict[str, Any]]] = []
        for decode in DECODES:
            jobs.append(("loader", "loader", {"shards": shards, "decode": decode, "workers": loader_workers,
                                              "batch": batch, "img_size": img, "batches": loader_batches}))  # fmt: skip
        for compile in compiles:
            jobs.append(("bare", "bare", {"arch": arch, "batch": batch, "img_size": img, "device": device,
                                          "dtype": dtype, "compile": compile, "steps": 10 if gpu else 1}))  # fmt: skip
            for decode in DECODES:
                for method in METHODS:
                    out = os.path.join(tmp, f"run-{method}-{decode}-{compile}")
                    jobs.append(("train", "train", {
                        "method": method, "shards": shards, "out": out, "decode": decode, "compile": compile,
                        "batch": batch, "steps": steps, "tail": tail, "arch": arch, "img_size": img,
                        "workers": workers, "precision": precision, "device": device, "model": tiny}))  # fmt: skip
        for key, kind, spec in jobs:
            if time.perf_counter() - started > args.budget_s:
                print(f"[gpu] budget spent: skipping {kind} {spec.get('method', '')}", file=sys.stderr)
                continue
            if args.dry_run:  # in this process, one thread: the code paths, quickly
                results[key].append(_worker(kind, spec))
                continue
            command = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
            measured = _common.run_measured(command, timeout_s=max(60.0, args.budget_s))
            if measured.returncode != 0:
                results.setdefault("failed", []).append(
                    {"kind": kind, "spec": spec, "stderr": measured.stderr[-2000:]}
                )
                print(f"[gpu] {kind} failed:\n{measured.stderr[-2000:]}", file=sys.stderr)
            else:
                results[key].append(json.loads(measured.stdout.strip().splitlines()[-1]))
            save()

    for row in results["loader"]:
        per_img = row["worker_cpu_ms_per_img"] + row["trainer_cpu_ms_per_img"]
        row["cores_at_6200"] = 6200 * per_img / 1e3
    for row in results["train"]:
        row["loader_cores_per_gpu"] = None
        loader = next((r for r in results["loader"] if r["decode"] == row["decode"]), None)
        if loader is not None:
            row["loader_cores_per_gpu"] = row["img_s"] * loader["worker_cpu_ms_per_img"] / 1e3
    save()
    rows = [
        {"run": f"train {r['method']}", "decode": r["decode"], "compile": r["compile"], "img/s": r["img_s"],
         "MFU": f"{r['mfu']:.1%}" if r["mfu"] is not None else "-", "trainer CPU-ms/img": r["trainer_cpu_ms_per_img"],
         "loader cores at this rate": r["loader_cores_per_gpu"], "waited for data": f"{r['data_wait']:.1%}"}
        for r in results["train"]
    ] + [
        {"run": f"bare step {m}", "decode": "-", "compile": b["compile"], "img/s": b[m]["img_s"],
         "MFU": f"{b[m]['mfu']:.1%}" if b[m]["mfu"] is not None else "-"}
        for b in results["bare"] for m in METHODS
    ]  # fmt: skip
    loader_rows = [
        {"decode": r["decode"], "workers": r["workers"], "img/s": r["img_s"],
         "worker CPU-ms/img": r["worker_cpu_ms_per_img"], "trainer CPU-ms/img": r["trainer_cpu_ms_per_img"],
         "cores at 6,200 img/s": r["cores_at_6200"]}
        for r in results["loader"]
    ]  # fmt: skip
    where = info["gpu"] or "the CPU (--dry-run: a tiny model, the numbers mean nothing)"
    sections = [
        f"{arch}, {img} px, batch {batch}, {precision}, on {where}; train steady state over the last {tail} of "
        f"{steps} steps; bare step: `rspretrain bench` (synthetic batches in memory).",
        "",
        _common.markdown_table(rows, list(rows[0]) if rows else ["run"]),
        "",
        "The loader alone (batches made and moved to the device, decoded there with `decode: device`):",
        "",
        _common.markdown_table(loader_rows, list(loader_rows[0]) if loader_rows else ["decode"]),
        "",
        f"Total wall time {time.perf_counter() - started:.0f} s.",
    ]
    print(_common.report("GPU: the loader and the training step, decode cpu vs device", sections, info))
    save()
    if results.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
