"""rscurate.scan: walking source roots (patterns, symlinks, odd entries) and pass 1's header and hash columns."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _images import (
    textured,
    write_exif_jpeg,
    write_geotiff,
    write_jpeg,
    write_png,
    write_png_header_only,
    write_text_as_image,
    write_truncated,
    write_zero_byte,
)

from rscurate import scan
from rscurate.recipe import RecipeError, recipe_from_dict


def recipe_for(*roots: Path, **source: object):
    return recipe_from_dict(
        {"name": "t", "sources": [{"name": f"s{i}", "root": str(r), **source} for i, r in enumerate(roots)]}
    )


def test_patterns_match_extensions_case_insensitively() -> None:
    match = scan.compile_patterns(["**/*.jpg", "images/*.png"])
    assert match("a.jpg") and match("x/y/DJI_0005.JPG") and match("deep/er/b.Jpg")
    assert match("images/a.PNG") and not match("other/a.png") and not match("images/sub/a.png")
    assert not match("a.jpg.txt") and not match("notes.md")
    # Case still matters outside the extension.
    images = scan.compile_patterns(["Images/*.tif"])
    assert images("Images/a.TIF") and not images("images/a.tif")
    with pytest.raises(RecipeError, match="braces"):
        scan.compile_patterns(["**/*.{jpg,png}"])


def test_walk_follows_inner_symlinks_and_reports_outer_ones(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    write_jpeg(root / "a" / "b" / "x.jpg", textured(16, 16))
    write_jpeg(outside / "y.jpg", textured(16, 16))
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a loop back up the tree
    os.symlink(root, root / "self")  # another loop, to the root itself
    os.symlink(root / "a" / "b" / "x.jpg", root / "inner_link.jpg")  # stays inside: followed
    os.symlink(outside, root / "linked_dir")  # leaves the root: listed, not followed
    os.symlink(outside / "y.jpg", root / "outer_link.jpg")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    (root / "folder.png").mkdir()
    write_png(root / "folder.png" / "inside.png", textured(16, 16))
    os.mkfifo(root / "pipe.jpg")

    found = {rel: reason for rel, _, reason in scan.walk(str(root), ["**/*.jpg", "**/*.png"])}
    assert found["a/b/x.jpg"] is None
    assert found["inner_link.jpg"] is None
    assert found["folder.png/inside.png"] is None
    assert found["folder.png"] == "a directory, not a file (its name looks like an image)"
    assert found["linked_dir"].startswith("symlink outside the source root (not followed): -> ")
    assert found["outer_link.jpg"].startswith("symlink outside the source root (not followed)")
    assert found["dangling.jpg"] == "broken symlink (its target does not exist)"
    assert found["pipe.jpg"] == "not a regular file (a fifo)"
    assert not any("y.jpg" in rel for rel in found)  # nothing read through the outer link
    assert not any(rel.startswith(("self/", "a/b/loop/")) for rel in found)  # loops walked once
    assert list(found) == sorted(found)


def test_list_files_orders_by_source_then_relpath(tmp_path: Path) -> None:
    first, second = tmp_path / "z_first", tmp_path / "a_second"
    for root in (first, second):
        (root / "sub").mkdir(parents=True)
        for name in ("b.jpg", "a.jpg", "sub/c.jpg"):
            write_jpeg(root / name, textured(16, 16))
    files = scan.list_files(recipe_for(first, second))
    assert list(files.columns) == scan.LIST_COLUMNS
    assert files["source"].tolist() == ["s0"] * 3 + ["s1"] * 3
    assert files["relpath"].tolist() == ["a.jpg", "b.jpg", "sub/c.jpg"] * 2
    assert files["path"].iloc[0] == str(first / "a.jpg") and files["status"].isna().all()


def test_scan_records_every_kind_of_file(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    write_geotiff(root / "geo.tif", textured(120, 100, 4, dtype="uint16"), nodata=0)
    write_jpeg(root / "photo.JPG", textured(50, 70))
    write_exif_jpeg(root / "rotated.jpg", 8, h=40, w=60)
    write_png(root / "gray.png", textured(30, 30, 1)[:, :, 0])
    write_zero_byte(root / "empty.jpg")
    write_truncated(root / "cut.jpg", write_jpeg(tmp_path / "whole.jpg", textured(64, 64)))
    write_text_as_image(root / "page.png", "html")
    write_png_header_only(root / "huge.png", 30000, 30000)
    (root / "dir.tif").mkdir()
    os.symlink(tmp_path / "whole.jpg", root / "outside.jpg")

    inputs = scan.run(scan.list_files(recipe_for(root)))
    assert list(inputs.columns) == scan.INPUT_COLUMNS
    by = inputs.set_index("relpath")
    assert len(by) == 10

    geo = by.loc["geo.tif"]
    assert (geo["status"], geo["format"], geo["width"], geo["height"], geo["bands"], geo["dtype"]) == (
        "ok",
        "tiff",
        100,
        120,
        4,
        "uint16",
    )
    assert (geo["crs"], geo["nodata"]) == ("EPSG:32633", 0.0) and pd.isna(geo["reason"])
    assert geo["sha256"] == hashlib.sha256((root / "geo.tif").read_bytes()).hexdigest()
    assert geo["size_bytes"] == (root / "geo.tif").stat().st_size

    photo = by.loc["photo.JPG"]
    assert (photo["format"], photo["width"], photo["height"], photo["bands"]) == ("jpeg", 70, 50, 3)
    assert pd.isna(photo["crs"])
    assert by.loc["rotated.jpg", ["width", "height"]].tolist() == [40, 60]
    assert by.loc["gray.png", ["bands", "dtype"]].tolist() == [1, "uint8"]

    errors = by[by["status"] == "error"]["reason"].to_dict()
    assert errors == {
        "empty.jpg": "zero-byte file",
        "cut.jpg": "truncated JPEG (no end-of-image marker)",
        "page.png": "not an image: looks like HTML text (an error page saved under an image name?)",
        "huge.png": "truncated PNG (no IEND chunk at the end)",
        "dir.tif": "a directory, not a file (its name looks like an image)",
        "outside.jpg": f"symlink outside the source root (not followed): -> {tmp_path / 'whole.jpg'}",
    }
    assert by.loc["empty.jpg", "size_bytes"] == 0  # what could be read is kept
    assert pd.isna(by.loc["outside.jpg", "sha256"])  # never opened


def test_scan_run_keeps_going_and_types_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        write_jpeg(root / f"{i}.jpg", textured(20, 20, seed=i))
    files = scan.list_files(recipe_for(root))
    real = scan.read_header

    def flaky(path: str, data: bytes | None = None):
        if path.endswith("1.jpg"):
            raise PermissionError(13, "Permission denied")
        return real(path, data)

    monkeypatch.setattr(scan, "read_header", flaky)
    inputs = scan.run(files)
    assert inputs["status"].tolist() == ["ok", "error", "ok"]
    assert inputs.loc[1, "reason"] == "permission denied"
    assert str(inputs["width"].dtype) == "Int64" and str(inputs["nodata"].dtype) == "Float64"
    assert inputs["width"].isna().tolist() == [False, True, False]
    empty = scan.run(files.iloc[0:0])
    assert list(empty.columns) == scan.INPUT_COLUMNS and len(empty) == 0


def test_benchmark_files_are_listed(tmp_path: Path) -> None:
    src, bench = tmp_path / "src", tmp_path / "bench"
    src.mkdir()
    bench.mkdir()
    write_png(bench / "t1.png", textured(20, 20))
    (bench / "readme.txt").write_text("not matched")
    r = recipe_from_dict(
        {
            "name": "t",
            "sources": [{"name": "s", "root": str(src)}],
            "benchmarks": [{"name": "b", "root": str(bench)}],
        }
    )
    listed = scan.list_benchmark_files(r)
    assert listed[["benchmark", "relpath"]].values.tolist() == [["b", "t1.png"]]


@pytest.mark.realdata
def test_scan_real_data(real_data: Path) -> None:
    inputs = scan.run(scan.list_files(recipe_for(real_data)))
    assert len(inputs) == 71 and (inputs["status"] == "ok").all()
    by = inputs.set_index("relpath")
    assert by.loc["rasterio/RGB.byte.tif", "crs"] == "EPSG:32618"
    assert by.loc["DeepForest/AWPE Pigeon Lake 2020 DJI_0005.JPG", "format"] == "jpeg"
    assert by.loc["PaddleRS/optical.bmp", "format"] == "bmp"
    assert by.loc["torchsat/tiff_8channel_uint8.tif", "bands"] == 8
    assert by.loc["rio-color/rgb16.tif", "dtype"] == "uint16"
    assert np.isclose(by.loc["DeepForest/OSBS_029.tif", "nodata"], 255.0)
    assert (
        by.loc["BIT_CD/samples/A/test_2_0000_0000.png", "sha256"]
        == by.loc["ChangeFormer/samples_LEVIR/A/test_2_0000_0000.png", "sha256"]
    )
