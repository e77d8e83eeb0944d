"""rscurate.exclude: header-level reasons (unreadable, benchmark, not_optical, too_small, exact_duplicate)
and the benchmark images' pHashes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import imagehash
import pandas as pd
import pytest
from _images import textured, write_jpeg, write_png, write_text_as_image
from PIL import Image

from rscurate import exclude, scan
from rscurate.recipe import ExcludeConfig, RecipeError, SourceConfig, recipe_from_dict


def inputs_row(
    source: str,
    relpath: str,
    sha: str | None,
    w: int = 100,
    h: int = 100,
    status: str = "ok",
    reason: str | None = None,
) -> dict:
    return {
        "source": source,
        "path": f"/data/{source}/{relpath}",
        "relpath": relpath,
        "size_bytes": 10,
        "sha256": sha,
        "format": "png",
        "width": w,
        "height": h,
        "bands": 3,
        "dtype": "uint8",
        "crs": None,
        "nodata": None,
        "status": status,
        "reason": reason,
    }


SOURCES = (
    SourceConfig(name="first", root="/data/first"),
    SourceConfig(name="second", root="/data/second", exclude_paths=("test/leak.png",)),
    SourceConfig(name="sar", root="/data/sar", optical=False),
)


def decide(rows: list[dict], cfg: ExcludeConfig | None = None) -> pd.DataFrame:
    out = exclude.run(cfg or ExcludeConfig(min_side=64), scan.to_inputs_frame(rows), SOURCES)
    return out.set_index(out["source"] + ":" + out["relpath"])


def test_each_reason() -> None:
    out = decide(
        [
            inputs_row("first", "ok.png", "a"),
            inputs_row("first", "broken.png", None, status="error", reason="zero-byte file"),
            inputs_row("first", "small.png", "b", w=200, h=63),
            inputs_row("second", "test/leak.png", "c"),
            inputs_row("sar", "scene.tif", "d"),
        ]
    )
    assert out.loc["first:ok.png", "status"] == "ok" and pd.isna(out.loc["first:ok.png", "reason"])
    assert out.loc["first:broken.png", ["status", "reason"]].tolist() == [
        "error",
        "unreadable: zero-byte file",
    ]
    assert out.loc["first:small.png", ["status", "reason"]].tolist() == ["excluded", "too_small"]
    assert out.loc["second:test/leak.png", ["status", "reason"]].tolist() == ["excluded", "benchmark"]
    assert out.loc["sar:scene.tif", ["status", "reason"]].tolist() == ["excluded", "not_optical"]
    assert set(out["reason"].dropna().map(lambda r: r.split(":")[0])) <= set(exclude.REASONS)


def test_exact_duplicates_keep_the_first_by_source_order_then_relpath() -> None:
    out = decide(
        [
            inputs_row("second", "a.png", "same"),  # earlier relpath, but a later source
            inputs_row("first", "z.png", "same"),
            inputs_row("first", "m.png", "same"),  # same source: relpath decides
            inputs_row("first", "other.png", "different"),
        ]
    )
    assert out.loc["first:m.png", "status"] == "ok"
    for key in ("first:z.png", "second:a.png"):
        assert out.loc[key, ["status", "reason", "duplicate_of_path"]].tolist() == [
            "excluded",
            "exact_duplicate",
            "/data/first/m.png",
        ]
    assert out.loc["first:other.png", "status"] == "ok" and out["duplicate_of_path"].notna().sum() == 2


def test_duplicates_are_found_among_ok_files_only() -> None:
    out = decide(
        [inputs_row("first", "tiny.png", "x", w=10, h=10), inputs_row("second", "copy.png", "x", w=10, h=10)]
    )
    assert out["reason"].tolist() == ["too_small", "too_small"]  # neither is kept, so neither is a duplicate


def test_a_byte_copy_of_a_listed_benchmark_file_is_a_benchmark_too(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rscurate.exclude"):
        out = decide([inputs_row("second", "test/leak.png", "k"), inputs_row("first", "train/copy.png", "k")])
    assert out["reason"].tolist() == ["benchmark", "benchmark"]
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="rscurate.exclude"):
        decide([inputs_row("second", "test/elsewhere.png", "k")])
    assert "1 of its 1 exclude_paths are not among the scanned files" in caplog.text


def test_benchmark_run_hashes_like_imagehash(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    a = write_png(bench / "a.png", textured(80, 120, seed=1))
    write_jpeg(bench / "b.jpg", textured(300, 200, seed=2))
    write_text_as_image(bench / "c.png", "html")
    recipe = recipe_from_dict(
        {
            "name": "t",
            "sources": [{"name": "s", "root": str(tmp_path)}],
            "benchmarks": [{"name": "b", "root": str(bench)}],
        },
        check_roots=False,
    )
    out = exclude.benchmark_run(exclude.list_benchmark_files(recipe)).set_index("relpath")
    assert out.loc["a.png", "phash"] == str(imagehash.phash(Image.open(a)))
    assert out.loc["b.jpg", "status"] == "ok" and len(out.loc["b.jpg", "phash"]) == 16
    assert out.loc["c.png", "status"] == "error"
    assert out.loc["c.png", "reason"].startswith("unreadable: not an image: looks like HTML text")


def test_exclude_on_scanned_files(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write_png(one / "x.png", textured(100, 100))
    shutil.copyfile(one / "x.png", two / "x.png")
    write_png(two / "tiny.png", textured(20, 20))
    recipe = recipe_from_dict(
        {"name": "t", "sources": [{"name": "one", "root": str(one)}, {"name": "two", "root": str(two)}]}
    )
    out = exclude.run(recipe.exclude, scan.run(scan.list_files(recipe)), recipe.sources)
    assert out[["source", "relpath", "status", "reason"]].fillna("-").values.tolist() == [
        ["one", "x.png", "ok", "-"],
        ["two", "tiny.png", "excluded", "too_small"],
        ["two", "x.png", "excluded", "exact_duplicate"],
    ]


def test_manifest_hold_outs_and_ignored_files(tmp_path: Path) -> None:
    """A source manifest's exclude_patterns / exclude_lists hold test images out; ignore_patterns skip masks."""
    root = tmp_path / "dior"
    for rel in ("trainval/00001.jpg", "test/00002.jpg", "test/00003.JPG", "trainval/00004.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(root / rel, textured(96, 96, seed=int(rel[-5])))
    (root / "masks").mkdir()
    write_png(root / "masks" / "00001.png", textured(96, 96, seed=9))
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("00004\n")
    recipe = recipe_from_dict(
        {
            "name": "t",
            "sources": [
                {
                    "name": "dior",
                    "root": str(root),
                    "exclude_patterns": ["test/*.jpg"],
                    "exclude_lists": ["splits/test.txt"],
                    "ignore_patterns": ["masks/**/*.png"],
                }
            ],
        }
    )
    files = scan.list_files(recipe)
    assert sorted(files["relpath"]) == [
        "test/00002.jpg",
        "test/00003.JPG",
        "trainval/00001.jpg",
        "trainval/00004.jpg",
    ]
    out = exclude.run(recipe.exclude, scan.run(files), recipe.sources).set_index("relpath")
    assert out.loc["trainval/00001.jpg", "status"] == "ok"
    for held in ("test/00002.jpg", "test/00003.JPG", "trainval/00004.jpg"):
        assert (out.loc[held, "status"], out.loc[held, "reason"]) == ("excluded", "benchmark"), held


def test_a_missing_exclude_list_stops_the_run(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    write_jpeg(root / "a.jpg", textured(96, 96))
    recipe = recipe_from_dict(
        {"name": "t", "sources": [{"name": "src", "root": str(root), "exclude_lists": ["test.txt"]}]}
    )
    with pytest.raises(RecipeError, match="test.txt not found"):
        exclude.run(recipe.exclude, scan.run(scan.list_files(recipe)), recipe.sources)
