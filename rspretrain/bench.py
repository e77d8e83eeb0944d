"""Times MAE and SelectiveMAE training steps side by side, on the same batches, in one process.

A step is forward + backward + AdamW step. Steps alternate (mae, selectivemae, mae, ...) so that a noisy
machine slows both alike; the figures are medians. Alongside the time ratio the result carries the
analytic FLOP ratio (rspretrain.flops), and on CUDA the model FLOPs utilisation against the card's
dense bf16 peak.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from rspretrain import masking, runtime
from rspretrain.flops import training_gflops_per_image
from rspretrain.model import ModelConfig, PretrainModel, build_model

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s (SXM parts), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
METHODS = ("mae", "selectivemae")


def peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None for CPUs and cards not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def synthetic_batch(n: int, in_chans: int, img_size: int, seed: int) -> torch.Tensor:
    """(N, C, H, W) ImageNet-normalised-like images: smooth fields, flat areas and textured areas."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, in_chans, 7, 7, generator=g)
    base = F.interpolate(coarse, size=(img_size, img_size), mode="bicubic", align_corners=False)
    texture = torch.rand(n, 1, img_size // 4, img_size // 4, generator=g)
    texture = F.interpolate(texture, size=(img_size, img_size), mode="nearest")  # (N, 1, H, W)
    region = (F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(img_size, img_size)) > 0.5).float()
    imgs = (base + 0.3 * region * (texture - 0.5)).clamp(0, 1)  # (N, C, H, W) in [0, 1]
    return (imgs - 0.45) / 0.226


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def run_bench(
    arch: str = "vit_base_patch16",
    batch_size: int = 8,
    steps: int = 5,
    warmup: int = 2,
    img_size: int = 224,
    device: str = "cpu",
    dtype: str = "float32",
    decoder_depth: int | None = None,
    compile: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``steps`` interleaved training steps of each method after ``warmup`` untimed ones.

    decoder_depth sets SelectiveMAE's decoder depth (None: 12); MAE keeps its 8-block baseline.
    dtype "bfloat16" runs forward and loss under autocast (parameters and AdamW stay float32).
    compile=True wraps each model in torch.compile, as the trainer does; token scoring and selection
    stay eager inside it (PretrainModel.select is excluded from compilation).

    Returns per method: ms_per_step (median), ms_all, cpu_ms_per_step (this process's CPU time, every
    thread), forward_backward_ms and optimizer_ms (medians of
    the two parts of a step), images_per_s, gflops_per_image, mfu (CUDA only), num_visible,
    num_targets, decoder_depth; SelectiveMAE also selection_ms (HOG + PSTS + target draw for one
    batch, included in its step). Top level: time_ratio (MAE ms / SelectiveMAE ms),
    time_ratio_forward_backward (the same without the AdamW step), flop_ratio, and the run settings.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use float32 or bfloat16")
    dev = torch.device(device)
    if dev.type == "cpu":
        runtime.keep_host_memory()  # as `train` runs its steps

    def autocast() -> Any:
        if dtype == "bfloat16":
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return nullcontext()

    torch.manual_seed(0)
    cfgs = {
        "mae": ModelConfig(method="mae", arch=arch, img_size=img_size),
        "selectivemae": ModelConfig(
            method="selectivemae", arch=arch, img_size=img_size, decoder_depth=decoder_depth
        ),
    }
    models: dict[str, PretrainModel] = {}
    runners: dict[str, Callable[..., Any]] = {}  # the model, or its torch.compile wrapper
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg).to(dev).train()
        models[name] = model
        runners[name] = torch.compile(model) if compile else model
        # fused AdamW exists for CPU and CUDA and is several times faster than the per-tensor loop.
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05, fused=True)

    in_chans = cfgs["mae"].in_chans
    batches = [synthetic_batch(batch_size, in_chans, img_size, seed=i).to(dev) for i in range(2)]
    sample_index = torch.arange(batch_size, device=dev)
    progress = 0.5  # PSTS "far" stage; every stage costs the same similarity ranking

    def step(name: str, i: int) -> tuple[float, float, float]:
        """One training step; returns (total ms, of which AdamW ms, CPU ms of this process)."""
        model, opt = models[name], optimizers[name]
        noise = masking.counter_uniform(0, i, sample_index, (model.noise_channels, model.num_patches))
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = runners[name](batches[i % len(batches)], progress, noise)
        out.loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        opt.step()
        _sync(dev)
        t2, c2 = time.perf_counter(), time.process_time()
        return (t2 - t0) * 1e3, (t2 - t1) * 1e3, (c2 - c0) * 1e3

    times: dict[str, list[float]] = {name: [] for name in METHODS}
    optimizer_times: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu_times: dict[str, list[float]] = {name: [] for name in METHODS}
    for i in range(warmup + steps):
        for name in METHODS:
            total, opt_ms, cpu_ms = step(name, i)
            if i >= warmup:
                times[name].append(total)
                optimizer_times[name].append(opt_ms)
                cpu_times[name].append(cpu_ms)
        log.info("step %d: %s", i, {name: round(t[-1], 1) for name, t in times.items() if t})

    sel = models["selectivemae"]
    imgs = batches[0]
    noise = masking.counter_uniform(0, 0, sample_index, (sel.noise_channels, sel.num_patches))
    with torch.no_grad(), autocast():
        patches = sel.encoder.embed_patches(imgs)
        selection = [
            _timed(lambda: sel.select(imgs, patches, progress, noise), dev) for _ in range(steps + 1)
        ]

    peak = peak_tflops(dev)
    result: dict[str, Any] = {
        "arch": arch,
        "batch_size": batch_size,
        "img_size": img_size,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "compile": compile,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "peak_bf16_tflops": peak,
    }
    for name in METHODS:
        ms = statistics.median(times[name])
        gflops = training_gflops_per_image(cfgs[name])
        images_per_s = batch_size / (ms / 1e3)
        fwd_bwd = [t - o for t, o in zip(times[name], optimizer_times[name], strict=True)]
        result[name] = {
            "ms_per_step": ms,
            "ms_all": times[name],
            "cpu_ms_per_step": statistics.median(cpu_times[name]),  # this process, every thread
            "optimizer_ms": statistics.median(optimizer_times[name]),
            "forward_backward_ms": statistics.median(fwd_bwd),
            "images_per_s": images_per_s,
            "gflops_per_image": gflops,
            "mfu": gflops * 1e9 * images_per_s / (peak * 1e12) if peak else None,
            "num_visible": models[name].num_visible,
            "num_targets": models[name].num_targets,
            "decoder_depth": cfgs[name].effective_decoder_depth,
        }
    result["selectivemae"]["selection_ms"] = statistics.median(selection[1:])
    result["time_ratio"] = result["mae"]["ms_per_step"] / result["selectivemae"]["ms_per_step"]
    result["time_ratio_forward_backward"] = (
        result["mae"]["forward_backward_ms"] / result["selectivemae"]["forward_backward_ms"]
    )
    result["flop_ratio"] = result["mae"]["gflops_per_image"] / result["selectivemae"]["gflops_per_image"]
    return result


def format_bench(result: dict[str, Any]) -> str:
    """A markdown table of one run_bench result, for docs/benchmarks.md."""
    head = (
        f"{result['arch']}, batch {result['batch_size']}, {result['img_size']} px, {result['device_name']}, "
        f"{result['dtype']}, compile={result['compile']}, {result['threads']} threads, "
        f"median of {result['steps']} interleaved steps"
    )
    rows = [
        "| method | visible | reconstructed | decoder depth | ms/step | of which AdamW | images/s "
        "| GFLOP/image | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        r = result[name]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        rows.append(
            f"| {name} | {r['num_visible']} | {r['num_targets']} | {r['decoder_depth']} | {r['ms_per_step']:.0f} "
            f"| {r['optimizer_ms']:.0f} "
            f"| {r['images_per_s']:.1f} | {r['gflops_per_image']:.1f} | {mfu} |"
        )
    tail = (
        f"Time ratio {result['time_ratio']:.2f}x ({result['time_ratio_forward_backward']:.2f}x without AdamW), "
        f"FLOP ratio {result['flop_ratio']:.2f}x; "
        f"scoring + selection {result['selectivemae']['selection_ms']:.1f} ms per batch."
    )
    return "\n".join([head, "", *rows, "", tail])
