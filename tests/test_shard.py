"""Shard pass: the seeded shuffle, byte-reproducible and atomic tars, sizes.json/_info.json, and verify."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rscurate import shard
from rscurate.recipe import ShardConfig
from rscurate.sample import encode_metadata


def tiles_table(n_per_source: int = 30, sources: tuple[str, ...] = ("src-a", "src-b")) -> pd.DataFrame:
    rows = []
    for s in sources:
        for i in range(n_per_source):
            rows.append(
                {
                    "key": f"{s}_{i:04d}_0_0",
                    "source": s,
                    "path": f"/data/{s}/{i}.png",
                    "relpath": f"{i}.png",
                    "task": "classification",
                    "x": 0,
                    "y": 0,
                    "width": 8,
                    "height": 6,
                    "phash": f"{i:016x}",
                    "status": "kept" if i % 5 else "excluded",
                    "reason": None if i % 5 else "blank",
                    "crs": None,
                    "bounds": None,
                }
            )
    return pd.DataFrame(rows)


def test_assign_is_seeded_balanced_and_independent_of_row_order() -> None:
    tiles = tiles_table()
    cfg = ShardConfig(max_samples=7, shuffle_seed=3)
    a = shard.assign(cfg, "demo", tiles)
    b = shard.assign(cfg, "demo", tiles.sample(frac=1, random_state=1))
    assert a.set_index("key")[["shard", "shard_position"]].equals(
        b.set_index("key").loc[a["key"], ["shard", "shard_position"]]
    )

    kept = a[a["status"] == "kept"]
    assert a.loc[a["status"] != "kept", "shard"].isna().all()
    sizes = kept["shard"].value_counts().sort_index()
    assert list(sizes.index) == [f"demo-{i:06d}.tar" for i in range(7)]  # 48 kept -> ceil(48 / 7) = 7 shards
    assert sizes.max() <= 7 and sizes.max() - sizes.min() <= 1
    # A global shuffle: every shard mixes the two sources, and positions inside each shard are 0..n-1.
    assert (kept.groupby("shard")["source"].nunique() == 2).all()
    for _, group in kept.groupby("shard"):
        assert sorted(group["shard_position"]) == list(range(len(group)))
    # Another seed gives another order.
    c = shard.assign(ShardConfig(max_samples=7, shuffle_seed=4), "demo", tiles)
    assert not c["shard"].equals(a["shard"])


@pytest.mark.parametrize(
    ("n", "cap", "expected"), [(0, 5, []), (5, 5, [5]), (6, 5, [3, 3]), (11, 5, [4, 4, 3])]
)
def test_shard_sizes(n: int, cap: int, expected: list[int]) -> None:
    assert shard.shard_sizes(n, cap) == expected


def jpeg(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples_for(tiles: pd.DataFrame) -> list[shard.Sample]:
    return [
        shard.Sample(r["key"], "jpg", jpeg(i), encode_metadata(shard.sample_metadata(r)))
        for i, r in enumerate(tiles.to_dict("records"))
    ]


def test_write_shard_is_byte_reproducible_with_fixed_headers(tmp_path: Path) -> None:
    samples = samples_for(tiles_table(4))
    shard.write_shard(tmp_path / "a.tar", samples)
    shard.write_shard(tmp_path / "b.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert len(data) % tarfile.RECORDSIZE == 0

    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == [f"{samples[0].key}.jpg", f"{samples[0].key}.json"]
    assert len(members) == 2 * len(samples)
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (
            0,
            0,
            0,
            "",
            "",
            0o644,
            tarfile.REGTYPE,
        )
        assert not m.pax_headers
    # Raw USTAR headers: no PAX ('x'/'g') or GNU long-name ('L') records anywhere.
    offset = 0
    while offset < len(data) and data[offset : offset + 512].strip(b"\0"):
        header = data[offset : offset + 512]
        assert header[257:265] == b"ustar\x0000" and header[156:157] == b"0"
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512


def test_write_shard_is_atomic(tmp_path: Path) -> None:
    good = samples_for(tiles_table(3))

    def failing():
        yield from good[:2]
        raise OSError("disk full")

    target = tmp_path / "x-000000.tar"
    with pytest.raises(OSError, match="disk full"):
        shard.write_shard(target, failing())
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary left

    bad_key = [shard.Sample("has.dot", "jpg", b"x", b"{}")]
    with pytest.raises(ValueError, match="key"):
        shard.write_shard(target, bad_key)
    assert list(tmp_path.iterdir()) == []


def test_sample_metadata_fields() -> None:
    row = tiles_table(1).iloc[1].to_dict()
    assert set(shard.sample_metadata(row)) == {"source", "path", "x", "y", "width", "height", "phash", "task"}
    geo = {**row, "crs": "EPSG:32633", "bounds": "[500000.0, 0.0, 500004.0, 3.0]"}
    meta = shard.sample_metadata(geo)
    assert meta["crs"] == "EPSG:32633" and meta["bounds"] == [500000.0, 0.0, 500004.0, 3.0]
    assert meta["path"] == row["relpath"]  # shards do not depend on where the data was mounted


def test_info_json_is_what_timm_reads() -> None:
    from timm.data.readers.reader_wds import _parse_split_info

    sizes = {"demo-000001.tar": 3, "demo-000000.tar": 4}
    info = _parse_split_info("train", json.loads(json.dumps(shard.info_record("demo", sizes))))
    assert info.num_samples == 7
    assert info.filenames == ("demo-000000.tar", "demo-000001.tar")
    assert info.shard_lengths == (4, 3)


# --- verify -------------------------------------------------------------------------------------------


def build_output(out: Path, max_samples: int = 8) -> pd.DataFrame:
    """A finished output folder written by the shard functions directly: tiles.parquet + shards."""
    tiles = shard.assign(ShardConfig(max_samples=max_samples), "demo", tiles_table(10))
    images = {r["key"]: jpeg(i) for i, r in enumerate(tiles.to_dict("records"))}
    tiles["image_sha256"] = [hashlib.sha256(images[k]).hexdigest() for k in tiles["key"]]
    (out / "shards").mkdir(parents=True)
    rows = tiles.set_index("key")
    sizes = {}
    for name, keys in shard.plan(tiles).items():
        samples = [
            shard.Sample(
                k,
                "jpg",
                images[k],
                encode_metadata(shard.sample_metadata({"key": k, **rows.loc[k].to_dict()})),
            )
            for k in keys
        ]
        sizes[name] = shard.write_shard(out / "shards" / name, samples)
    shard.write_index(out / "shards", "demo", sizes)
    tiles.to_parquet(out / "tiles.parquet", index=False)
    return tiles


def rewrite(path: Path, edit) -> None:
    """Rewrite a tar member by member through edit(name, data) -> list of (TarInfo, data)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            for info, blob in edit(m, data):
                tar.addfile(info, io.BytesIO(blob) if blob is not None else None)


