"""rspretrain command line: parses flags, builds the config, sets up logging, calls the library, prints a summary.

    rspretrain train --shards 'data/shards/tiles-{000000..000099}.tar' --out runs/demo --config configs/demo_cpu.yaml
    torchrun --nproc_per_node=8 -m rspretrain train --config configs/selectivemae_vitb_opticalrs13m.yaml ...
    rspretrain export runs/demo --out encoder.safetensors
    rspretrain bench --arch vit_base_patch16 --batch-size 8
    rspretrain visualize runs/demo --shards 'data/shards/*.tar' --out fig.png
    rspretrain probe encoder.safetensors --train ucm/train --val ucm/val   (and --random-init: the baseline)
    rspretrain split /data/AID --protocol aid-20 --out splits/aid-20
    rspretrain finetune encoder.safetensors --train splits/aid-20/train.txt --val splits/aid-20/val.txt --out runs/ft
    rspretrain linprobe encoder.safetensors --train splits/aid-20/train.txt --val splits/aid-20/val.txt --out runs/lp

Errors a user can cause leave with exit code 2 and one line on stderr (the stack trace only with --debug).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SelectiveMAE / MAE pretraining on WebDataset shards written by rscurate.",
)
out_console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(quiet: bool = False, debug: bool = False) -> None:
    """Once per process: rich on rank 0 (stderr), plain WARNING-only lines tagged with the rank elsewhere."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_rspretrain", False)]:
        root.removeHandler(old)
    if _rank() == 0:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=debug)
        level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {_rank()}] %(levelname)s %(name)s: %(message)s"))
        level = logging.DEBUG if debug else logging.WARNING
    handler._rspretrain = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _guard(debug: bool, fn: Callable[[], T]) -> T:
    """Run `fn`; a user-fixable error becomes one line on stderr and exit code 2."""
    from rspretrain.checkpoint import CheckpointError
    from rspretrain.config import ConfigError
    from rspretrain.data import DataError
    from rspretrain.probe import ProbeError
    from rspretrain.runtime import TrainingError
    from rspretrain.splits import SplitError
    from rspretrain.visualize import VisualizeError
    from rspretrain.weights import WeightsError

    user_errors = (
        WeightsError,
        ConfigError,
        DataError,
        CheckpointError,
        TrainingError,
        ProbeError,
        VisualizeError,
        SplitError,
    )
    try:
        return fn()
    except user_errors as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _overrides(flags: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    from rspretrain.config import parse_assignment

    result = {key: value for key, value in flags.items() if value is not None}
    for text in assignments or []:
        key, value = parse_assignment(text)
        result[key] = value
    return result


@app.command()
def train(
    shards: list[str] = typer.Option(
        None, "--shards", help="Shards: brace pattern, glob, folder, path or URL; repeatable."
    ),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, log.jsonl, tb/, config.json."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    method: str = typer.Option(None, help="selectivemae | mae"),
    arch: str = typer.Option(
        None,
        help="vit_tiny_patch16 | vit_small_patch16 | vit_base_patch16 | vit_large_patch16 | vit_huge_patch14",
    ),
    img_size: int = typer.Option(None, help="Input size in pixels."),
    decoder_depth: int = typer.Option(None, help="Decoder blocks (default 12 selectivemae, 8 mae)."),
    mask_ratio: float = typer.Option(None, help="Fraction of patches hidden from the encoder."),
    kept_mask_ratio: float = typer.Option(None, help="SelectiveMAE: fraction of the patches reconstructed."),
    score: str = typer.Option(None, help="SelectiveMAE patch scores: hog | uniform."),
    batch_size: int = typer.Option(None, help="Per-process batch size."),
    steps: int = typer.Option(None, help="Total optimiser steps of the run (more on --resume extends it)."),
    epochs: float = typer.Option(None, help="Or the total length in epochs."),
    samples_per_epoch: int = typer.Option(
        None, help="Samples per epoch (default: counted from the shards' size files or tar headers)."
    ),
    blr: float = typer.Option(None, help="Base lr: lr = blr x effective batch / 256."),
    lr_scale: str = typer.Option(
        None,
        help="none | kept_over_mask (the SelectiveMAE reference code's extra factor) | mask_over_kept (its inverse).",
    ),
    warmup_steps: int = typer.Option(None, help="Linear warmup in steps."),
    warmup_epochs: float = typer.Option(None, help="Or in epochs."),
    accum_steps: int = typer.Option(None, help="Gradient accumulation steps."),
    clip_grad: float = typer.Option(None, help="Clip the global gradient norm to this value."),
    shuffle_buffer: int = typer.Option(None, help="Samples in each worker's shuffle buffer."),
    workers: int = typer.Option(
        None,
        help="DataLoader workers per process (default: this process's cores minus the trainer's threads).",
    ),
    decode: str = typer.Option(
        None, help="cpu (workers decode and crop; default) | device (JPEGs decoded and cropped on the GPU)."
    ),
    resampled: bool = typer.Option(
        None,
        "--resampled/--no-resampled",
        help="Draw shards with replacement (default), or split them over ranks x workers.",
    ),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    precision: str = typer.Option(None, help="auto | bf16 | fp16 | fp32"),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    fsdp: bool = typer.Option(
        None, "--fsdp/--no-fsdp", help="Shard model, gradients and optimiser over the processes (FSDP2)."
    ),
    grad_checkpointing: bool = typer.Option(
        None,
        "--grad-checkpointing/--no-grad-checkpointing",
        help="Recompute encoder blocks in backward: less activation memory, ~30% more compute.",
    ),
    dist_timeout: float = typer.Option(
        None, help="Seconds a collective waits for the other ranks before the job fails (default 1800)."
    ),
    seed: int = typer.Option(None, help="Seed of init, data order, augmentation and masks."),
    threads: int = typer.Option(None, help="torch threads of each training process (CPU runs)."),
    checkpoint_every: int = typer.Option(
        None, help="Steps between checkpoints (one is also written at the end)."
    ),
    log_every: int = typer.Option(None, help="Steps between log lines."),
    figure_every: int = typer.Option(
        None,
        "--figure-every",
        "--during-training",
        metavar="K",
        help="Every K steps a reconstruction figure lands in RUN/figures and TensorBoard (0: none).",
    ),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: --set model.depth=2 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's newest good checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings only."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Debug logs and stack traces."),
) -> None:
    """Pretrain an encoder: one process, or one per GPU under torchrun."""
    setup_logging(quiet, debug)
    flags = {
        "data.shards": shards or None,
        "train.out": str(out),
        "model.method": method,
        "model.arch": arch,
        "model.img_size": img_size,
        "model.decoder_depth": decoder_depth,
        "model.mask_ratio": mask_ratio,
        "model.kept_mask_ratio": kept_mask_ratio,
        "model.score": score,
        "train.batch_size": batch_size,
        "train.steps": steps,
        "train.epochs": epochs,
        "data.samples_per_epoch": samples_per_epoch,
        "data.shuffle_buffer": shuffle_buffer,
        "data.workers": workers,
        "data.decode": decode,
        "data.resampled": resampled,
        "optim.blr": blr,
        "optim.lr_scale": lr_scale,
        "optim.warmup_steps": warmup_steps,
        "optim.warmup_epochs": warmup_epochs,
        "optim.accum_steps": accum_steps,
        "optim.clip_grad": clip_grad,
        "train.device": device,
        "train.precision": precision,
        "train.compile": compile,
        "train.fsdp": fsdp,
        "model.grad_checkpointing": grad_checkpointing,
        "train.dist_timeout": dist_timeout,
        "train.seed": seed,
        "train.threads": threads,
        "train.checkpoint_every": checkpoint_every,
        "train.log_every": log_every,
        "train.figure_every": figure_every,
    }

    def run() -> dict[str, Any]:
        from rspretrain.config import ConfigError, load_config
        from rspretrain.train import train as train_run
        from rspretrain.visualize import TrainingFigures

        saved = out / "config.json"
        base = json.loads(saved.read_text()) if resume and saved.is_file() else None
        cfg = load_config(config, _overrides(flags, set_), base=base)
        if not cfg.data.shards:
            raise ConfigError("give the shards to train on: --shards PATTERN (or data.shards in --config)")
        show = _rank() == 0 and not quiet and not json_out
        figures = TrainingFigures(cfg) if cfg.train.figure_every else None
        with _progress(show) as on_log:
            return train_run(cfg, resume=resume, on_log=on_log, figures=figures)

    summary = _guard(debug, run)
    if _rank() != 0:
        return
    if json_out:
        out_console.print_json(json.dumps(summary))
    elif not quiet:
        _print_table("rspretrain train", summary)


class _progress:
    """A rich progress line fed by the trainer's log records (rank 0); a no-op when hidden."""

    def __init__(self, show: bool, title: str = "train") -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.1f} img/s"
            ),
            TimeRemainingColumn(),
            console=err_console,
            disable=not show,
        )
        self.task: Any = None

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        self.progress.start()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        fields = {"loss": record["loss"], "lr": record["lr"], "rate": record["samples_per_s"]}
        if self.task is None:
            self.task = self.progress.add_task("train", total=record["total_steps"], **fields)
        self.progress.update(self.task, completed=record["step"], total=record["total_steps"], **fields)


