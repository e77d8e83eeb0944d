"""rscurate.synth: a deterministic aerial-like corpus with planted duplicates, leaks, broken files and rasters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import imagehash
import numpy as np
import pytest
import rasterio
from PIL import Image

from rscurate import scan
from rscurate.recipe import load_recipe
from rscurate.synth import aerial, synth


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("synth") / "c", n_chips=10, chip_size=128, large_side=1100, seed=3)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def phash_of(path: Path) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(path).convert("RGB"))


def test_same_seed_same_bytes(corpus: Path, tmp_path: Path) -> None:
    again = synth(tmp_path / "again", n_chips=10, chip_size=128, large_side=1100, seed=3)
    assert digests(corpus.parent) == digests(again.parent)
    other = synth(tmp_path / "other", n_chips=10, chip_size=128, large_side=1100, seed=4)
    a, b = digests(corpus.parent), digests(other.parent)
    assert a["chips/images/00000.jpg"] != b["chips/images/00000.jpg"]


def test_recipe_and_layout(corpus: Path) -> None:
    assert corpus.name == "recipe.yaml"
    assert "root: chips" in corpus.read_text()  # relative roots: the corpus can be moved
    recipe = load_recipe(corpus)
    assert [s.name for s in recipe.sources] == ["chips", "detection", "geotiff"]
    assert [s.task for s in recipe.sources] == ["scene_classification", "detection", "segmentation"]
    assert recipe.sources[0].root == str(corpus.parent / "chips") and recipe.benchmarks[0].root == str(
        corpus.parent / "benchmarks"
    )
    root = corpus.parent
    assert len(list((root / "chips" / "images").glob("0*.jpg"))) == 10 + 2  # + re-encoded and shifted copies
    assert sorted(p.name for p in (root / "geotiff").iterdir()) == [
        "ms_uint16.tif",
        "reflectance.tif",
        "scene_large.tif",
    ]
    sizes = [Image.open(p).size for p in sorted((root / "detection" / "images").glob("P0*.png"))]
    assert all(1000 <= max(s) <= 1500 for s in sizes) and len(sizes) == 4


def test_planted_cases_are_where_synth_json_says(corpus: Path) -> None:
    root = corpus.parent
    planted = json.loads((root / "synth.json").read_text())
    for dup in planted["exact_duplicates"]:
        assert (root / dup["file"]).read_bytes() == (root / dup["of"]).read_bytes()
    kinds = {n["kind"] for n in planted["near_duplicates"]}
    assert kinds == {"requality", "brightened", "shifted"}
    for near in planted["near_duplicates"]:
        assert (root / near["file"]).read_bytes() != (root / near["of"]).read_bytes()
        assert phash_of(root / near["file"]) - phash_of(root / near["of"]) <= 4, near
    for leak in planted["benchmark_leaks"]:
        if "@" in leak["of"]:
            rel, window = leak["of"].split("@")
            x, y, w, h = (int(v) for v in window.split(","))
            with rasterio.open(root / rel) as ds:
                tile = np.moveaxis(ds.read(window=rasterio.windows.Window(x, y, w, h)), 0, 2)
            ref = imagehash.phash(Image.fromarray(tile))
        else:
            ref = phash_of(root / leak["of"])
        assert phash_of(root / leak["file"]) - ref <= 4, leak
    unrelated = phash_of(root / "benchmarks" / "bench_other.jpg")
    assert all(unrelated - phash_of(p) > 8 for p in (root / "chips" / "images").glob("0*.jpg"))

    inputs = scan.run(scan.list_files(load_recipe(corpus))).set_index("relpath")
    broken = {p.split("/", 1)[1]: inputs.loc[p.split("/", 1)[1], "reason"] for p in planted["broken"]}
    assert broken == {
        "images/broken_empty.jpg": "zero-byte file",
        "images/broken_truncated.jpg": "truncated JPEG (no end-of-image marker)",
        "images/broken_text.png": "not an image: looks like HTML text (an error page saved under an image name?)",
    }
    assert (inputs["status"] == "ok").sum() == len(inputs) - 3


def test_geotiffs(corpus: Path) -> None:
    root = corpus.parent
    strip = json.loads((root / "synth.json").read_text())["nodata_strip_px"]
    with rasterio.open(root / "geotiff" / "scene_large.tif") as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0], ds.nodata) == (1100, 1100, 3, "uint8", 0)
        assert ds.crs.to_epsg() == 32633 and ds.block_shapes[0] == (512, 512)
        data = ds.read()
    assert strip == 1100 // 6 and (data[:, :, :strip] == 0).all() and (data[:, :, strip:] > 0).all()
    with rasterio.open(root / "geotiff" / "ms_uint16.tif") as ds:
        ms = ds.read()
        assert (ds.count, ds.dtypes[0], ds.nodata) == (4, "uint16", 0)
    assert (ms[:, 0, 0] == 0).all() and ms[:, -1, -1].min() >= 6000
    with rasterio.open(root / "geotiff" / "reflectance.tif") as ds:
        refl = ds.read()
        assert ds.dtypes[0] == "float32"
    assert 0.03 < np.isnan(refl[0]).mean() < 0.2 and np.nanmax(refl) <= 0.4


def test_aerial_is_a_seamless_textured_world() -> None:
    big = aerial(5000, 7000, 600, 700, seed=1)
    assert np.array_equal(aerial(5000, 7000, 300, 400, seed=1), big[:300, :400])
    assert np.array_equal(aerial(5123, 7321, 200, 250, seed=1), big[321:521, 123:373])
    assert big.min() >= 1  # 0 is reserved for nodata
    chips = [aerial(40960 * i, 12345, 128, 128, seed=0) for i in range(12)]
    assert min(float(c.astype(np.float32).std()) for c in chips) > 5  # never flat noise-free
    hashes = [imagehash.phash(Image.fromarray(c)) for c in chips]
    # Distinct places look distinct.
    assert min(a - b for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_chips"):
        synth(Path("/nonexistent"), n_chips=2)
    with pytest.raises(ValueError, match="large_side"):
        synth(Path("/nonexistent"), large_side=100)
