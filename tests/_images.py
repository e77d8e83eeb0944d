"""Generators of tiny test images, every kind the read side meets: GeoTIFFs with CRS and nodata, 16-bit,
float with NaN, many bands, palette, CMYK, RGBA, EXIF-rotated JPEG, and broken files (truncated,
zero-byte, text under an image name, a PNG header claiming 30000 x 30000 px), and `write_hostile_corpus`,
all of them in one source root with odd names, links and permissions.

All are seeded and small; import them from any test (`from _images import ...`).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine


def north_up(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """rasterio.transform.from_origin without the deprecated Affine `*` it uses inside."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


CRS = "EPSG:32633"
ORIGIN = (500000.0, 5200000.0)  # upper-left corner (x, y) in the CRS
PIXEL = 2.0  # metres


def textured(h: int, w: int, bands: int = 3, seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """(h, w, bands) array with smooth structure and noise, scaled to the dtype (uint8 10..245,
    uint16 1000..30000, float 0..1); never flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(bands):
        fx, fy, ph = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.28)
        chans.append(0.5 + 0.35 * np.sin(fx * xx + ph) * np.cos(fy * yy) + rng.normal(0, 0.05, (h, w)))
    unit = np.clip(np.stack(chans, axis=-1), 0, 1)  # (h, w, bands)
    if dtype == "uint8":
        return (10 + unit * 235).astype(np.uint8)
    if dtype == "uint16":
        return (1000 + unit * 29000).astype(np.uint16)
    if dtype == "int16":
        return (-8000 + unit * 16000).astype(np.int16)
    return unit.astype(dtype)


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = CRS,
    nodata: float | None = None,
    tiled: bool = True,
    block: int = 256,
    compress: str | None = "deflate",
    photometric: str | None = None,
    colorinterp: list | None = None,
    pixel: float = PIXEL,
    mask: np.ndarray | None = None,
    **extra: object,
) -> Path:
    """Write (H, W, C) or (H, W) `data` as a GeoTIFF (or a plain TIFF when crs is None)."""
    arr = data if data.ndim == 3 else data[:, :, None]
    h, w, c = arr.shape
    profile: dict = dict(driver="GTiff", width=w, height=h, count=c, dtype=str(arr.dtype))
    if crs is not None:
        profile.update(crs=crs, transform=north_up(ORIGIN[0], ORIGIN[1], pixel, pixel))
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if compress:
        profile["compress"] = compress
    if photometric:
        profile["photometric"] = photometric
    profile.update(extra)
    with rasterio.Env(GDAL_PAM_ENABLED="NO", GDAL_TIFF_INTERNAL_MASK="YES"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain TIFFs are meant to have none
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(np.moveaxis(arr, 2, 0))  # (H, W, C) -> (C, H, W)
            if colorinterp is not None:
                ds.colorinterp = colorinterp
            if mask is not None:
                ds.write_mask(mask.astype(np.uint8) * 255)
    return Path(path)


def write_sparse_geotiff(
    path: Path, side: int, *, block: int = 512, textured_blocks: int = 4, seed: int = 0
) -> Path:
    """A side x side uint8 RGB tiled GeoTIFF, nodata 0, where only a few blocks hold data: GDAL's
    SPARSE_OK leaves the others out of the file, so a 20000 px raster takes a few hundred KB."""
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=side,
            height=side,
            count=3,
            dtype="uint8",
            crs=CRS,
            transform=north_up(ORIGIN[0], ORIGIN[1], 1.0, 1.0),
            nodata=0,
            tiled=True,
            blockxsize=block,
            blockysize=block,
            compress="deflate",
            sparse_ok=True,
        ) as ds:
            for i in range(textured_blocks):
                x = y = (i * (side // max(textured_blocks, 1))) // block * block
                tile = textured(block, block, 3, seed=seed + i)
                ds.write(np.moveaxis(tile, 2, 0), window=rasterio.windows.Window(x, y, block, block))
    return Path(path)


def write_png(path: Path, arr: np.ndarray, **kw: object) -> Path:
    Image.fromarray(arr).save(path, format="PNG", **kw)
    return Path(path)


def write_jpeg(path: Path, arr: np.ndarray, quality: int = 92, **kw: object) -> Path:
    Image.fromarray(arr).save(path, format="JPEG", quality=quality, **kw)
    return Path(path)


def write_palette_png(path: Path, h: int = 64, w: int = 80, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A palette (mode P) PNG; returns the path and the RGB image it shows."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = (np.add.outer(np.arange(h) // 8, np.arange(w) // 10) % 16).astype(np.uint8)
    im = Image.fromarray(index, mode="L").convert("P")
    im.putpalette(palette.tobytes() + bytes(3 * (256 - 16)))
    im.save(path, format="PNG")
    return Path(path), palette[index]


def write_cmyk_jpeg(path: Path, h: int = 64, w: int = 64, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A CMYK JPEG; returns the path and Pillow's RGB conversion of what was written."""
    rgb = textured(h, w, 3, seed)
    im = Image.fromarray(rgb).convert("CMYK")
    im.save(path, format="JPEG", quality=95)
    with Image.open(path) as back:
        expected = np.asarray(back.convert("RGB"))
    return Path(path), expected


def write_rgba_png(path: Path, h: int = 64, w: int = 64, transparent_cols: int = 16, seed: int = 0) -> Path:
    """RGBA PNG whose first `transparent_cols` columns have alpha 0 (with non-black colour under them)."""
    rgba = np.dstack([textured(h, w, 3, seed), np.full((h, w), 255, np.uint8)])
    rgba[:, :transparent_cols, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(path, format="PNG")
    return Path(path)


def write_gray16_png(path: Path, h: int = 64, w: int = 64, seed: int = 0) -> tuple[Path, np.ndarray]:
    arr = textured(h, w, 1, seed, "uint16")[:, :, 0]
    Image.fromarray(arr).save(path, format="PNG")
    return Path(path), arr


def write_exif_jpeg(path: Path, orientation: int, h: int = 48, w: int = 64) -> tuple[Path, np.ndarray]:
    """A JPEG stored h x w with an EXIF orientation tag; returns the path and the stored pixels as
    decoded (so a test can orient them itself). A bright marker sits at the stored top-left corner."""
    stored = textured(h, w, 3, seed=orientation)
    stored[:8, :8] = 250
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        decoded = np.asarray(im.convert("RGB"))
    return Path(path), decoded


def write_zero_byte(path: Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def write_truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    """The first `keep` fraction of another file's bytes (an interrupted download)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


TEXTS = {
    "html": b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>Forbidden</body></html>\n",
    "json": b'{"error": "not found", "status": 404}\n',
    "xml": b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>\n',
    "text": b"this is not an image, just some notes about the dataset\n",
    "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 123456\n",
}


def write_text_as_image(path: Path, kind: str = "html") -> Path:
    Path(path).write_bytes(TEXTS[kind])
    return Path(path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    )


def write_png_header_only(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A crafted PNG: a valid IHDR claiming width x height RGB, then a short IDAT and no IEND."""
    idat = zlib.compress(b"\x00" + bytes(3 * min(width, 64)))
    Path(path).write_bytes(png_header(width, height) + _chunk(b"IDAT", idat))
    return Path(path)


def write_zero_png(path: Path, side: int = 30000, bit_depth: int = 1) -> Path:
    """A real, complete side x side greyscale PNG of zeros (1-bit by default: 30000 px is ~110 KB),
    compressed row by row so writing it never holds the raw image in memory."""
    row = b"\x00" + bytes(-(-side * bit_depth // 8))  # filter byte + packed zero pixels
    comp = zlib.compressobj(9)
    parts = []
    chunk = row * 256
    for start in range(0, side, 256):
        n = min(256, side - start)
        parts.append(comp.compress(chunk if n == 256 else row * n))
    parts.append(comp.flush())
    with open(path, "wb") as f:
        f.write(png_header(side, side, bit_depth, color_type=0))
        f.write(_chunk(b"IDAT", b"".join(parts)))
        f.write(_chunk(b"IEND", b""))
    return Path(path)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# A corpus of hostile and broken inputs, for end-to-end runs (tests/test_hostile.py)

# How inputs.parquet writes a file name that is not valid UTF-8: each undecodable byte as the text `\xNN`
# (rscurate.scan.path_text). The file below is b"caf\xe9 latin-1.png" on disk.
NON_UTF8_NAME = b"caf\xe9 latin-1.png"
NON_UTF8_TEXT = "caf\\xe9 latin-1.png"
NON_UTF8_TIFF = b"m\xfcnchen \xff.tif"
NON_UTF8_TIFF_TEXT = "m\\xfcnchen \\xff.tif"
UNICODE_NAME = "ünïcødé 東京 🛰.png"
QUOTED_NAME = "with space \"double\" 'single' $HOME `tick`.jpg"


def write_hostile_corpus(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """Every hostile or broken input a curation run meets, under `root` (a source root); `outside` gets
    the target of a symlink that leaves the root. Returns relpath (as inputs.parquet writes it) ->
    (status, reason substring) after a full run with min_side 32, max_side 512, tile_size 256.

    Two entries need a process that cannot override file permissions (not plain root): `locked.png`
    (mode 000) and `locked_dir` (a folder of mode 000).
    """
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    expected: dict[str, tuple[str, str]] = {}

    def ok(name: str) -> None:
        expected[name] = ("ok", "")

    def error(name: str, reason: str) -> None:
        expected[name] = ("error", reason)

    # Broken files: what a person reads in `reason` says what is wrong with each.
    error(write_zero_byte(root / "empty.jpg").name, "unreadable: zero-byte file")
    whole_jpg = write_jpeg(outside / "whole.jpg", textured(96, 96, seed=1))
    error(write_truncated(root / "cut.jpg", whole_jpg).name, "truncated JPEG (no end-of-image marker)")
    whole_png = write_png(outside / "whole.png", textured(96, 96, seed=2))
    error(write_truncated(root / "cut.png", whole_png).name, "truncated PNG (no IEND chunk at the end)")
    whole_tif = write_geotiff(outside / "whole.tif", textured(300, 300, seed=3), compress=None)
    error(write_truncated(root / "cut.tif", whole_tif, keep=0.6).name, "truncated TIFF")
    error(write_text_as_image(root / "page.jpg", "html").name, "not an image: looks like HTML text")
    error(write_text_as_image(root / "notes.png", "text").name, "not an image: looks like plain text")
    error(write_text_as_image(root / "lfs.tif", "lfs").name, "Git LFS pointer")
    # A PNG header claiming 30000 x 30000 RGB (2.7 GB decoded) with a few bytes of data.
    error(write_png_header_only(root / "claims_30000px.png").name, "truncated PNG")

    # Odd but valid rasters: all of them are read and kept.
    write_geotiff(root / "u16.tif", textured(96, 80, 3, seed=4, dtype="uint16"))
    ok("u16.tif")
    flt = textured(96, 96, 3, seed=5, dtype="float32")
    flt[:30, :, :] = np.nan  # under max_nodata_fraction: kept, with the NaN rows as black
    write_geotiff(root / "float_nan.tif", flt)
    ok("float_nan.tif")
    for bands in (1, 2, 4, 5):
        write_geotiff(root / f"bands{bands}.tif", textured(80, 96, bands, seed=10 + bands))
        ok(f"bands{bands}.tif")
    write_palette_png(root / "palette.png", 72, 90, seed=6)
    ok("palette.png")
    write_cmyk_jpeg(root / "cmyk.jpg", 72, 72, seed=7)
    ok("cmyk.jpg")
    write_rgba_png(root / "rgba.png", 80, 80, transparent_cols=16, seed=8)
    ok("rgba.png")
    write_exif_jpeg(root / "exif_rotated.jpg", 6, h=64, w=96)
    ok("exif_rotated.jpg")

    # Names: not UTF-8, unicode, spaces and quotes.
    with open(os.fsencode(root) + b"/" + NON_UTF8_NAME, "wb") as f:
        f.write(_png_bytes(textured(70, 70, seed=20)))
    ok(NON_UTF8_TEXT)
    write_geotiff(root / "x.tif", textured(70, 70, seed=27))  # GDAL takes UTF-8 names only
    os.rename(os.fsencode(root / "x.tif"), os.fsencode(root) + b"/" + NON_UTF8_TIFF)
    ok(NON_UTF8_TIFF_TEXT)
    write_png(root / UNICODE_NAME, textured(70, 70, seed=21))
    ok(UNICODE_NAME)
    write_jpeg(root / QUOTED_NAME, textured(70, 70, seed=22))
    ok(QUOTED_NAME)

    # Entries that are not image files.
    (root / "folder.jpg").mkdir()
    error("folder.jpg", "a directory, not a file")
    write_png(root / "folder.jpg" / "inside.png", textured(70, 70, seed=23))
    ok("folder.jpg/inside.png")
    (root / "nested").mkdir()
    write_jpeg(root / "nested" / "deep.jpg", textured(70, 70, seed=24))
    ok("nested/deep.jpg")
    os.symlink("..", root / "nested" / "loop")  # a folder loop: walked once, nothing listed twice
    os.symlink("self_loop.jpg", root / "self_loop.jpg")  # a link to itself
    error("self_loop.jpg", "symlink loop")
    os.symlink(whole_jpg, root / "outside.jpg")
    error("outside.jpg", "symlink outside the source root (not followed)")
    os.symlink(outside, root / "outside_dir")
    error("outside_dir", "symlink outside the source root (not followed)")
    os.symlink(root / "gone.png", root / "dangling.png")
    error("dangling.png", "broken symlink")

    # Permissions (they only bite where the reading process cannot override them).
    write_png(root / "locked.png", textured(70, 70, seed=25)).chmod(0)
    error("locked.png", "permission denied")
    (root / "locked_dir").mkdir()
    write_png(root / "locked_dir" / "hidden.png", textured(70, 70, seed=26))
    (root / "locked_dir").chmod(0)
    error("locked_dir", "permission denied: the folder could not be listed")
    return expected


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
