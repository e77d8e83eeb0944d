"""Shards from any tool: sample counts from rscurate's sizes.json, timm's _info.json, a wids shardindex.json,
img2dataset's {shard}_stats.json, or the tar headers (cached); and training on such shards without
--samples-per-epoch."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _shards import encode, tile_image, tiny_set_flags, torch_threads, write_shards
from typer.testing import CliRunner

from rspretrain.cli import app
from rspretrain.config import DataConfig
from rspretrain.data import DataError, ShardSource
from rspretrain.shards import COUNT_CACHE, count_samples, count_tar_samples, expand_shards


def img2dataset_folder(folder: Path, shards: int = 2, per_shard: int = 5, failed: int = 2) -> list[Path]:
    """img2dataset's webdataset output: {shard}.tar ({key}.jpg, .txt, .json), {shard}.parquet, {shard}_stats.json.

    Each shard's parquet lists `failed` URLs that did not download; they are in `count`, not in the tar."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        name = f"{s:05d}"
        rows = []
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                members = {
                    "jpg": encode(tile_image(rng, 48), "jpg"),
                    "txt": b"an aerial scene",
                    "json": json.dumps({"key": key, "status": "success"}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "url": f"https://example.com/{key}.jpg", "status": "success"})
        for i in range(failed):
            rows.append(
                {
                    "key": f"{name}f{i}",
                    "url": f"https://example.com/gone{i}.jpg",
                    "status": "failed_to_download",
                }
            )
        pd.DataFrame(rows).to_parquet(folder / f"{name}.parquet")
        stats = {
            "count": per_shard + failed,
            "successes": per_shard,
            "failed_to_download": failed,
            "failed_to_resize": 0,
            "duration": 1.5,
            "status_dict": {"success": per_shard, "failed_to_download": failed},
        }
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        paths.append(folder / f"{name}.tar")
    return paths


@pytest.fixture()
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP (404 for what is not there)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_plain_tars_are_counted_from_their_headers_and_the_count_is_cached(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, shards=3, per_shard=7, size=16, sizes_json=False)
    assert count_tar_samples(paths[0]) == 7
    assert count_samples(expand_shards(str(tmp_path))) == 21
    cache = json.loads((tmp_path / COUNT_CACHE).read_text())["tars"]
    assert {k: v["samples"] for k, v in cache.items()} == {p.name: 7 for p in paths}
    # the cache is what is read next time, for as long as the tar is the same size and age
    cache[paths[1].name]["samples"] = 100
    (tmp_path / COUNT_CACHE).write_text(json.dumps({"tars": cache}))
    assert count_samples(expand_shards(str(tmp_path))) == 7 + 100 + 7
    with open(paths[1], "ab") as f:
        f.write(b"\0" * 1024)  # a changed tar is counted again
    assert count_samples(expand_shards(str(tmp_path))) == 21
    assert count_samples(expand_shards(str(tmp_path)), scan=False) is None  # no listed counts


def test_counts_are_cached_in_the_user_cache_when_the_shard_folder_cannot_hold_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, cache_home = tmp_path / "ro", tmp_path / "cache"
    write_shards(shards, shards=2, per_shard=3, size=16, sizes_json=False)
    (
        shards / COUNT_CACHE
    ).mkdir()  # the cache file cannot be written there (read-only folders alike, even as root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    assert count_samples(expand_shards(str(shards))) == 6
    (cached,) = (cache_home / "rspretrain" / "sample-counts").glob("*.json")
    assert json.loads(cached.read_text())["folder"] == str(shards)
    assert sorted(json.loads(cached.read_text())["tars"]) == ["tiles-000000.tar", "tiles-000001.tar"]


def test_a_tar_member_in_a_subfolder_and_webdataset_meta_files_count_as_webdataset_reads_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["__meta__", "a/k1.jpg", "a/k1.json", "a/k2.jpg", "k3.jpg", "k3.cls", "k3.x.json"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert count_tar_samples(path) == 3
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="bad.tar"):
        count_tar_samples(tmp_path / "bad.tar")


def test_img2dataset_layout_is_counted_from_its_stats_files(tmp_path: Path) -> None:
    img2dataset_folder(tmp_path, shards=2, per_shard=5, failed=2)
    assert count_samples(expand_shards(str(tmp_path)), scan=False) == 10  # successes, not count
    assert not (tmp_path / COUNT_CACHE).exists()  # nothing was scanned


