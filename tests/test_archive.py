"""Sources read straight from archives: zip, split zip, tar, tar.gz and folders of them give the same
shards as the unpacked folder; corrupt members and truncated archives; member paths and odd names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _images import textured, write_geotiff, write_jpeg, write_png
from conftest import output_files

from rscurate import archive, pipeline, raster, scan
from rscurate.recipe import load_recipe

# The tables' columns that name a file by its path on disk: they differ between archive and folder.
PATH_COLUMNS = ("path", "duplicate_of_path", "benchmark_match")


def write_unpacked(root: Path) -> Path:
    """A small dataset as it lies unpacked: chips, a scene sliced into tiles, a 16-bit GeoTIFF, an
    exact duplicate, a blank image and a broken file."""
    (root / "images" / "sub").mkdir(parents=True)
    for i in range(5):
        write_jpeg(root / "images" / f"chip_{i}.jpg", textured(96, 128, seed=i))
    write_png(root / "images" / "sub" / "rgb.png", textured(120, 100, seed=9))
    shutil.copyfile(root / "images" / "chip_0.jpg", root / "images" / "sub" / "copy.jpg")
    (root / "scenes").mkdir()
    write_png(root / "scenes" / "big.png", textured(700, 600, seed=10))
    write_png(root / "scenes" / "flat.png", np.full((90, 90, 3), 77, np.uint8))
    (root / "scenes" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "geo").mkdir()
    write_geotiff(root / "geo" / "ms.tif", textured(300, 340, 3, seed=11, dtype="uint16"))
    return root


def files_of(root: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def write_zip(path: Path, root: Path, stored: bool = False) -> Path:
    mode = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=mode) as z:
        for rel, p in files_of(root):
            z.write(p, rel)
    return path


def write_tar(path: Path, root: Path, mode: str, names: list[str] | None = None) -> Path:
    """A tar of root's files; a member order other than sorted (archive order must be kept)."""
    wanted = files_of(root) if names is None else [(n, root / n) for n in names]
    with tarfile.open(path, mode) as t:
        for rel, p in reversed(wanted):
            t.add(p, f"./{rel}")
    return path


def split_zip(whole: Path, out: Path, part_size: int) -> Path:
    """The parts of a split ZIP as `zip -s` writes them (NAME.z01, ..., NAME.zip), made from a whole
    one: a spanning signature first, the entries' data cut into parts of part_size bytes, and the
    central directory (in the last part) giving each entry's part and offset in it."""
    data = whole.read_bytes()
    eocd_at = data.rfind(b"PK\x05\x06")
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<4sHHHHLLH", data, eocd_at)
    body = b"PK\x07\x08" + data[:cd_offset]  # every local offset moves 4 bytes on
    parts = [body[i : i + part_size] for i in range(0, len(body), part_size)]
    directory = bytearray(data[cd_offset : cd_offset + cd_size])
    pos = 0
    for _ in range(count):
        nlen, xlen, clen = struct.unpack_from("<HHH", directory, pos + 28)
        (offset,) = struct.unpack_from("<L", directory, pos + 42)
        struct.pack_into("<H", directory, pos + 34, (offset + 4) // part_size)
        struct.pack_into("<L", directory, pos + 42, (offset + 4) % part_size)
        pos += 46 + nlen + xlen + clen
    last = len(parts)  # the .zip part holds the central directory and the end record
    eocd = struct.pack("<4sHHHHLLH", b"PK\x05\x06", last, last, count, count, cd_size, 0, 0)
    stem = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts, start=1):
        Path(f"{stem}.z{i:02d}").write_bytes(part)
    out.write_bytes(bytes(directory) + eocd)
    return out


def recipe_at(folder: Path, root: Path | str, tag: str = "arc") -> Path:
    recipe = {
        "name": "arc",
        "sources": [{"name": "src", "root": str(root), "task": "detection"}],
        "exclude": {"min_side": 64},
        "slice": {"max_side": 512, "tile_size": 256},
        "shard": {"max_samples": 4, "shuffle_seed": 3},
    }
    path = folder / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def curate(tmp: Path, root: Path | str, tag: str, **kw: object) -> Path:
    out = tmp / f"out-{tag}"
    pipeline.run(load_recipe(recipe_at(tmp, root, tag)), out, workers=1, **kw)
    return out


