"""A synthetic aerial-like corpus and its recipe, for `rscurate synth OUT`, `make demo` and benchmarks.

The imagery is a procedural "world": a patchwork of crop parcels with row texture, forest, villages of
roofs with shadows on concrete, a road grid, lakes with shorelines, illumination drift and sensor
noise. Every pixel is a function of its world coordinates and the seed, so a scene written block by
block is seamless, chips cut from far-apart places are all different, and the same seed gives the same
bytes.

Layout written under OUT:

    chips/images/*.jpg         scene-classification chips (chip_size px JPEGs), with planted near-
                               duplicates (re-encoded at q70, shifted by 2 px; each within 2 pHash bits of
                               its original) and broken files (zero bytes, truncated, HTML text as .png)
    detection/images/*.png     four 1000-1500 px PNG scenes, a byte copy of a chip (exact duplicate) and a
                               brightened copy of another (near-duplicate across sources)
    geotiff/scene_large.tif    large_side px tiled GeoTIFF, EPSG:32633, nodata 0 in a strip on the left
    geotiff/ms_uint16.tif      16-bit 4-band (R, G, B, NIR) GeoTIFF with a nodata corner
    geotiff/reflectance.tif    float32 3-band reflectance with a NaN hole
    benchmarks/*.jpg           near-copies of a few chips and of one tile of scene_large (benchmark leaks)
                               and one unrelated image
    recipe.yaml                relative roots; `rscurate run OUT/recipe.yaml OUT/curated`
    synth.json                 what was planted where (for tests and the demo's summary)
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from PIL import Image
from rasterio.transform import Affine
from rasterio.windows import Window

from rscurate.hash import phash

log = logging.getLogger(__name__)


def north_up(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """rasterio.transform.from_origin without the deprecated Affine `*` it uses inside."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


CRS = "EPSG:32633"
PIXEL_SIZE = 0.5  # metres
# The standard benchmark corpus of issue 4: a few thousand chips plus one 8000 px tiled GeoTIFF.
STANDARD = {"n_chips": 3000, "chip_size": 256, "large_side": 8000, "broken": False}
_BLOCK = 512

# Crop parcel colours (RGB) and how strong their row texture is.
_CROPS = np.array(
    [
        [92, 128, 58],
        [120, 150, 70],
        [160, 150, 90],
        [176, 160, 110],
        [110, 96, 70],
        [140, 118, 84],
        [78, 110, 52],
        [190, 180, 130],
        [130, 140, 80],
        [100, 120, 90],
    ],
    dtype=np.float32,
)
_ROOFS = np.array(
    [[150, 70, 60], [170, 90, 70], [190, 190, 185], [120, 120, 125], [90, 95, 110], [210, 200, 180]],
    dtype=np.float32,
)


# --------------------------------------------------------------------------------------------------
# The procedural world


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) float32 from integer lattice coordinates (broadcasts)."""
    h = (
        ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + (seed * 2246822519) % 4294967296
    ) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return (h.astype(np.float32) / np.float32(4294967296.0)).astype(np.float32)


def _lattice(x0: int, n: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis: lattice coordinates (cells,), cell index of each pixel (n,), smoothstep weight (n,)."""
    f = (x0 + np.arange(n, dtype=np.float64)) / scale
    i = np.floor(f).astype(np.int64)
    t = (f - i).astype(np.float32)
    return np.arange(i[0], i[-1] + 2), i - i[0], t * t * (3 - 2 * t)


def _value_noise(x0: int, y0: int, h: int, w: int, scale: float, seed: int) -> np.ndarray:
    """(h, w) float32 smooth value noise in [0, 1) with features about `scale` px across.

    Smoothstep interpolation of a hashed lattice, separably: along x on the small (cells, w) array, then
    along y with whole-row gathers. No BLAS: a matrix product here would start OpenBLAS threads that
    fight over a shared machine's cores.
    """
    gx, jx, tx = _lattice(x0, w, scale)
    gy, jy, ty = _lattice(y0, h, scale)
    grid = _hash(gx[None, :], gy[:, None], seed)  # (gh, gw)
    a, b = grid.take(jx, axis=1), grid.take(jx + 1, axis=1)  # (gh, w)
    rows = a + (b - a) * tx[None, :]  # (gh, w)
    top, bottom = rows.take(jy, axis=0), rows.take(jy + 1, axis=0)  # (h, w)
    return top + (bottom - top) * ty[:, None]


