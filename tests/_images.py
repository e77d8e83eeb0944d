"""Generators of tiny test images, every kind the read side meets: GeoTIFFs with CRS and nodata, 16-bit,
float with NaN, many bands, palette, CMYK, RGBA, EXIF-rotated JPEG, and broken files (truncated,
zero-byte, text under an image name, a PNG header claiming 30000 x 30000 px).

All are seeded and small; import them from any test (`from _images import ...`).
"""

from __future__ import annotations

import io
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
