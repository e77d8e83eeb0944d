"""rscurate.slicing: window grids, nodata/blank filtering, georeferenced tiles, encoding, pHashes, bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from _images import (
    ORIGIN,
    PIXEL,
    textured,
    write_cmyk_jpeg,
    write_exif_jpeg,
    write_geotiff,
    write_gray16_png,
    write_jpeg,
    write_palette_png,
    write_png,
    write_sparse_geotiff,
    write_truncated,
)
from PIL import Image

from rscurate import exclude as exclude_pass
from rscurate import scan, slicing
from rscurate.hash import from_hex
from rscurate.raster import orient_array
from rscurate.recipe import (
    ExcludeConfig,
    RecipeError,
    ShardConfig,
    SliceConfig,
    SourceConfig,
    recipe_from_dict,
)
from rscurate.sample import make_key


def cfg(tile: int = 512, overlap: int = 0, edge: str = "shift", max_side: int = 512) -> SliceConfig:
    return SliceConfig(max_side=max_side, tile_size=tile, overlap=overlap, edge=edge)


# --------------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize(
    ("n", "overlap", "edge", "expected"),
    [
        (1000, 0, "shift", [0, 488]),
        (1000, 0, "pad", [0, 512]),
        (1000, 0, "drop", [0]),
        (1000, 128, "shift", [0, 384, 488]),
        (1000, 128, "pad", [0, 384, 768]),
        (1000, 128, "drop", [0, 384]),
        (1024, 0, "shift", [0, 512]),
        (1024, 0, "pad", [0, 512]),
        (1024, 0, "drop", [0, 512]),
        (1408, 128, "shift", [0, 384, 768, 896]),
        (896, 128, "drop", [0, 384]),
    ],
)
def test_axis_windows(n: int, overlap: int, edge: str, expected: list[int]) -> None:
    assert slicing.axis_windows(n, 512, overlap, edge) == [(s, 512) for s in expected]


def test_windows_grid_row_by_row() -> None:
    assert slicing.windows(1000, 600, cfg()) == [
        (0, 0, 512, 512),
        (488, 0, 512, 512),
        (0, 88, 512, 512),
        (488, 88, 512, 512),
    ]
    assert slicing.windows(1000, 600, cfg(edge="pad")) == [
        (0, 0, 512, 512),
        (512, 0, 512, 512),
        (0, 512, 512, 512),
        (512, 512, 512, 512),
    ]
    assert slicing.windows(1000, 600, cfg(edge="drop")) == [(0, 0, 512, 512)]


def test_small_scenes_stay_whole_and_thin_ones_follow_the_edge_policy() -> None:
    assert slicing.windows(1024, 700, cfg(max_side=1024)) == [(0, 0, 1024, 700)]
    assert slicing.windows(3000, 300, cfg(max_side=1024, edge="shift"))[:2] == [
        (0, 0, 512, 300),
        (512, 0, 512, 300),
    ]
    assert slicing.windows(3000, 300, cfg(max_side=1024, edge="pad"))[0] == (0, 0, 512, 512)
    assert slicing.windows(3000, 300, cfg(max_side=1024, edge="drop")) == []


# --------------------------------------------------------------------------------------------------
# Slicing scenes


SHARD_PNG = ShardConfig(image_format="png")
EXCLUDE = ExcludeConfig()


def slice_files(
    paths: list[Path],
    slice_cfg: SliceConfig,
    *,
    ex: ExcludeConfig = EXCLUDE,
    shard: ShardConfig = SHARD_PNG,
    source: SourceConfig | None = None,
    **kw,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    source = source or SourceConfig(name="src", root=str(paths[0].parent), task="segmentation")
    files = pd.DataFrame(
        {"source": source.name, "path": [str(p) for p in paths], "relpath": [p.name for p in paths]}
    )
    return slicing.run(slice_cfg, ex, shard, scan.run(files), [source], **kw)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_georeferenced_scene_tiles(tmp_path: Path) -> None:
    data = textured(1100, 1300)
    data[:, :300] = 0  # a nodata strip
    data[588:, 788:] = 77  # a flat corner: the tile at (788, 588) is blank
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    tiles, scenes = slice_files([path], cfg())
    sha = scan.file_sha256(str(path))
    assert list(tiles.columns) == slicing.TILE_COLUMNS
    assert tiles[["x", "y"]].values.tolist() == [[x, y] for y in (0, 512, 588) for x in (0, 512, 788)]
    assert tiles["key"].tolist() == [make_key("src", sha[:16], x, y) for x, y in tiles[["x", "y"]].values]
    assert (tiles["task"] == "segmentation").all() and (tiles["crs"] == "EPSG:32633").all()

    by = tiles.set_index(["x", "y"])
    left = by.loc[(0, 0)]
    assert (left["status"], left["reason"]) == ("excluded", "nodata")
    assert left["nodata_fraction"] == pytest.approx(300 / 512)
    assert pd.isna(left["data"]) and pd.isna(left["phash"])
    flat = by.loc[(788, 588)]
    assert (flat["status"], flat["reason"], flat["nodata_fraction"]) == ("excluded", "blank", 0.0)
    kept = tiles[tiles["status"] == "kept"]
    assert len(kept) == 5 and kept["reason"].isna().all()

    t = by.loc[(512, 0)]
    minx, miny, maxx, maxy = json.loads(t["bounds"])
    assert (minx, maxy) == (ORIGIN[0] + 512 * PIXEL, ORIGIN[1])
    assert (maxx, miny) == (ORIGIN[0] + 1024 * PIXEL, ORIGIN[1] - 512 * PIXEL)

    # PNG tiles hold exactly the source pixels; the pHash is imagehash's of those pixels.
    for (x, y), row in kept.set_index(["x", "y"]).iterrows():
        region = data[y : y + 512, x : x + 512]
        assert np.array_equal(decode(row["data"]), region)
        assert row["phash"] == str(imagehash.phash(Image.fromarray(region)))

    scene = scenes.iloc[0]
    assert (scene["path"], scene["status"], scene["tiles"], scene["kept"]) == (str(path), "ok", 9, 5)
    full = int(str(imagehash.phash(Image.fromarray(data))), 16)
    assert bin(from_hex(scene["scene_phash"]) ^ full).count("1") <= 6  # from the thumbnail of the tiles


def test_padding_counts_as_nodata(tmp_path: Path) -> None:
    data = textured(600, 700)
    path = write_png(tmp_path / "p.png", data)
    tiles, _ = slice_files([path], cfg(edge="pad"), ex=ExcludeConfig(max_nodata_fraction=0.7))
    by = tiles.set_index(["x", "y"])
    right = by.loc[(512, 0)]
    assert right["nodata_fraction"] == pytest.approx(1 - 188 / 512) and right["status"] == "kept"
    pixels = decode(right["data"])
    assert pixels.shape == (512, 512, 3) and (pixels[:, 188:] == 0).all()
    assert np.array_equal(pixels[:, :188], data[:512, 512:])
    corner = by.loc[(512, 512)]
    assert corner["nodata_fraction"] == pytest.approx(1 - 188 * 88 / 512**2) and corner["reason"] == "nodata"


def test_overlap_tiles_repeat_the_shared_pixels(tmp_path: Path) -> None:
    data = textured(700, 900, 3, dtype="uint16")
    path = write_geotiff(tmp_path / "o.tif", data, block=128)
    tiles, _ = slice_files([path], cfg(tile=256, overlap=64))
    assert sorted(set(tiles["x"])) == [0, 192, 384, 576, 644]
    assert sorted(set(tiles["y"])) == [0, 192, 384, 444]
    by = tiles.set_index(["x", "y"])
    a, b = decode(by.loc[(0, 0), "data"]), decode(by.loc[(192, 0), "data"])
    assert np.array_equal(a[:, 192:], b[:, :64])


def test_sixteen_bit_scene_reaches_the_full_range(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "u16.tif", textured(900, 1100, 3, dtype="uint16"))
    tiles, _ = slice_files([path], cfg())
    pixels = np.stack([decode(d)[:, :, c] for d in tiles["data"] for c in range(3)])
    assert pixels.min() == 0 and pixels.max() == 255 and len(tiles) == 6


def test_jpeg_tiles_are_deterministic_and_carry_no_metadata(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "chip.jpg", textured(256, 256), exif=Image.Exif().tobytes())
    shard = ShardConfig(image_format="jpg", jpeg_quality=90, reencode="always")
    first, _ = slice_files([path], cfg(), shard=shard)
    second, _ = slice_files([path], cfg(), shard=shard)
    data = first["data"].iloc[0]
    assert data == second["data"].iloc[0] and data[:2] == b"\xff\xd8"
    assert b"Exif" not in data and b"ICC_PROFILE" not in data
    im = Image.open(io.BytesIO(data))
    assert im.size == (256, 256) and im.mode == "RGB"
    assert slicing.encode(textured(64, 64), shard) == slicing.encode(textured(64, 64), shard)


# --------------------------------------------------------------------------------------------------
# Copy-through: files that need no change go into the shards as they are


def test_a_plain_jpeg_chip_is_copied_byte_for_byte(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "chip.jpg", textured(256, 256, seed=3), exif=Image.Exif().tobytes())
    tiles, scenes = slice_files([path], cfg(), shard=ShardConfig(image_format="jpg"))
    row = tiles.iloc[0]
    assert row["data"] == path.read_bytes() and bool(row["copied"])
    assert row["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The decode for the pHash still happened, from the same pixels imagehash sees.
    assert from_hex(row["phash"]) == int(str(imagehash.phash(Image.open(path))), 16)
    assert scenes["scene_phash"].item() == row["phash"]


def test_png_is_copied_into_png_shards_and_encoded_for_jpg_shards(tmp_path: Path) -> None:
    path = write_png(tmp_path / "rgb.png", textured(200, 180, seed=4))
    into_png, _ = slice_files([path], cfg(), shard=SHARD_PNG)
    into_jpg, _ = slice_files([path], cfg(), shard=ShardConfig(image_format="jpg"))
    assert into_png["data"].item() == path.read_bytes() and into_png["copied"].item()
    assert into_jpg["data"].item()[:2] == b"\xff\xd8" and not into_jpg["copied"].item()


def test_files_that_need_a_change_are_reencoded(tmp_path: Path) -> None:
    rotated, rotated_pixels = write_exif_jpeg(tmp_path / "rotated.jpg", orientation=6, h=96, w=128)
    cmyk, _ = write_cmyk_jpeg(tmp_path / "cmyk.jpg", h=96, w=96)
    grey = write_jpeg(tmp_path / "grey.jpg", textured(96, 96, bands=1, seed=5)[:, :, 0])
    gray16, _ = write_gray16_png(tmp_path / "gray16.png", h=96, w=96)
    rgb16 = write_rgb16_png(tmp_path / "rgb16.png", textured(96, 96, seed=6, dtype="uint16"))
    palette, _ = write_palette_png(tmp_path / "palette.png", h=96, w=96)
    sliced = write_jpeg(tmp_path / "large.jpg", textured(700, 1100, seed=7))
    paths = [rotated, cmyk, grey, gray16, rgb16, palette, sliced]
    for shard in (ShardConfig(image_format="jpg"), SHARD_PNG):
        tiles, scenes = slice_files(paths, cfg(max_side=512), shard=shard)
        assert (scenes["status"] == "ok").all(), scenes
        kept = tiles[tiles["status"] == "kept"]
        assert set(kept["path"]) == {str(p) for p in paths}
        assert not kept["copied"].any()
        originals = {str(p): p.read_bytes() for p in paths}
        assert all(d != originals[p] for d, p in zip(kept["data"], kept["path"], strict=True))
        assert (kept.loc[kept["path"] == str(sliced), "width"] == 512).all()  # sliced into tiles
    # The rotated chip was re-encoded upright, the way the pipeline reads it.
    tiles, _ = slice_files([rotated], cfg(), shard=SHARD_PNG)
    assert np.array_equal(decode(tiles["data"].item()), orient_array(rotated_pixels, 6))
    assert Image.open(rgb16).mode == "RGB"  # Pillow would drop the low bytes: the reader must not


def write_rgb16_png(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one): IHDR, one zlib IDAT of unfiltered rows, IEND."""
    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_reencode_always_encodes_every_tile(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "chip.jpg", textured(256, 256, seed=8))
    auto, _ = slice_files([path], cfg(), shard=ShardConfig(image_format="jpg", reencode="auto"))
    always, _ = slice_files([path], cfg(), shard=ShardConfig(image_format="jpg", reencode="always"))
    assert auto["copied"].item() and not always["copied"].item()
    assert always["data"].item() != path.read_bytes()
    assert always["image_sha256"].item() == hashlib.sha256(always["data"].item()).hexdigest()
    # The same pixels were judged and hashed either way.
    assert auto["phash"].item() == always["phash"].item()
    assert (
        recipe_from_dict(
            {"name": "x", "sources": [{"name": "s", "root": str(tmp_path)}], "shard": {"reencode": "always"}}
        ).shard.reencode
        == "always"
    )
    with pytest.raises(RecipeError, match="shard.reencode"):
        recipe_from_dict(
            {"name": "x", "sources": [{"name": "s", "root": str(tmp_path)}], "shard": {"reencode": "never"}}
        )