def test_verify_passes_on_a_good_output(tmp_path: Path) -> None:
    tiles = build_output(tmp_path)
    report = shard.verify(tmp_path)
    assert report.ok, report.problems
    assert report.samples == int((tiles["status"] == "kept").sum()) == 16
    assert report.shards == 2


def test_verify_catches_a_tampered_image(tmp_path: Path) -> None:
    build_output(tmp_path)
    target = tmp_path / "shards" / "demo-000000.tar"
    victim = []

    def flip(m: tarfile.TarInfo, data: bytes):
        if m.name.endswith(".jpg") and not victim:
            victim.append(m.name)
            data = data[:-20] + bytes(b ^ 0x55 for b in data[-20:-2]) + data[-2:]  # same size, other bytes
        return [(m, data)]

    rewrite(target, flip)
    report = shard.verify(tmp_path)
    assert not report.ok
    assert any(victim[0] in p and "differs" in p for p in report.problems), report.problems


def test_verify_catches_a_tampered_json(tmp_path: Path) -> None:
    build_output(tmp_path)

    def edit(m: tarfile.TarInfo, data: bytes):
        if m.name.endswith(".json"):
            data = data.replace(b'"x":0', b'"x":1')
        return [(m, data)]

    rewrite(tmp_path / "shards" / "demo-000001.tar", edit)
    problems = shard.verify(tmp_path).problems
    assert problems and all("does not match tiles.parquet" in p for p in problems)


