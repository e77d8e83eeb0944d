"""rspretrain finetune / linprobe and the weights loader: a tiny ViT learns generated colour classes and real
EuroSAT chips, a run killed mid-epoch resumes to the uninterrupted result, official MAE- and SelectiveMAE-format
checkpoints load (built here from random weights), the position embedding resamples, the linear probe trains
only its head, layer decay follows MAE's formula, and user errors exit with code 2."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _shards import torch_threads
from PIL import Image
from typer.testing import CliRunner

from rspretrain import checkpoint as ckpt
from rspretrain.cli import app
from rspretrain.config import ConfigError
from rspretrain.finetune import build_classifier, build_optimizer, run_finetune
from rspretrain.finetune_config import load_finetune_config
from rspretrain.splits import write_split
from rspretrain.weights import WeightsError, load_weights, resize

COLOURS = [(200, 40, 40), (40, 180, 40), (40, 60, 200), (210, 200, 40)]
DEPTH = 2  # a vit_tiny_patch16 with two blocks: matches no preset, so --arch names its heads
FAST = {  # a tiny CPU run: 32 px, batch 16, one worker-less process
    "model.arch": "vit_tiny_patch16",
    "train.batch_size": 16,
    "train.device": "cpu",
    "data.workers": 0,
    "train.log_every": 1,
}
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Four classes of 32 px images: a dominant colour under a random brightness and heavy noise."""
    rng = np.random.default_rng(seed)
    for c, rgb in enumerate(COLOURS):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.array(rgb, float) * rng.uniform(0.6, 1.2) + rng.normal(0, 40, (32, 32, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def timm_encoder_state(img_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=DEPTH, num_classes=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def mae_checkpoint(path: Path, encoder: dict[str, torch.Tensor]) -> Path:
    """facebookresearch/mae's main_pretrain.py layout: encoder + decoder under timm names, and its args."""
    decoder = {
        "mask_token": torch.randn(1, 1, 64),
        "decoder_embed.weight": torch.randn(64, 192),
        "decoder_pos_embed": torch.randn(1, 5, 64),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(192, 64),
        "decoder_norm.weight": torch.ones(64),
        "decoder_pred.weight": torch.randn(768, 64),
    }
    args = argparse.Namespace(model="mae_vit_tiny_patch16", mask_ratio=0.75, blr=1.5e-4)
    torch.save({"model": {**encoder, **decoder}, "epoch": 799, "args": args}, path)
    return path


def selectivemae_checkpoint(path: Path, encoder: dict[str, torch.Tensor]) -> Path:
    """The SelectiveMAE reference's layout: its cross-attention decoder, token scorer and HOG buffers too."""
    extra = {
        "mask_token": torch.randn(1, 1, 64),
        "decoder_embed1.weight": torch.randn(64, 192),
        "decoder_pos_embed": torch.randn(1, 5, 64),
        "decoder_blocks.0.cross_attn.q.weight": torch.randn(64, 64),
        "decoder_norm.bias": torch.zeros(64),
        "decoder_pred.bias": torch.zeros(768),
        "pos_embed_probs": torch.zeros(1, 4, 192),
        "get_token_probs.0.norm1.weight": torch.ones(192),
        "get_token_probs_linear.weight": torch.randn(1, 192),
        "hog.weight_x": torch.randn(3, 1, 3, 3),
        "hog.gkern": torch.randn(16, 16),
    }
    torch.save({"model": {**encoder, **extra}, "epoch": 799}, path)
    return path


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colours")
    return {
        "train": colour_folder(root / "train", 24, 0),
        "val": colour_folder(root / "val", 10, 1),
        "mae": mae_checkpoint(root / "mae.pth", timm_encoder_state()),
    }


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_finetune_lowers_the_loss_and_beats_chance(colours: dict[str, Path], tmp_path: Path) -> None:
    # the MAE recipe as shipped (RandAugment, random erasing, mixup + cutmix, smoothing, layer decay), shortened
    run = tmp_path / "run"
    overrides = {**FAST, "train.epochs": 4, "optim.lr": 1e-3, "optim.warmup_steps": 3, "train.eval_every": 2}
    result = run_finetune(colours["mae"], colours["train"], colours["val"], run, overrides=overrides)
    losses = [r["loss"] for r in _records(run, "train")]
    assert len(losses) == 24  # 96 images, batch 16, 4 epochs
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6
    assert result["top1"] >= 0.75  # chance: 0.25; measured 1.0
    evals = _records(run, "eval")
    assert [e["epoch"] for e in evals] == [2.0, 4.0]
    assert result["top1"] == evals[-1]["top1"] and result["evaluated_at"]["step"] == 24  # the LAST evaluation
    assert result["evaluated_at"]["images"] == 40 and 0 <= result["top1"] <= result["top5"] <= 1
    assert "test_set_selection" not in result  # only with report_max
    assert result["weights"]["kind"] == "mae" and result["weights"]["dropped"] == {"mae decoder": 6}
    assert result["train_split"]["images"] == 96 and len(result["train_split"]["sha256"]) == 64
    assert result["model"] == {"arch": "vit_tiny_patch16", "img_size": 32, "pool": "avg"}
    assert result["seconds_per_epoch"] > 0 and result["epochs"] == 4.0
    assert json.loads((run / "result.json").read_text())["top1"] == result["top1"]
    assert (run / "tb").is_dir() and ckpt.list_checkpoints(run)[0].name == "step-000000024.pt"
    tuned = load_weights(run, arch="vit_tiny_patch16")  # a fine-tuned run is weights for the next evaluation
    assert tuned.kind == "classifier" and tuned.step == 24 and tuned.dropped == {"classifier head": 2}
    assert tuned.state is not None and "fc_norm.weight" in tuned.state and "head.weight" not in tuned.state


@pytest.mark.slow
def test_real_eurosat_chips(labeled_data: Path, tmp_path: Path) -> None:
    # 10 classes x 20 real 64 px chips, seeded 75/25 split; a plain recipe (crop + flip) at 32 px, 45 steps
    split = write_split(labeled_data, tmp_path / "split", train_ratio=0.75, max_per_class=20)
    assert (split.train_images, split.val_images) == (150, 50)
    encoder = mae_checkpoint(tmp_path / "mae.pth", timm_encoder_state())
    plain = {"augment.mixup": 0, "augment.cutmix": 0, "augment.auto_augment": None, "augment.re_prob": 0}
    plain |= {"augment.smoothing": 0, "optim.layer_decay": None, "augment.scale": [0.5, 1.0]}
    overrides = {
        **FAST,
        **plain,
        "model.img_size": 32,
        "train.epochs": 6,
        "optim.lr": 1e-3,
        "optim.warmup_epochs": 1,
    }
    result = run_finetune(encoder, split.train, split.val, tmp_path / "run", overrides=overrides)
    losses = [r["loss"] for r in _records(tmp_path / "run", "train")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert result["top1"] > 0.2  # chance: 0.1; measured 0.35
    assert result["weights"]["pos_embed_resampled_from"] is None and result["model"]["img_size"] == 32
    assert result["val_split"]["sha256"] == split.val_sha256 and result["val_split"]["layout"] == "split"


# ---------------------------------------------------------------------------------------------- resume


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def on_log(record: dict) -> None:
        if record["step"] == step:
            raise _Crash(f"killed at step {step}")

    return on_log


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(
    colours: dict[str, Path], tmp_path: Path
) -> None:
    # 6 steps per epoch, a checkpoint after each epoch and every 4 steps: killed after step 9, resumed from step 8,
    # mid-epoch, with a decoding worker where the first run had none (augmentation is seeded per image)
    flags = {
        **FAST,
        "train.epochs": 2,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 2,
        "train.checkpoint_every": 4,
    }
    flags |= {"train.eval_every": 1, "model.weights": str(colours["mae"])}
    flags |= {"data.train": str(colours["train"]), "data.val": str(colours["val"])}
    whole = load_finetune_config(None, {**flags, "train.out": str(tmp_path / "a")})
    want = run_finetune(colours["mae"], colours["train"], colours["val"], tmp_path / "a", overrides=flags)

    from rspretrain.finetune import finetune

    killed = load_finetune_config(None, {**flags, "train.out": str(tmp_path / "b")})
    with pytest.raises(_Crash):
        finetune(killed, on_log=_crash_at(9))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == [
        "step-000000008.pt",
        "step-000000006.pt",
    ]
    resumed = load_finetune_config(None, {**flags, "train.out": str(tmp_path / "b"), "data.workers": 1})
    got = finetune(resumed, resume=True)
    assert [r["step"] for r in _records(tmp_path / "b", "train")] == list(
        range(1, 13)
    )  # each step logged once
    for a, b in zip(_records(tmp_path / "a", "train"), _records(tmp_path / "b", "train"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), a["step"]
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert [e["top1"] for e in got["evaluations"]] == [e["top1"] for e in want["evaluations"]]
    end_a = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "a")[0])["model"]
    end_b = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "b")[0])["model"]
    for key, value in end_a.items():
        assert torch.allclose(value, end_b[key], atol=1e-6), key
    assert whole.train.out != resumed.train.out


# ---------------------------------------------------------------------------------------------- weights


def test_official_checkpoint_formats_load(tmp_path: Path) -> None:
    encoder = timm_encoder_state()
    mae = load_weights(mae_checkpoint(tmp_path / "mae.pth", encoder), arch="vit_tiny_patch16")
    sel = load_weights(selectivemae_checkpoint(tmp_path / "sel.pth", encoder), arch="vit_tiny_patch16")
    assert (mae.kind, mae.method, sel.kind, sel.method) == ("mae", "mae", "selectivemae", "selectivemae")
    assert sel.dropped == {"mae decoder": 6, "selectivemae token scorer": 5}
    for weights in (mae, sel):
        assert weights.state is not None and set(weights.state) == set(encoder)
        assert all(torch.equal(weights.state[k], v) for k, v in encoder.items())
        assert (weights.model.img_size, weights.model.depth, weights.model.embed_dim) == (32, DEPTH, None)
    # both build timm's classifier with every encoder tensor in place
    cfg = load_finetune_config(None, {"model.pool": "cls"})
    model = build_classifier(cfg, sel, num_classes=3)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.state_dict()["norm.weight"], encoder["norm.weight"])
    # a plain state dict of a standard preset needs no --arch
    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict()
    torch.save(full, tmp_path / "plain.pt")
    plain = load_weights(tmp_path / "plain.pt")
    assert (plain.kind, plain.model.arch, plain.model.img_size) == ("timm", "vit_tiny_patch16", 32)
    with pytest.raises(WeightsError, match="matches no preset; give --arch"):
        load_weights(tmp_path / "mae.pth")