def _print_table(title: str, data: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out_console.print(table)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder (its newest good checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Stack traces on errors."),
) -> None:
    """Write the encoder under timm VisionTransformer names, and print how to load it."""
    setup_logging(quiet=json_out, debug=debug)

    def run_export() -> Any:
        from rspretrain.export import export_encoder

        return export_encoder(run, out)

    result = _guard(debug, run_export)
    info = {
        "out": str(result.path),
        "checkpoint": str(result.checkpoint),
        "step": result.step,
        "tensors": result.tensors,
        "timm_model": result.timm_name,
        "timm_kwargs": result.timm_kwargs,
        "load": result.recipe,
    }
    if json_out:
        out_console.print_json(json.dumps(info))
        return
    out_console.print(
        f"wrote {result.path}: {result.tensors} tensors from {result.checkpoint} (step {result.step})",
        highlight=False,
    )
    out_console.print(result.recipe, highlight=False, soft_wrap=True)


@app.command()
def bench(
    arch: str = typer.Option("vit_base_patch16", help="Encoder preset."),
    batch_size: int = typer.Option(8, help="Images per step."),
    steps: int = typer.Option(5, help="Timed steps per method."),
    warmup: int = typer.Option(2, help="Untimed steps first."),
    img_size: int = typer.Option(224, help="Input size."),
    decoder_depth: int = typer.Option(None, help="SelectiveMAE decoder blocks (default 12; MAE keeps 8)."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 (autocast)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder and decoder."),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Stack traces on errors."),
) -> None:
    """Time MAE and SelectiveMAE training steps side by side, with analytic FLOPs."""
    setup_logging(quiet=True, debug=debug)
    from rspretrain.config import ConfigError
    from rspretrain.model import ARCHS

    def run_bench() -> dict[str, Any]:
        import torch

        from rspretrain.bench import run_bench as bench_run

        if arch not in ARCHS:
            raise ConfigError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype {dtype!r}: use float32 or bfloat16")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no GPU; use --device cpu")
        return bench_run(
            arch=arch,
            batch_size=batch_size,
            steps=steps,
            warmup=warmup,
            img_size=img_size,
            device=device,
            dtype=dtype,
            decoder_depth=decoder_depth,
            compile=compile,
            threads=threads,
        )

    result = _guard(debug, run_bench)
    if json_out:
        out_console.print_json(json.dumps(result, default=str))
        return
    _print_bench(result)