def test_scene_statuses_and_unreadable_scenes(tmp_path: Path) -> None:
    flat = write_png(tmp_path / "a_flat.png", np.full((300, 300, 3), 120, np.uint8))
    thin = write_png(tmp_path / "b_thin.png", textured(100, 1400))
    good = write_jpeg(tmp_path / "c_good.jpg", textured(200, 300))
    cut = write_truncated(
        tmp_path / "d_cut.jpg", write_jpeg(tmp_path / "whole.jpg", textured(400, 400)), keep=0.4
    )
    after = write_png(tmp_path / "e_after.png", textured(120, 120))
    paths = [flat, thin, good, cut, after]
    source = SourceConfig(name="src", root=str(tmp_path))
    files = pd.DataFrame(
        {"source": "src", "path": [str(p) for p in paths], "relpath": [p.name for p in paths]}
    )
    inputs = scan.run(files)
    assert inputs["status"].tolist() == ["ok", "ok", "ok", "error", "ok"]
    inputs["status"] = "ok"  # as if the file had been cut after the scan: only decoding can tell
    tiles, scenes = slicing.run(cfg(edge="drop"), EXCLUDE, SHARD_PNG, inputs, [source])
    s = scenes.set_index("path")
    assert s.loc[str(flat), ["status", "reason"]].tolist() == ["excluded", "blank"]
    assert pd.isna(s.loc[str(flat), "scene_phash"])
    assert s.loc[str(thin), ["status", "reason", "tiles"]].tolist() == ["excluded", "too_small", 0]
    assert s.loc[str(good), "status"] == "ok"
    assert s.loc[str(good), "scene_phash"] == tiles.loc[tiles["path"] == str(good), "phash"].item()
    assert s.loc[str(cut), "status"] == "error" and s.loc[str(cut), "reason"].startswith(
        "unreadable: truncated JPEG"
    )
    assert s.loc[str(after), "status"] == "ok"  # the run went on
    assert set(tiles["path"]) == {str(flat), str(good), str(after)}
    assert tiles.loc[tiles["path"] == str(flat), "reason"].tolist() == ["blank"]