def test_files_that_are_no_weights_say_what_they_hold(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pth")
    with pytest.raises(
        WeightsError, match=r"other\.pth: not a checkpoint we can read.*found \['epoch', 'lr'\]"
    ):
        load_weights(tmp_path / "other.pth")
    torch.save({"model": {"encoder.layer.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="neither a ViT encoder's nor a known head's"):
        load_weights(tmp_path / "foreign.pth")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        load_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def test_position_embedding_resamples_to_another_size(colours: dict[str, Path]) -> None:
    source = load_weights(colours["mae"], arch="vit_tiny_patch16")
    bigger = load_weights(colours["mae"], arch="vit_tiny_patch16", img_size=64)
    assert bigger.state is not None and source.state is not None
    assert source.state["pos_embed"].shape == (1, 5, 192) and bigger.state["pos_embed"].shape == (1, 17, 192)
    assert torch.equal(bigger.state["pos_embed"][:, 0], source.state["pos_embed"][:, 0])  # class token kept
    assert bigger.resampled_from == 32 and bigger.model.img_size == 64
    # a grid that is constant per channel stays constant after resampling
    flat = dict(source.state)
    flat["pos_embed"] = torch.cat([torch.zeros(1, 1, 192), torch.arange(192.0).expand(1, 4, 192)], dim=1)
    resized = resize(replace(source, state=flat), 48).state
    assert resized is not None
    assert torch.allclose(resized["pos_embed"][0, 1:], torch.arange(192.0).expand(9, 192), atol=1e-4)
    model = build_classifier(load_finetune_config(), bigger, num_classes=4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(WeightsError, match="multiple of the patch size 16"):
        load_weights(colours["mae"], arch="vit_tiny_patch16", img_size=40)


# ---------------------------------------------------------------------------------------------- protocols


def test_linprobe_trains_only_its_batchnorm_head(colours: dict[str, Path], tmp_path: Path) -> None:
    overrides = {**FAST, "train.epochs": 1, "optim.warmup_steps": 1}
    result = run_finetune(
        colours["mae"],
        colours["train"],
        colours["val"],
        tmp_path / "lp",
        protocol="linprobe",
        overrides=overrides,
    )
    assert result["protocol"] == "linprobe" and result["model"]["pool"] == "cls"
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "lp")[0])["model"]
    encoder = timm_encoder_state()
    for key, value in encoder.items():  # the encoder is frozen
        assert torch.equal(state[key], value), key
    assert "head.0.running_mean" in state and "head.0.weight" not in state  # BatchNorm1d(affine=False)
    assert state["head.1.weight"].std() > 0.005  # trained from N(0, 0.01)
    cfg = load_finetune_config(protocol="linprobe")
    assert (cfg.optim.opt, cfg.optim.blr, cfg.train.epochs, cfg.optim.warmup_epochs) == ("lars", 0.1, 90, 10)
    assert (cfg.augment.mixup, cfg.augment.auto_augment, cfg.train.batch_size) == (0.0, None, 512)


def test_finetune_defaults_and_layer_decay_follow_the_references(colours: dict[str, Path]) -> None:
    cfg = load_finetune_config()
    o, a = cfg.optim, cfg.augment
    assert (o.blr, o.layer_decay, o.weight_decay, o.min_lr, o.warmup_epochs) == (1e-3, 0.75, 0.05, 1e-6, 5)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.drop_path) == (1024, 100, 0.1)
    assert (a.auto_augment, a.re_prob, a.mixup, a.cutmix, a.smoothing) == (
        "rand-m9-mstd0.5-inc1",
        0.25,
        0.8,
        1.0,
        0.1,
    )
    weights = load_weights(colours["mae"], arch="vit_tiny_patch16")
    model = build_classifier(cfg, weights, num_classes=4)
    optimizer = build_optimizer(cfg, model, lr=1.0)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    layers = DEPTH + 1  # MAE's param_groups_lrd: embeddings 0, block i -> i + 1, the rest DEPTH + 1
    for name, p in model.named_parameters():
        layer = 0 if name.startswith(("cls_token", "pos_embed", "patch_embed")) else layers
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        assert scale[id(p)] == pytest.approx(0.75 ** (layers - layer)), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if no_decay else 0.05), name


def test_cli_finetune_and_user_errors(colours: dict[str, Path], tmp_path: Path) -> None:
    args = ["finetune", str(colours["mae"]), "--train", str(colours["train"]), "--val", str(colours["val"])]
    args += ["--arch", "vit_tiny_patch16", "--batch-size", "16", "--steps", "2", "--device", "cpu"]
    args += ["--workers", "0", "--auto-augment", "none", "--report-max", "--json"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["config"]["augment"]["auto_augment"] is None
    assert summary["test_set_selection"]["max_top1"] == summary["top1"]  # one evaluation: the same number
    assert "test set" in summary["test_set_selection"]["note"]
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert again.exit_code == 2 and "--resume" in again.stderr
    # --resume reads the run's saved config; a longer --steps extends the finished run
    longer = ["finetune", "--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--json"]
    extended = runner.invoke(app, longer)
    assert extended.exit_code == 0, extended.output
    assert json.loads(extended.stdout)["steps"] == 3
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [2, 3]  # logged at each run's end
    bad = tmp_path / "bad.pth"
    torch.save({"something": 1}, bad)
    cases = [
        ([*args[:1], str(bad), *args[2:]], "not a checkpoint we can read"),
        ([*args, "--batch-size", "500"], "fewer than one global batch"),
        ([*args, "--batch-size", "15"], "even batch size"),
        (
            [*args[:1], "--random-init", *args[2:]],
            "--random-init without WEIGHTS needs --arch and --img-size",
        ),
        ([*args, "--pool", "max"], "model.pool"),
    ]
    for case, message in cases:
        out = runner.invoke(app, [*case, "--out", str(tmp_path / "x")])
        assert out.exit_code == 2, (case, out.output)
        assert message in out.stderr and "Traceback" not in out.output, (case, out.stderr)


def test_shipped_evaluation_recipes_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    paper = load_finetune_config(root / "finetune_vitb_paper.yaml")
    assert (paper.model.pool, paper.model.img_size, paper.train.batch_size, paper.train.epochs) == (
        "cls",
        224,
        1024,
        100,
    )
    assert (paper.optim.blr, paper.optim.layer_decay, paper.optim.warmup_epochs) == (1e-3, 0.75, 5)
    cpu = load_finetune_config(root / "finetune_eurosat_cpu.yaml")
    assert (cpu.protocol, cpu.model.img_size, cpu.train.device) == ("finetune", 64, "cpu")
    probe = load_finetune_config(root / "linprobe_eurosat_cpu.yaml", protocol="linprobe")
    assert (probe.protocol, probe.optim.opt, probe.model.pool) == ("linprobe", "lars", "cls")
    with pytest.raises(ConfigError, match="run `rspretrain linprobe` instead"):
        load_finetune_config(root / "linprobe_eurosat_cpu.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.layer_decy'"):
        load_finetune_config(None, {"optim.layer_decy": 0.65})


def _rank_main(rank: int, port: int, flags: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from rspretrain.finetune import finetune

    finetune(load_finetune_config(None, flags))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process(colours: dict[str, Path], tmp_path: Path) -> None:
    # the same global batch of 16 as one process of 16 or two of 8; no mixup or drop path (per-rank RNG streams),
    # augmentation seeded per image: the same losses, and an evaluation shared between the ranks
    import socket

    import torch.multiprocessing as mp

    flags = {**FAST, "train.steps": 4, "optim.lr": 1e-3, "optim.warmup_steps": 1, "model.drop_path": 0.0}
    flags |= {"augment.mixup": 0.0, "augment.cutmix": 0.0, "model.weights": str(colours["mae"])}
    flags |= {"data.train": str(colours["train"]), "data.val": str(colours["val"])}
    one = run_finetune(colours["mae"], colours["train"], colours["val"], tmp_path / "one", overrides=flags)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two_flags = {**flags, "train.batch_size": 8, "train.out": str(tmp_path / "two")}
    mp.start_processes(_rank_main, args=(port, two_flags), nprocs=2, join=True, start_method="fork")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2 and two["global_batch"] == 16
    for a, b in zip(_records(tmp_path / "one", "train"), _records(tmp_path / "two", "train"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
    assert two["evaluated_at"]["images"] == 40  # every val image once, over both ranks
    assert two["top1"] == pytest.approx(one["top1"], abs=0.026)  # at most one image flips (gloo's sum order)
