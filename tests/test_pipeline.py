"""The pipeline: pass order and decisions, persistence and resume, determinism across workers, the executor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import MINI_EXPECTED, MINI_RECIPE, output_files, write_mini_corpus

from rscurate import pipeline, shard
from rscurate.recipe import load_recipe, recipe_from_dict

SMALL_PARTITIONS = 60_000  # pixels: the mini corpus then slices in several partitions


def ran(out: Path, since: int = 0) -> list[str]:
    return [r["pass"] for r in pipeline.read_log(out)[since:] if r["event"] == "ran"]


def test_mini_corpus_decisions(mini_curated: Path) -> None:
    inputs = pd.read_parquet(mini_curated / "inputs.parquet")
    tiles = pd.read_parquet(mini_curated / "tiles.parquet")
    by_rel = inputs.set_index("relpath")
    assert len(inputs) == MINI_EXPECTED["inputs"]
    assert by_rel.loc["broken.png", "status"] == "error" and by_rel.loc["broken.png", "reason"].startswith(
        "unreadable: "
    )
    assert by_rel.loc["copy_a00.png", "reason"] == "exact_duplicate"
    assert by_rel.loc["tiny.png", "reason"] == "too_small"
    assert by_rel.loc["flat.png", "reason"] == "blank"  # decided by slicing from pixels
    assert by_rel.loc["a02.png", "reason"] == "benchmark"  # scene pHash near bench/leak_a02.png
    assert by_rel.loc["a02.png", "benchmark_match"].endswith("leak_a02.png")

    assert (tiles["status"] == "kept").sum() == MINI_EXPECTED["kept"]
    near = tiles[tiles["relpath"] == "near_a01.jpg"].iloc[0]
    a01 = tiles[tiles["relpath"] == "a01.png"].iloc[0]
    assert (near["status"], near["duplicate_of"]) == ("duplicate", a01["key"])
    assert tiles.loc[tiles["relpath"] == "a02.png", "reason"].tolist() == ["benchmark"]
    assert len(tiles[tiles["relpath"] == "big.png"]) == 9
    # Final tables are sorted, with absolute paths plus relpath; only ok inputs have tiles.
    assert list(tiles["key"]) == sorted(tiles["key"])
    assert inputs["path"].map(os.path.isabs).all() and tiles["path"].map(os.path.isabs).all()
    assert set(tiles["path"]) <= set(inputs.loc[inputs["status"] != "error", "path"])


def test_stats_match_the_tables(mini_curated: Path) -> None:
    stats = json.loads((mini_curated / "stats.json").read_text())
    inputs = pd.read_parquet(mini_curated / "inputs.parquet")
    tiles = pd.read_parquet(mini_curated / "tiles.parquet")
    sizes = json.loads((mini_curated / "shards" / "sizes.json").read_text())
    assert stats["inputs"]["by_status"] == {
        s: int((inputs["status"] == s).sum()) for s in pipeline.INPUT_STATUSES
    }
    assert stats["tiles"]["by_status"] == {
        s: int((tiles["status"] == s).sum()) for s in pipeline.TILE_STATUSES
    }
    assert stats["inputs"]["by_reason"] == MINI_EXPECTED["by_reason"]
    assert stats["kept"] == sum(sizes.values()) == MINI_EXPECTED["kept"]
    assert stats["shards"] == len(sizes) == MINI_EXPECTED["shards"]
    assert stats["inputs"]["by_source"]["beta"] == {"total": 7, "ok": 4, "excluded": 3, "error": 0}
    # Per pass: what each pass decided.
    assert stats["passes"]["exclude"]["inputs"] == {
        "error:unreadable": 1,
        "excluded:exact_duplicate": 1,
        "excluded:too_small": 1,
    }
    assert stats["passes"]["slice"]["inputs"] == {"excluded:blank": 1}
    assert stats["passes"]["hash"]["inputs"] == {"excluded:benchmark": 1}
    assert stats["passes"]["dedup"]["tiles"] == {"duplicate": 1}
    assert stats["passes"]["shard"] == {"samples": 18, "shards": 5}
    assert shard.verify(mini_curated).ok


def test_workers_and_partitioning_do_not_change_the_bytes(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    pipeline.run(load_recipe(mini_recipe), out, workers=2, partition_pixels=SMALL_PARTITIONS)
    assert len(list((out / "_work" / "slice").glob("part-*.scenes.parquet"))) > 3
    assert output_files(out) == output_files(mini_curated)


def test_resume_redoes_only_what_is_missing(mini_recipe: Path, mini_curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(mini_curated, out)
    recipe = load_recipe(mini_recipe)
    reference = output_files(mini_curated)
    n = len(pipeline.read_log(out))

    # Everything finished: nothing runs.
    result = pipeline.run(recipe, out, workers=1)
    assert not any(r.ran for r in result.passes) and ran(out, n) == []

    # The last pass output of dedup gone: dedup and shard rerun; every tar is still current and kept.
    tars = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    (out / "_work" / "dedup.tiles.parquet").unlink()
    assert pipeline.pending(out) == ["dedup", "shard"]
    result = pipeline.run(recipe, out, workers=1)
    assert ran(out, n) == ["dedup", "shard"]
    assert result.passes[-1].detail == "0 shards written, 5 reused"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == tars
    assert output_files(out) == reference

    # One shard gone: only the shard pass runs, and writes only that tar.
    n = len(pipeline.read_log(out))
    (out / "shards" / "mini-000002.tar").unlink()
    result = pipeline.run(recipe, out, workers=1)
    assert ran(out, n) == ["shard"] and result.passes[-1].detail == "1 shards written, 4 reused"
    assert output_files(out) == reference


def test_crash_then_rerun_gives_identical_outputs(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = load_recipe(mini_recipe)
    out = tmp_path / "out"
    real_slice, real_write = pipeline._slice_partition, shard.write_shard
    calls = {"slice": 0, "write": 0}

    def crash_on_third_partition(task):
        calls["slice"] += 1
        if calls["slice"] == 3:
            raise KeyboardInterrupt
        return real_slice(task)

    monkeypatch.setattr(pipeline, "_slice_partition", crash_on_third_partition)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, out, workers=1, partition_pixels=SMALL_PARTITIONS)
    assert len(list((out / "_work" / "slice").glob("part-*.scenes.parquet"))) == 2
    assert not (out / "_work" / "slice.done.json").exists()

    def crash_in_second_shard(path, samples):
        calls["write"] += 1
        if calls["write"] == 2:

            def half():
                yield next(iter(samples))
                raise KeyboardInterrupt

            return real_write(path, half())
        return real_write(path, samples)

    monkeypatch.setattr(pipeline, "_slice_partition", real_slice)
    monkeypatch.setattr(shard, "write_shard", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, out, workers=1, partition_pixels=SMALL_PARTITIONS)
    slice_runs = [r for r in pipeline.read_log(out) if r["pass"] == "slice"]
    assert len(slice_runs) == 1 and slice_runs[0]["detail"].endswith("partitions sliced, 2 reused")
    assert [p.name for p in (out / "shards").iterdir()] == ["mini-000000.tar"]  # no partial tar, no temporary
    # A killed process leaves temporary files behind; they must not matter.
    (out / "shards" / "mini-000003.tar.tmp").write_bytes(b"partial")
    (out / "_work" / "hash.tiles.parquet.tmp").write_bytes(b"partial")

    monkeypatch.setattr(shard, "write_shard", real_write)
    result = pipeline.run(recipe, out, workers=1, partition_pixels=SMALL_PARTITIONS)
    assert [r.name for r in result.passes if r.ran] == ["shard"]
    assert result.passes[-1].detail == "4 shards written, 1 reused"
    assert output_files(out) == output_files(mini_curated)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_outputs(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; from rscurate import pipeline; from rscurate.recipe import load_recipe; "
        f"pipeline.run(load_recipe(sys.argv[1]), sys.argv[2], workers=2, partition_pixels={SMALL_PARTITIONS // 4})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(mini_recipe), str(out)], start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "_work" / "slice").glob("part-*.scenes.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the pool's workers die too
    proc.wait()
    assert not (out / "_work" / "slice.done.json").exists()
    pipeline.run(load_recipe(mini_recipe), out, workers=1)
    assert output_files(out) == output_files(mini_curated)


def test_single_pass_runs_what_it_needs_and_force_redoes(mini_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(mini_recipe)
    out = tmp_path / "out"
    assert pipeline.pending(out, "slice") == ["scan", "exclude", "slice"]
    result = pipeline.run(recipe, out, until="slice", workers=1)
    assert [r.name for r in result.passes] == ["scan", "exclude", "slice"] and all(
        r.ran for r in result.passes
    )
    assert not (out / "tiles.parquet").exists() and (out / "_work" / "slice.tiles.parquet").exists()
    assert result.stats["tiles"]["by_status"]["kept"] == 20 and result.stats["kept"] == 0

    n = len(pipeline.read_log(out))
    pipeline.run(recipe, out, until="exclude", workers=1, force=True)
    assert ran(out, n) == ["exclude"]
    assert pipeline.pending(out, "slice") == ["slice"]  # forcing exclude made slice out of date
    result = pipeline.run(recipe, out, until="slice", workers=1)
    assert result.passes[-1].detail.endswith("0 partitions sliced, 1 reused")  # its part is still current


def test_refuses_an_output_folder_of_another_recipe(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path
) -> None:
    other = recipe_from_dict(
        {**MINI_RECIPE, "shard": {"max_samples": 5}}, base_dir=mini_recipe.parent, where="other.yaml"
    )
    with pytest.raises(pipeline.OutputError, match=r"different recipe \(they differ in: shard\)"):
        pipeline.run(other, mini_curated, workers=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(pipeline.OutputError, match="not empty"):
        pipeline.run(load_recipe(mini_recipe), foreign, workers=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_empty_corpus_gives_empty_outputs(tmp_path: Path) -> None:
    recipe_path = write_mini_corpus(tmp_path / "corpus")
    for p in (tmp_path / "corpus" / "alpha").rglob("*.*"):
        p.unlink()
    for p in (tmp_path / "corpus" / "beta").glob("*"):
        p.unlink()
    result = pipeline.run(load_recipe(recipe_path), tmp_path / "out", workers=1)
    assert result.complete and result.stats["kept"] == 0 and result.stats["shards"] == 0
    assert json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text()) == {}
    assert shard.verify(tmp_path / "out").ok


def test_process_executor_keeps_order_and_pins_threads() -> None:
    before = {k: os.environ.get(k) for k in pipeline.THREAD_ENV}
    with pipeline.make_executor(2) as ex:
        assert isinstance(ex, pipeline.ProcessExecutor)
        assert list(ex.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        names = list(pipeline.THREAD_ENV)
        assert list(ex.map(os.getenv, names)) == ["1"] * len(names)
    assert {k: os.environ.get(k) for k in pipeline.THREAD_ENV} == before  # this process is left as it was
    assert isinstance(pipeline.make_executor(1), pipeline.SerialExecutor)


def test_partitions_are_fixed_by_rows_not_workers() -> None:
    df = pd.DataFrame({"width": [100, 100, 300, 50, 50, 50], "height": [100, 100, 300, 50, 50, 50]})
    parts = pipeline._partitions(df, max_pixels=20_000)
    assert [len(p) for p in parts] == [2, 1, 3]
    assert pd.concat(parts, ignore_index=True).equals(df)


def test_reason_codes() -> None:
    assert pipeline.reason_code("unreadable: truncated PNG") == "unreadable"
    assert pipeline.reason_code("benchmark") == "benchmark"
    assert pipeline.reason_code("symlink outside the source root (not followed)") is None
    assert pipeline.reason_code(None) is None and pipeline.reason_code(float("nan")) is None


def test_labels_per_distinct_pair_equal_row_by_row() -> None:
    """_labels works out each (status, reason) pair once; the labels are those of the row-by-row rule."""
    df = pd.DataFrame(
        {
            "status": ["ok", "excluded", "excluded", "error", "kept", "excluded", "duplicate", "ok"],
            "reason": [
                None,
                "blank",
                "benchmark",
                "unreadable: truncated PNG",
                float("nan"),
                pd.NA,
                "",
                "ok",
            ],
        }
    )
    expected = ["ok", "excluded:blank", "excluded:benchmark", "error:unreadable", "kept", "excluded"]
    expected += ["duplicate", "ok"]
    assert pipeline._labels(df) == pipeline._row_labels(df) == expected
    big = pd.concat([df] * 50, ignore_index=True).sample(frac=1.0, random_state=3)
    assert pipeline._labels(big) == pipeline._row_labels(big)
    assert pipeline._labels(df[["status"]]) == df["status"].tolist()
    assert pipeline._labels(df.iloc[0:0]) == []


def test_passes_parent_does_not_import_rasterio() -> None:
    """A pooled run's parent reads no pixels: importing the pass modules must not import rasterio (GDAL and
    boto3, half a second of serial CPU) or scipy.ndimage (the pixel checks'); the workers get them from the
    fork server's preload."""
    code = (
        "import sys, rscurate.cli, rscurate.pipeline, rscurate.scan, rscurate.exclude, rscurate.decontam, "
        "rscurate.slicing, rscurate.shard, rscurate.dedup; "
        "print('rasterio' in sys.modules, 'scipy.ndimage' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"
