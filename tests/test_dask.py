"""`--executor dask`: the same outputs as the local pool, byte for byte, even when a worker dies mid-task.

One LocalCluster (2 worker processes, 1 thread each) serves the module; the corpus is the synthetic one,
small, with small partitions and shards so that several of each are mapped over the workers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import yaml
from conftest import output_files
from typer.testing import CliRunner

from rscurate import executors, pipeline
from rscurate.cli import app
from rscurate.executors import DaskExecutor, ExecutorError, make_executor
from rscurate.recipe import load_recipe

pytest.importorskip("distributed")
pytestmark = pytest.mark.distributed

PARTITION_PIXELS = 2_000_000  # pixels: the corpus slices in several partitions
SLICE_TO_KILL = "part-00001-"  # the partition whose first attempt kills its worker


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rscurate.synth import synth

    path = synth(tmp_path_factory.mktemp("dask") / "corpus", n_chips=30, large_side=1200, seed=0)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["shard"]["max_samples"] = 16  # several shards, written by different workers
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(recipe_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every final file of a run on the local process pool."""
    out = tmp_path_factory.mktemp("local") / "out"
    pipeline.run(load_recipe(recipe_path), out, workers=2)
    files = output_files(out)
    assert len([f for f in files if f.endswith(".tar")]) >= 4
    return files


@pytest.fixture(scope="module")
def executor() -> DaskExecutor:
    with DaskExecutor(workers=2) as ex:
        yield ex


def test_dask_outputs_are_byte_identical_to_local(
    recipe_path: Path, reference: dict[str, bytes], executor: DaskExecutor, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = pipeline.run(load_recipe(recipe_path), out, executor=executor, partition_pixels=PARTITION_PIXELS)
    assert result.complete
    files = output_files(out)
    expected = {"inputs.parquet", "tiles.parquet", "stats.json", "shards/sizes.json", "shards/_info.json"}
    assert expected <= set(files)
    assert files == reference  # every final file, byte for byte
    assert executor.workers == 2
    assert {r["workers"] for r in pipeline.read_log(out) if r["event"] == "ran"} == {2}
    slice_dir = out / "_work" / "slice"
    assert len(list(slice_dir.glob("part-*.scenes.parquet"))) >= 3
    assert not [p.name for p in slice_dir.iterdir() if p.name.endswith(".tmp")]


def _die_once(marker_dir: str, task: pipeline._SliceTask) -> int:
    """Worker side: the first attempt at one partition leaves half a staged file and kills its process."""
    marker = Path(marker_dir) / task.name
    if task.name.startswith(SLICE_TO_KILL) and not marker.exists():
        marker.write_text(str(os.getpid()))
        Path(f"{task.data_file}.0badc0ffee.tmp").write_bytes(b"PAR1 half written")
        os._exit(1)
    return pipeline._slice_partition(task)


def test_a_worker_killed_mid_slice_loses_and_duplicates_nothing(
    recipe_path: Path,
    reference: dict[str, bytes],
    executor: DaskExecutor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    before = set(executor.client.scheduler_info()["workers"])
    # Pickled with its arguments and run on the workers, where pipeline._slice_partition is the real one.
    monkeypatch.setattr(pipeline, "_slice_partition", functools.partial(_die_once, str(markers)))
    out = tmp_path / "out"
    result = pipeline.run(load_recipe(recipe_path), out, executor=executor, partition_pixels=PARTITION_PIXELS)

    killed = [p for p in markers.iterdir() if p.name.startswith(SLICE_TO_KILL)]
    assert len(killed) == 1, "the partition to kill was never run"
    with pytest.raises(ProcessLookupError):
        os.kill(int(killed[0].read_text()), 0)  # that worker process is gone
    executor.client.wait_for_workers(2, timeout=60)
    assert set(executor.client.scheduler_info()["workers"]) != before  # the nanny started a new one
    slice_pass = next(r for r in result.passes if r.name == "slice")
    assert slice_pass.detail.endswith("partitions sliced, 0 reused")
    assert output_files(out) == reference
    assert not [p.name for p in (out / "_work" / "slice").iterdir() if p.name.endswith(".tmp")]


def test_cli_runs_on_a_scheduler_address(
    recipe_path: Path, reference: dict[str, bytes], executor: DaskExecutor, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    address = executor.client.scheduler.address
    args = ["run", str(recipe_path), "--out", str(out), "--executor", "dask", "--scheduler", address]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert output_files(out) == reference


def test_workers_that_cannot_see_a_folder_are_named(executor: DaskExecutor, tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match=r"2 of 2 Dask workers cannot see .*nowhere"):
        executor.require_visible([str(tmp_path), str(tmp_path / "nowhere")])
    executor.require_visible([str(tmp_path)])


def test_executor_choices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ExecutorError, match="--scheduler needs --executor dask"):
        make_executor(2, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(ExecutorError, match="unknown executor 'ray'"):
        make_executor(2, kind="ray")
    with pytest.raises(ExecutorError, match="--workers sizes a local Dask cluster"):
        make_executor(2, kind="dask", scheduler="tcp://127.0.0.1:8786")
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 2)
    with pytest.raises(ExecutorError, match="cannot reach the Dask scheduler"):
        DaskExecutor("tcp://127.0.0.1:9").require_visible([])  # nothing listens on the discard port


def test_cli_names_an_unreachable_scheduler(
    recipe_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 2)
    args = ["run", str(recipe_path), "--out", str(tmp_path / "out"), "--executor", "dask"]
    result = CliRunner().invoke(app, [*args, "--scheduler", "tcp://127.0.0.1:9", "--quiet"])
    assert result.exit_code == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.output
