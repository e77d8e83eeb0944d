"""SelectiveMAE against MAE at equal compute on real imagery (EuroSAT RGB), with ablations (issue 11).

    .venv/bin/python benchmarks/bench_fidelity.py [--quick] [--json PATH] [--work DIR] [--jobs 2]
    make bench-fidelity          # the full run (about 2 hours on 2 cores), rewrites its section of docs/benchmarks.md

1. **Split.** `rspretrain.splits.write_split(EuroSAT, protocol="eurosat-80", seed=0)`: a fixed, stratified 80/20
   split (21,600 train / 5,400 test images).
2. **Curate.** `rscurate run` over EuroSAT with every test image in `exclude_paths`, so pretraining sees only the
   training part (near-duplicates dropped by the default dedup).
3. **Calibrate.** Each configuration trains a few steps with the real `rspretrain train` loop (loading, token
   selection, forward, backward, AdamW; one thread, loader in-process), configuration after configuration, repeat
   after repeat, under the timing lock (`--timing-lock`, env RS_TIMING_LOCK). Its per-step cost is the median CPU
   time of one step in steady state. CPU time, not wall time, is the currency: on a shared machine it moves far
   less with other users' load, and a single-threaded step's CPU time is its wall time on an idle core.
4. **Budget.** Every configuration gets the same compute: `--budget-steps` MAE steps' worth of CPU time, turned
   into a step count per configuration with the calibrated costs.
5. **Pretrain.** Each (configuration, seed) trains its fixed step count, `--jobs` at a time, one thread each,
   at `--nice` niceness (no timing is taken from these runs, only step counts, so they run outside the lock).
6. **Evaluate.** Frozen features of a fixed subset of the training part (the probe's training set) and of the
   test part: DINO k-NN and the L-BFGS linear probe of `rspretrain probe`; for the main configurations also a
   short fine-tune (`rspretrain.finetune`) when that module is installed. Random init is the same encoder at
   the init of each seed's SelectiveMAE run.
7. **Table.** Mean +- std over seeds, the calibration and the step counts, to stdout (markdown) and `--json`.

`--quick` is a smoke test of every code path: 20 images per class, a few steps, one seed, two ablations.
The script runs its own jobs: `--job FILE` (internal) runs one calibration, pretraining or evaluation job.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common

# torch, numpy and rspretrain are imported inside the functions, after main() has pinned every thread count to 1.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SELECTIVEMAE_RECIPE = ROOT / "configs" / "selectivemae_vittiny_cpu.yaml"
MAE_RECIPE = ROOT / "configs" / "mae_vittiny_cpu.yaml"
DEFAULT_WORK = ROOT / "out" / "bench-fidelity"

log = logging.getLogger("bench_fidelity")


# ----------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Variant:
    """One pretraining configuration: a recipe plus config overrides."""

    name: str
    label: str
    recipe: Path
    overrides: tuple[tuple[str, Any], ...] = ()
    main: bool = False  # one of the compared methods (more seeds, fine-tuned); else an ablation

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)


MAIN = (
    Variant("selectivemae", "SelectiveMAE (recipe defaults)", SELECTIVEMAE_RECIPE, main=True),
    Variant("mae", "MAE", MAE_RECIPE, main=True),
)
ABLATIONS = (
    Variant(
        "score-uniform",
        "score: uniform (the reference code's)",
        SELECTIVEMAE_RECIPE,
        (("model.score", "uniform"),),
    ),
    Variant("selection-topk", "selection: topk", SELECTIVEMAE_RECIPE, (("model.selection", "topk"),)),
    Variant("psts-off", "PSTS off (semantic draw only)", SELECTIVEMAE_RECIPE, (("model.psts", False),)),
    Variant("psts-patch", "psts_features: patch", SELECTIVEMAE_RECIPE, (("model.psts_features", "patch"),)),
    Variant("decoder-deep", "decoder depth x2", SELECTIVEMAE_RECIPE, (("model.decoder_depth", "x2"),)),
    Variant("decoder-wide", "decoder width x2", SELECTIVEMAE_RECIPE, (("model.decoder_embed_dim", "x2"),)),
    Variant(
        "lr-kept-over-mask",
        "lr x kept / mask (the reference's)",
        SELECTIVEMAE_RECIPE,
        (("optim.lr_scale", "kept_over_mask"),),
    ),
)
EXTRA = (  # item 3's questions; run with --variants
    Variant("kv-shared", "decoder_kv: shared", SELECTIVEMAE_RECIPE, (("model.decoder_kv", "shared"),)),
    Variant("mask-075", "mask ratio 0.75", SELECTIVEMAE_RECIPE, (("model.mask_ratio", 0.75),)),
    Variant("kept-050", "kept ratio 0.5", SELECTIVEMAE_RECIPE, (("model.kept_mask_ratio", 0.5),)),
    Variant("temp-1", "semantic_temperature 1", SELECTIVEMAE_RECIPE, (("model.semantic_temperature", 1.0),)),
    Variant("clip-off", "no gradient clipping", SELECTIVEMAE_RECIPE, (("optim.clip_grad", None),)),
    Variant("mae-clip", "MAE, clip 1.0", MAE_RECIPE, (("optim.clip_grad", 1.0),)),
    Variant(
        "sel-dec12",
        "SelectiveMAE, decoder depth 12 (the paper's)",
        SELECTIVEMAE_RECIPE,
        (("model.decoder_depth", 12),),
    ),
    Variant("mae-dec8", "MAE, decoder depth 8 (the paper's)", MAE_RECIPE, (("model.decoder_depth", 8),)),
    Variant(
        "pix-raw", "SelectiveMAE, raw-pixel loss", SELECTIVEMAE_RECIPE, (("model.norm_pix_loss", False),)
    ),
    Variant("mae-pix-raw", "MAE, raw-pixel loss", MAE_RECIPE, (("model.norm_pix_loss", False),)),
)
VARIANTS = {v.name: v for v in (*MAIN, *ABLATIONS, *EXTRA)}


def resolve_overrides(variant: Variant) -> dict[str, Any]:
    """The variant's overrides, in order, with relative ones ("x2") applied to the value before them."""
    from rspretrain.config import load_config

    out: dict[str, Any] = {}
    for key, value in variant.overrides:
        if isinstance(value, str) and value.startswith("x") and value[1:].isdigit():
            section, name = key.split(".")
            current = getattr(getattr(load_config(variant.recipe, out), section), name)
            if current is None and section == "model":  # a preset: the value it stands for
                current = getattr(load_config(variant.recipe, out).model, f"effective_{name}", None)
            if current is None:
                raise SystemExit(f"{variant.name}: {key} has no value in {variant.recipe.name} to multiply")
            value = current * int(value[1:])
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- data


