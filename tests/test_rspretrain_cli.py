"""The rspretrain command line: train -> export smoke test, resume, exit code 2 for user errors, bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shards import tiny_set_flags, torch_threads, write_shards
from typer.testing import CliRunner

from rspretrain import checkpoint as ckpt
from rspretrain.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-shards")
    write_shards(folder, shards=2, per_shard=6, size=64, corrupt=[(0, 2)])
    return folder


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_train_then_export(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("train: {batch_size: 4, log_every: 1}\noptim: {blr: 1.0e-3}\n")
    result = invoke(
        "train",
        "--shards",
        shards,
        "--out",
        run,
        "--config",
        config,
        "--batch-size",
        2,
        "--steps",
        3,
        "--samples-per-epoch",
        8,
        "--json",
        *tiny_set_flags(),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 3 and summary["checkpoint"].endswith("step-000000003.pt")
    assert summary["global_batch"] == 2  # the flag beat the YAML file
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["train"]["batch_size"] == 2 and resolved["optim"]["blr"] == 1e-3
    assert resolved["data"]["samples_per_epoch"] == 8
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    out = tmp_path / "encoder.safetensors"
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert "timm.create_model('vit_tiny_patch16_224'" in result.stdout and "strict=True" in result.stdout

    result = invoke("train", "--out", run, "--resume", "--steps", 5, "--json")  # extends the finished run
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 5
    assert ckpt.list_checkpoints(run)[0].name == "step-000000005.pt"


def test_corrupt_sample_is_counted_in_the_log(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--shards",
        shards,
        "--out",
        run,
        "--batch-size",
        11,
        "--steps",
        1,
        "--no-resampled",
        "--shuffle-buffer",
        1,
        "--quiet",
        *tiny_set_flags(),
    )
    assert result.exit_code == 0, result.output
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["skipped"] == 1  # 12 samples, one garbage .jpg: 11 decoded, 1 skipped


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.bach_size=2"], "unknown key 'train.bach_size'"),
        (["--set", "optim.blr=fast"], "optim.blr: expected a number"),
        (["--steps", 2, "--epochs", 1], "set only one of"),
        (["--shards", "/nonexistent/shard-{0..3}.tar"], "does not exist"),
        (["--arch", "vit_gigantic"], "model.arch"),
    ],
)
def test_user_errors_exit_2_with_one_line(shards: Path, tmp_path: Path, args: list, message: str) -> None:
    base = ["train", "--out", tmp_path / "run", "--steps", 1, "--quiet"]
    if "--shards" not in args:
        base += ["--shards", shards]
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_refuses_to_overwrite_a_run_and_reports_bad_checkpoints(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        invoke(
            "train", "--shards", shards, "--out", run, "--steps", 1, "--quiet", *tiny_set_flags()
        ).exit_code
        == 0
    )
    result = invoke("train", "--shards", shards, "--out", run, "--steps", 1, "--quiet", *tiny_set_flags())
    assert result.exit_code == 2 and "--resume" in result.stderr
    only = ckpt.list_checkpoints(run)[0]
    only.write_bytes(b"garbage")
    result = invoke("train", "--out", run, "--resume", "--steps", 2, "--quiet")
    assert result.exit_code == 2 and str(only) in result.stderr
    result = invoke("export", tmp_path / "nowhere", "--out", tmp_path / "e.safetensors")
    assert result.exit_code == 2 and "nowhere" in result.stderr
    result = invoke("train", "--out", run, "--resume", "--steps", 2, "--quiet", "--debug")
    assert result.exit_code != 0 and isinstance(
        result.exception, ckpt.CheckpointError
    )  # --debug: the real error


def test_bench_prints_both_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from rspretrain import cli

    result = invoke(
        "bench",
        "--arch",
        "vit_tiny_patch16",
        "--img-size",
        64,
        "--batch-size",
        2,
        "--steps",
        1,
        "--warmup",
        0,
        "--threads",
        1,
        "--decoder-depth",
        1,
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mae"]["ms_per_step"] > 0 and data["selectivemae"]["ms_per_step"] > 0
    assert data["flop_ratio"] > 1
    console = Console(record=True, width=100)
    monkeypatch.setattr(cli, "out_console", console)
    cli._print_bench(data)
    text = console.export_text()
    assert "selectivemae" in text and "mae" in text and "FLOP ratio" in text and "MFU" not in text
    assert invoke("bench", "--dtype", "float16").exit_code == 2


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rspretrain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for command in ("train", "export", "bench"):
        assert command in done.stdout
