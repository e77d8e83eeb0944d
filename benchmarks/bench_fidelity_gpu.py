"""The equal-compute experiment of bench_fidelity.py at GPU scale: ViT-S/16 (or ViT-B/16) at 224 px, tens of
minutes of one GPU per run. NOT RUN YET: no session so far had a GPU for it (see docs/benchmarks.md).

    .venv/bin/python benchmarks/bench_fidelity_gpu.py --data EUROSAT_RGB [--arch vit_small_patch16]
        [--minutes 10] [--seeds 3] [--json PATH]
    .venv/bin/python benchmarks/bench_fidelity_gpu.py --data EUROSAT_RGB --cpu-check   # the same code path on CPU

What changes against the CPU benchmark (everything else, the split, the curation, the calibration, the probes
and the table, is bench_fidelity.py's):

- the encoder is `--arch` at 224 px with the reference's decoder presets (width 256 / 8 heads for ViT-S, 512 / 16
  for ViT-B; depth 12 for SelectiveMAE, 8 for MAE), batch 256, the paper's blr 1.5e-4 (x kept / mask for
  SelectiveMAE), 5% warmup, bf16;
- the budget is GPU wall time (`--minutes` per run), calibrated with CUDA synchronisation; runs go one at a
  time, each with `--loader-workers` decoding processes;
- the probes extract features on the GPU.

Sizing on one H200 (from docs/benchmarks.md: ViT-B SelectiveMAE ~6,200 img/s in bf16 at batch 512 on synthetic
data; the loader needs ~14 cores per GPU at 256 px): 10 minutes is about 1.5-3.5M samples, 75-175 epochs of the
19,908 curated EuroSAT training chips. With 2 methods x 3 seeds and the 6 ablations x 2 seeds that is 3 hours;
`--variants main` (1 hour) is the part to run first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import bench_fidelity


def arguments(args: argparse.Namespace) -> list[str]:
    """bench_fidelity.py's command line for this experiment."""
    if args.cpu_check:  # every code path of the GPU experiment, on CPU, in a minute or two
        model = [
            "--set",
            "model.arch=vit_tiny_patch16",
            "--set",
            "model.img_size=64",
            "--set",
            "model.mask_ratio=0.75",
        ]
        runtime = ["--device", "cpu", "--quick", "--loader-workers", "1", "--budget-seconds", "4"]
    else:
        model = [
            "--set",
            f"model.arch={args.arch}",
            "--set",
            "model.img_size=224",
            "--set",
            "model.decoder_embed_dim=null",  # the reference's presets for the arch
            "--set",
            "model.decoder_num_heads=null",
            "--set",
            "model.decoder_depth=null",  # 12 for SelectiveMAE, 8 for MAE
        ]
        runtime = [
            "--device",
            "cuda",
            "--loader-workers",
            str(args.loader_workers),
            "--threads",
            "4",
            "--budget-seconds",
            str(60 * args.minutes),
            "--seeds",
            str(args.seeds),
            "--repeats",
            "3",
            "--calibrate-warmup",
            "20",
            "--calibrate-steps",
            "60",
        ]
    recipe = [
        "--set",
        "train.batch_size=256" if not args.cpu_check else "train.batch_size=8",
        "--set",
        "optim.blr=1.5e-4" if not args.cpu_check else "optim.blr=8.0e-3",
        "--set",
        "train.precision=auto",  # bf16 on the GPU
        "--set",
        "data.shuffle_buffer=5000",
    ]
    work = ["--work", str(args.work)] if args.work else []
    out = ["--json", str(args.json)] if args.json else []
    return [
        *model,
        *recipe,
        *runtime,
        "--data",
        str(args.data),
        "--variants",
        args.variants,
        "--jobs",
        "1",
        *work,
        *out,
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="EuroSAT RGB (one folder per class)")
    parser.add_argument("--arch", default="vit_small_patch16", help="vit_small_patch16 or vit_base_patch16")
    parser.add_argument("--minutes", type=float, default=10.0, help="GPU minutes per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default="main,ablations")
    parser.add_argument("--loader-workers", type=int, default=12)
    parser.add_argument("--work", help="default: out/bench-fidelity-gpu")
    parser.add_argument("--json")
    parser.add_argument(
        "--cpu-check", action="store_true", help="run the same code path on CPU, tiny and fast"
    )
    args = parser.parse_args(argv)
    if args.work is None:
        args.work = str(
            bench_fidelity.ROOT
            / "out"
            / ("bench-fidelity-gpu-check" if args.cpu_check else "bench-fidelity-gpu")
        )
    command = arguments(args)
    print("bench_fidelity.py " + " ".join(command), file=sys.stderr)
    bench_fidelity.main(command)


if __name__ == "__main__":
    main()
