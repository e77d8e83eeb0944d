"""End to end on the synthesized corpus: every planted case lands where it should, and the shards read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rscurate import pipeline, shard
from rscurate.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def curated(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synth corpus curated with 2 workers. Its recipe, with two changes: max_nodata_fraction 0.2
    (synth's nodata strip covers 26% of the first tile column at large_side 1600) and 16 samples per
    shard (so there are several shards to mix sources across)."""
    data = yaml.safe_load(synth_corpus.read_text())
    data["exclude"] = {**data.get("exclude", {}), "max_nodata_fraction": 0.2}
    data["shard"] = {**data.get("shard", {}), "max_samples": 16}
    recipe = recipe_from_dict(data, base_dir=synth_corpus.parent, where="e2e recipe")
    out = tmp_path_factory.mktemp("e2e") / "out"
    result = pipeline.run(recipe, out, workers=2)
    corpus = synth_corpus.parent
    return {
        "out": out,
        "corpus": corpus,
        "result": result,
        "planted": json.loads((corpus / "synth.json").read_text()),
        "inputs": pd.read_parquet(out / "inputs.parquet").set_index("path", drop=False),
        "tiles": pd.read_parquet(out / "tiles.parquet"),
    }


def tiles_of(c: dict, rel: str) -> pd.DataFrame:
    return c["tiles"][c["tiles"]["path"] == str(c["corpus"] / rel)]


def test_every_file_and_tile_is_accounted_for(curated: dict) -> None:
    corpus, inputs, tiles = curated["corpus"], curated["inputs"], curated["tiles"]
    on_disk = {
        str(Path(d) / f)
        for sub in ("chips", "detection", "geotiff")
        for d, _, files in os.walk(corpus / sub)
        for f in files
    }
    assert set(inputs["path"]) == on_disk
    assert (
        inputs["status"].isin(pipeline.INPUT_STATUSES).all()
        and tiles["status"].isin(pipeline.TILE_STATUSES).all()
    )
    assert tiles["key"].is_unique
    ok_or_sliced = inputs.loc[inputs["scene_phash"].notna() | (inputs["status"] == "ok"), "path"]
    assert set(tiles["path"]) <= set(ok_or_sliced)
    assert (tiles.loc[tiles["status"] != "kept", "reason"].notna()).all()
    assert tiles.loc[tiles["status"] == "kept", "shard"].notna().all()
    assert tiles.loc[tiles["status"] != "kept", "shard"].isna().all()


def test_planted_cases(curated: dict) -> None:
    planted, inputs, corpus = curated["planted"], curated["inputs"], curated["corpus"]
    for rel in planted["broken"]:
        row = inputs.loc[str(corpus / rel)]
        assert (
            row["status"] == "error" and row["reason"].startswith("unreadable: ") and len(row["reason"]) > 14
        )

    for dup in planted["exact_duplicates"]:
        row = inputs.loc[str(corpus / dup["file"])]
        assert (row["status"], row["reason"], row["duplicate_of_path"]) == (
            "excluded",
            "exact_duplicate",
            str(corpus / dup["of"]),
        )

    for near in planted["near_duplicates"]:
        a, b = tiles_of(curated, near["file"]).iloc[0], tiles_of(curated, near["of"]).iloc[0]
        statuses = sorted([a["status"], b["status"]])
        assert statuses == ["duplicate", "kept"], (near, statuses)
        dup, kept = (a, b) if a["status"] == "duplicate" else (b, a)
        assert dup["duplicate_of"] == kept["key"]

    for leak in planted["benchmark_leaks"]:
        if "@" in leak["of"]:  # one tile of the large scene
            rel, window = leak["of"].split("@")
            x, y, _, _ = (int(v) for v in window.split(","))
            t = tiles_of(curated, rel)
            hit = t[(t["x"] == x) & (t["y"] == y)].iloc[0]
            assert (hit["status"], hit["reason"]) == ("excluded", "benchmark")
            assert inputs.loc[str(corpus / rel), "status"] == "ok"  # the rest of the scene stays
        else:  # a whole chip: the scene and its tile go
            assert inputs.loc[str(corpus / leak["of"]), "reason"] == "benchmark"
            assert tiles_of(curated, leak["of"])["reason"].tolist() == ["benchmark"]


def test_nodata_strip_and_other_rasters(curated: dict) -> None:
    strip = curated["planted"]["nodata_strip_px"]
    large = tiles_of(curated, "geotiff/scene_large.tif")
    in_strip = large[large["x"] < strip]
    assert len(in_strip) >= 3 and (in_strip["reason"] == "nodata").all()
    assert (in_strip["nodata_fraction"] > 0.2).all()
    assert (large.loc[large["x"] >= strip, "status"] != "excluded").sum() > 0
    assert large["crs"].eq("EPSG:32633").all() and large["bounds"].notna().all()

    inputs = curated["inputs"]
    for rel, dtype, bands in (
        ("geotiff/ms_uint16.tif", "uint16", 4),
        ("geotiff/reflectance.tif", "float32", 3),
    ):
        row = inputs.loc[str(curated["corpus"] / rel)]
        assert (row["dtype"], int(row["bands"])) == (dtype, bands)
        assert (tiles_of(curated, rel)["status"] == "kept").sum() >= 1


def test_stats_are_consistent_with_the_tables(curated: dict) -> None:
    out, inputs, tiles = curated["out"], curated["inputs"], curated["tiles"]
    stats = json.loads((out / "stats.json").read_text())
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert stats["inputs"]["total"] == len(inputs) and stats["tiles"]["total"] == len(tiles)
    assert (
        stats["inputs"]["by_status"]
        == inputs["status"].value_counts().reindex(pipeline.INPUT_STATUSES, fill_value=0).to_dict()
    )
    assert (
        stats["tiles"]["by_status"]
        == tiles["status"].value_counts().reindex(pipeline.TILE_STATUSES, fill_value=0).to_dict()
    )
    reasons = tiles["reason"].dropna()
    assert (
        stats["tiles"]["by_reason"] == reasons[reasons != "duplicate"].value_counts().sort_index().to_dict()
    )
    for source, counts in stats["tiles"]["by_source"].items():
        assert counts["kept"] == int(((tiles["source"] == source) & (tiles["status"] == "kept")).sum())
    assert stats["kept"] == sum(sizes.values()) == int((tiles["status"] == "kept").sum())
    assert stats["shards"] == len(sizes) == len(list((out / "shards").glob("*.tar")))


def test_shards_read_back_with_webdataset(curated: dict) -> None:
    import webdataset as wds

    out, tiles = curated["out"], curated["tiles"]
    assert shard.verify(out).ok
    kept = tiles[tiles["status"] == "kept"].set_index("key")
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"):
        key, meta, image = sample["__key__"], sample["json"], sample["jpg"]
        row = kept.loc[key]
        assert image.mode == "RGB" and image.size == (meta["width"], meta["height"]) == (
            row["width"],
            row["height"],
        )
        assert (meta["source"], meta["x"], meta["y"], meta["phash"]) == (
            row["source"],
            row["x"],
            row["y"],
            row["phash"],
        )
        seen[key] = Path(sample["__url__"]).name
    assert len(seen) == len(kept)  # every kept tile in exactly one shard
    assert all(seen[k] == kept.loc[k, "shard"] for k in seen)
    sources_per_shard = kept.groupby("shard")["source"].nunique()
    assert len(sources_per_shard) > 1 and (sources_per_shard >= 2).all()
