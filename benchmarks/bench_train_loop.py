"""Benchmark: does `rspretrain train` run SelectiveMAE and MAE as fast as `rspretrain bench` times their bare
steps? ViT-B/16, 224 px, batch 8, fp32 on the CPU, the same threads for both.

`rspretrain bench` times forward + backward + AdamW on synthetic batches held in memory, the methods' steps
interleaved. `rspretrain train` runs the whole loop on real tiles (RS_REAL_DATA curated into 256 px tiles by
`rscurate run`): loading (`data.workers` fitted to the machine: in the training process when its threads take
every core), the device-side normalisation, counter-based noise, PSTS at the run's progress, the optimiser
step that skips non-finite steps on the device, the schedule, logging. Its steady state is the median step of
the last ones, timed (wall and this process's CPU) by the hook train calls after every step, as bench's figure
is the median of its steps. Each measurement runs in its own process; a repeat runs bench, SelectiveMAE train
and MAE train in turn.

Wall time is what a user sees; CPU time per step is the figure that other users of a shared machine disturb
least (with several threads it counts the threads' waiting too). `make bench` runs it with one thread: on a
2-core machine shared with other work, two OpenMP threads per step spend most of their time waiting for each
other whenever the scheduler takes one away, and the steps then time the scheduler (tens of seconds instead of
one), not the loop.

    .venv/bin/python benchmarks/bench_train_loop.py [--quick] [--threads N] [--repeats R] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

ARCH = "vit_base_patch16"
BATCH = 8
TARGET_WITHIN = 0.05  # train's step within 5% of bench's, each method
TARGET_RATIO = 1.9  # SelectiveMAE / MAE end to end in train
METHODS = ("selectivemae", "mae")


def bench_worker(threads: int, steps: int, warmup: int) -> dict[str, Any]:
    from rspretrain.bench import run_bench

    r = run_bench(arch=ARCH, batch_size=BATCH, steps=steps, warmup=warmup, threads=threads)
    return {m: {"wall_ms": r[m]["ms_per_step"], "cpu_ms": r[m]["cpu_ms_per_step"]} for m in METHODS}


def train_worker(method: str, shards: str, out: str, threads: int, steps: int, tail: int) -> dict[str, Any]:
    from rspretrain.config import load_config
    from rspretrain.data import fitted_workers
    from rspretrain.train import train

    cfg = load_config(
        None,
        {
            "data.shards": [shards],
            "model.method": method,
            "model.arch": ARCH,
            "model.img_size": 224,
            "train.out": out,
            "train.batch_size": BATCH,
            "train.steps": steps,
            "train.log_every": tail,  # one record per window: the grad norm of a log line once per window
            "train.checkpoint_every": 10**6,  # the one at the end comes after the last record
            "train.device": "cpu",
            "train.precision": "fp32",
            "train.threads": threads,
        },
    )
    records: list[dict[str, Any]] = []
    clock: list[tuple[float, float]] = []  # (wall, CPU) after every step

    def on_log(record: dict[str, Any]) -> None:
        records.append(record)

    def after_step(*_: Any) -> None:  # train's per-step hook (the one figures use), called on every step
        clock.append((time.perf_counter(), time.process_time()))

    train(cfg, on_log=on_log, figures=after_step)
    steps_ms = [((b[0] - a[0]) * 1e3, (b[1] - a[1]) * 1e3) for a, b in zip(clock, clock[1:], strict=False)]
    last = records[-1]
    return {
        # medians of the last `tail` steps, as bench's are medians of its steps; a step with a log line
        # (its gradient norm, once per window here, once per 20 steps by default) is one of them
        "wall_ms": statistics.median(w for w, _ in steps_ms[-tail:]),
        "cpu_ms": statistics.median(c for _, c in steps_ms[-tail:]),
        "mean_wall_ms": statistics.mean(w for w, _ in steps_ms[-tail:]),
        "steps_ms": steps_ms,
        "data_wait": last["data_wait"],
        "loader_samples_per_s": last["loader_samples_per_s"],
        "workers": fitted_workers(threads) if cfg.data.workers is None else cfg.data.workers,
        "records": [
            {k: r[k] for k in ("step", "samples_per_s", "data_wait", "loader_samples_per_s")} for r in records
        ],
    }


def _run(args: list[str], threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", *args]
    measured = _common.run_measured(command, env=_common.pin_threads(threads), timeout_s=1800)
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{measured.stderr[-3000:]}")
    return json.loads(measured.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of both (default 2; make bench uses 1, see below)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="default 3: one process's step time drifts by 5%%"
    )
    parser.add_argument("--data", type=Path, default=_common.real_data_folder(), help="real scenes to tile")
    parser.add_argument("--work", type=Path, help="keep the curated tiles here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "bench":
            result = bench_worker(int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            method, shards, out, threads, steps, tail = rest
            result = train_worker(method, shards, out, int(threads), int(steps), int(tail))
        print(json.dumps(result))
        return

    started = time.perf_counter()
    info = _common.machine()
    repeats = 1 if args.quick else args.repeats
    bench_steps, bench_warmup = (2, 1) if args.quick else (5, 1)
    train_steps, tail = (6, 3) if args.quick else (16, 12)
    if not args.data.is_dir():
        raise SystemExit(f"no real scenes at {args.data}: set RS_REAL_DATA or pass --data")
    runs: dict[str, list[dict[str, Any]]] = {"bench": [], **{m: [] for m in METHODS}}
    with tempfile.TemporaryDirectory(prefix="rspretrain-bench-loop-") as tmp:
        work = args.work or Path(tmp)
        shards = str(Path(_common.curated_tiles(args.data, 256, work)[0]).parent)
        bench = ["bench", str(args.threads), str(bench_steps), str(bench_warmup)]
        for r in range(repeats):  # bench, the two trains, bench, ...: each train between two bench runs
            runs["bench"].append(_run(bench, args.threads))
            for m in METHODS:
                out = os.path.join(tmp, f"run-{m}-{r}")
                runs[m].append(
                    _run(
                        ["train", m, shards, out, str(args.threads), str(train_steps), str(tail)],
                        args.threads,
                    )
                )
        runs["bench"].append(_run(bench, args.threads))

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows, summary = [], {}
    for m in METHODS:
        b_wall, b_cpu = (
            med([b[m]["wall_ms"] for b in runs["bench"]]),
            med([b[m]["cpu_ms"] for b in runs["bench"]]),
        )
        t_wall, t_cpu = med([t["wall_ms"] for t in runs[m]]), med([t["cpu_ms"] for t in runs[m]])
        # each train against the mean of the bench runs just before and after it: the machine's load drifts
        # over the minutes between runs, and moves a step's time by several percent
        off = {
            unit: med(
                [
                    t[f"{unit}_ms"] / statistics.mean([runs["bench"][r][m][f"{unit}_ms"] for r in (i, i + 1)])
                    for i, t in enumerate(runs[m])
                ]
            )
            for unit in ("wall", "cpu")
        }
        summary[m] = {"bench_wall": b_wall, "bench_cpu": b_cpu, "train_wall": t_wall, "train_cpu": t_cpu,
                      "train_over_bench_wall": off["wall"], "train_over_bench_cpu": off["cpu"]}  # fmt: skip
        rows.append(
            {
                "method": m,
                "bench ms/step (wall)": b_wall,
                "train ms/step (wall)": t_wall,
                "train / bench (wall)": f"**{off['wall']:.3f}**",
                "bench CPU-ms/step": b_cpu,
                "train CPU-ms/step": t_cpu,
                "train / bench (CPU)": f"**{off['cpu']:.3f}**",
                "trainer waited for data": f"{med([t['data_wait'] for t in runs[m]]):.1%}",
                "loader img/s": med([t["loader_samples_per_s"] for t in runs[m]]),
            }
        )
    ratio = {
        key: summary["mae"][key] / summary["selectivemae"][key]
        for key in ("bench_wall", "bench_cpu", "train_wall", "train_cpu")
    }
    targets = []
    for m in METHODS:
        s = summary[m]
        off_wall, off_cpu = s["train_over_bench_wall"] - 1, s["train_over_bench_cpu"] - 1
        targets.append(
            {
                "target": f"12.4 `rspretrain train` vs `rspretrain bench`, {m}, ViT-B/16 batch 8, {args.threads} threads",
                "value": f"{off_wall:+.1%} (wall), {off_cpu:+.1%} (CPU)",
                "goal": f"within {TARGET_WITHIN:.0%}",
                "status": "**met**"
                if abs(off_wall) <= TARGET_WITHIN and abs(off_cpu) <= TARGET_WITHIN
                else "**not met**",
            }
        )
    targets.append(
        {
            "target": f"12.4 SelectiveMAE / MAE end to end in `rspretrain train`, ViT-B/16, {args.threads} threads",
            "value": f"{ratio['train_wall']:.2f}x (wall), {ratio['train_cpu']:.2f}x (CPU); bench "
            f"{ratio['bench_wall']:.2f}x (wall)",
            "goal": f">= {TARGET_RATIO}x",
            "status": "**met**"
            if ratio["train_wall"] >= TARGET_RATIO and ratio["train_cpu"] >= TARGET_RATIO
            else "**not met**",
        }
    )
    sections = [
        f"Targets: `rspretrain train` within {TARGET_WITHIN:.0%} of `rspretrain bench` for both methods, and "
        f"SelectiveMAE at least {TARGET_RATIO}x MAE's rate in `train`.",
        "",
        _common.markdown_table(rows, list(rows[0])),
        "",
        f"SelectiveMAE / MAE: train {ratio['train_wall']:.2f}x (wall), {ratio['train_cpu']:.2f}x (CPU); bench "
        f"{ratio['bench_wall']:.2f}x (wall), {ratio['bench_cpu']:.2f}x (CPU).",
        "",
        f"{ARCH}, batch {BATCH}, 224 px, fp32, {args.threads} torch threads in both; bench: median of "
        f"{bench_steps} interleaved steps after {bench_warmup}; train: {train_steps} steps on 256 px real tiles, "
        f"steady state = the median of the last {tail} (a log line, with its gradient norm, every {tail}), "
        f"`data.workers` fitted ({runs['selectivemae'][0]['workers']} on this machine: {info['cores_usable']} "
        f"cores, {args.threads} for the trainer); medians of {repeats} repeats, each measurement in its own "
        "process, bench run before the first train and after each repeat's two; train / bench divides each "
        "train by the mean of the bench runs on either side of it.",
        "",
        f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
    ]
    info["threads"] = {k: str(args.threads) for k in info["threads"]}
    text = _common.report("The training loop against the bare step (`train` vs `bench`)", sections, info)
    print(text)
    _common.write_json(
        args.json,
        {"benchmark": "train_loop", "summary": summary, "ratio": ratio, "runs": runs, "targets": targets,
         "threads": args.threads, "machine": info},
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
