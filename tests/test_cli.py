"""The command line: exit codes (0 ok, 1 verify mismatch, 2 user error), messages, summaries, JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml
from conftest import MINI_EXPECTED, MINI_RECIPE
from typer.testing import CliRunner

from rscurate.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_bad_recipe_exits_2_naming_the_key(mini_recipe: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINI_RECIPE, "slice": {"tile_sise": 256}}))
    result = invoke("run", bad, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "slice.tile_sise" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    missing = invoke("scan", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert missing.exit_code == 2 and "recipe file not found" in missing.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from rscurate.recipe import RecipeError

    result = runner.invoke(
        app, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out"), "--debug"]
    )
    assert isinstance(result.exception, RecipeError)


def test_other_recipe_into_the_same_out_exits_2(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path
) -> None:
    other = mini_recipe.parent / "other.yaml"
    other.write_text(yaml.safe_dump({**MINI_RECIPE, "dedup": {"max_distance": 2}}))
    result = invoke("run", other, "--out", mini_curated)
    assert result.exit_code == 2
    assert "different recipe" in result.output and "dedup" in result.output


def test_run_single_pass_then_resume_with_json(mini_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("hash", mini_recipe, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "running scan, exclude, slice first" in result.output
    assert "Passes" in result.output and "hash" in result.output

    result = invoke("run", mini_recipe, "--out", out, "--workers", "1", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["kept"] == MINI_EXPECTED["kept"] and stats["shards"] == MINI_EXPECTED["shards"]
    assert stats == json.loads((out / "stats.json").read_text())

    again = invoke("run", mini_recipe, "--out", out)
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_stats_command(mini_curated: Path, tmp_path: Path) -> None:
    result = invoke("stats", mini_curated)
    assert result.exit_code == 0
    for word in (
        "Inputs",
        "Tiles",
        "Reasons",
        "exact_duplicate",
        "alpha",
        "beta",
        f"kept {MINI_EXPECTED['kept']}",
    ):
        assert word in result.output
    as_json = invoke("stats", mini_curated, "--json")
    assert json.loads(as_json.stdout)["tiles"]["by_status"]["duplicate"] == MINI_EXPECTED["duplicate"]
    empty = invoke("stats", tmp_path)
    assert empty.exit_code == 2 and "stats.json not found" in empty.output


def test_verify_exit_codes(mini_curated: Path, tmp_path: Path) -> None:
    ok = invoke("verify", mini_curated, "--workers", "1")
    assert ok.exit_code == 0 and f"{MINI_EXPECTED['kept']} samples" in ok.output

    out = tmp_path / "out"
    shutil.copytree(mini_curated, out)
    victim = out / "shards" / "mini-000001.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members[2:]:  # drop the first sample
            tar.addfile(m, __import__("io").BytesIO(data))
    bad = invoke("verify", out, "--workers", "1", "--json")
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert not report["ok"] and any("missing" in p for p in report["problems"])

    nothing = invoke("verify", tmp_path / "nowhere")
    assert nothing.exit_code == 2


def test_synth_command_prints_how_to_curate(tmp_path: Path) -> None:
    result = invoke("synth", tmp_path / "demo", "--chips", "8", "--large-side", "1024", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "recipe.yaml").exists()
    assert f"rscurate run {tmp_path / 'demo' / 'recipe.yaml'} --out" in result.output
    bad = invoke("synth", tmp_path / "demo2", "--chips", "2")
    assert bad.exit_code == 2 and "n_chips" in bad.output


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rscurate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("run", "scan", "exclude", "slice", "hash", "dedup", "shard", "stats", "verify", "synth"):
        assert command in result.stdout


def test_allow_missing_leaves_out_a_missing_source(mini_recipe: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    sources = [{**s, "root": str(mini_recipe.parent / s["root"])} for s in MINI_RECIPE["sources"]]
    sources.append({"name": "gone", "root": str(tmp_path / "not-downloaded")})
    bench = [{**b, "root": str(mini_recipe.parent / b["root"])} for b in MINI_RECIPE["benchmarks"]]
    recipe.write_text(yaml.safe_dump({**MINI_RECIPE, "sources": sources, "benchmarks": bench}))
    refused = invoke("scan", recipe, "--out", tmp_path / "a")
    assert refused.exit_code == 2 and "sources[2].root" in refused.output
    result = invoke("scan", recipe, "--out", tmp_path / "b", "--allow-missing", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "left out" in result.output and "gone" in result.output
