"""Benchmark: SelectiveMAE vs MAE training step on CPU (rspretrain.bench.run_bench), ViT-S, ViT-B, ViT-L.

A step is forward + backward + AdamW, batch 8, 224 px, float32; the two methods' steps alternate, on
the same batches, in one process per configuration, and the figures are medians. Alongside the measured
time ratio (MAE ms / SelectiveMAE ms) stands the ratio of their analytic training FLOPs
(rspretrain.flops). MAE keeps its 8-block, 512-wide decoder; SelectiveMAE's decoder depth is 12 (the
paper's recipe, configs/selectivemae_vitb_opticalrs13m.yaml) and, for ViT-B, also 8.

    .venv/bin/python benchmarks/bench_pretrain.py [--quick] [--threads N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import _common

TARGET_RATIO = 2.0
TARGET_FLOP_AGREEMENT = 0.10

# (arch, SelectiveMAE decoder depth, timed steps, warm-up steps); ViT-L takes fewer steps.
CONFIGS = [
    ("vit_small_patch16", 12, 5, 1),
    ("vit_base_patch16", 12, 4, 1),
    ("vit_base_patch16", 8, 4, 1),
    ("vit_large_patch16", 12, 2, 1),
]
QUICK = [
    ("vit_small_patch16", 12, 2, 1),
    ("vit_base_patch16", 12, 2, 1),
    ("vit_base_patch16", 8, 2, 1),
    ("vit_large_patch16", 12, 1, 1),
]


def worker(arch: str, depth: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    from rspretrain.bench import format_bench, run_bench

    result = run_bench(
        arch=arch,
        batch_size=8,
        steps=steps,
        warmup=warmup,
        img_size=224,
        device="cpu",
        dtype="float32",
        decoder_depth=depth,
        threads=threads,
    )
    result["table"] = format_bench(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about two minutes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--worker", nargs=5, metavar=("ARCH", "DEPTH", "STEPS", "WARMUP", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        arch, depth, steps, warmup, threads = args.worker
        print(json.dumps(worker(arch, int(depth), int(steps), int(warmup), int(threads))))
        return

    started = time.perf_counter()
    info = _common.machine()
    threads = args.threads or info["cores_usable"]
    env = _common.pin_threads(threads)
    results = []
    for arch, depth, steps, warmup in QUICK if args.quick else CONFIGS:
        command = [
            sys.executable,
            __file__,
            "--worker",
            arch,
            str(depth),
            str(steps),
            str(warmup),
            str(threads),
        ]
        measured = _common.run_measured(command, env=env, timeout_s=900)
        if measured.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{measured.stderr[-3000:]}")
        result = json.loads(measured.stdout.strip().splitlines()[-1])
        result["peak_rss_mb"] = measured.peak_rss_bytes / 2**20
        result["wall_s"] = measured.wall_s
        results.append(result)

    rows = []
    for r in results:
        agreement = r["time_ratio"] / r["flop_ratio"] - 1
        met = r["time_ratio"] >= TARGET_RATIO and abs(agreement) <= TARGET_FLOP_AGREEMENT
        rows.append(
            {
                "encoder": r["arch"].replace("_patch16", "/16"),
                "SelectiveMAE decoder": r["selectivemae"]["decoder_depth"],
                "MAE ms/step": r["mae"]["ms_per_step"],
                "SelectiveMAE ms/step": r["selectivemae"]["ms_per_step"],
                "time ratio": f"{r['time_ratio']:.2f}x",
                "without AdamW": f"{r['time_ratio_forward_backward']:.2f}x",
                "FLOP ratio": f"{r['flop_ratio']:.2f}x",
                "time / FLOP ratio": f"{r['time_ratio'] / r['flop_ratio']:.2f}",
                "steps": r["steps"],
                "target met": "yes" if met else "no",
            }
        )
    columns = list(rows[0])
    sections = [
        f"Target: SelectiveMAE's step at least {TARGET_RATIO:.1f}x faster than MAE's, and the time ratio within "
        f"{TARGET_FLOP_AGREEMENT:.0%} of the FLOP ratio.",
        "",
        _common.markdown_table(rows, columns),
        "",
        f"Batch 8, 224 px, float32, {threads} torch threads, AdamW (fused); medians of the timed steps "
        "after the warm-up ones, the methods' steps interleaved. Each configuration in its own process.",
        "",
        "Per configuration:",
        "",
    ]
    for r in results:
        sections += [
            r["table"],
            "",
            f"Peak RSS {r['peak_rss_mb']:.0f} MB, process wall time {r['wall_s']:.0f} s.",
            "",
        ]
    sections.append(f"Total benchmark wall time {time.perf_counter() - started:.0f} s.")
    info["threads"] = {k: str(threads) for k in info["threads"]}
    text = _common.report("SelectiveMAE vs MAE: training step on CPU", sections, info)
    print(text)
    _common.write_json(
        args.json, {"benchmark": "pretrain", "results": results, "threads": threads, "machine": info}
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