def comparable(out: Path, table: str) -> pd.DataFrame:
    df = pd.read_parquet(out / table)
    return df.drop(columns=[c for c in PATH_COLUMNS if c in df.columns])


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the unpacked dataset, its curated output)."""
    tmp = tmp_path_factory.mktemp("arc")
    root = write_unpacked(tmp / "dataset")
    return root, curate(tmp, root, "folder")


def assert_same_outputs(out: Path, reference: Path) -> None:
    """Shards byte for byte; tables equal in every column but the on-disk paths; same counts."""
    mine, theirs = output_files(out), output_files(reference)
    shards = sorted(k for k in theirs if k.startswith("shards/"))
    assert shards and sorted(k for k in mine if k.startswith("shards/")) == shards
    for name in shards:
        assert mine[name] == theirs[name], name
    for table in ("inputs.parquet", "tiles.parquet"):
        pd.testing.assert_frame_equal(comparable(out, table), comparable(reference, table))
    a, b = (json.loads((o / "stats.json").read_text()) for o in (out, reference))
    for key in ("inputs", "tiles", "kept", "shards"):
        assert a[key] == b[key]


@pytest.mark.parametrize("kind", ["zip", "stored-zip", "tar", "tar.gz", "split-zip", "folder-of-archives"])
def test_archives_curate_like_the_unpacked_folder(
    kind: str, unpacked: tuple[Path, Path], tmp_path: Path
) -> None:
    root, reference = unpacked
    if kind == "zip":
        source: Path = write_zip(tmp_path / "dataset.zip", root)
    elif kind == "stored-zip":
        source = write_zip(tmp_path / "dataset.zip", root, stored=True)
    elif kind == "tar":
        source = write_tar(tmp_path / "dataset.tar", root, "w")
    elif kind == "tar.gz":
        source = write_tar(tmp_path / "dataset.tar.gz", root, "w:gz")
    elif kind == "split-zip":
        source = split_zip(
            write_zip(tmp_path / "whole.zip", root), tmp_path / "parts" / "dataset.zip", 20_000
        )
        (tmp_path / "whole.zip").unlink()
        assert len(list((tmp_path / "parts").glob("dataset.z[0-9]*"))) > 3
    else:  # a multi-part release: some files in a zip, the rest in a tar.gz, in one folder
        source = tmp_path / "release"
        source.mkdir()
        names = [rel for rel, _ in files_of(root)]
        with zipfile.ZipFile(source / "part-1.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
            for rel in names[::2]:
                z.write(root / rel, rel)
        write_tar(source / "part-2.tar.gz", root, "w:gz", names=names[1::2])
    out = curate(tmp_path, source, kind)
    assert_same_outputs(out, reference)
    inputs = pd.read_parquet(out / "inputs.parquet")
    # Every path names its archive and the member inside it.
    assert all(archive.is_member(p) for p in inputs["path"])
    if kind != "folder-of-archives":
        archive_path = str(source)
        assert {archive.split(p)[0] for p in inputs["path"]} == {archive_path}
    chip = inputs.loc[inputs["relpath"] == "images/chip_1.jpg", "path"].item()
    assert archive.split(chip)[1].lstrip("./") == "images/chip_1.jpg"


def test_a_compressed_tar_is_streamed_once_per_pass(
    unpacked: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, reference = unpacked
    source = write_tar(tmp_path / "dataset.tgz", root, "w:gz")
    opened: list[str] = []
    real_open = archive.MemberStream._open

    def counted(self: archive.MemberStream) -> tarfile.TarFile:
        opened.append(self.path)
        return real_open(self)

    monkeypatch.setattr(archive.MemberStream, "_open", counted)
    out = curate(tmp_path, source, "tgz", partition_pixels=30_000)  # many slice partitions
    assert len(list((out / "_work" / "slice").glob("part-*.scenes.parquet"))) >= 4
    assert len(opened) == 2  # scan and slice each stream it once (listing is one more pass)
    assert_same_outputs(out, reference)


def test_a_corrupt_member_is_one_unreadable_row(unpacked: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = unpacked
    source = write_zip(tmp_path / "dataset.zip", root, stored=True)
    data = bytearray(source.read_bytes())
    chip = (root / "images" / "chip_2.jpg").read_bytes()
    at = bytes(data).find(chip)
    data[at + len(chip) // 2] ^= 0xFF  # one flipped byte inside the stored member: its CRC fails
    source.write_bytes(bytes(data))
    out = curate(tmp_path, source, "corrupt")
    inputs = pd.read_parquet(out / "inputs.parquet").set_index("relpath")
    assert inputs.loc["images/chip_2.jpg", "status"] == "error"
    assert inputs.loc["images/chip_2.jpg", "reason"] == (
        "unreadable: archive member fails its CRC check (corrupt inside the archive)"
    )
    assert (inputs.drop(index=["images/chip_2.jpg", "scenes/broken.jpg"])["status"] != "error").all()
    assert json.loads((out / "stats.json").read_text())["kept"] > 0


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz"])
def test_a_truncated_archive_is_a_clear_error_naming_it(
    suffix: str, unpacked: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = unpacked
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".zip":
        write_zip(whole, root)
    else:
        write_tar(whole, root, "w" if suffix == ".tar" else "w:gz")
    cut = tmp_path / f"dataset{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(archive.ArchiveError, match=str(cut).replace(".", r"\.")) as caught:
        curate(tmp_path, cut, "cut")
    assert "download it again" in str(caught.value)
    if suffix != ".zip":
        return  # the command line's handling is the same for every kind: checked once
    recipe = recipe_at(tmp_path, cut, "cli")
    done = subprocess.run(
        [sys.executable, "-m", "rscurate", "run", str(recipe), "--out", str(tmp_path / "cli-out")],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2 and str(cut) in done.stderr.replace("\n", "") and "Traceback" not in done.stderr
    )


def test_a_missing_part_of_a_split_zip_is_named(unpacked: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = unpacked
    source = split_zip(write_zip(tmp_path / "whole.zip", root), tmp_path / "parts" / "dataset.zip", 20_000)
    (tmp_path / "parts" / "dataset.z02").unlink()
    with pytest.raises(archive.ArchiveError, match=r"missing part dataset\.z02"):
        archive.list_members(str(source))


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's `zip` to make a split archive")
def test_a_split_zip_written_by_zip_reads_back(unpacked: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = unpacked
    subprocess.run(["zip", "-q", "-s", "64k", "-r", str(tmp_path / "release.zip"), "."], cwd=root, check=True)
    assert (tmp_path / "release.z01").exists()
    listed = {rel: path for rel, path, reason in scan.walk(str(tmp_path / "release.zip"), ["**/*"])}
    assert sorted(listed) == [rel for rel, _ in files_of(root)]
    for rel, p in files_of(root):
        assert archive.read_member(listed[rel]) == p.read_bytes()


def test_member_names_that_are_not_utf8_survive_the_tables(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "chip.jpg", textured(80, 90, seed=4))
    name = b"imgs/caf\xe9.jpg".decode("utf-8", "surrogateescape")
    with tarfile.open(tmp_path / "odd.tar", "w", encoding="utf-8", errors="surrogateescape") as t:
        t.add(tmp_path / "chip.jpg", name)
    (rel, path, reason) = scan.walk(str(tmp_path / "odd.tar"), ["**/*.jpg"])[0]
    text = raster.path_text(path)
    assert text.endswith("!imgs/caf\\xe9.jpg") and raster.path_text(rel) == "imgs/caf\\xe9.jpg"
    assert raster.fs_path(text) == path
    inputs = scan.run(pd.DataFrame({"source": ["s"], "path": [text], "relpath": [raster.path_text(rel)]}))
    assert inputs["status"].item() == "ok" and inputs["width"].item() == 90


def test_split_paths() -> None:
    assert archive.split("/d/AID.zip!AID/a b/x.jpg") == ("/d/AID.zip", "AID/a b/x.jpg")
    assert archive.split("/d/set.TAR.GZ!./x.png") == ("/d/set.TAR.GZ", "./x.png")
    assert archive.split("/d/wow!/x.jpg") is None and archive.split("/d/x.jpg") is None
    assert archive.split("/d/a.zip!b.zip!c.jpg") == ("/d/a.zip", "b.zip!c.jpg")


def test_an_archive_whose_own_name_is_not_utf8(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "chip.jpg", textured(70, 80, seed=5))
    name = os.fsdecode(b"d\xe9p\xf4t.zip")  # the bytes of a Latin-1 name, as a surrogate-escaped str
    with zipfile.ZipFile(tmp_path / name, "w") as z:
        z.write(tmp_path / "chip.jpg", "a/chip.jpg")
    (rel, path, _) = scan.walk(str(tmp_path / name), ["**/*.jpg"])[0]
    text = raster.path_text(path)
    assert "d\\xe9p\\xf4t.zip!a/chip.jpg" in text and raster.fs_path(text) == path
    inputs = scan.run(pd.DataFrame({"source": ["s"], "path": [text], "relpath": [rel]}))
    assert inputs["status"].item() == "ok" and inputs["sha256"].item() == (
        hashlib.sha256((tmp_path / "chip.jpg").read_bytes()).hexdigest()
    )
