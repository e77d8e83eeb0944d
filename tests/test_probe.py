"""rspretrain probe: k-NN and linear probe on a frozen encoder, and what pretraining buys over random init.

The labelled set is generated: four classes of images whose brightness ramps across the image in one of four
directions (0, 90, 180, 270 degrees, jittered), under strong pixel noise and a random brightness offset. The
class signal is smooth and spread over every patch; the noise is not predictable. A MAE reconstructing masked
patches must carry the smooth part and cannot use the noise, so even a short pretraining on unlabelled images
of the same kind raises the signal in the features over the noise, while a random encoder projects both alike.
Measured over seeds 0-7 (60 steps): linear top-1 pretrained 0.93-0.99 vs random 0.73-0.85, a gap of at least
0.087; the test's seed gives 0.975 vs 0.85. k-NN on the raw features does not gain this quickly (the brightness
offset dominates the cosine of both encoders), so the margin is asserted on the linear probe.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from _shards import tiny_config, torch_threads
from PIL import Image
from typer.testing import CliRunner

from rscurate.sample import encode_metadata, make_key
from rspretrain.cli import app
from rspretrain.export import export_encoder
from rspretrain.probe import (
    ProbeConfig,
    accuracy,
    default_json_path,
    fit_linear,
    knn_predict,
    load_encoder,
    run_probe,
)
from rspretrain.train import train

CLASSES = 4
SIZE = 64
SEED = 0
MARGIN = 0.05  # the smallest gap over seeds 0-7 was 0.087


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def ramp_image(rng: np.random.Generator, cls: int, size: int = SIZE) -> Image.Image:
    """A brightness ramp in direction cls * 90 degrees (jittered), random offset, heavy pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    theta = 2 * np.pi * cls / CLASSES + rng.normal(0, 0.15)
    ramp = np.cos(theta) * xx + np.sin(theta) * yy  # (size, size) in about [-0.7, 0.7]
    base = 128 + rng.uniform(-28, 28) + rng.normal(0, 8, 3)  # brightness and a slight tint
    arr = base + 90 * ramp[..., None] + rng.normal(0, 60, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        folder = root / f"ramp{c * 90:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ramp_image(rng, c).save(folder / f"{i:03d}.png")
    return root


def write_unlabelled_shards(folder: Path, n: int, seed: int) -> Path:
    """n ramp images of random classes as one shard, through the rscurate sample contract."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(folder / "ramps-000000.tar")) as sink:
        for i in range(n):
            buf = io.BytesIO()
            ramp_image(rng, int(rng.integers(CLASSES)), 80).save(buf, format="PNG")
            meta = {"source": "ramps", "path": "ramps.png", "x": i * 80, "y": 0, "width": 80, "height": 80}
            meta |= {"phash": "0" * 16, "task": "test"}
            sink.write(
                {
                    "__key__": make_key("ramps", "s", i * 80, 0),
                    "png": buf.getvalue(),
                    "json": encode_metadata(meta),
                }
            )
    (folder / "sizes.json").write_text(json.dumps({"ramps-000000.tar": n}))
    return folder


@pytest.fixture(scope="module")
def ramps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labelled train/val folders and a tiny MAE pretrained for 60 steps on unlabelled ramp shards."""
    root = tmp_path_factory.mktemp("ramps")
    train_dir = write_image_folder(root / "train", 24, SEED)
    val_dir = write_image_folder(root / "val", 40, SEED + 100)
    shards = write_unlabelled_shards(root / "shards", 256, SEED + 200)
    cfg = tiny_config(
        root / "run",
        {
            "model.method": "mae",
            "train.steps": 60,
            "train.batch_size": 32,
            "train.seed": SEED,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 5,
            "data.shards": [str(shards)],
            "data.crop_scale": [0.5, 1.0],
            "train.checkpoint_every": 1000,
            "train.log_every": 60,
        },
    )
    with torch_threads(1):
        train(cfg)
    return {"train": train_dir, "val": val_dir, "run": root / "run"}


def test_pretrained_encoder_beats_random_init(ramps: dict[str, Path], tmp_path: Path) -> None:
    pre = run_probe(ramps["run"], ramps["train"], ramps["val"], json_out=tmp_path / "pre.json")
    rnd = run_probe(
        ramps["run"], ramps["train"], ramps["val"], random_init=True, json_out=tmp_path / "rnd.json"
    )
    for r in (pre, rnd):
        assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
        assert (r["train_images"], r["val_images"], r["classes"], r["feature_dim"]) == (96, 160, 4, 64)
    assert pre["step"] == 60 and pre["method"] == "mae" and not pre["random_init"]
    assert rnd["step"] is None and rnd["random_init"]
    assert pre["linear_top1"] >= rnd["linear_top1"] + MARGIN, (pre, rnd)
    assert rnd["linear_top1"] > 0.5 and rnd["knn_top1"] > 1 / CLASSES  # a real signal, not a broken baseline
    saved = json.loads((tmp_path / "pre.json").read_text())
    assert saved["linear_top1"] == pre["linear_top1"] and saved["class_names"][1] == "ramp090"


def test_export_and_checkpoint_give_the_same_probe(ramps: dict[str, Path], tmp_path: Path) -> None:
    exported = export_encoder(ramps["run"], tmp_path / "enc.safetensors")
    from_ckpt, from_export = load_encoder(ramps["run"]), load_encoder(exported.path)
    assert (from_export.model.arch, from_export.model.img_size, from_export.step) == (
        "vit_tiny_patch16",
        64,
        60,
    )
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(from_ckpt.module(x), from_export.module(x))
    # the random baseline is the init the run started from, whichever file it is read from
    r1 = load_encoder(ramps["run"], random_init=True).module.state_dict()
    r2 = load_encoder(exported.path, random_init=True).module.state_dict()
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert not torch.equal(
        r1["patch_embed.proj.weight"], from_ckpt.module.state_dict()["patch_embed.proj.weight"]
    )


def test_separable_features_score_one_and_accuracy_is_a_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 10  # (K, D)
    labels = torch.arange(3).repeat_interleave(30)  # (M,)
    feats = centres[labels] + torch.randn(90, 16, generator=g)  # (M, D)
    q_labels = torch.arange(3).repeat_interleave(10)
    queries = centres[q_labels] + torch.randn(30, 16, generator=g)
    assert accuracy(knn_predict(feats, labels, queries, 3, k=20), q_labels) == 1.0
    probe = fit_linear(feats, labels, 3)
    assert accuracy(probe.predict(queries), q_labels) == 1.0
    assert accuracy(probe.predict(feats), labels) == 1.0
    shuffled = q_labels[torch.randperm(30, generator=g)]
    assert 0.0 <= accuracy(probe.predict(queries), shuffled) < 1.0
    # k larger than the training set is clipped, a constant feature does not blow up the standardisation
    assert accuracy(knn_predict(feats[:5], labels[:5], queries, 3, k=50), q_labels) >= 0.0
    const = torch.cat([feats, torch.ones(90, 1)], dim=1)
    assert torch.isfinite(fit_linear(const, labels, 3).weight).all()


def solid_colour_folder(root: Path, per_class: int) -> Path:
    """Three classes of flat red, green, blue images with slight noise: separable by any encoder."""
    rng = np.random.default_rng(1)
    for name, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.asarray(colour, dtype=np.float64) + rng.normal(0, 10, (40, 48, 3))  # non-square: crop
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


def test_cli_random_init_without_weights_on_a_separable_toy(tmp_path: Path, monkeypatch) -> None:
    train_dir = solid_colour_folder(tmp_path / "train", 6)
    val_dir = solid_colour_folder(tmp_path / "val", 3)
    monkeypatch.chdir(tmp_path)
    args = ["probe", "--random-init", "--arch", "vit_tiny_patch16", "--img-size", "32"]
    args += ["--train", str(train_dir), "--val", str(val_dir), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["knn_top1"] == 1.0 and summary["linear_top1"] == 1.0
    assert summary["probe"]["k"] == 18  # k=20 clipped to the 18 training images
    written = tmp_path / "probe-random-vit_tiny_patch16-32.json"  # the documented default
    assert Path(summary["json"]) == Path("probe-random-vit_tiny_patch16-32.json") and written.is_file()
    table = CliRunner().invoke(app, [*args, "--json-out", str(tmp_path / "t.json")])
    assert table.exit_code == 0 and "linear top-1" in table.stdout and "100.00 %" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random-init"], "needs --arch and --img-size"),
        ([], "give WEIGHTS"),
        (["--random-init", "--arch", "vit_tiny_patch16", "--img-size", "32", "--pool", "max"], "--pool"),
        (["nowhere.pt"], "no such checkpoint file"),
        (["nowhere.safetensors"], "no such file"),
    ],
)
def test_cli_user_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    train_dir = solid_colour_folder(tmp_path / "train", 1)
    result = CliRunner().invoke(app, ["probe", *args, "--train", str(train_dir), "--val", str(train_dir)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_val_classes_must_exist_in_train(tmp_path: Path) -> None:
    train_dir = solid_colour_folder(tmp_path / "train", 1)
    val_dir = solid_colour_folder(tmp_path / "val", 1)
    (val_dir / "purple").mkdir()
    Image.new("RGB", (8, 8), (120, 0, 120)).save(val_dir / "purple" / "0.png")
    args = ["probe", "--random-init", "--arch", "vit_tiny_patch16", "--img-size", "32", "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--train", str(train_dir), "--val", str(val_dir), "--quiet"])
    assert result.exit_code == 2 and "purple" in result.stderr


def test_default_json_paths(tmp_path: Path) -> None:
    cfg = ProbeConfig()
    cfg.validate()
    model = load_encoder(None, random_init=True, arch="vit_tiny_patch16", img_size=32).model
    assert default_json_path(tmp_path / "enc.safetensors", False, model) == tmp_path / "enc.probe.json"
    assert default_json_path(tmp_path / "step-1.pt", True, model) == tmp_path / "step-1.probe-random.json"
    assert default_json_path(tmp_path, False, model) == tmp_path / "probe.json"
