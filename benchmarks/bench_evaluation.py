"""Evaluating an encoder on CPU: the three protocols (k-NN / logistic probe, MAE linear probe, fine-tuning) on real
EuroSAT chips, for the `make demo` encoder, the same encoder at random init, and an official-format MAE checkpoint
built from random weights; top-1 of each and seconds per epoch.

    make demo && RS_LABELED_DATA=../shared/data/eurosat-rgb \\
        .venv/bin/python benchmarks/bench_evaluation.py --weights demo-out/encoder.safetensors [--per-class 200]

Each run is its own `rspretrain` process (wall and CPU seconds, workers included). The recipes are
configs/finetune_eurosat_cpu.yaml and configs/linprobe_eurosat_cpu.yaml (6 epochs, 64 px) and `rspretrain probe`
at 64 px: short CPU schedules that check an encoder end to end, not the paper's 100-epoch protocol. These are
accuracies first; the seconds come from the same runs on whatever machine ran them (see its load in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = "configs/finetune_eurosat_cpu.yaml"
LINPROBE = "configs/linprobe_eurosat_cpu.yaml"
IMG_SIZE = 64


def mae_format_checkpoint(path: Path, img_size: int, seed: int = 0) -> Path:
    """A checkpoint laid out as facebookresearch/mae's main_pretrain.py saves one ({'model', 'epoch', 'args'}),
    from random weights: a timm ViT-Tiny/16 encoder and MAE's 8-block 512-wide decoder, under MAE's names."""
    import argparse as ap

    import timm
    import torch
    from timm.models.vision_transformer import Block
    from torch import nn

    torch.manual_seed(seed)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=0)
    state = dict(encoder.state_dict())
    tokens = (img_size // 16) ** 2 + 1
    decoder = nn.ModuleDict(
        {
            "decoder_embed": nn.Linear(192, 512),
            "decoder_blocks": nn.Sequential(*[Block(512, 16, qkv_bias=True) for _ in range(8)]),
            "decoder_norm": nn.LayerNorm(512),
            "decoder_pred": nn.Linear(512, 16 * 16 * 3),
        }
    )
    state |= {k: v for k, v in decoder.state_dict().items()}
    state["mask_token"] = torch.randn(1, 1, 512) * 0.02
    state["decoder_pos_embed"] = torch.zeros(1, tokens, 512)
    args = ap.Namespace(
        model="mae_vit_tiny_patch16", input_size=img_size, mask_ratio=0.75, norm_pix_loss=True
    )
    torch.save({"model": state, "epoch": 0, "args": args}, path)
    return path


def run(command: list[str], env: dict[str, str]) -> tuple[dict[str, Any], _common.Measured]:
    measured = _common.run_measured(command, env=env, timeout_s=3 * 3600)
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{measured.stderr[-3000:]}")
    return json.loads(measured.stdout), measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "demo-out" / "encoder.safetensors")
    parser.add_argument("--data", type=Path, default=os.environ.get("RS_LABELED_DATA"))
    parser.add_argument("--per-class", type=int, default=200, help="EuroSAT chips per class (80/20 split)")
    parser.add_argument("--epochs", type=float, default=None, help="override the recipes' 6 epochs")
    parser.add_argument("--quick", action="store_true", help="20 chips per class, 1 epoch: a smoke test")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        sys.exit("set RS_LABELED_DATA (or --data) to the EuroSAT RGB folder")
    if not args.weights.is_file():
        sys.exit(
            f"{args.weights}: no such file; run `make demo` first (it writes demo-out/encoder.safetensors)"
        )
    per_class, epochs = (20, 1.0) if args.quick else (args.per_class, args.epochs)

    started = time.perf_counter()
    info = _common.machine()
    env = {**os.environ, **_common.pin_threads(info["cores_usable"])}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "rspretrain"]
    split, _ = run(
        [*py, "split", str(args.data), "--protocol", "eurosat-80", "--max-per-class", str(per_class)]
        + ["--out", str(work / "split"), "--json"],
        env,
    )
    mae = mae_format_checkpoint(work / "mae-format-random.pth", 128)
    encoders = {
        "make demo encoder (pretrained)": [str(args.weights)],
        "same encoder, random init": [str(args.weights), "--random-init"],
        "MAE-format .pth, random weights": [str(mae)],
    }
    data = ["--train", split["train"], "--val", split["val"], "--quiet", "--json"]
    extra = ["--epochs", str(epochs)] if epochs is not None else []
    rows, runs = [], {}
    for name, weights in encoders.items():
        tag = name.split()[0].lower().strip(",")
        probe, probe_m = run(
            [
                *py,
                "probe",
                *weights,
                *data,
                "--img-size",
                str(IMG_SIZE),
                "--json-out",
                str(work / f"{tag}-probe.json"),
            ],
            env,
        )
        lp, lp_m = run(
            [*py, "linprobe", *weights, "-c", LINPROBE, *data, *extra, "--out", str(work / f"{tag}-lp")], env
        )
        ft, ft_m = run(
            [*py, "finetune", *weights, "-c", FINETUNE, *data, *extra, "--out", str(work / f"{tag}-ft")], env
        )
        runs[name] = {
            "probe": probe | {"wall_s": probe_m.wall_s, "cpu_s": probe_m.cpu_s},
            "linprobe": {
                k: lp[k] for k in ("top1", "top5", "epochs", "seconds_per_epoch", "weights", "model")
            }
            | {"wall_s": lp_m.wall_s, "cpu_s": lp_m.cpu_s},
            "finetune": {
                k: ft[k] for k in ("top1", "top5", "epochs", "seconds_per_epoch", "weights", "model")
            }
            | {"wall_s": ft_m.wall_s, "cpu_s": ft_m.cpu_s},
        }
        rows.append(
            {
                "encoder": name,
                "k-NN": f"{100 * probe['knn_top1']:.1f}",
                "logistic": f"{100 * probe['linear_top1']:.1f}",
                "MAE linear probe": f"{100 * lp['top1']:.1f}",
                "fine-tune": f"{100 * ft['top1']:.1f}",
                "lin. probe s/epoch (wall / CPU)": f"{lp['seconds_per_epoch']:.0f} / {lp_m.cpu_s / lp['epochs']:.0f}",
                "fine-tune s/epoch (wall / CPU)": f"{ft['seconds_per_epoch']:.0f} / {ft_m.cpu_s / ft['epochs']:.0f}",
            }
        )
    sections = [
        f"EuroSAT RGB, {split['train_images']} train / {split['val_images']} val chips ({per_class} per class, "
        f"seeded 80/20 split, sha256 {split['val_sha256'][:12]}... of val.txt), {IMG_SIZE} px, ViT-Tiny/16. "
        "Top-1 in % on val, of the last evaluation. k-NN (k=20) and logistic regression: `rspretrain probe` "
        f"on frozen mean-pooled features. MAE linear probe: `rspretrain linprobe -c {LINPROBE}`. Fine-tune: "
        f"`rspretrain finetune -c {FINETUNE}` (the MAE recipe at batch 64). {ft['epochs']:g} epochs each. "
        "Chance: 10%.",
        "",
        _common.markdown_table(rows, list(rows[0])),
        "",
        "Seconds per epoch: wall from the run's own clock (training steps only), CPU from the whole process "
        "(workers, evaluations and start-up included) over its epochs. The make demo encoder is 100 CPU steps "
        "of SelectiveMAE on the synthetic demo corpus at 128 px (its position embedding is resampled to 64 px); "
        "the random-init rows start from the init that run started from. Short schedules on a small subset: "
        "they check the pipeline and compare encoders at equal cost, not the paper's protocol "
        "(`make finetune-aid` and the others run that, on a GPU).",
        "",
        f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
    ]
    text = _common.report("Evaluating an encoder on CPU (EuroSAT)", sections, info)
    print(text)
    _common.write_json(args.json, {"split": split, "runs": runs, "rows": rows, "machine": info})


if __name__ == "__main__":
    main()