def _print_bench(result: dict[str, Any]) -> None:
    table = Table(
        title=f"{result['arch']}, batch {result['batch_size']}, {result['img_size']} px",
        caption=f"{result['device_name']}, {result['dtype']}, {result['threads']} threads, "
        f"median of {result['steps']} interleaved steps",
    )
    columns: tuple[tuple[str, str], ...] = (
        ("visible", "num_visible"),
        ("targets", "num_targets"),
        ("decoder", "decoder_depth"),
        ("ms/step", "ms_per_step"),
        ("img/s", "images_per_s"),
        ("GFLOP/img", "gflops_per_image"),
        ("MFU", "mfu"),
    )
    if all(result[name].get("mfu") is None for name in ("mae", "selectivemae")):
        columns = columns[:-1]  # MFU needs a known GPU peak
    table.add_column("method", no_wrap=True, min_width=12)
    for title, _ in columns:
        table.add_column(title, justify="right")
    for name in ("mae", "selectivemae"):
        row = result[name]
        table.add_row(name, *(_fmt(row.get(key)) for _, key in columns))
    out_console.print(table)
    out_console.print(
        f"MAE / SelectiveMAE: time ratio {result['time_ratio']:.2f}x, FLOP ratio {result['flop_ratio']:.2f}x",
        highlight=False,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
def visualize(
    run: Path = typer.Argument(..., help="Run folder (its newest good checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Output PNG."),
    shards: list[str] = typer.Option(
        None, "--shards", help="Shards to take samples from (default: the run's data.shards); repeatable."
    ),
    n: int = typer.Option(8, "--n", help="Samples, one row each: the first N decodable in shard order."),
    seed: int = typer.Option(0, help="Seed of the masks (fixed: figures differ only by model and progress)."),
    progress: float = typer.Option(
        None, help="Run progress in [0, 1] for PSTS (default: checkpoint step / total steps)."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only, no summary."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Debug logs and stack traces."),
) -> None:
    """Draw inputs, HOG scores, visible and reconstructed patches and the reconstructions of a checkpoint."""
    setup_logging(quiet or json_out, debug)

    def run_visualize() -> dict[str, Any]:
        from rspretrain.visualize import visualize as draw

        show = not (quiet or json_out)
        with err_console.status("reconstructing and drawing") if show else contextlib.nullcontext():
            return draw(run, out, shards=shards or None, n=n, seed=seed, progress=progress, device=device)

    result = _guard(debug, run_visualize)
    if json_out:
        out_console.print_json(json.dumps(result))
    elif not quiet:
        _print_table("rspretrain visualize", result)


@app.command()
def probe(
    weights: Path = typer.Argument(
        None,
        help="Checkpoint .pt, run folder or exported .safetensors (none: --random-init --arch --img-size).",
    ),
    train_dir: Path = typer.Option(
        ..., "--train", help="Labelled training images: one folder per class, or a split file."
    ),
    val_dir: Path = typer.Option(
        ..., "--val", help="Labelled validation images: class folders or a split file."
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Baseline: the same encoder at the init pretraining starts from."
    ),
    arch: str = typer.Option(None, help="Encoder preset, with --random-init and no WEIGHTS."),
    img_size: int = typer.Option(None, help="Input size, with --random-init and no WEIGHTS."),
    seed: int = typer.Option(None, help="Seed of --random-init (default: the run's train.seed, else 0)."),
    pool: str = typer.Option("mean", help="Feature per image: mean (of the patch tokens) | cls."),
    k: int = typer.Option(20, help="Neighbours of the k-NN vote."),
    temperature: float = typer.Option(0.07, help="k-NN vote weight exp(cosine / temperature)."),
    l2: float = typer.Option(1e-3, help="L2 penalty of the logistic regression (per mean loss)."),
    max_iter: int = typer.Option(500, help="L-BFGS iterations of the logistic regression."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="DataLoader workers decoding images."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    json_path: Path = typer.Option(
        None,
        "--json-out",
        help="Result file (default: next to WEIGHTS as NAME.probe.json / NAME.probe-random.json, "
        "RUN/probe.json for a run folder, ./probe-random-ARCH-SIZE.json without WEIGHTS).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, warnings only."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Debug logs and stack traces."),
) -> None:
    """k-NN (k=20, cosine, DINO-weighted) and linear-probe top-1 of a frozen encoder on an ImageFolder dataset."""
    setup_logging(quiet or json_out, debug)

    def run_probe() -> dict[str, Any]:
        from rspretrain.probe import ProbeConfig
        from rspretrain.probe import run_probe as probe_run

        cfg = ProbeConfig(
            k=k,
            temperature=temperature,
            pool=pool,
            l2=l2,
            max_iter=max_iter,
            batch_size=batch_size,
            workers=workers,
            device=device,
        )
        bars = _Stages(show=not (quiet or json_out))
        try:
            return probe_run(
                weights,
                train_dir,
                val_dir,
                cfg,
                random_init=random_init,
                arch=arch,
                img_size=img_size,
                seed=seed,
                json_out=json_path,
                progress=bars,
            )
        finally:
            bars.finish()

    result = _guard(debug, run_probe)
    if json_out:
        out_console.print_json(json.dumps(result))
    elif not quiet:
        table = Table(title="rspretrain probe", show_header=False)
        table.add_row("weights", str(result["weights"]))
        if result["step"] is not None:
            table.add_row("pretrained", f"{result['method']}, {result['step']:,} steps")
        table.add_row(
            "encoder", f"{result['arch']}, {result['img_size']} px, {result['probe']['pool']} pooled"
        )
        table.add_row(
            "data",
            f"{result['classes']} classes, {result['train_images']} train / {result['val_images']} val",
        )
        table.add_row(
            f"k-NN top-1 (k={result['probe']['k']})", f"{100 * result['knn_top1']:.2f} %", style="bold"
        )
        table.add_row("linear top-1", f"{100 * result['linear_top1']:.2f} %", style="bold")
        table.add_row("result", result["json"])
        table.add_row("seconds", f"{result['seconds']:.1f}")
        out_console.print(table)


def _classify_command(protocol: str) -> Callable[..., None]:
    """`rspretrain finetune` and `rspretrain linprobe`: one set of flags, one loop, two sets of defaults."""

    def command(
        weights: Path = typer.Argument(
            None,
            help="Encoder: exported .safetensors, run folder or checkpoint, MAE / SelectiveMAE .pth "
            "(none: --random-init --arch --img-size).",
        ),
        train_data: str = typer.Option(
            None, "--train", help="Training images: a class-folder tree or a split file."
        ),
        val_data: str = typer.Option(
            None, "--val", help="Evaluation images: a class-folder tree or a split file."
        ),
        out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, log.jsonl, tb/, result.json."),
        config: Path = typer.Option(
            None, "--config", "-c", help="YAML config (see configs/finetune_*.yaml)."
        ),
        data_root: str = typer.Option(
            None, help="Where split files' images live (ours: the root; reference lists)."
        ),
        random_init: bool = typer.Option(
            None, "--random-init", help="Baseline: the encoder at the init pretraining starts from."
        ),
        arch: str = typer.Option(None, help="Encoder preset (needed only without weights)."),
        img_size: int = typer.Option(None, help="Input size; another than the weights' resamples pos_embed."),
        pool: str = typer.Option(None, help="avg (patch-token mean + fc_norm) | cls (class token)."),
        drop_path: float = typer.Option(None, help="Stochastic depth rate."),
        batch_size: int = typer.Option(None, help="Per-process batch size."),
        epochs: float = typer.Option(None, help="Length in epochs."),
        steps: int = typer.Option(None, help="Or in optimiser steps."),
        blr: float = typer.Option(None, help="Base lr: lr = blr x effective batch / 256."),
        lr: float = typer.Option(None, help="Absolute peak lr (overrides --blr)."),
        layer_decay: float = typer.Option(None, help="Layer-wise lr decay (AdamW)."),
        weight_decay: float = typer.Option(None, help="Weight decay."),
        min_lr: float = typer.Option(None, help="Lr at the end of the cosine."),
        warmup_epochs: float = typer.Option(None, help="Linear warmup in epochs."),
        warmup_steps: int = typer.Option(None, help="Or in steps."),
        accum_steps: int = typer.Option(None, help="Gradient accumulation steps."),
        clip_grad: float = typer.Option(None, help="Clip the global gradient norm to this value."),
        auto_augment: str = typer.Option(None, help="timm auto-augment policy, or 'none'."),
        reprob: float = typer.Option(None, help="Random erasing probability."),
        mixup: float = typer.Option(None, help="Mixup alpha (0: off)."),
        cutmix: float = typer.Option(None, help="CutMix alpha (0: off)."),
        smoothing: float = typer.Option(None, help="Label smoothing."),
        eval_every: int = typer.Option(
            None, help="Epochs between evaluations (one is always made at the end)."
        ),
        report_max: bool = typer.Option(
            None,
            "--report-max",
            help="Also report the best val top-1 over the run, labelled test-set selection.",
        ),
        device: str = typer.Option(None, help="auto | cpu | cuda"),
        precision: str = typer.Option(None, help="auto | bf16 | fp16 | fp32"),
        seed: int = typer.Option(None, help="Seed of data order, augmentation, mixup and the head."),
        threads: int = typer.Option(None, help="torch threads of each process (CPU runs)."),
        workers: int = typer.Option(None, help="DataLoader workers per process."),
        checkpoint_every: int = typer.Option(
            None, help="Steps between extra checkpoints (one after every epoch)."
        ),
        log_every: int = typer.Option(None, help="Steps between log lines."),
        set_: list[str] = typer.Option(None, "--set", help="Any config key: --set augment.re_mode=const."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the run's newest good checkpoint."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings only."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Debug logs and stack traces."),
    ) -> None:
        setup_logging(quiet or json_out, debug)
        flags = {
            "model.weights": str(weights) if weights is not None else None,
            "data.train": train_data,
            "data.val": val_data,
            "data.data_root": data_root,
            "data.workers": workers,
            "train.out": str(out),
            "model.random_init": random_init,
            "model.arch": arch,
            "model.img_size": img_size,
            "model.pool": pool,
            "model.drop_path": drop_path,
            "train.batch_size": batch_size,
            "train.epochs": epochs,
            "train.steps": steps,
            "optim.blr": blr,
            "optim.lr": lr,
            "optim.layer_decay": layer_decay,
            "optim.weight_decay": weight_decay,
            "optim.min_lr": min_lr,
            "optim.warmup_epochs": warmup_epochs,
            "optim.warmup_steps": warmup_steps,
            "optim.accum_steps": accum_steps,
            "optim.clip_grad": clip_grad,
            "augment.re_prob": reprob,
            "augment.mixup": mixup,
            "augment.cutmix": cutmix,
            "augment.smoothing": smoothing,
            "train.eval_every": eval_every,
            "train.report_max": report_max,
            "train.device": device,
            "train.precision": precision,
            "train.seed": seed,
            "train.threads": threads,
            "train.checkpoint_every": checkpoint_every,
            "train.log_every": log_every,
        }
        if auto_augment is not None:
            flags["augment.auto_augment"] = None if auto_augment.lower() in ("", "none") else auto_augment

        def run() -> dict[str, Any]:
            from rspretrain.finetune import finetune
            from rspretrain.finetune_config import load_finetune_config

            saved = out / "config.json"
            base = json.loads(saved.read_text()) if resume and saved.is_file() else None
            overrides = _overrides(flags, set_)
            if "augment.auto_augment" in flags:  # None is a value here ("none"), not "not given"
                overrides["augment.auto_augment"] = flags["augment.auto_augment"]
            cfg = load_finetune_config(config, overrides, base=base, protocol=protocol)
            show = _rank() == 0 and not quiet and not json_out
            with _progress(show, protocol) as on_log:
                return finetune(cfg, resume=resume, on_log=on_log)

        result = _guard(debug, run)
        if _rank() != 0:
            return
        if json_out:
            out_console.print_json(json.dumps(result))
        elif not quiet:
            _print_classification(result)

    command.__doc__ = (
        "Fine-tune the whole encoder with a linear head (MAE / SelectiveMAE recipe); top-1 of the last epoch."
        if protocol == "finetune"
        else "MAE linear probe: frozen encoder, BatchNorm + linear head, LARS; top-1 of the last epoch."
    )
    return command


app.command("finetune")(_classify_command("finetune"))
app.command("linprobe")(_classify_command("linprobe"))


def _print_classification(result: dict[str, Any]) -> None:
    w, m = result["weights"], result["model"]
    table = Table(title=f"rspretrain {result['protocol']}", show_header=False)
    table.add_row("weights", f"{w['source']} ({w['kind']})")
    table.add_row("encoder", f"{m['arch']}, {m['img_size']} px, {m['pool']} pooled")
    train, val = result["train_split"], result["val_split"]
    table.add_row("data", f"{len(result['classes'])} classes, {train['images']} train / {val['images']} val")
    table.add_row("top-1 (last epoch)", f"{100 * result['top1']:.2f} %", style="bold")
    table.add_row("top-5 (last epoch)", f"{100 * result['top5']:.2f} %")
    if "test_set_selection" in result:
        table.add_row(
            "max top-1 over evals (test-set selection)",
            f"{100 * result['test_set_selection']['max_top1']:.2f} %",
        )
    table.add_row("epochs", f"{result['epochs']:g} ({result['steps']} steps of {result['global_batch']})")
    if result["seconds_per_epoch"] is not None:
        table.add_row("seconds per epoch", f"{result['seconds_per_epoch']:.1f}")
    table.add_row("result", str(Path(result["run"]) / "result.json"))
    out_console.print(table)


@app.command()
def split(
    root: Path = typer.Argument(
        None, help="Dataset folder: one sub-folder of images per class (or ROOT/images/<class>)."
    ),
    out: Path = typer.Option(None, "--out", help="Folder for train.txt and val.txt."),
    train_ratio: float = typer.Option(None, help="Fraction of each class that goes to train (e.g. 0.2)."),
    protocol: str = typer.Option(
        None, help="A benchmark protocol: sets the ratio and checks the class count (see --list)."
    ),
    seed: int = typer.Option(0, help="Seed of the per-class permutation."),
    max_per_class: int = typer.Option(None, help="Keep a seeded subset of this many images per class first."),
    list_protocols: bool = typer.Option(False, "--list", help="Print the protocol table and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Debug logs and stack traces."),
) -> None:
    """Write a seeded, stratified split (OUT/train.txt, OUT/val.txt: `path label` lines) of a labelled folder."""
    setup_logging(quiet=json_out, debug=debug)
    from rspretrain.splits import PROTOCOLS, SplitError, write_split

    if list_protocols:
        table = Table(title="benchmark protocols")
        for column in ("protocol", "dataset", "DATA_ROOT/...", "train", "classes", "images", "reported"):
            table.add_column(column)
        for p in PROTOCOLS.values():
            row = (
                p.name,
                p.dataset,
                p.folder,
                f"{p.train_ratio:.0%}",
                str(p.classes),
                f"{p.images:,}",
                p.reported,
            )
            table.add_row(*row)
        out_console.print(table)
        return

    def run_split() -> Any:
        if root is None or out is None:
            raise SplitError("give the dataset folder and --out DIR (or --list for the protocol table)")
        return write_split(
            root, out, train_ratio=train_ratio, protocol=protocol, seed=seed, max_per_class=max_per_class
        )

    result = _guard(debug, run_split)
    info = {
        "train": str(result.train),
        "val": str(result.val),
        "train_images": result.train_images,
        "val_images": result.val_images,
        "classes": len(result.classes),
        "protocol": result.protocol,
        "train_sha256": result.train_sha256,
        "val_sha256": result.val_sha256,
    }
    if json_out:
        out_console.print_json(json.dumps(info))
    else:
        _print_table("rspretrain split", info)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {task.fields['unit']}/s" if speed else "", style="progress.data.speed")


class _Stages:
    """rscurate.progress.Progress as one rich bar per stage, with count, rate and ETA; a no-op when hidden."""

    def __init__(self, show: bool) -> None:
        from rich.progress import TimeElapsedColumn

        self.bars = Progress(
            TextColumn("[bold]{task.description:<15}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not show,
        )
        self.task: Any = None
        self.started = False

    def start(self, name: str, total: float, unit: str) -> None:
        if not self.started:
            self.bars.start()
            self.started = True
        self._complete()
        self.task = self.bars.add_task(name, total=total, unit=unit)

    def advance(self, amount: float = 1) -> None:
        if self.task is not None:
            self.bars.advance(self.task, amount)

    def _complete(self) -> None:
        if self.task is not None:
            self.bars.update(self.task, completed=self.bars.tasks[-1].total)
            self.task = None

    def finish(self) -> None:
        self._complete()
        if self.started:
            self.bars.stop()
            self.started = False


def main() -> None:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # under torchrun: a rank's uncaught error goes to the file torchrun reads, so the job's failure
        # summary names the rank and the error with its traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        record(app)()
    else:
        app()


if __name__ == "__main__":
    main()