def test_verify_catches_a_missing_sample(tmp_path: Path) -> None:
    tiles = build_output(tmp_path)
    gone = shard.plan(tiles)["demo-000001.tar"][2]
    rewrite(tmp_path / "shards" / "demo-000001.tar", lambda m, d: [] if m.name.startswith(gone) else [(m, d)])
    problems = shard.verify(tmp_path).problems
    assert any(gone in p and "missing" in p for p in problems), problems
    assert any("sizes.json" in p and "demo-000001.tar" in p for p in problems), problems


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("../evil.json", tarfile.REGTYPE, ".."),
        ("/etc/evil.json", tarfile.REGTYPE, "absolute"),
        ("link.jpg", tarfile.SYMTYPE, "link"),
        ("hard.jpg", tarfile.LNKTYPE, "link"),
        ("dev.jpg", tarfile.CHRTYPE, "device"),
    ],
)
def test_verify_rejects_unsafe_members(tmp_path: Path, name: str, kind: bytes, expected: str) -> None:
    build_output(tmp_path)
    added = []

    def add(m: tarfile.TarInfo, data: bytes):
        out = [(m, data)]
        if not added:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc/passwd"
            blob = b"{}" if kind == tarfile.REGTYPE else None
            info.size = len(blob) if blob else 0
            out.append((info, blob))
            added.append(name)
        return out

    rewrite(tmp_path / "shards" / "demo-000000.tar", add)
    problems = shard.verify(tmp_path).problems
    assert any(name in p and expected in p for p in problems), problems


def test_verify_catches_a_sample_in_the_wrong_shard_and_a_stray_tar(tmp_path: Path) -> None:
    tiles = build_output(tmp_path)
    moved = shard.plan(tiles)["demo-000000.tar"][0]
    shards = tmp_path / "shards"
    with tarfile.open(shards / "demo-000000.tar") as tar:
        taken = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.startswith(moved + ".")]
    rewrite(shards / "demo-000000.tar", lambda m, d: [] if m.name.startswith(moved + ".") else [(m, d)])
    rewrite(shards / "demo-000001.tar", lambda m, d: [(m, d)])
    with tarfile.open(shards / "demo-000001.tar", "a", format=tarfile.USTAR_FORMAT) as tar:
        for m, d in taken:
            tar.addfile(m, io.BytesIO(d))
    (shards / "demo-000009.tar").write_bytes((shards / "demo-000001.tar").read_bytes())
    problems = shard.verify(tmp_path).problems
    assert any(
        "demo-000001.tar" in p and moved in p and "belongs in demo-000000.tar" in p for p in problems
    ), problems
    assert any("demo-000009.tar" in p and "also in demo-000001.tar" in p for p in problems), problems
    assert any("demo-000009.tar" in p and "sizes.json" in p for p in problems), problems


