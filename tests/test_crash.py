"""Crash safety: `rscurate run` killed with SIGKILL at several points, full disks and unwritable folders.

Whatever happens, OUT holds no half-written file under a final name, the rerun redoes only what was not
finished (asserted through _work/log.jsonl), and the final outputs are byte-identical to an
uninterrupted run (the `mini_curated` fixture).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import MINI_EXPECTED, output_files
from test_hostile import modes_bite, run_cli
from typer.testing import CliRunner

from rscurate import pipeline, shard
from rscurate.cli import app
from rscurate.recipe import load_recipe

pytestmark = pytest.mark.slow


def check_no_partial_files(out: Path, reference: Path) -> dict[str, tuple[int, int]]:
    """Every file under a final name is complete: each tar is byte-identical to the uninterrupted run's,
    each parquet file reads, each json parses. Returns the tars present: name -> (inode, mtime)."""
    tars = {}
    for tar in sorted((out / "shards").glob("*.tar")) if (out / "shards").is_dir() else []:
        try:
            data, st = tar.read_bytes(), tar.stat()
        except FileNotFoundError:  # removed by the run between the listing and the read (stale plan)
            continue
        assert data == (reference / "shards" / tar.name).read_bytes(), f"{tar.name} is not complete"
        tars[tar.name] = (st.st_ino, st.st_mtime_ns)
    for path in out.rglob("*"):
        if path.suffix == ".parquet":
            pq.read_metadata(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    return tars


def run_and_kill(
    recipe: Path, out: Path, workers: int, when: Callable[[], bool], jitter: float, reference: Path
) -> dict[str, tuple[int, int]]:
    """Start `rscurate run`, SIGKILL its process group `jitter` seconds after `when()` turns true, and
    check the files it left. While it runs, every tar that appears is checked as well."""
    args = ["run", str(recipe), "--out", str(out), "--workers", str(workers)]
    with open(out.parent / "kill.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rscurate", *args],
            stdout=log,
            stderr=log,
            start_new_session=True,  # the pool's workers share the group: killpg takes them too
        )
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            names = {p.name for p in (out / "shards").glob("*.tar")} if (out / "shards").is_dir() else set()
            if names - seen:
                check_no_partial_files(out, reference)
                seen = names
            if when():
                time.sleep(jitter)
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before the kill point; see kill.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return check_no_partial_files(out, reference)


def test_sigkill_at_random_points_then_identical_outputs(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    work = out / "_work"
    rng = random.Random(20240)
    kill_points: list[tuple[str, int, Callable[[], bool]]] = [
        ("scan finished", 2, lambda: (work / "scan.done.json").exists()),
        ("slice started", 1, lambda: any((work / "slice").glob("part-*"))),
        ("hash finished", 2, lambda: (work / "hash.done.json").exists()),
        ("first shard written", 1, lambda: any((out / "shards").glob("*.tar"))),
    ]
    finished_before: list[str] = []
    tars: dict[str, tuple[int, int]] = {}
    for what, workers, when in kill_points:
        n = len(pipeline.read_log(out))
        tars = run_and_kill(mini_recipe, out, workers, when, rng.uniform(0, 0.02), mini_curated)
        log = pipeline.read_log(out)[n:]
        # The run that was killed did not redo what the run before it had finished.
        assert [r["pass"] for r in log if r["event"] == "reused"] == finished_before, what
        assert not {r["pass"] for r in log if r["event"] == "ran"} & set(finished_before), what
        finished_before = [p for p in pipeline.PASSES if (work / f"{p}.done.json").exists()]
        assert "shard" not in finished_before, f"killed at '{what}' too late: the run had finished"
        assert not (out / "stats.json").exists()
    assert tars, "the last kill came before any shard was written"

    n = len(pipeline.read_log(out))
    result = CliRunner().invoke(
        app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    log = pipeline.read_log(out)[n:]
    assert [r["pass"] for r in log if r["event"] == "reused"] == finished_before
    ran = [r for r in log if r["event"] == "ran"]
    assert [r["pass"] for r in ran] == [p for p in pipeline.PASSES if p not in finished_before]
    shards = MINI_EXPECTED["shards"]
    assert ran[-1]["detail"] == f"{shards - len(tars)} shards written, {len(tars)} reused"
    for name, (inode, mtime) in tars.items():  # the tars finished before the kill were not rewritten
        assert (out / "shards" / name).stat().st_ino == inode
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert output_files(out) == output_files(mini_curated)


# --------------------------------------------------------------------------------------------------
# A full disk and a folder this user may not write


def test_no_space_left_on_a_real_small_disk(mini_recipe: Path, mini_curated: Path, tmp_path: Path) -> None:
    """OUT on a small tmpfs, filled by a ballast file so that runs stop at different points: each stop is
    one line naming the file, and once the ballast is deleted the rerun ends with the same bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_no_space_left_injected covers the same path")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the injected test covers it")
    try:
        used = shutil.disk_usage(mount).used
        pipeline.run(load_recipe(mini_recipe), mount / "probe", workers=1)
        needed = shutil.disk_usage(mount).used - used  # what a whole run takes on this disk
        shutil.rmtree(mount / "probe")
        stops = []
        for k, room in enumerate((0.3, 0.7, 0.95)):
            out, ballast = mount / f"out{k}", mount / "ballast"
            ballast.write_bytes(b"\0" * (shutil.disk_usage(mount).free - int(needed * room)))
            result = CliRunner().invoke(app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1"])
            assert result.exit_code == 2, (room, result.output)
            line = result.output.strip().splitlines()[-1]
            assert line.startswith(f"error: cannot write {out}/") and "no space left on device" in line, line
            assert "free some space" in line and "run the same command again" in line
            assert "Traceback" not in result.output
            assert not list(out.rglob("*.tmp"))
            check_no_partial_files(out, mini_curated)
            finished = [p for p in pipeline.PASSES if (out / "_work" / f"{p}.done.json").exists()]
            stops.append(len(finished))

            ballast.unlink()
            n = len(pipeline.read_log(out))
            result = CliRunner().invoke(
                app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
            )
            assert result.exit_code == 0, result.output
            assert [r["pass"] for r in pipeline.read_log(out)[n:] if r["event"] == "reused"] == finished
            assert output_files(out) == output_files(mini_curated)
            shutil.rmtree(out)
        assert len(set(stops)) > 1, f"every run stopped after the same {stops[0]} passes"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("where", ["tiles.parquet", "shard tar", "stats.json"])
def test_no_space_left_injected(
    mini_recipe: Path, mini_curated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC raised the way pyarrow, tarfile and write_text raise it (no file name), at the last writes."""
    out = tmp_path / "out"
    enospc = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    if where == "tiles.parquet":
        real = pipeline.pq.write_table

        def write_table(table, target, **kw):
            if str(target).endswith("/tiles.parquet.tmp"):
                raise enospc
            return real(table, target, **kw)

        monkeypatch.setattr(pipeline.pq, "write_table", write_table)
        named = out / "tiles.parquet"
    elif where == "shard tar":
        real_fsync, calls = os.fsync, []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(shard.os, "fsync", fsync)
        named = out / "shards" / "mini-000002.tar"
    else:
        real_write_text = Path.write_text

        def write_text(self: Path, data: str, *a, **kw) -> int:
            if self.name == "stats.json.tmp":
                real_write_text(self, data[:10], *a, **kw)  # a half-written temporary, then the error
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_text(self, data, *a, **kw)

        monkeypatch.setattr(Path, "write_text", write_text)
        named = out / "stats.json"
    result = CliRunner().invoke(
        app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    # The file named is the one being written (a tar may be staged under a temporary name of its own).
    assert re.fullmatch(
        f"error: cannot write {re.escape(str(named))}(\\.[0-9a-f]+\\.tmp)?: no space left on device; "
        "free some space on that disk \\(or choose another --out\\), then run the same command again: "
        "it resumes where it stopped",
        lines[0],
    ), lines[0]
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    check_no_partial_files(out, mini_curated)
    assert not (out / "stats.json").exists()
    done = [p for p in pipeline.PASSES if (out / "_work" / f"{p}.done.json").exists()]
    assert done == ["scan", "exclude", "slice", "hash", "dedup"]

    monkeypatch.undo()
    n = len(pipeline.read_log(out))
    result = CliRunner().invoke(
        app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    log = pipeline.read_log(out)[n:]
    assert [r["pass"] for r in log if r["event"] == "reused"] == done
    assert [r["pass"] for r in log if r["event"] == "ran"] == ["shard"]
    assert output_files(out) == output_files(mini_curated)


def test_unwritable_shards_folder(mini_recipe: Path, mini_curated: Path, tmp_path: Path) -> None:
    """OUT/shards made read-only after dedup: a real `rscurate run` (held to file modes even as root)
    fails with one line naming the folder; once it is writable again the run finishes identically."""
    out = tmp_path / "out"
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    bite, why_not = modes_bite(probe)
    if not bite:
        pytest.skip(f"cannot make a folder unwritable here: {why_not}")
    result = CliRunner().invoke(
        app, ["dedup", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    (out / "shards").chmod(0o555)
    try:
        failed = run_cli(
            ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"],
            tmp_path / "logs",
            drop_dac=True,
        )
    finally:
        (out / "shards").chmod(0o755)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and failed.stdout == "", failed.stderr
    assert lines[0].startswith(f"error: cannot write {out / 'shards'}/") and "permission denied" in lines[0]
    assert f"make {out / 'shards'} writable for this user" in lines[0]
    assert "Traceback" not in failed.stderr
    assert not any((out / "shards").iterdir()) and not (out / "stats.json").exists()

    n = len(pipeline.read_log(out))
    result = CliRunner().invoke(
        app, ["run", str(mini_recipe), "--out", str(out), "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert [r["pass"] for r in pipeline.read_log(out)[n:] if r["event"] == "ran"] == ["shard"]
    assert output_files(out) == output_files(mini_curated)