def _fbm(x0: int, y0: int, h: int, w: int, scale: float, seed: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += np.float32(amp) * _value_noise(x0, y0, h, w, scale / 2**o, seed + 7919 * o)
        total += amp
        amp *= 0.5
    return out / np.float32(total)


_GRAIN_PERIOD = 1024
_grain_cache: dict[int, np.ndarray] = {}


def _grain(x0: int, y0: int, h: int, w: int, seed: int) -> np.ndarray:
    """(h, w) float32 sensor noise in [-5, 5]: a seeded periodic texture (period 1024 px, unnoticeable)."""
    if seed not in _grain_cache:
        g = np.random.default_rng(seed + 51).uniform(-5, 5, (_GRAIN_PERIOD, _GRAIN_PERIOD)).astype(np.float32)
        _grain_cache[seed] = np.tile(g, (2, 2))  # (2P, 2P): any window up to P px is a plain slice
    g2 = _grain_cache[seed]
    oy, ox = y0 % _GRAIN_PERIOD, x0 % _GRAIN_PERIOD
    if h <= _GRAIN_PERIOD and w <= _GRAIN_PERIOD:
        return g2[oy : oy + h, ox : ox + w]
    rows = (oy + np.arange(h)) % _GRAIN_PERIOD
    cols = (ox + np.arange(w)) % _GRAIN_PERIOD
    return g2.take(rows, axis=0).take(cols, axis=1)


# Palette indexes: 0-9 crops, then the other land covers.
_FOREST, _GROUND, _ROOF0, _SHADOW, _ROAD, _WATER, _SHORE = 10, 11, 12, 18, 19, 20, 21
_PALETTE = np.concatenate(
    [
        _CROPS,
        np.array([[52, 88, 44], [150, 150, 148]], np.float32),
        _ROOFS,
        np.array([[68, 68, 70], [95, 95, 98], [32, 62, 78], [170, 160, 125]], np.float32),
    ]
).copy(order="C")


def aerial(x0: int, y0: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 aerial-like image of the world window at (x0, y0); values 1..255 (0 is nodata)."""
    cell = 192  # parcel grid
    xs = x0 + np.arange(w, dtype=np.int64)
    ys = y0 + np.arange(h, dtype=np.int64)
    cx, cy = xs // cell, ys // cell
    lx, ly = (xs - cx * cell).astype(np.float32), (ys - cy * cell).astype(np.float32)
    gx, gy = np.arange(cx[0], cx[-1] + 1), np.arange(cy[0], cy[-1] + 1)
    jx, jy = cx - cx[0], cy - cy[0]

    def per_cell(salt: int) -> np.ndarray:  # (h, w): one hashed value per parcel-grid cell
        return _hash(gx[None, :], gy[:, None], seed * 31 + salt).take(jy, axis=0).take(jx, axis=1)

    # Fields: each cell split into 1-3 parcels across x or y; a crop colour and row texture per parcel.
    kind = per_cell(1)  # < 0.22 village, < 0.36 forest, else fields
    split_x = per_cell(2) < 0.5
    n_strips = 1 + np.floor(per_cell(3) * 3)
    strip = np.floor(np.where(split_x, lx[None, :], ly[:, None]) * n_strips * np.float32(1 / cell))
    parcel = per_cell(4) * np.float32(7.31) + strip * np.float32(0.377)
    parcel -= np.floor(parcel)
    idx = np.minimum(parcel * len(_CROPS), len(_CROPS) - 1).astype(np.uint8)  # (h, w) palette index
    # Crop rows: a triangle wave (cheaper than sin) of 4-9 px period across the parcel.
    phase = np.where(
        split_x, (ys % 9216).astype(np.float32)[:, None], (xs % 9216).astype(np.float32)[None, :]
    )
    phase /= 4.0 + 5.0 * per_cell(5)
    phase -= np.floor(phase)
    mod = np.abs(phase - np.float32(0.5)) * (20.0 + 36.0 * per_cell(6)) - (5.0 + 9.0 * per_cell(6))  # (h, w)

    canopy = _value_noise(x0, y0, h, w, 7.0, seed + 11) - 0.5  # crown-sized texture
    forest = (kind >= 0.22) & (kind < 0.36)
    idx[forest] = _FOREST
    mod[forest] = 60 * canopy[forest]

    # Villages: concrete ground, roofs on a lot grid, shadows to the south-east.
    village = kind < 0.22
    lot = 36
    lxi, lyi = xs // lot, ys // lot
    ox, oy = (xs - lxi * lot).astype(np.int16)[None, :], (ys - lyi * lot).astype(np.int16)[:, None]
    lgx, lgy = np.arange(lxi[0], lxi[-1] + 1), np.arange(lyi[0], lyi[-1] + 1)
    ljx, ljy = lxi - lxi[0], lyi - lyi[0]

    def per_lot(salt: int) -> np.ndarray:
        return _hash(lgx[None, :], lgy[:, None], seed * 17 + salt).take(ljy, axis=0).take(ljx, axis=1)

    m0 = 3 + (per_lot(1) * 8).astype(np.int16)
    m1 = 3 + (per_lot(2) * 8).astype(np.int16)
    has = village & (per_lot(3) < 0.75)
    roof = has & (ox >= m0) & (ox < lot - m1) & (oy >= m1) & (oy < lot - m0)
    shadow = has & ~roof & (ox - 3 >= m0) & (ox - 3 < lot - m1) & (oy - 3 >= m1) & (oy - 3 < lot - m0)
    idx[village] = _GROUND
    mod[village] = 30 * canopy[village]
    idx[roof] = _ROOF0 + np.minimum(per_lot(4)[roof] * len(_ROOFS), len(_ROOFS) - 1).astype(np.uint8)
    mod[roof] = 0
    idx[shadow] = _SHADOW

    # Roads along some parcel-grid lines (always around villages).
    road_w = 7
    road_col = (_hash(gx, np.zeros_like(gx), seed + 21) < 0.45).take(jx)[None, :] | village
    road_row = (_hash(np.zeros_like(gy), gy, seed + 22) < 0.45).take(jy)[:, None] | village
    on_road = (road_col & (lx[None, :] < road_w)) | (road_row & (ly[:, None] < road_w))
    idx[on_road] = _ROAD
    mod[on_road] = 12 * canopy[on_road]

    # Lakes where a low-frequency field is high, with a sandy shore.
    wet = _fbm(x0, y0, h, w, 900.0, seed + 31, octaves=3)
    water = wet > 0.66
    shore = (wet > 0.652) & ~water
    idx[water] = _WATER
    mod[water] = 14 * canopy[water] - 260 * (wet[water] - 0.66)  # deeper water is darker
    idx[shore] = _SHORE

    # Illumination drift and sensor noise.
    light = 0.88 + 0.24 * _value_noise(x0, y0, h, w, 400.0, seed + 41)  # (h, w)
    # Channel-first while computing, so the (h, w) factors broadcast over whole contiguous planes.
    img = _PALETTE.T.take(idx, axis=1)  # (3, n) palette, (h, w) index -> (3, h, w)
    img *= light
    img += mod + _grain(x0, y0, h, w, seed)
    np.clip(img, 1, 255, out=img)
    out = np.empty((h, w, 3), np.uint8)
    out[...] = img.transpose(1, 2, 0)  # (3, h, w) -> (h, w, 3)
    return out


# --------------------------------------------------------------------------------------------------
# Writers


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def _distance(a: bytes, b: bytes) -> int:
    """pHash Hamming distance between two encoded images, as the pipeline will see them."""
    ha, hb = (phash(np.asarray(Image.open(io.BytesIO(x)).convert("RGB"))) for x in (a, b))
    return (ha ^ hb).bit_count()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_geotiff_blocks(
    path: Path, side_w: int, side_h: int, origin: tuple[int, int], seed: int, nodata_strip: int = 0
) -> None:
    """A tiled 3-band uint8 GeoTIFF of the world at `origin`, generated and written block by block."""
    profile = dict(
        driver="GTiff",
        width=side_w,
        height=side_h,
        count=3,
        dtype="uint8",
        crs=CRS,
        nodata=0,
        transform=north_up(
            500000.0 + origin[0] * PIXEL_SIZE, 5200000.0 - origin[1] * PIXEL_SIZE, PIXEL_SIZE, PIXEL_SIZE
        ),
        tiled=True,
        blockxsize=_BLOCK,
        blockysize=_BLOCK,
        compress="deflate",
        zlevel=1,
        predictor=2,
        interleave="pixel",
        photometric="rgb",
    )
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path, "w", **profile) as ds:
        for by in range(0, side_h, _BLOCK):
            for bx in range(0, side_w, _BLOCK):
                w, h = min(_BLOCK, side_w - bx), min(_BLOCK, side_h - by)
                block = aerial(origin[0] + bx, origin[1] + by, h, w, seed)
                if bx < nodata_strip:
                    block[:, : max(0, nodata_strip - bx)] = 0
                ds.write(np.moveaxis(block, 2, 0), window=Window(bx, by, w, h))  # (h, w, 3) -> (3, h, w)


def _write_ms_uint16(path: Path, origin: tuple[int, int], seed: int) -> None:
    h, w = 500, 600
    rgb = aerial(origin[0], origin[1], h, w, seed).astype(np.float32)
    nir = 255 - rgb[..., 0] * 0.6 + rgb[..., 1] * 0.4
    bands = np.stack([rgb[..., 0], rgb[..., 1], rgb[..., 2], nir], axis=0)  # (4, h, w)
    dn = (6000 + bands * 60).astype(np.uint16)
    yy, xx = np.mgrid[0:h, 0:w]
    dn[:, (xx + yy) < 140] = 0  # nodata corner, like a scene edge
    with (
        rasterio.Env(GDAL_PAM_ENABLED="NO"),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=w,
            height=h,
            count=4,
            dtype="uint16",
            crs=CRS,
            nodata=0,
            transform=north_up(510000.0, 5190000.0, 2.0, 2.0),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
            predictor=2,
        ) as ds,
    ):
        ds.write(dn)


def _write_reflectance(path: Path, origin: tuple[int, int], seed: int) -> None:
    h, w = 480, 640
    refl = aerial(origin[0], origin[1], h, w, seed).astype(np.float32) / 255 * 0.4  # (h, w, 3)
    refl = np.moveaxis(refl, 2, 0).copy()  # (3, h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    refl[:, (xx - 420) ** 2 + (yy - 300) ** 2 < 90**2] = np.nan  # a cloud-masked hole
    with (
        rasterio.Env(GDAL_PAM_ENABLED="NO"),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=w,
            height=h,
            count=3,
            dtype="float32",
            crs=CRS,
            transform=north_up(520000.0, 5180000.0, 1.0, 1.0),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        ) as ds,
    ):
        ds.write(refl)


# --------------------------------------------------------------------------------------------------
# The corpus


def synth(
    out: Path,
    *,
    n_chips: int = 200,
    chip_size: int = 256,
    large_side: int = 3000,
    seed: int = 0,
    broken: bool = True,
) -> Path:
    """Write the corpus under `out` (see the module docstring) and return the path of its recipe.yaml.

    Deterministic given the arguments. `out` may exist; the folders this writes are replaced.
    """
    if n_chips < 8:
        raise ValueError(
            "n_chips must be at least 8 (near-duplicates and benchmark leaks are planted among them)"
        )
    if chip_size < 64 or large_side < 1024:
        raise ValueError("chip_size must be at least 64 and large_side at least 1024")
    out = Path(out)
    for sub in ("chips", "detection", "geotiff", "benchmarks"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    chips, det, geo, bench = (
        out / "chips" / "images",
        out / "detection" / "images",
        out / "geotiff",
        out / "benchmarks",
    )
    for d in (chips, det, geo, bench):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    planted: dict[str, Any] = {
        "near_duplicates": [],
        "exact_duplicates": [],
        "benchmark_leaks": [],
        "broken": [],
    }

    # Chips from far-apart places: a 2-D grid of origins 4096 px apart, jittered.
    origins = [
        (int(4096 * (i % 64) + rng.integers(0, 2048)), int(4096 * (i // 64) + rng.integers(0, 2048)))
        for i in range(n_chips)
    ]
    chip_files = []
    for i, (ox, oy) in enumerate(origins):
        name = f"{i:05d}.jpg"
        (chips / name).write_bytes(_jpeg(aerial(ox, oy, chip_size, chip_size, seed), quality=90))
        chip_files.append(name)

    # Near-duplicates of chips: another JPEG quality, brightened, shifted by 2 px. pHash is sensitive to
    # such edits on some content (a 2 px shift of a small, low-contrast chip can move it 10+ bits), so
    # each is planted on the first chip where it stays within 2 bits: a near-duplicate the pipeline's
    # distance of 4 must find, not a coin toss.
    pool = [i for i in range(1, n_chips) if i != 4]  # chip 0 is cut for the truncated file, 4 is copied

    def pick(variant: Callable[[int], bytes]) -> tuple[int, bytes]:
        best: tuple[int, int, bytes] | None = None
        for i in pool[:12]:
            data = variant(i)
            d = _distance(data, (chips / chip_files[i]).read_bytes())
            if best is None or d < best[0]:
                best = (d, i, data)
            if d <= 2:
                break
        assert best is not None
        pool.remove(best[1])
        return best[1], best[2]

    def chip(i: int, dx: int = 0, dy: int = 0) -> np.ndarray:
        return aerial(origins[i][0] + dx, origins[i][1] + dy, chip_size, chip_size, seed)

    def brighten(rgb: np.ndarray, by: int) -> np.ndarray:
        return np.clip(rgb.astype(np.int16) + by, 0, 255).astype(np.uint8)

    for kind, dest, variant in (
        ("requality", chips / "01000_q70.jpg", lambda i: _jpeg(chip(i), quality=70)),
        ("brightened", det / "scene_0002_bright.jpg", lambda i: _jpeg(brighten(chip(i), 8))),
        ("shifted", chips / "01001_shift.jpg", lambda i: _jpeg(chip(i, 2, 1))),
    ):
        i, data = pick(variant)
        dest.write_bytes(data)
        planted["near_duplicates"].append(
            {"kind": kind, "of": f"chips/images/{chip_files[i]}", "file": str(dest.relative_to(out))}
        )

    # Exact byte duplicate across sources.
    shutil.copyfile(chips / chip_files[4], det / "P9004.jpg")
    planted["exact_duplicates"].append(
        {"of": f"chips/images/{chip_files[4]}", "file": "detection/images/P9004.jpg"}
    )

    # Detection scenes, 1000-1500 px PNGs.
    for k, (w, h) in enumerate([(1400, 1100), (1200, 1300), (1500, 1000), (1100, 1150)]):
        ox, oy = 300000 + 5000 * k, 300000
        (det / f"P{k:04d}.png").write_bytes(_png(aerial(ox, oy, h, w, seed)))

    # GeoTIFF source.
    large_origin = (600000, 600000)
    strip = large_side // 6
    write_geotiff_blocks(
        geo / "scene_large.tif", large_side, large_side, large_origin, seed, nodata_strip=strip
    )
    _write_ms_uint16(geo / "ms_uint16.tif", (700000, 700000), seed)
    _write_reflectance(geo / "reflectance.tif", (800000, 800000), seed)
    planted["nodata_strip_px"] = strip

    # Benchmarks: near-copies of three chips and of one tile of the large scene; one unrelated image.
    for _ in range(3):
        i, data = pick(lambda i: _jpeg(brighten(chip(i), 4), quality=80))
        (bench / f"bench_{i:05d}.jpg").write_bytes(data)
        planted["benchmark_leaks"].append(
            {"of": f"chips/images/{chip_files[i]}", "file": f"benchmarks/bench_{i:05d}.jpg"}
        )
    # A tile of scene_large on the 512 px grid, past the nodata strip: it exists for any large_side >= 1024.
    tx, ty = -(-strip // 512) * 512, 512
    (bench / "bench_tile.jpg").write_bytes(
        _jpeg(aerial(large_origin[0] + tx, large_origin[1] + ty, 512, 512, seed), quality=85)
    )
    planted["benchmark_leaks"].append(
        {"of": f"geotiff/scene_large.tif@{tx},{ty},512,512", "file": "benchmarks/bench_tile.jpg"}
    )
    (bench / "bench_other.jpg").write_bytes(
        _jpeg(aerial(9_000_000, 9_000_000, chip_size, chip_size, seed), quality=85)
    )

    if broken:
        (chips / "broken_empty.jpg").write_bytes(b"")
        data = (chips / chip_files[0]).read_bytes()
        (chips / "broken_truncated.jpg").write_bytes(data[: len(data) // 2])
        (chips / "broken_text.png").write_bytes(
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
        )
        planted["broken"] = [
            "chips/images/broken_empty.jpg",
            "chips/images/broken_truncated.jpg",
            "chips/images/broken_text.png",
        ]

    recipe = {
        "name": "synth",
        "sources": [
            {"name": "chips", "root": "chips", "task": "scene_classification"},
            {"name": "detection", "root": "detection", "task": "detection"},
            {"name": "geotiff", "root": "geotiff", "task": "segmentation"},
        ],
        "benchmarks": [{"name": "synth-bench", "root": "benchmarks"}],
        "slice": {"max_side": 1024, "tile_size": 512, "overlap": 0, "edge": "shift"},
        "shard": {"max_samples": 128, "image_format": "jpg", "jpeg_quality": 95},
    }
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(
        "# Written by `rscurate synth`: a synthetic aerial-like corpus. Run: rscurate run recipe.yaml OUT\n"
        + yaml.safe_dump(recipe, sort_keys=False),
        encoding="utf-8",
    )
    planted.update(n_chips=n_chips, chip_size=chip_size, large_side=large_side, seed=seed)
    (out / "synth.json").write_text(json.dumps(planted, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("synth: %d chips, a %d px GeoTIFF, recipe at %s", n_chips, large_side, recipe_path)
    return recipe_path


# --------------------------------------------------------------------------------------------------
# A labelled scene-classification set (ImageFolder layout), for `rspretrain probe` in the demo

SCENE_CLASSES = ("farmland", "forest", "residential", "water")


def _scene(cls: str, x0: int, y0: int, size: int, rng: np.random.Generator, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 image of one land cover at world offset (x0, y0)."""
    shade = _fbm(x0, y0, size, size, 48.0, seed)[..., None]  # (H, W, 1) illumination drift
    grain = _grain(x0, y0, size, size, seed)[..., None]
    if cls == "water":
        rgb = _PALETTE[_WATER] + 18 * shade + 0.6 * grain
    elif cls == "forest":
        crowns = _fbm(x0, y0, size, size, 5.0, seed + 1, octaves=2)[..., None]  # tree crowns a few px across
        rgb = _PALETTE[_FOREST] * (0.55 + 0.9 * crowns) + 10 * shade + grain
    elif cls == "farmland":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        rows = np.sin((np.cos(theta) * xx + np.sin(theta) * yy) * 2 * np.pi / rng.uniform(5, 9))[..., None]
        crop = _CROPS[rng.integers(len(_CROPS))]
        rgb = crop * (0.85 + 0.12 * rows) + 25 * shade + grain
    else:  # residential: a grid of lots with roofs, shadows and streets
        lot = int(rng.integers(14, 22))
        yy, xx = np.mgrid[0:size, 0:size]
        ly, lx = (yy + y0) // lot, (xx + x0) // lot
        roof = _ROOFS[(_hash(lx, ly, seed) * len(_ROOFS)).astype(int) % len(_ROOFS)]  # (H, W, 3)
        iy, ix = (yy + y0) % lot, (xx + x0) % lot
        street = (iy < 3) | (ix < 3)
        shadow = ~street & ((iy < 5) | (ix < 5))
        rgb = np.where(
            street[..., None], _PALETTE[_ROAD], np.where(shadow[..., None], _PALETTE[_SHADOW], roof)
        )
        rgb = rgb + 12 * shade + grain
    return np.clip(rgb, 1, 255).astype(np.uint8)


def scene_classes(
    out: Path, *, per_class: int = 24, val_per_class: int = 12, size: int = 128, seed: int = 0
) -> Path:
    """Write a labelled set of four land covers as `out/train/<class>/*.png` and `out/val/<class>/*.png`.

    The layout of UC Merced, AID or NWPU-RESISC45, for trying `rspretrain probe` without downloading one.
    Deterministic given the arguments; returns `out`.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, cls in enumerate(SCENE_CLASSES):
            folder = out / split / cls
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for i in range(n):
                x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
                (folder / f"{cls}_{i:03d}.png").write_bytes(_png(_scene(cls, x0, y0, size, rng, seed + c)))
    return out