def test_copied_chips_are_the_source_files_in_the_shards(tmp_path: Path) -> None:
    """shard.reencode auto, end to end: a plain JPEG chip's sample image is the file itself; what needs a
    change (an EXIF orientation, a sliced scene) is encoded; verify passes; a rerun is byte-identical."""
    import yaml
    from _images import textured, write_exif_jpeg, write_jpeg
    from conftest import output_files

    from rscurate import pipeline
    from rscurate.recipe import load_recipe

    root = tmp_path / "data"
    root.mkdir()
    chips = [write_jpeg(root / f"chip{i}.jpg", textured(120, 150, seed=i)) for i in range(3)]
    rotated, _ = write_exif_jpeg(root / "rotated.jpg", orientation=8, h=96, w=128)
    write_jpeg(root / "scene.jpg", textured(600, 700, seed=9))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "copy",
                "sources": [{"name": "s", "root": str(root)}],
                "slice": {"max_side": 512, "tile_size": 256},
                "shard": {"max_samples": 3},
            }
        )
    )
    out = tmp_path / "out"
    result = pipeline.run(load_recipe(recipe), out, workers=1)
    tiles = pd.read_parquet(out / "tiles.parquet").set_index("key")
    members: dict[str, bytes] = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    members[m.name[: -len(".jpg")]] = t.extractfile(m).read()  # type: ignore[union-attr]
    kept = tiles[tiles["status"] == "kept"]
    assert set(members) == set(kept.index)
    by_path = {str(p): p.read_bytes() for p in root.iterdir()}
    copied = kept[kept["copied"]]
    assert sorted(copied["path"]) == sorted(str(p) for p in chips)
    for key, row in copied.iterrows():
        assert members[key] == by_path[row["path"]]
    encoded = kept[~kept["copied"]]
    assert str(rotated) in set(encoded["path"]) and (encoded["width"] <= 256).all()
    assert all(members[k] != by_path[p] for k, p in encoded["path"].items())
    assert result.stats["passes"]["slice"]["copied"] == 3
    assert result.stats["passes"]["slice"]["encoded"] == len(encoded)
    assert shard.verify(out).ok
    again = tmp_path / "again"
    pipeline.run(load_recipe(recipe), again, workers=2)
    assert output_files(again) == output_files(out)


def test_write_shard_writes_what_tarfile_writes(tmp_path: Path) -> None:
    """The member framing written by hand is byte for byte TarFile's (USTAR, fixed headers, end records)."""
    rng = np.random.default_rng(3)
    samples = [
        shard.Sample(f"src_{i:016x}_0_0", "jpg", rng.bytes(int(n)), json.dumps({"i": i}).encode())
        for i, n in enumerate(rng.integers(0, 3000, 40))
    ]
    ours = tmp_path / "ours.tar"
    shard.write_shard(ours, samples)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in ((s.image_ext, s.image), ("json", s.metadata)):
                tar.addfile(shard._tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
    assert ours.read_bytes() == reference.getvalue()
    empty = tmp_path / "empty.tar"
    shard.write_shard(empty, [])
    with tarfile.open(fileobj=(ref := io.BytesIO()), mode="w", format=tarfile.USTAR_FORMAT):
        pass
    assert empty.read_bytes() == ref.getvalue()


def test_ustar_header_is_tarfiles_byte_for_byte() -> None:
    """The template-filled member header equals tarfile's for the same TarInfo, over names and sizes at
    every edge (name lengths 1..100, then the fallbacks: over 100 bytes, not ASCII, 8 GiB and more)."""
    rng = random.Random(5)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_."
    names = ["a", "x" * 100, "x" * 101, "d/" * 60 + "x.jpg", "ü.jpg", "\udcff.jpg", "k.json"]
    names += ["".join(rng.choice(alphabet) for _ in range(n)) for n in range(1, 101)]
    sizes = [0, 1, 511, 512, 513, 8**11 - 1, 8**11, 2**40, *(rng.randrange(10**9) for _ in range(20))]

    def tarfiles(name: str, size: int) -> bytes:
        return shard._tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")

    def outcome(make: Callable[[str, int], bytes], name: str, size: int) -> bytes | type[Exception]:
        try:
            return make(name, size)
        except ValueError as exc:  # tarfile's: a name or size USTAR cannot hold
            return type(exc)

    checked = 0
    for name in names:
        for size in rng.sample(sizes, 6) + [0, 8**11 - 1, 8**11]:
            expected = outcome(tarfiles, name, size)
            assert outcome(shard._ustar_header, name, size) == expected, (name, size)
            checked += isinstance(expected, bytes)
    assert checked > 500  # most are headers, not refusals