def prepare(labeled: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Split, curate the training part into shards, and pick the probe's images. Reused when already there."""
    from rspretrain.splits import load_labeled, write_split

    per_class = 20 if quick else None
    split = write_split(labeled, work / "split", protocol="eurosat-80", seed=0, max_per_class=per_class)
    train = load_labeled(split.train)
    test = load_labeled(split.val).relabel(train.classes)

    curated = work / "curated"
    if not (curated / "stats.json").exists():
        base = Path(labeled).resolve()
        recipe = {
            "name": "eurosat-train",
            "sources": [
                {
                    "name": "eurosat-rgb",
                    "root": str(base),
                    "task": "classification",
                    # the test part, and with --quick every image outside the subset, never reach the shards
                    "exclude_paths": sorted(
                        {str(p.resolve().relative_to(base)) for p in _all_images(base)}
                        - {str(p.resolve().relative_to(base)) for p in train.paths}
                    ),
                }
            ],
            "shard": {"max_samples": 500 if not quick else 50},
        }
        work.mkdir(parents=True, exist_ok=True)
        (work / "recipe.yaml").write_text(json.dumps(recipe, indent=1) + "\n")  # JSON is YAML
        rscurate = Path(sys.executable).with_name("rscurate")
        command = [str(rscurate), "run", str(work / "recipe.yaml"), "--out", str(curated), "--quiet"]
        log.info("curating: %s", " ".join(command))
        subprocess.run(command, check=True)
    stats = json.loads((curated / "stats.json").read_text())

    n_train, n_test = (8, 8) if quick else (100, 200)
    probe = {
        "classes": train.classes,
        "train": _subset(train, n_train, seed=1),
        "test": _subset(test, n_test, seed=2),
    }
    (work / "probe.json").write_text(json.dumps(probe) + "\n")
    for part in ("train", "test"):  # the same subsets as split files, for rspretrain finetune
        _write_split(
            work / "probe" / f"{part}.txt", Path(labeled).resolve(), train.classes, probe[part], part
        )
    return {
        "split": {
            "train_images": split.train_images,
            "test_images": split.val_images,
            "train_sha256": split.train_sha256,
            "test_sha256": split.val_sha256,
            "train_file": str(split.train),
            "test_file": str(split.val),
        },
        "shards": str(curated / "shards"),
        "kept": stats.get("kept"),
        "stats": stats,
        "probe_train_images": len(probe["train"]),
        "probe_test_images": len(probe["test"]),
    }


def _write_split(
    path: Path, root: Path, classes: Sequence[str], items: Sequence[Sequence[Any]], part: str
) -> None:
    """`path label` lines under the header `rspretrain split` writes (rspretrain.splits reads it back)."""
    lines = ["# rspretrain split v1", f"# root: {root}", f"# part: {part}", f"# classes: {' '.join(classes)}"]
    lines += [f"{Path(p).resolve().relative_to(root)} {classes[int(y)]}" for p, y in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _all_images(root: Path) -> list[Path]:
    from rspretrain.splits import scan_folder

    return scan_folder(root).paths


def _subset(labeled: Any, per_class: int, seed: int) -> list[tuple[str, int]]:
    """A seeded, class-balanced subset: (path, label) pairs, per_class of each class (all if fewer)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for path, label in zip(labeled.paths, labeled.labels, strict=True):
        by_class.setdefault(label, []).append(str(path))
    chosen: list[tuple[str, int]] = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        for i in rng.permutation(len(paths))[:per_class]:
            chosen.append((paths[int(i)], label))
    return chosen


# ----------------------------------------------------------------------------------------------- jobs


def _train_config(job: dict[str, Any]) -> Any:
    from rspretrain.config import load_config

    overrides = {
        **job["overrides"],
        "data.shards": [job["shards"]],
        # 0 on CPU: loading in the training thread, one core per run and nothing else competing for it
        "data.workers": job.get("loader_workers", 0),
        "train.out": job["out"],
        "train.steps": job["steps"],
        "train.seed": job["seed"],
        "train.threads": job.get("threads", 1),
        "train.device": job.get("device", "cpu"),
        "train.log_every": job.get("log_every", 50),
        # with a learning curve, a checkpoint at every fraction of the run, all kept
        "train.checkpoint_every": max(job["steps"] // job.get("curve", 1), 1),
        "train.keep_checkpoints": max(job.get("curve", 1) + 1, 2),  # the last step may add one
        "train.figure_every": 0,
    }
    return load_config(job["recipe"], overrides)


def job_calibrate(job: dict[str, Any]) -> dict[str, Any]:
    """Train warmup + measure steps; CPU and wall seconds per step over the measured ones."""
    import torch

    from rspretrain.train import train

    marks: list[tuple[int, float, float]] = []
    cuda = job.get("device", "cpu").startswith("cuda")

    def on_log(record: dict[str, Any]) -> None:
        if cuda:
            torch.cuda.synchronize()  # the step's kernels, not just their launches
        marks.append((int(record["step"]), time.process_time(), time.perf_counter()))

    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    try:
        train(_train_config(job), on_log=on_log)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    by_step = {step: (cpu, wall) for step, cpu, wall in marks}
    a, b = job["warmup"], job["steps"]
    if a not in by_step or b not in by_step:
        raise SystemExit(f"calibration logged steps {sorted(by_step)}, expected {a} and {b}")
    n = b - a
    return {
        "cpu_s_per_step": (by_step[b][0] - by_step[a][0]) / n,
        "wall_s_per_step": (by_step[b][1] - by_step[a][1]) / n,
    }


def job_pretrain(job: dict[str, Any]) -> dict[str, Any]:
    """Train the fixed step count (or reuse a finished run), then evaluate its encoder."""
    from rspretrain import checkpoint, runtime
    from rspretrain.train import train

    out = Path(job["out"])
    cpu, wall = time.process_time(), time.perf_counter()
    done = out / "done.json"
    what = {
        "steps": job["steps"],
        "recipe": job["recipe"],
        "overrides": job["overrides"],
        "shards": job["shards"],
    }
    trained = json.loads(done.read_text()) if done.exists() else {}
    if trained.get("run") != what:  # a run of this very configuration is reused, any other redone
        shutil.rmtree(out, ignore_errors=True)
        train(_train_config(job))
        trained = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "run": what}
        done.write_text(json.dumps(trained) + "\n")
    losses = [
        json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if line.strip()
    ]
    assert checkpoint.list_checkpoints(out), f"{out}: no checkpoint after training"
    result = {"cpu_s": trained["cpu_s"], "wall_s": trained["wall_s"], "steps": job["steps"]}
    result["final_loss"] = losses[-1] if losses else None
    result.update(evaluate(job, out, random_init=False))
    if job.get("curve", 1) > 1:  # the probes along the run (each point's lr schedule is the whole run's)
        result["curve"] = [
            {"step": runtime.step_of(path), **evaluate({**job, "finetune": False}, path, random_init=False)}
            for path in reversed(checkpoint.list_checkpoints(out))
        ]
    return result


def job_random(job: dict[str, Any]) -> dict[str, Any]:
    """The encoder a seed's run started from, evaluated as if pretrained."""
    return evaluate(job, Path(job["out"]), random_init=True)


def evaluate(job: dict[str, Any], run: Path, random_init: bool) -> dict[str, Any]:
    import torch

    from rspretrain import probe

    encoder = probe.load_encoder(run, random_init=random_init)
    spec = json.loads(Path(job["probe"]).read_text())
    size = encoder.model.img_size
    device = job.get("device", "cpu")
    workers = job.get("loader_workers", 0)
    t0 = time.process_time()
    with torch.no_grad():
        train_x, train_y, test_x, test_y = (
            t
            for part in ("train", "test")
            for t in probe.extract_features(
                encoder.module, _Images(spec[part], size), batch_size=64, workers=workers, device=device
            )
        )
    k = len(spec["classes"])
    knn = probe.accuracy(probe.knn_predict(train_x, train_y, test_x, k), test_y)
    linear = probe.accuracy(probe.fit_linear(train_x, train_y, k).predict(test_x), test_y)
    result: dict[str, Any] = {"knn": knn, "linear": linear, "probe_cpu_s": time.process_time() - t0}
    if job.get("finetune"):
        result.update(finetune(job, run, random_init))
    return result


class _Images:
    """(path, label) pairs as a dataset: resize and centre-crop to the encoder's size, ImageNet-normalised,
    as `rspretrain probe` prepares an ImageFolder."""

    def __init__(self, items: Sequence[Sequence[Any]], img_size: int) -> None:
        from torchvision import transforms

        from rspretrain.data import IMAGENET_MEAN, IMAGENET_STD

        self.items = [(str(p), int(y)) for p, y in items]
        self.transform = transforms.Compose(
            [
                transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(img_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def finetune(job: dict[str, Any], run: Path, random_init: bool) -> dict[str, Any]:
    """A short fine-tune (configs/finetune_eurosat_cpu.yaml: the MAE recipe at EuroSAT's 64 px) of the run's
    encoder, or of its init, on the probe's training images; top-1 on the probe's test images."""
    from rspretrain.finetune import run_finetune

    probe_dir = Path(job["probe"]).parent / "probe"
    out = Path(job["out"]).with_name(Path(job["out"]).name + ("-ft-random" if random_init else "-ft"))
    shutil.rmtree(out, ignore_errors=True)
    epochs = job["finetune_epochs"]
    overrides = {
        "model.random_init": random_init,
        "train.epochs": epochs,
        "train.eval_every": epochs,
        "train.seed": job["seed"],
        "train.threads": job.get("threads", 1),
        "train.device": job.get("device", "cpu"),
        "data.workers": job.get("loader_workers", 0),
        "train.log_every": 1000,
    }
    t0, w0 = time.process_time(), time.perf_counter()
    result = run_finetune(
        str(run),
        probe_dir / "train.txt",
        probe_dir / "test.txt",
        out,
        config=ROOT / "configs" / "finetune_eurosat_cpu.yaml",
        overrides=overrides,
    )
    shutil.rmtree(out, ignore_errors=True)
    return {
        "finetune": result["top1"],
        "finetune_cpu_s": time.process_time() - t0,
        "finetune_wall_s": time.perf_counter() - w0,
    }


JOBS = {"calibrate": job_calibrate, "pretrain": job_pretrain, "random": job_random}


def run_job(path: Path) -> None:
    job = json.loads(path.read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    result = JOBS[job["kind"]](job)
    Path(job["result"]).parent.mkdir(parents=True, exist_ok=True)
    Path(job["result"]).write_text(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------- scheduling


@dataclass
class Pool:
    """Runs job files as subprocesses, `jobs` at a time, at `nice` niceness."""

    work: Path
    jobs: int = 2
    nice: int = 0
    running: list[tuple[subprocess.Popen[bytes], dict[str, Any], Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def submit(self, job: dict[str, Any]) -> None:
        while len(self.running) >= self.jobs:
            self._reap(block=True)
        spec = self.work / "jobs" / f"{job['name']}.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(job, indent=1) + "\n")
        logf = open(spec.with_suffix(".log"), "w")  # noqa: SIM115 (closed when reaped)
        command = [sys.executable, str(Path(__file__).resolve()), "--job", str(spec)]
        nice = self.nice

        def lower_priority() -> None:
            if nice:
                os.nice(nice)

        proc = subprocess.Popen(command, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=lower_priority)
        self.running.append((proc, job, logf))
        log.info("started %s", job["name"])

    def _reap(self, block: bool) -> None:
        while True:
            for entry in list(self.running):
                proc, job, logf = entry
                if proc.poll() is not None:
                    logf.close()
                    self.running.remove(entry)
                    if proc.returncode != 0:
                        self.failed.append(job["name"])
                        log.error("job %s failed (exit %d); see %s", job["name"], proc.returncode, logf.name)
                    else:
                        log.info("finished %s", job["name"])
                    return
            if not block:
                return
            time.sleep(0.5)

    def wait(self) -> None:
        while self.running:
            self._reap(block=True)


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (other benchmarks on a shared machine wait for it), if given."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        log.info("waiting for the timing lock %s", path)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def calibrate(
    variants: Sequence[Variant], args: argparse.Namespace, data: dict[str, Any], work: Path
) -> dict[str, dict[str, Any]]:
    """Per-step CPU and wall seconds of each variant: short runs, interleaved, `args.repeats` rounds."""
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    pool = Pool(work, jobs=1, nice=0)
    with timing_lock(args.timing_lock):
        for r in range(args.repeats):
            for v in variants:
                job = _job(v, "calibrate", f"calibrate-{v.name}-{r}", work, data, seed=100 + r)
                job.update(steps=args.calibrate_warmup + args.calibrate_steps, warmup=args.calibrate_warmup)
                job["log_every"] = math.gcd(args.calibrate_warmup, args.calibrate_steps)
                pool.submit(job)
                pool.wait()
                if pool.failed:
                    raise SystemExit(f"calibration of {v.name} failed: see {work / 'jobs' / job['name']}.log")
                runs[v.name].append(json.loads(Path(job["result"]).read_text()))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
            "wall_s_per_step": statistics.median(r["wall_s_per_step"] for r in rs),
            "cpu_runs": [r["cpu_s_per_step"] for r in rs],
            "wall_runs": [r["wall_s_per_step"] for r in rs],
        }
    return out


def _job(
    variant: Variant, kind: str, name: str, work: Path, data: dict[str, Any], seed: int
) -> dict[str, Any]:
    out = work / "runs" / name if kind != "calibrate" else work / "calibration" / name
    return {
        **data["runtime"],
        "kind": kind,
        "name": name,
        "variant": variant.name,
        "recipe": str(variant.recipe),
        "overrides": resolve_overrides(variant),
        "shards": data["shards"],
        "probe": data["probe"],
        "seed": seed,
        "out": str(out),
        "result": str(work / "results" / f"{name}.json"),
    }


# ----------------------------------------------------------------------------------------------- report


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
        "values": xs,
    }


def _pm(s: dict[str, Any], percent: bool = True, digits: int = 1) -> str:
    if s["mean"] is None:
        return "n/a"
    scale = 100 if percent else 1
    return f"{s['mean'] * scale:.{digits}f} +- {s['std'] * scale:.{digits}f}"


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = ("knn", "linear", "finetune", "steps", "cpu_s", "wall_s", "final_loss")
    return {name: {k: _stats([r.get(k) for r in rs]) for k in keys} for name, rs in results.items()}


def render(payload: dict[str, Any]) -> str:
    s, cal, budget = payload["summary"], payload["calibration"], payload["budget"]
    rows = []
    order = ["random-init", *[v for v in payload["variants"]]]
    for name in order:
        if name not in s:
            continue
        st = s[name]
        label = "random init" if name == "random-init" else VARIANTS[name].label
        rows.append(
            {
                "encoder": label,
                "seeds": st["knn"]["n"],
                "steps": _pm(st["steps"], percent=False, digits=0) if st["steps"]["n"] else "0",
                "pretrain CPU s": _pm(st["cpu_s"], percent=False, digits=0) if st["cpu_s"]["n"] else "0",
                "pretrain wall s": _pm(st["wall_s"], percent=False, digits=0) if st["wall_s"]["n"] else "0",
                "k-NN top-1 %": _pm(st["knn"]),
                "linear top-1 %": _pm(st["linear"]),
                "fine-tune top-1 %": _pm(st["finetune"]),
            }
        )
    table = _common.markdown_table(
        rows,
        [
            "encoder",
            "seeds",
            "steps",
            "pretrain CPU s",
            "pretrain wall s",
            "k-NN top-1 %",
            "linear top-1 %",
            "fine-tune top-1 %",
        ],
    )
    cal_rows = [
        {
            "configuration": VARIANTS[name].label,
            "CPU ms/step": 1000 * c["cpu_s_per_step"],
            "wall ms/step": 1000 * c["wall_s_per_step"],
            "CPU runs (ms)": ", ".join(f"{1000 * x:.0f}" for x in c["cpu_runs"]),
            "steps at the budget": budget["steps"][name],
        }
        for name, c in cal.items()
    ]
    cal_table = _common.markdown_table(
        cal_rows, ["configuration", "CPU ms/step", "wall ms/step", "CPU runs (ms)", "steps at the budget"]
    )
    d = payload["data"]
    text = [
        f"EuroSAT RGB, split `eurosat-80` seed 0 ({d['split']['train_images']:,} train / "
        f"{d['split']['test_images']:,} test), the training part curated with `rscurate run` into "
        f"{d['kept']:,} samples. Probes: k-NN (k=20) and linear on frozen mean-pooled features, trained on "
        f"{d['probe_train_images']:,} training images, scored on {d['probe_test_images']:,} test images.",
        "",
        f"Budget: {budget['seconds']:.0f} {budget['currency']} seconds per run"
        + (f" ({budget['anchor_steps']} steps of MAE)" if budget["anchor_steps"] else "")
        + f"; each configuration's step count is that budget over its calibrated {budget['currency']} cost per "
        f"step (median of {payload['args']['repeats']} interleaved short runs, under the timing lock). "
        f"Recipes: `{SELECTIVEMAE_RECIPE.relative_to(ROOT)}`, `{MAE_RECIPE.relative_to(ROOT)}`.",
        "",
        table,
        "",
        "Calibration (per step, batch of the recipe, one thread, loader in the training thread):",
        "",
        cal_table,
    ]
    curve = render_curve(payload)
    if curve:
        text += ["", curve]
    if payload.get("failed"):
        text += ["", f"Failed jobs: {', '.join(payload['failed'])}."]
    return "\n".join(text)


def render_curve(payload: dict[str, Any]) -> str:
    """With --curve N: the probes of each checkpoint along the runs, by fraction of the budget (each
    point lies on its run's whole learning-rate schedule, so it is not a shorter run's end point)."""
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for name, runs in payload.get("results", {}).items():
        for run in runs:
            for point in run.get("curve", []):
                frac = round(100 * point["step"] / max(run["steps"], 1))
                points.setdefault((name, frac), []).append(point)
    if not points:
        return ""
    rows = []
    for (name, frac), ps in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        knn, lin = _stats([p.get("knn") for p in ps]), _stats([p.get("linear") for p in ps])
        rows.append(
            {
                "budget %": frac,
                "encoder": VARIANTS[name].label if name in VARIANTS else name,
                "steps": ", ".join(str(p["step"]) for p in ps),
                "k-NN top-1 %": _pm(knn),
                "linear top-1 %": _pm(lin),
            }
        )
    table = _common.markdown_table(rows, ["budget %", "encoder", "steps", "k-NN top-1 %", "linear top-1 %"])
    return (
        "Along the runs (a checkpoint at each fraction of the budget, probed the same way; each point lies on "
        "its run's whole learning-rate schedule):\n\n" + table
    )


def _compare(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[str, str, int | None]:
    """Compare two seed summaries: (value text, status, sign) where sign is +1 / -1 when the
    difference of the means is more than twice its standard error over the seeds, 0 when it is
    within that (seed noise decides it), None when either side was not measured."""
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return "not measured", "not measured", None
    diff = a["mean"] - b["mean"]
    se = math.sqrt(sum((s["std"] or 0.0) ** 2 / max(s["n"], 1) for s in (a, b)))
    sign = 0 if abs(diff) <= 2 * se else (1 if diff > 0 else -1)
    value = (
        f"{100 * a['mean']:.1f}% vs {100 * b['mean']:.1f}% "
        f"(difference {100 * diff:+.1f} points, 2 standard errors over seeds: {200 * se:.1f})"
    )
    return value, "", sign


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Status is **met** only when the difference is larger than the seed noise (two standard
    errors); a difference inside it is reported as a tie, never as a win."""
    rows = []
    rand = summary.get("random-init") or {}
    for method in ("selectivemae", "mae"):
        for key, label in (("knn", "k-NN"), ("linear", "linear"), ("finetune", "fine-tune")):
            value, _, sign = _compare(summary.get(method, {}).get(key), rand.get(key))
            status = {None: "not measured", 1: "**met**", 0: "**not met** (tie within seed noise)"}.get(
                sign, "**not met** (worse)"
            )
            rows.append(
                {
                    "target": f"11. {method} pretrained > random init, EuroSAT {label}",
                    "value": value,
                    "goal": "pretrained > random init, beyond seed noise",
                    "status": status,
                }
            )
    for key, label in (("knn", "k-NN"), ("linear", "linear probe"), ("finetune", "fine-tune")):
        value, _, sign = _compare(summary.get("selectivemae", {}).get(key), summary.get("mae", {}).get(key))
        status = {None: "not measured", 1: "**met** (better)", 0: "**met** (tie within seed noise)"}.get(
            sign, "**not met** (worse)"
        )
        rows.append(
            {
                "target": f"11. SelectiveMAE >= MAE at equal compute, EuroSAT {label}",
                "value": value,
                "goal": "SelectiveMAE not worse than MAE beyond seed noise",
                "status": status,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny data, few steps, one seed")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="shards, runs and job files")
    parser.add_argument("--data", type=Path, default=os.environ.get("RS_LABELED_DATA"), help="EuroSAT RGB")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the training runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the main configurations")
    parser.add_argument("--ablation-seeds", type=int, default=2, help="seeds of each ablation")
    parser.add_argument("--budget-steps", type=int, default=600, help="the budget, in MAE steps")
    parser.add_argument("--budget-seconds", type=float, help="or in seconds (CPU on cpu, wall on cuda)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (runs, calibration and probes)")
    parser.add_argument(
        "--loader-workers", type=int, default=0, help="data.workers of each run (0: in-process)"
    )
    parser.add_argument("--threads", type=int, default=1, help="train.threads of each run")
    parser.add_argument("--repeats", type=int, default=3, help="calibration rounds")
    parser.add_argument("--calibrate-warmup", type=int, default=10)
    parser.add_argument("--calibrate-steps", type=int, default=30)
    parser.add_argument(
        "--variants",
        default="main,ablations",
        help="comma-separated names, or the groups main / ablations / extra; known: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--timing-lock", default=os.environ.get("RS_TIMING_LOCK"), help="flock file")
    parser.add_argument("--no-finetune", action="store_true", help="probes only")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="of the short fine-tune")
    parser.add_argument(
        "--curve", type=int, default=1, help="probe N checkpoints along each run (exploration)"
    )
    parser.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        help="KEY=VALUE for every configuration (repeatable)",
    )
    parser.add_argument("--exp", help="keep this experiment's runs apart: WORK/exp/EXP (the data is shared)")
    args = parser.parse_args(argv)
    _common.pin_threads(1)  # this process and every job it starts: one thread each
    if args.job is not None:
        run_job(args.job)
        return
    logging.basicConfig(level=logging.INFO, format="[bench_fidelity] %(message)s", stream=sys.stderr)
    if args.data is None or not Path(args.data).is_dir():
        raise SystemExit(
            "give the EuroSAT RGB folder: --data DIR or RS_LABELED_DATA (../shared/data/eurosat-rgb)"
        )
    if args.quick:
        args.seeds, args.ablation_seeds, args.budget_steps = 1, 1, 12
        args.repeats, args.calibrate_warmup, args.calibrate_steps = 1, 2, 4
        args.finetune_epochs = 1
        if args.variants == "main,ablations":
            args.variants = "main,score-uniform,decoder-deep"
        if args.work == DEFAULT_WORK:
            args.work = DEFAULT_WORK.with_name("bench-fidelity-quick")
    common = tuple(_parse_set(a) for a in args.set_)
    if common:  # every configuration, the MAE anchor of the budget included
        VARIANTS.update(
            {
                n: Variant(v.name, v.label, v.recipe, (*common, *v.overrides), v.main)
                for n, v in VARIANTS.items()
            }
        )
    variants = _select(args.variants)
    data_dir = args.work.resolve()
    work = data_dir / "exp" / args.exp if args.exp else data_dir
    info = _common.machine()
    t0, c0 = time.perf_counter(), time.process_time()

    data = prepare(Path(args.data), data_dir, args.quick)
    data["probe"] = str(data_dir / "probe.json")
    data["runtime"] = {"device": args.device, "loader_workers": args.loader_workers, "threads": args.threads}
    log.info("data: %s samples in %s", data["kept"], data["shards"])
    calibration = calibrate(
        variants if "mae" in {v.name for v in variants} else [*variants, VARIANTS["mae"]], args, data, work
    )
    currency = "wall_s_per_step" if args.device.startswith("cuda") else "cpu_s_per_step"
    if args.budget_seconds:
        budget_cpu = float(args.budget_seconds)
    else:
        budget_cpu = args.budget_steps * calibration["mae"][currency]
    steps = {name: max(1, round(budget_cpu / c[currency])) for name, c in calibration.items()}
    log.info(
        "budget %.0f %s seconds: %s", budget_cpu, "GPU wall" if currency.startswith("wall") else "CPU", steps
    )

    pool = Pool(work, jobs=args.jobs, nice=args.nice)
    jobs: list[dict[str, Any]] = []
    main_seeds = range(args.seeds)
    for v in variants:
        for seed in main_seeds if v.main else range(args.ablation_seeds):
            job = _job(v, "pretrain", f"{v.name}-s{seed}", work, data, seed)
            job["steps"] = steps[v.name]
            job["log_every"] = max(1, min(50, steps[v.name]))
            job["finetune"] = v.main and not args.no_finetune
            job["finetune_epochs"] = args.finetune_epochs
            job["curve"] = args.curve
            jobs.append(job)
    base = VARIANTS["selectivemae"]
    for job in jobs:
        pool.submit(job)
    pool.wait()
    randoms = []
    for seed in main_seeds:
        job = _job(base, "random", f"random-init-s{seed}", work, data, seed)
        job["out"] = str(work / "runs" / f"{base.name}-s{seed}")  # the init of that run
        job["finetune"] = not args.no_finetune
        job["finetune_epochs"] = args.finetune_epochs
        randoms.append(job)
        if Path(job["out"]).exists():
            pool.submit(job)
    pool.wait()

    results: dict[str, list[dict[str, Any]]] = {}
    for job in [*jobs, *randoms]:
        path = Path(job["result"])
        if path.exists():
            key = "random-init" if job["kind"] == "random" else job["variant"]
            results.setdefault(key, []).append({"seed": job["seed"], **json.loads(path.read_text())})
    summary = summarise(results)
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": [v.name for v in variants],
        "data": data,
        "calibration": calibration,
        "budget": {
            "anchor_steps": None if args.budget_seconds else args.budget_steps,
            "seconds": budget_cpu,
            "currency": "GPU wall" if currency.startswith("wall") else "CPU",
            "steps": steps,
        },
        "results": results,
        "summary": summary,
        "failed": pool.failed,
        "machine": info,
        "wall_s": time.perf_counter() - t0,
        "cpu_s_parent": time.process_time() - c0,
    }
    title = "SelectiveMAE vs MAE at equal compute on EuroSAT (issue 11)"
    if args.exp:  # an exploration states no targets: the default run's rows are the summary's
        title += f", experiment `{args.exp}`"
    else:
        payload["targets"] = targets(summary)
    print(_common.report(title, [render(payload)], info))
    _common.write_json(args.json, payload)
    if pool.failed:
        raise SystemExit(f"{len(pool.failed)} jobs failed: {', '.join(pool.failed)}")


def _parse_set(text: str) -> tuple[str, Any]:
    from rspretrain.config import parse_assignment

    return parse_assignment(text)


def _select(spec: str) -> list[Variant]:
    groups = {"main": MAIN, "ablations": ABLATIONS, "extra": EXTRA}
    chosen: list[Variant] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        group = tuple(VARIANTS[v.name] for v in groups.get(name, ()))
        for v in group or ((VARIANTS[name],) if name in VARIANTS else ()):
            if v not in chosen:
                chosen.append(v)
        if name not in groups and name not in VARIANTS:
            raise SystemExit(
                f"--variants: unknown {name!r}; known: main, ablations, extra, {', '.join(VARIANTS)}"
            )
    return chosen


if __name__ == "__main__":
    main()