def test_wids_shard_index_is_read(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, shards=2, per_shard=4, size=16, sizes_json=False)
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "tiles",
        "shardlist": [
            {"url": f"{p.name}", "md5sum": "0" * 32, "nsamples": n, "filesize": p.stat().st_size}
            for p, n in zip(paths, [4, 9], strict=True)
        ],
    }
    (tmp_path / "shardindex.json").write_text(json.dumps(index))
    assert count_samples(expand_shards(str(tmp_path)), scan=False) == 13  # from the index, not the tars


def test_url_shards_count_from_size_files_and_stats_over_http(http_folder: tuple[Path, str]) -> None:
    root, base = http_folder
    img2dataset_folder(root / "i2d", shards=2, per_shard=3, failed=1)
    assert count_samples([f"{base}/i2d/00000.tar", f"{base}/i2d/00001.tar"]) == 6
    write_shards(root / "plain", shards=1, per_shard=4, size=16, sizes_json=False)
    url = f"{base}/plain/tiles-000000.tar"
    assert count_samples([url]) is None  # no size file, and a URL is not scanned
    cfg = DataConfig(shards=(url,), workers=0)
    with pytest.raises(DataError, match="--samples-per-epoch"):
        ShardSource(cfg, img_size=32, batch_size=2, seed=0)
    src = ShardSource(cfg, img_size=32, batch_size=2, seed=0, need_epoch_size=False)  # a run given in --steps
    assert src.samples_per_epoch is None
    batch = next(src.epoch(0))
    assert batch.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("layout", ["plain", "img2dataset", "wids"])
@pytest.mark.parametrize("length", [["--steps", "3"], ["--epochs", "0.5"]])
def test_train_runs_on_shards_from_other_tools_without_samples_per_epoch(
    tmp_path: Path, layout: str, length: list[str]
) -> None:
    shards, run = tmp_path / "shards", tmp_path / "run"
    if layout == "img2dataset":
        img2dataset_folder(shards, shards=2, per_shard=6, failed=1)
    else:
        paths = write_shards(shards, shards=2, per_shard=6, size=64, sizes_json=False)
        if layout == "wids":
            listed = [{"url": p.name, "nsamples": 6, "filesize": p.stat().st_size} for p in paths]
            (shards / "shardindex.json").write_text(
                json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": listed})
            )
    with torch_threads(1):
        result = CliRunner().invoke(
            app,
            ["train", "--shards", str(shards), "--out", str(run), "--batch-size", "2", "--json", *length,
             *tiny_set_flags()],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 3  # 12 samples, batch 2: 6 steps per epoch
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 0.5


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_yields_the_members_webdataset_yields(tmp_path: Path, fmt: int) -> None:
    import gzip

    from webdataset.tariterators import tar_file_iterator

    from rspretrain.shards import tar_members

    path = tmp_path / "odd.tar"
    members = [
        ("__meta__", b"m"),  # webdataset's meta member: skipped
        ("d", None),  # a directory: skipped
        ("k1.jpg", b"x" * 700),  # data over a block
        ("sub/" + "b" * 120 + "/k2.jpg", b"y" * 5),  # a long name (GNU L, pax path, or ustar prefix)
        ("k3.jpg", b""),
        ("ü-k4.json", b"{}"),  # not ASCII
    ]
    if fmt == tarfile.GNU_FORMAT or fmt == tarfile.PAX_FORMAT:
        members.append(("c" * 150 + ".jpg", b"z"))  # a long name without a folder
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        want = [(d["fname"], d["data"]) for d in tar_file_iterator(f)]
    assert len(want) == len(members) - 2
    with open(path, "rb") as f:
        assert list(tar_members(f)) == want
    with open(path, "rb") as f:
        assert [n for n, _ in tar_members(f, read=False)] == [n for n, _ in want]
    gz = tmp_path / "odd.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with open(gz, "rb") as f:
        assert list(tar_members(f)) == want
    cut = path.read_bytes()[: 512 * 3 + 100]  # inside k1.jpg's data
    with pytest.raises(EOFError, match="cut short"):
        list(tar_members(io.BytesIO(cut)))
