"""Reliability: a SIGKILLed run resumes exactly, bad checkpoints and crafted pickles are refused, broken shards
and dead or stalling URLs are skipped and counted without hanging, and a failing DDP rank ends the job."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from _shards import encode, tile_image, tiny_set_flags, torch_threads, write_shards
from typer.testing import CliRunner

from rspretrain import checkpoint as ckpt
from rspretrain.cli import app
from rspretrain.config import DataConfig
from rspretrain.data import DataError, ShardSource
from rspretrain.runtime import drop_log_records_after

runner = CliRunner()
_META = b"{}"  # the json member of a hand-made sample; the trainer does not read it


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- kill -9


def test_sigkilled_cli_run_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, shards=2, per_shard=10, size=64)
    args = [
        "train",
        "--shards",
        str(shards),
        "--steps",
        "30",
        "--batch-size",
        "3",
        "--checkpoint-every",
        "2",
        "--shuffle-buffer",
        "6",
        "--threads",
        "1",
        "--quiet",
        *tiny_set_flags(),
    ]
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])  # uninterrupted, in this process
    assert done.exit_code == 0, done.output
    want = _losses(tmp_path / "whole")
    assert list(want) == list(range(1, 31))

    run = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "rspretrain", *args, "--out", str(run)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            deadline = time.monotonic() + 240
            while not ckpt.list_checkpoints(run) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            alive = child.poll() is None
            child.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a node that loses power
        finally:
            child.kill()
            child.wait(30)
    assert alive, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert child.returncode == -signal.SIGKILL
    killed_at = max(_losses(run))
    assert 2 <= killed_at < 30, killed_at  # killed mid-run, after its first checkpoint
    for path in ckpt.list_checkpoints(run):  # whatever is under a final name is whole
        assert ckpt.load_checkpoint(path)["step"] == int(path.stem.split("-")[1])

    done = runner.invoke(app, ["train", "--out", str(run), "--resume", "--threads", "1", "--quiet"])
    assert done.exit_code == 0, done.output
    got = _losses(run)
    assert list(got) == list(range(1, 31))  # every step logged once
    for step in range(1, 31):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "loss": 0.8}\n{"step": 4, "lo'
    )
    drop_log_records_after(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'


# ---------------------------------------------------------------------------------------------- crafted pickles


def _malicious_checkpoint(path: Path, marker: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 1, "model": Payload()}, path)


def test_export_and_probe_refuse_a_checkpoint_that_would_run_code(tmp_path: Path) -> None:
    from rspretrain.probe import load_encoder

    marker = tmp_path / "pwned"
    path = ckpt.checkpoint_path(tmp_path / "run", 1)
    _malicious_checkpoint(path, marker)
    for target in (path, tmp_path / "run"):  # the file, and the run folder holding only it
        result = runner.invoke(app, ["export", str(target), "--out", str(tmp_path / "e.safetensors")])
        assert result.exit_code == 2, result.output
        assert str(path) in result.stderr and "refused" in result.stderr
    assert not (tmp_path / "e.safetensors").exists()
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        load_encoder(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- broken shards


def _source(shards: list[str], **data) -> ShardSource:
    cfg = DataConfig(
        shards=tuple(shards),
        **{
            "workers": 0,
            "shuffle_buffer": 1,
            "shuffle_initial": 1,
            "resampled": False,
            "samples_per_epoch": 100,
            **data,
        },
    )
    return ShardSource(cfg, img_size=32, batch_size=1, seed=0)


def test_truncated_shard_missing_and_undecodable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    good, cut = write_shards(tmp_path, shards=2, per_shard=6, size=24)
    with tarfile.open(cut) as tar:  # cut the tar inside the image of its third sample
        offset = next(m.offset_data for m in tar.getmembers() if m.name == "synthetic_scene1_48_0.jpg")
    cut.write_bytes(cut.read_bytes()[: offset + 100])
    odd = tmp_path / "odd-000000.tar"
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(odd)) as sink:
        sink.write({"__key__": "odd_a", "png": encode(tile_image(rng, 24), "png"), "json": _META})
        sink.write({"__key__": "odd_b", "json": _META})  # no image member
        sink.write({"__key__": "odd_c", "jpg": b"not a jpeg at all", "json": _META})
        sink.write({"__key__": "odd_d", "jpg": encode(tile_image(rng, 24), "jpg"), "json": _META})
    expected = {f"synthetic_scene0_{i * 24}_0" for i in range(6)} | {
        "synthetic_scene1_0_0",
        "synthetic_scene1_24_0",
    }
    expected |= {"odd_a", "odd_d"}

    batches = list(islice(_source([str(good), str(cut), str(odd)]).epoch(0), 11))  # one pass, and one more
    keys = [b.keys[0] for b in batches]
    assert set(keys[:10]) == expected and len(set(keys[:10])) == 10
    assert sum(b.skipped for b in batches) == 2  # odd_b, odd_c
    assert sum(b.bad_shards for b in batches) == 1  # the cut tar, once


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tar: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tar, self.hits = tar, {}
        self.release = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path == "/fail.tar":
            self.send_error(500)
        elif self.path == "/stall.tar":  # accepts, then never answers
            self.server.release.wait(60)
        elif self.path in ("/good.tar", "/half.tar"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.tar)))
            self.end_headers()
            if self.path == "/good.tar":
                self.wfile.write(self.server.tar)
            else:  # half the body, then silence
                self.wfile.write(self.server.tar[: len(self.server.tar) // 2])
                self.wfile.flush()
                self.server.release.wait(60)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    (tar,) = write_shards(tmp_path / "served", shards=1, per_shard=6, size=24)
    srv = _Server(tar.read_bytes())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


@pytest.mark.timeout(60)
def test_failing_stalling_and_refused_urls_are_retried_then_skipped(
    server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    closed = f"http://127.0.0.1:{_free_port()}/x.tar"  # nothing listens there
    urls = [f"{base}/good.tar", f"{base}/fail.tar", f"{base}/stall.tar", f"{base}/half.tar", closed]
    src = _source(urls, url_timeout=0.5, url_retries=2, url_backoff=0.05)
    start = time.monotonic()
    # 6 samples of good.tar, what half.tar sent before it stalled (its first 3), then past its timeout
    batches = list(islice(src.epoch(0), 12))
    elapsed = time.monotonic() - start
    keys = [b.keys[0] for b in batches]
    good = {f"synthetic_scene0_{i * 24}_0" for i in range(6)}
    assert set(keys) <= good and good <= set(keys)  # all of good.tar, some of half.tar again, nothing else
    assert sum(b.bad_shards for b in batches) >= 4  # fail, stall, half (cut by the read timeout), refused
    assert server.hits["/fail.tar"] % 3 == 0 and server.hits["/fail.tar"] >= 3  # 1 try + 2 retries per pass
    assert server.hits["/stall.tar"] >= 3
    assert elapsed < 30
    warned = [r.getMessage() for r in caplog.records if "skipping the rest of shard" in r.getMessage()]
    for name in ("fail.tar", "stall.tar", "half.tar", "x.tar"):
        assert any(name in message for message in warned), (name, warned)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_dead_source_stops_the_run_instead_of_hanging(workers: int) -> None:
    dead = [f"http://127.0.0.1:{_free_port()}/shard-{i}.tar" for i in range(3)]
    src = _source(dead, resampled=True, url_timeout=0.5, url_retries=0, workers=workers)
    with pytest.raises(
        DataError, match=r"^\d+ shards in a row cannot be opened, the last http://127\.0\.0\.1:"
    ):
        next(src.epoch(0))  # from a loader worker too: one line, not the worker's traceback


# ---------------------------------------------------------------------------------------------- a failing rank

_FAILING_ENTRY = """
import os, sys
import rspretrain.train as train

real = train.counter_uniform


def failing(seed, step, index, shape):
    if os.environ["RANK"] == "1" and step == 2:  # the third step, on rank 1 only
        raise RuntimeError("injected failure on rank 1 at step 3")
    return real(seed, step, index, shape)


train.counter_uniform = failing
from rspretrain.cli import main

main()
"""


@pytest.mark.distributed
def test_a_failing_ddp_rank_ends_the_job_naming_the_rank_and_the_error(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, shards=2, per_shard=6, size=64)
    entry = tmp_path / "entry.py"
    entry.write_text(_FAILING_ENTRY)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(entry),
        "train",
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "10",
        "--batch-size",
        "2",
        "--dist-timeout",
        "60",
        "--quiet",
        *tiny_set_flags(),
    ]
    start = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    elapsed = time.monotonic() - start
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "injected failure on rank 1 at step 3" in out
    root_cause = out[out.index("Root Cause") :]
    assert "rank      : 1 " in root_cause and "injected failure on rank 1 at step 3" in root_cause, out[
        -3000:
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert elapsed < 200  # well under dist_timeout x 3: no rank waited for the dead one
