"""Sources and OUT as URLs, against real servers on loopback: an HTTP server with directory listings and
byte ranges (sources), and moto's S3 server (sources and OUT). No mocks: every read and write is HTTP.

What must hold: shards made from remote sources are byte-identical to shards made from the same files on
disk (sample metadata holds paths relative to the source root), and an OUT on S3 receives exactly the
bytes a local OUT would.
"""

from __future__ import annotations

import functools
import http.server
import io
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import output_files

from rscurate import fs, pipeline
from rscurate.recipe import load_recipe

pytest.importorskip("aiohttp")  # fsspec's http
BUCKET = "rscurate-test"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's folder listings plus single byte ranges, which fsspec and GDAL ask for."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> io.BytesIO | None:  # type: ignore[override]
        path = self.translate_path(self.path)
        wanted = self.headers.get("Range")
        if wanted is None or os.path.isdir(path):
            return super().send_head()  # type: ignore[return-value]
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.send_error(404)
            return None
        size = len(data)
        if match is None or match.group(1) == "" and match.group(2) == "":
            self.send_error(416)
            return None
        first, last = match.groups()
        start = size - int(last) if first == "" else int(first)
        end = size - 1 if first == "" or last == "" else min(int(last), size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rscurate.synth import synth

    path = synth(tmp_path_factory.mktemp("remote") / "corpus", n_chips=30, large_side=1200, seed=0)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["shard"]["max_samples"] = 16
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(recipe_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run from the files on disk into a local OUT (read-only)."""
    out = tmp_path_factory.mktemp("local") / "out"
    pipeline.run(load_recipe(recipe_path), out, workers=1)
    return out


def _recipe_at(recipe_path: Path, base_url: str, dest: Path) -> Path:
    """The recipe with every source and benchmark root under base_url."""
    data = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    for entry in [*data["sources"], *data.get("benchmarks", [])]:
        entry["root"] = f"{base_url}/{entry['root']}"
    dest.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dest


def _same_curation(out: Path, reference: Path, base_url: str, corpus: Path) -> None:
    """Shards and indexes byte-identical; the tables equal once the URLs in them (path,
    duplicate_of_path, benchmark_match) are read as the files on disk they were copied from."""
    files, expected = output_files(out), output_files(reference)
    shards = {k: v for k, v in expected.items() if k.startswith("shards/")}
    assert len(shards) >= 6 and {k: files.get(k) for k in shards} == shards
    for table in ("inputs.parquet", "tiles.parquet"):
        got, want = pd.read_parquet(out / table), pd.read_parquet(reference / table)
        assert got["path"].str.startswith(base_url + "/").all()
        for col in got.columns:
            if pd.api.types.is_string_dtype(got[col]) and not pd.api.types.is_numeric_dtype(got[col]):
                got[col] = got[col].str.replace(base_url, str(corpus), regex=False)
        pd.testing.assert_frame_equal(got, want)


@pytest.fixture(scope="module")
def http_base(recipe_path: Path) -> Iterator[str]:
    handler = functools.partial(RangeHandler, directory=str(recipe_path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_sources_over_http_give_the_same_shards(
    recipe_path: Path, reference: Path, http_base: str, tmp_path: Path
) -> None:
    remote = _recipe_at(recipe_path, http_base, tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    pipeline.run(load_recipe(remote), out, workers=1)
    _same_curation(out, reference, http_base, recipe_path.parent)
    inputs = pd.read_parquet(out / "inputs.parquet")
    assert set(inputs["format"].dropna()) >= {"jpeg", "png", "tiff"}  # Pillow and GDAL both read over http


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on loopback; the environment points s3fs (in this process and in every worker
    process started after it) at it. Yields the bucket's URL."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            mp.setenv(key, value)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        s3fs_, _ = fs.filesystem(f"s3://{BUCKET}")
        s3fs_.mkdir(BUCKET)
        yield f"s3://{BUCKET}"
        fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


def _download(url: str, dest: Path) -> Path:
    s3fs_, path = fs.filesystem(url)
    s3fs_.invalidate_cache()
    for key in s3fs_.find(path):
        target = dest / key[len(path) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3fs_.cat_file(key))
    return dest


def test_out_on_s3_gets_the_local_bytes_and_resumes(
    recipe_path: Path, reference: Path, s3: str, tmp_path: Path
) -> None:
    recipe, url, work = load_recipe(recipe_path), f"{s3}/curated", tmp_path / "work"
    pytest.importorskip("distributed")
    from rscurate.executors import DaskExecutor

    # Two Dask workers (started after the fixture set the endpoint): each uploads the shards it writes.
    with DaskExecutor(workers=2) as executor:
        result = pipeline.run(recipe, url, executor=executor, work=work)
    assert result.complete and result.out == url
    assert output_files(_download(url, tmp_path / "got")) == output_files(reference)
    assert (work / "_work" / "slice.done.json").exists()  # the pass state stays in --work
    assert pipeline.load_stats(url) == pipeline.load_stats(reference)

    # Finished: nothing runs. One shard gone from the bucket: only that tar is written again.
    assert not any(r.ran for r in pipeline.run(recipe, url, workers=1, work=work).passes)
    fs.remove(f"{url}/shards/synth-000002.tar")
    result = pipeline.run(recipe, url, workers=1, work=work)
    assert [r.name for r in result.passes if r.ran] == ["shard"]
    n_shards = len([f for f in output_files(reference) if f.endswith(".tar")])
    assert result.passes[-1].detail == f"1 shards written, {n_shards - 1} reused"
    assert output_files(_download(url, tmp_path / "again")) == output_files(reference)

    # The bucket prefix belongs to this recipe now.
    other = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    other["dedup"] = {"max_distance": 2}
    (recipe_path.parent / "other.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    with pytest.raises(pipeline.OutputError, match="different recipe"):
        pipeline.run(load_recipe(recipe_path.parent / "other.yaml"), url, workers=1, work=tmp_path / "w2")


def test_sources_on_s3_give_the_same_shards(
    recipe_path: Path, reference: Path, s3: str, tmp_path: Path
) -> None:
    s3fs_, bucket = fs.filesystem(s3)
    corpus = recipe_path.parent
    for p in sorted(corpus.rglob("*")):
        if p.is_file() and p.suffix != ".yaml":
            s3fs_.put_file(str(p), f"{bucket}/corpus/{p.relative_to(corpus).as_posix()}")
    remote = _recipe_at(recipe_path, f"{s3}/corpus", tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    pipeline.run(load_recipe(remote), out, workers=1)
    _same_curation(out, reference, f"{s3}/corpus", corpus)


def test_urls_that_cannot_hold_outputs_are_refused(recipe_path: Path, http_base: str) -> None:
    recipe = load_recipe(recipe_path)
    with pytest.raises(pipeline.OutputError, match="read-only"):
        pipeline.run(recipe, f"{http_base}/out", workers=1)
    with pytest.raises(pipeline.OutputError, match="not a protocol fsspec knows"):
        pipeline.run(recipe, "nosuchscheme://bucket/out", workers=1)


def test_locations() -> None:
    assert fs.is_url("s3://b/k") and fs.is_url("https://h/x") and not fs.is_url("/data/x")
    assert not fs.is_url("file:///data/x") and fs.local_path("file:///data/x") == "/data/x"
    assert fs.join("s3://b/out/", "shards", "a.tar") == "s3://b/out/shards/a.tar"
    assert fs.join("/data/out", "shards") == os.path.join("/data/out", "shards")
