"""Real imagery (RS_REAL_DATA, see shared/data/rs-real/SOURCES.md): exact and near duplicates that occur
naturally in public repositories, a held-out benchmark image, every file accounted for, shards verified."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from rscurate import pipeline, shard
from rscurate.recipe import SUPPORTED_EXTENSIONS, recipe_from_dict

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# ChangeFormer and BIT_CD are sources of their own (group G is an exact byte duplicate across the two);
# every other folder is one "aerial" source. DeepForest/OSBS_029.png is held out as a benchmark: its
# pixel-identical GeoTIFF twin (group E) is in the aerial source and must not reach a shard.
OWN_SOURCES = ("ChangeFormer", "BIT_CD")
BENCHMARK_FILE = "DeepForest/OSBS_029.png"


def image_files(root: Path) -> set[str]:
    return {
        str(Path(d) / f)
        for d, _, files in os.walk(root)
        for f in files
        if Path(f).suffix.lower() in SUPPORTED_EXTENSIONS
    }


@pytest.fixture(scope="module")
def curated(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folders = sorted(p.name for p in real_data.iterdir() if p.is_dir() and p.name not in OWN_SOURCES)
    patterns = [f"{f}/**/*{ext}" for f in folders for ext in SUPPORTED_EXTENSIONS if f != "DeepForest"]
    patterns += [f"DeepForest/*{ext}" for ext in SUPPORTED_EXTENSIONS if ext != ".png"]  # not the benchmark
    recipe = recipe_from_dict(
        {
            "name": "rs-real",
            "sources": [
                {"name": "changeformer", "root": str(real_data / "ChangeFormer"), "task": "change_detection"},
                {"name": "bit_cd", "root": str(real_data / "BIT_CD"), "task": "change_detection"},
                {"name": "aerial", "root": str(real_data), "patterns": patterns},
            ],
            "benchmarks": [
                {"name": "neon", "root": str(real_data / "DeepForest"), "patterns": ["OSBS_029.png"]}
            ],
            "slice": {"tile_size": 512, "max_side": 1024},
            "shard": {"max_samples": 64},
        },
        where="real-data recipe",
    )
    out = tmp_path_factory.mktemp("real") / "out"
    result = pipeline.run(recipe, out, workers=2)
    inputs = pd.read_parquet(out / "inputs.parquet")
    return {
        "root": real_data,
        "out": out,
        "result": result,
        "inputs": inputs.set_index("path", drop=False),
        "tiles": pd.read_parquet(out / "tiles.parquet"),
    }


def test_every_file_is_accounted_for(curated: dict) -> None:
    root = curated["root"]
    expected = image_files(root) - {str(root / BENCHMARK_FILE)}
    inputs = curated["inputs"]
    assert set(inputs["path"]) == expected
    assert inputs["path"].is_unique and inputs["status"].isin(pipeline.INPUT_STATUSES).all()
    assert (inputs.loc[inputs["status"] != "ok", "reason"].notna()).all()
    tiles = curated["tiles"]
    assert set(tiles["path"]) <= set(inputs["path"])
    stats = curated["result"].stats
    assert stats["inputs"]["total"] == len(expected) and stats["tiles"]["total"] == len(tiles)


def test_exact_duplicate_across_repositories(curated: dict) -> None:
    root, inputs = curated["root"], curated["inputs"]
    for side in ("A", "B"):
        bit = inputs.loc[str(root / "BIT_CD" / "samples" / side / "test_2_0000_0000.png")]
        former = root / "ChangeFormer" / "samples_LEVIR" / side / "test_2_0000_0000.png"
        assert (bit["status"], bit["reason"]) == ("excluded", "exact_duplicate")
        assert bit["duplicate_of_path"] == str(former)  # the earlier source in the recipe keeps it
        assert inputs.loc[str(former), "status"] == "ok"


def clustered(curated: dict, rels: list[str]) -> pd.DataFrame:
    """The whole-scene tiles of these files: one kept, the others duplicates of it."""
    tiles = curated["tiles"]
    group = tiles[tiles["path"].isin([str(curated["root"] / r) for r in rels])]
    assert len(group) == len(rels), group[["path", "x", "y"]]
    assert sorted(group["status"]) == ["duplicate"] * (len(rels) - 1) + ["kept"], group[
        ["path", "status", "reason"]
    ]
    kept_key = group.loc[group["status"] == "kept", "key"].iloc[0]
    assert (group.loc[group["status"] == "duplicate", "duplicate_of"] == kept_key).all()
    return group


def test_near_duplicate_groups_are_clustered(curated: dict) -> None:
    # Group A: one Landsat scene, uncompressed, DEFLATE and a 1/10 downsample (each one whole tile).
    clustered(curated, ["rasterio/RGB.byte.tif", "rasterio/rgb_deflate.tif", "rasterio/rgb-byte-tenth.tif"])
    # Group H: the same airport, with ships pasted into one copy (pHash distance 4).
    clustered(curated, ["RSPrompter/073.jpg", "RSPrompter/286.jpg"])


def test_held_out_benchmark_twin_is_excluded(curated: dict) -> None:
    root, inputs, tiles = curated["root"], curated["inputs"], curated["tiles"]
    twin = inputs.loc[str(root / "DeepForest" / "OSBS_029.tif")]
    assert (twin["status"], twin["reason"], int(twin["benchmark_distance"])) == ("excluded", "benchmark", 0)
    assert (tiles.loc[tiles["path"] == twin["path"], "reason"] == "benchmark").all()


def test_shards_verify(curated: dict) -> None:
    report = shard.verify(curated["out"])
    assert report.ok, report.problems[:10]
    assert report.samples == curated["result"].stats["kept"] > 0
    sources = curated["tiles"].loc[curated["tiles"]["status"] == "kept", "source"]
    assert set(sources) == {"changeformer", "aerial"}  # BIT_CD's two files are ChangeFormer's bytes