def test_sink_receives_the_bytes(tmp_path: Path) -> None:
    paths = [write_png(tmp_path / f"{i}.png", textured(100, 100, seed=i)) for i in range(3)]
    got: list[pd.DataFrame] = []
    tiles, _ = slice_files(paths, cfg(), sink=got.append)
    assert tiles["data"].isna().all() and tiles["phash"].notna().all()
    sunk = pd.concat(got)
    assert sunk["key"].tolist() == tiles["key"].tolist() and sunk["data"].notna().all()
    assert sunk["phash"].tolist() == tiles["phash"].tolist()


def test_luminance_std() -> None:
    flat = np.full((64, 64, 3), 50, np.uint8)
    assert slicing.luminance_std(flat) == 0.0
    stripes = flat.copy()
    stripes[::2] = 150
    assert slicing.luminance_std(stripes, step=1) == pytest.approx(50.0, abs=0.01)
    valid = np.zeros((64, 64), bool)
    assert slicing.luminance_std(stripes, valid) == 0.0


def test_a_20000_px_raster_slices_in_bounded_memory(tmp_path: Path) -> None:
    """1600 windows of a 20000 x 20000 RGB raster (1.2 GB decoded) with peak RSS of a few strips."""
    path = write_sparse_geotiff(tmp_path / "huge.tif", 20000, textured_blocks=4)
    assert path.stat().st_size < 5_000_000  # only the 4 textured blocks are stored
    code = textwrap.dedent(
        f"""
        import pandas as pd
        from rscurate import scan, slicing
        from rscurate.recipe import ExcludeConfig, ShardConfig, SliceConfig, SourceConfig
        src = SourceConfig(name="huge", root={str(tmp_path)!r})
        inputs = scan.run(pd.DataFrame({{"source": ["huge"], "path": [{str(path)!r}], "relpath": ["huge.tif"]}}))
        tiles, scenes = slicing.run(SliceConfig(), ExcludeConfig(), ShardConfig(), inputs, [src])
        print(len(tiles), int((tiles["status"] == "kept").sum()), int((tiles["reason"] == "nodata").sum()), scenes["status"].item())
        print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024)  # this process's peak (ru_maxrss would include the parent pytest: it survives exec)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split("\n")
    assert out[0] == "1600 4 1596 ok"
    peak_mb = int(out[1])
    assert peak_mb < 700, f"peak RSS {peak_mb} MB for a 1.2 GB raster: not bounded by strips"


# --------------------------------------------------------------------------------------------------
# Real imagery (RS_REAL_DATA)


@pytest.mark.realdata
@pytest.mark.slow
def test_scan_and_slice_every_real_file(real_data: Path) -> None:
    recipe = recipe_from_dict({"name": "real", "sources": [{"name": "real", "root": str(real_data)}]})
    inputs = exclude_pass.run(recipe.exclude, scan.run(scan.list_files(recipe)), recipe.sources)
    tiles, scenes = slicing.run(recipe.slice, recipe.exclude, recipe.shard, inputs, recipe.sources)
    assert len(scenes) == (inputs["status"] == "ok").sum() == 69  # 71 files, 2 exact duplicates
    assert (scenes["status"] != "error").all(), scenes[scenes["status"] == "error"]
    assert tiles["key"].is_unique and (tiles["status"] == "kept").sum() > 150

    def of(rel: str) -> pd.DataFrame:
        return tiles[tiles["path"] == str(real_data / rel)]

    assert of("rio-tiler/pix4d_alpha_nodata.tif")["nodata_fraction"].max() > 0.05
    rgb16 = decode(of("rio-color/rgb16.tif")["data"].item())
    assert rgb16.min() == 0 and rgb16.max() == 255
    byte = of("rasterio/RGB.byte.tif").iloc[0]
    assert byte["crs"] == "EPSG:32618" and len(json.loads(byte["bounds"])) == 4
    assert len(of("GeoChat/7292.JPG")) == 54  # 4592 x 3072 in 512 px tiles, shifted edges


@pytest.mark.realdata
def test_real_multiband_uses_source_bands(real_data: Path) -> None:
    import rasterio

    path = real_data / "torchsat/tiff_8channel_uint8.tif"
    source = SourceConfig(name="ms", root=str(path.parent), bands=(5, 3, 2))
    tiles, _ = slice_files([path], cfg(max_side=1024), source=source)
    with rasterio.open(path) as ds:
        expected = np.moveaxis(ds.read([5, 3, 2]), 0, 2)
    assert np.array_equal(decode(tiles["data"].item()), expected)
