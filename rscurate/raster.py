"""Open any supported image by path: header reads, windowed reads, 8-bit RGB conversion, nodata masks.

Two backends behind one `SceneReader`:

* Pillow for JPEG, PNG, BMP, WebP and GIF up to `PIL_MAX_PIXELS` pixels: decoded once, whole, at full
  resolution (GDAL's bundled libjpeg decodes JPEG about 2x slower than Pillow's libjpeg-turbo).
* rasterio for TIFF/GeoTIFF, JPEG 2000, 16-bit RGB PNG, and any JPEG/PNG too large to decode whole:
  read by windows, so memory stays bounded whatever the scene size. Pillow's decompression-bomb limit is
  never lifted; an image over it is read through GDAL instead.

Every read returns `rgb` (H, W, 3) uint8 and `valid` (H, W) bool, where False marks nodata: the declared
nodata value (a pixel is nodata when all its bands equal it, GDAL's rule), alpha 0, NaN, an internal
GDAL mask, or padding outside the scene. Nodata pixels are written as black.

Conversion to 8-bit RGB: uint8 as is; any other dtype through a per-band 2-98 percentile stretch computed
once per scene from a decimated read that ignores nodata; one band replicated to grey RGB; palette, CMYK
and YCbCr converted; more than three bands: the source's `bands`, else red/green/blue by colour
interpretation, else the first three bands that are not alpha. JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rscurate import archive, fs

# rasterio (GDAL, and boto3 through it: half a second of CPU) is imported where a file is read through it,
# so the parent of a pooled run, which reads no pixels, never imports it.
if TYPE_CHECKING:
    import rasterio
    from rasterio.enums import ColorInterp

log = logging.getLogger(__name__)

# Above this many pixels a JPEG/PNG is read by windows through GDAL instead of decoded whole by Pillow
# (50 Mpx RGB is 150 MB; Pillow's own bomb limit is 89 Mpx).
PIL_MAX_PIXELS = 50_000_000
# Raw bytes read from GDAL in one call; wider strips are read in column chunks.
READ_CHUNK_BYTES = 64 << 20
# GDAL block cache per process, in MB. Strips are read once each, so the cache needs little more than one
# row of blocks; GDAL's default (5% of RAM) would let it grow to the size of a whole scene.
GDAL_CACHE_MB = 128
# Files up to this size are read whole before Pillow decodes them (about 35% faster for small JPEGs).
WHOLE_READ_BYTES = 32 << 20
# Longest side of the decimated read that the percentile stretch is computed from.
STRETCH_SAMPLE_SIDE = 1024
# The tail of a file that is searched for the JPEG end-of-image marker or the PNG IEND chunk.
_TAIL_BYTES = 65536

PILLOW_FORMATS = ("jpeg", "png", "bmp", "webp", "gif")
RASTERIO_FORMATS = ("tiff", "jp2")

GDAL_OPTIONS = {
    # rasterio hands an int to GDALSetCacheMax64: bytes, not the megabytes the config option would mean.
    "GDAL_CACHEMAX": GDAL_CACHE_MB << 20,
    # Never write .aux.xml sidecars into a source dataset, which may be read-only or shared.
    "GDAL_PAM_ENABLED": "NO",
    # Probe for sidecars (.ovr, .msk, world files) by name instead of listing the whole folder on every
    # open, which costs O(files in folder) per scene in datasets with flat folders of 100k images.
    "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE",
}


class UnreadableImage(Exception):
    """A file that cannot be read as an image; `reason` says why in words a person understands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SceneInfo:
    format: str  # jpeg | png | tiff | bmp | webp | gif | jp2 (from the file's content, not its extension)
    width: int  # after EXIF orientation
    height: int
    bands: int
    dtype: str  # numpy name: uint8, uint16, int16, float32, ...
    crs: str | None  # "EPSG:nnnn" when the CRS has an EPSG code, else WKT
    nodata: float | None
    transform: tuple[float, ...] | None  # affine (a, b, c, d, e, f); None when not georeferenced
    mode: str | None  # colour layout: L, LA, P, RGB, RGBA, CMYK, YCbCr, I;16, F, ... or "N-band"
    backend: str = "pil"  # pil | rasterio
    orientation: int = 1  # EXIF orientation (1 = as stored)
    block: tuple[int, int] | None = None  # (height, width) of the file's internal blocks, rasterio only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gdal_env(**extra: Any) -> rasterio.Env:
    """A rasterio environment with this module's GDAL settings (cache size, no sidecar writes)."""
    import rasterio

    return rasterio.Env(**{**GDAL_OPTIONS, **extra})


# --------------------------------------------------------------------------------------------------
# File names that are not UTF-8


def path_text(path: str) -> str:
    """A file name as text the tables (pyarrow: UTF-8 only) can hold.

    Python keeps the bytes of a name that is not UTF-8 as lone surrogates (surrogateescape); each such
    byte becomes the four characters `\\xNN` here, and in such a name a backslash is doubled, so the text
    decodes back unambiguously: b"caf\\xe9.png" is written "caf\\xe9.png". Valid UTF-8 names are
    unchanged. `fs_path` turns the text back into the name on disk.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "".join(_escaped(c) for c in path)


def _escaped(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:  # a surrogate no file system name gives: shown, not decodable
        return f"\\u{code:04x}"
    return "\\\\" if c == "\\" else c


_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")


def fs_path(path: str) -> str:
    """The name to open for a `path` of the tables: `path_text` undone. A file whose name is the text
    itself (a UTF-8 name holding a backslash) exists under that text and wins."""
    if "\\" not in path or os.path.lexists(path):
        return path
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), path)


# --------------------------------------------------------------------------------------------------
# Identifying files from their first bytes


def sniff_format(head: bytes) -> str:
    """Image format from the first bytes of a file; raises UnreadableImage saying what the file is instead."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    raise UnreadableImage(_what_is_it(head))


def _what_is_it(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return "not an image: a Git LFS pointer (the image was never downloaded; run `git lfs pull`)"
    if head.startswith(b"\x00\x05\x16\x07"):
        return "not an image: a macOS resource fork ('._' AppleDouble file)"
    if head.startswith(b"\x1f\x8b"):
        return "not an image: a gzip archive"
    if head.startswith(b"PK\x03\x04"):
        return "not an image: a ZIP archive"
    if head.startswith(b"%PDF"):
        return "not an image: a PDF document"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    printable = sum(32 <= c < 127 or c in (9, 10, 13) for c in head)
    if text and printable >= 0.95 * len(head):
        if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
            return "not an image: looks like HTML text (an error page saved under an image name?)"
        if text.startswith(b"<?xml") or text.startswith(b"<"):
            return "not an image: looks like XML text"
        if text.startswith((b"{", b"[")):
            return "not an image: looks like JSON text"
        return "not an image: looks like plain text"
    return f"not an image: unknown format (starts with bytes {head[:8].hex(' ')})"


def _read_head_and_tail(path: str, tail: bool = True, whole_up_to: int = 0) -> tuple[bytes, bytes, int]:
    """First 64 bytes, last `_TAIL_BYTES` bytes (if `tail`) and size of a regular file, with readable
    errors. A file of at most `whole_up_to` bytes is read whole and returned in place of the tail.
    Also reads URLs and files inside archives (rscurate.archive)."""
    plain = fs.is_plain(path)
    try:
        if archive.is_member(path):
            # A member is decompressed whole to be read at all (a zip's deflate stream, a tar.gz's bytes
            # handed to the task): one read serves the head, the tail and the pixels.
            size = archive.member_size(path)
            if size == 0:
                raise UnreadableImage("zero-byte file")
            if size <= max(whole_up_to, WHOLE_READ_BYTES):
                data = archive.read_member(path)
                if size <= whole_up_to:
                    return data[:64], data, size
                return data[:64], data[-_TAIL_BYTES:] if tail else data[:64], size
        with open(path, "rb") if plain else fs.open_input(path) as f:
            size = os.fstat(f.fileno()).st_size if plain else fs.size(path)
            if size == 0:
                raise UnreadableImage("zero-byte file")
            if size <= whole_up_to:
                end = f.read()
                return end[:64], end, size
            head = end = f.read(64)
            if tail and size > len(head):
                f.seek(max(0, size - _TAIL_BYTES))
                end = f.read()
    except archive.MemberError as exc:
        raise UnreadableImage(exc.reason) from None
    except PermissionError:
        if plain and os.path.isdir(path):  # opening a folder: PermissionError on Windows
            raise UnreadableImage("a directory, not a file (its name looks like an image)") from None
        raise UnreadableImage("permission denied") from None
    except FileNotFoundError:
        if plain and os.path.islink(path):
            raise UnreadableImage("broken symlink (its target does not exist)") from None
        raise UnreadableImage("file not found (removed during the run?)") from None
    except IsADirectoryError:
        raise UnreadableImage("a directory, not a file (its name looks like an image)") from None
    except OSError as exc:
        raise UnreadableImage(f"cannot read the file ({exc.strerror or exc})") from None
    return head, end, size


def _check_complete(fmt: str, tail: bytes) -> None:
    """Catch truncated downloads from the end of the file, without decoding."""
    if fmt == "jpeg" and not tail.endswith(b"\xff\xd9") and b"\xff\xd9" not in tail:  # ends there, mostly
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    if fmt == "png" and b"IEND" not in tail:
        raise UnreadableImage("truncated PNG (no IEND chunk at the end)")


# --------------------------------------------------------------------------------------------------
# Headers


def read_header(path: str, data: bytes | None = None) -> SceneInfo:
    """Read only the header of an image; raises UnreadableImage with a readable reason.

    Also checks the end of JPEG/PNG files and the block table of TIFFs, which catches truncated copies
    without decoding pixels. `data`, when given, is the whole file's bytes (read once by the caller,
    who hashes them too), so the file is not read again unless GDAL must open it.
    """
    path = fs_path(os.fspath(path))
    if data is None:
        head, tail, size = _read_head_and_tail(path)
    elif not data:
        raise UnreadableImage("zero-byte file")
    else:
        head, tail, size = data[:64], data[-_TAIL_BYTES:], len(data)
    fmt = sniff_format(head)
    _check_complete(fmt, tail)
    if fmt in PILLOW_FORMATS:
        im = _pil_open(io.BytesIO(data) if data is not None else _pil_source(path), fmt)
        if im is not None:
            with im:
                info = _info_from_pil(im, fmt)
            if info is not None:
                return info
    # TIFF/JP2, and JPEG/PNG too large to decode whole or that Pillow would flatten (16-bit RGB PNG).
    with gdal_env():
        ds = _open_rasterio(path)
        with ds:
            return _info_from_dataset(ds, fmt, size)


_PIL_DTYPES = {
    "I;16": "uint16",
    "I;16B": "uint16",
    "I;16L": "uint16",
    "I;16N": "uint16",
    "I": "int32",
    "F": "float32",
}


def _pil_source(path: str) -> str | IO[bytes]:
    """What Image.open takes for a path: the path, or a file object reading a URL (through fsspec) or a
    file inside an archive."""
    return path if fs.is_plain(path) else fs.open_input(path)


def _pil_open(path: str | IO[bytes], fmt: str) -> Image.Image | None:
    """Image.open (header only) with readable errors; None when over Pillow's decompression-bomb limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError:
        return None
    except UnidentifiedImageError:
        raise UnreadableImage(f"corrupt {fmt.upper()} header (Pillow cannot identify it)") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        raise UnreadableImage(f"corrupt {fmt.upper()} header ({_short(str(exc))})") from None


def _info_from_pil(im: Image.Image, fmt: str) -> SceneInfo | None:
    """SceneInfo of an opened Pillow image; None when it should be read through GDAL instead."""
    width, height = im.size
    mode = im.mode
    if width * height > PIL_MAX_PIXELS:
        return None
    # Pillow keeps only the high byte of 16-bit RGB PNGs; GDAL reads them as uint16, which gets stretched.
    tile = getattr(im, "tile", None)
    rawmode = tile[0][3] if tile else None
    if fmt == "png" and mode in ("RGB", "RGBA") and isinstance(rawmode, str) and rawmode.endswith("16B"):
        return None
    orientation = 1
    if fmt == "jpeg":
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:  # a broken EXIF block must not make the pixels unreadable
            orientation = 1
        if orientation not in range(1, 9):
            orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if width < 1 or height < 1:
        raise UnreadableImage(f"{fmt.upper()} header gives an empty image ({width}x{height})")
    return SceneInfo(
        format=fmt,
        width=width,
        height=height,
        bands=len(im.getbands()),
        dtype=_PIL_DTYPES.get(mode, "uint8"),
        crs=None,
        nodata=None,
        transform=None,
        mode=mode,
        backend="pil",
        orientation=orientation,
    )


def crs_string(crs: Any) -> str | None:
    """The CRS as "EPSG:nnnn" when it matches an EPSG code, else as WKT."""
    if crs is None:
        return None
    return _crs_string(crs.to_wkt())


@functools.lru_cache(maxsize=256)
def _crs_string(wkt: str) -> str:
    # Matching a custom WKT against the EPSG database takes 50-150 ms; scenes of a dataset share a CRS.
    import rasterio.crs

    crs = rasterio.crs.CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def _open_rasterio(path: str) -> Any:
    """rasterio.open with readable errors; call inside gdal_env()."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError

    fd = None
    try:
        if path != path_text(path):
            # GDAL takes UTF-8 names only: reach the file through a descriptor. GDAL opens its own, so
            # ours is closed as soon as the dataset is open.
            fd = os.open(path, os.O_RDONLY)
            path = f"/dev/fd/{fd}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if fs.is_url(path):  # read through fsspec: the same endpoint and credentials as the listing
                return rasterio.open(path, opener=fs.rasterio_opener(path))
            if archive.is_member(path):  # GDAL reads the member through Python file objects
                return rasterio.open(path, opener=_member_opener())
            return rasterio.open(path)
    except RasterioIOError as exc:  # an OSError too: caught first
        msg = str(exc)
        if "ermission denied" in msg:
            raise UnreadableImage("permission denied") from None
        raise UnreadableImage(f"GDAL cannot open it ({_short(msg)})") from None
    except RasterioError as exc:
        raise UnreadableImage(f"GDAL cannot open it ({_short(str(exc))})") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except OSError as exc:  # from os.open of a name that is not UTF-8
        raise UnreadableImage(f"cannot read the file ({exc.strerror or exc})") from None
    finally:
        if fd is not None:
            os.close(fd)


class _MemberFiles:
    """rasterio's `opener` for files inside archives: GDAL reads a member (and probes for its sidecar
    files, which are then missing) through Python file objects (a FileContainer: see _member_opener)."""

    def open(self, path: str, mode: str = "rb", **kwds: Any) -> IO[bytes]:
        try:
            return archive.open_member(path)
        except archive.MemberError as exc:
            raise OSError(exc.reason) from None

    def isfile(self, path: str) -> bool:
        return archive.is_member(path) and fs.exists(path)

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def size(self, path: str) -> int:
        if not archive.is_member(path):
            raise FileNotFoundError(path)
        return archive.member_size(path)

    def rm(self, path: str) -> None:
        raise OSError(f"{path}: files inside archives are read-only")


@functools.cache
def _member_opener() -> Any:
    """The _MemberFiles opener as rasterio's FileContainer (made on first use: see the imports)."""
    from rasterio.abc import FileContainer

    return type("MemberFiles", (_MemberFiles, FileContainer), {})()


def _short(msg: str, limit: int = 160) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _info_from_dataset(ds: Any, fmt: str, size: int) -> SceneInfo:
    """SceneInfo of an open rasterio dataset."""
    orientation = 1
    if fmt == "jpeg":
        try:
            orientation = int(ds.tags().get("EXIF_Orientation", 1) or 1)
        except ValueError:
            orientation = 1
        if orientation not in range(1, 9):
            orientation = 1
    if fmt == "tiff":
        _check_tiff_blocks(ds, size)
    if ds.count < 1 or ds.width < 1 or ds.height < 1:
        raise UnreadableImage(f"{fmt.upper()} has no pixels ({ds.width}x{ds.height}, {ds.count} bands)")
    width, height = ds.width, ds.height
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    transform = None
    if ds.crs is not None or not ds.transform.is_identity:
        transform = tuple(float(v) for v in tuple(ds.transform)[:6])
    return SceneInfo(
        format=fmt,
        width=width,
        height=height,
        bands=ds.count,
        dtype=str(np.result_type(*ds.dtypes)),
        crs=crs_string(ds.crs),
        nodata=None if ds.nodata is None else float(ds.nodata),
        transform=transform,
        mode=_rasterio_mode(ds.colorinterp),
        backend="rasterio",
        orientation=orientation,
        block=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
    )


def _check_tiff_blocks(ds: Any, size: int) -> None:
    """A TIFF whose last block lies past the end of the file was cut short (an interrupted copy)."""
    bh, bw = ds.block_shapes[0]
    last = f"{(ds.width - 1) // bw}_{(ds.height - 1) // bh}"
    for bidx in sorted({1, ds.count}):
        offset = ds.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=bidx)
        nbytes = ds.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=bidx)
        if offset and nbytes and int(offset) + int(nbytes) > size:
            raise UnreadableImage(
                f"truncated TIFF (image data ends at byte {int(offset) + int(nbytes)}, the file has {size})"
            )


def _rasterio_mode(ci: tuple[ColorInterp, ...]) -> str:
    names = [c.name for c in ci]
    if names[:1] == ["palette"]:
        return "P"
    if names[:4] == ["cyan", "magenta", "yellow", "black"]:
        return "CMYK"
    if names[:3] == ["Y", "Cb", "Cr"]:
        return "YCbCr"
    if names == ["red", "green", "blue"]:
        return "RGB"
    if names == ["red", "green", "blue", "alpha"]:
        return "RGBA"
    if names == ["gray"]:
        return "L"
    if names == ["gray", "alpha"]:
        return "LA"
    return f"{len(names)}-band"


# --------------------------------------------------------------------------------------------------
# Pixel conversion helpers (pure)


def percentile_limits(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Per-band 2nd and 98th percentiles of (C, H, W) values over valid pixels -> (C, 2) float64."""
    limits = np.zeros((values.shape[0], 2), dtype=np.float64)
    for c in range(values.shape[0]):
        v = values[c] if valid is None else values[c][valid]
        v = v[np.isfinite(v)] if v.dtype.kind == "f" else v
        if v.size == 0:
            limits[c] = (0.0, 1.0)
            continue
        lo, hi = np.percentile(v, [2.0, 98.0])
        if hi <= lo:  # a constant band: keep its level visible rather than dividing by zero
            hi = lo + 1.0
        limits[c] = (lo, hi)
    return limits


def stretch_band(band: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 255], clipped, as uint8 (NaN -> 0)."""
    if band.dtype in (np.uint16, np.int16):
        # A 65536-entry lookup table beats float arithmetic by about 4x on large windows.
        lut = _stretch_lut(band.dtype == np.int16, float(lo), float(hi))
        index = band if band.dtype == np.uint16 else band.view(np.uint16) ^ np.uint16(0x8000)
        return lut[index]
    x = band.astype(np.float32, copy=False) if band.dtype != np.float64 else band
    with np.errstate(invalid="ignore", over="ignore"):
        out = (x - np.float32(lo)) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)
        np.clip(out, 0, 255, out=out)
    if out.dtype.kind == "f":
        out[np.isnan(out)] = 0
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _stretch_lut(signed: bool, lo: float, hi: float) -> np.ndarray:
    """(65536,) uint8 stretch of every 16-bit level; cached, as each strip of a scene reuses it."""
    base = -32768 if signed else 0
    levels = np.arange(base, base + 65536, dtype=np.float64)
    lut = np.clip(np.floor((levels - lo) * (255.0 / (hi - lo)) + 0.5), 0, 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """(4, H, W) uint8 CMYK -> (H, W, 3) uint8 RGB, R = (255 - C) * (255 - K) / 255."""
    k = 255 - cmyk[3].astype(np.uint16)
    rgb = np.empty(cmyk.shape[1:] + (3,), dtype=np.uint8)
    for i in range(3):
        rgb[..., i] = ((255 - cmyk[i].astype(np.uint16)) * k + 127) // 255
    return rgb


# Orientation: how to turn a stored (H, W, ...) array into the displayed one, per EXIF value.
def orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return a[::-1].swapaxes(0, 1)
    if orientation == 7:
        return a[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return a[:, ::-1].swapaxes(0, 1)
    return a


def stored_window(
    window: tuple[int, int, int, int], orientation: int, stored_w: int, stored_h: int
) -> tuple[int, int, int, int]:
    """The window of the stored image that, once oriented, gives `window` (x, y, w, h) of the displayed one."""
    x, y, w, h = window
    if orientation in (5, 6, 7, 8):
        # Displayed (x, y) comes from stored (y', x') after the flips of orient_array.
        sx, sy, sw, sh = y, x, h, w
        flip_x = orientation in (7, 8)  # stored columns reversed
        flip_y = orientation in (6, 7)  # stored rows reversed
    else:
        sx, sy, sw, sh = x, y, w, h
        flip_x = orientation in (2, 3)
        flip_y = orientation in (3, 4)
    if flip_x:
        sx = stored_w - sx - sw
    if flip_y:
        sy = stored_h - sy - sh
    return sx, sy, sw, sh


# --------------------------------------------------------------------------------------------------
# Readers


class SceneReader:
    """One open scene. Open it with `open_path` (or `open_scene` with a header read before) inside the
    worker that reads it; never pickle it.

    `read_rgb(window)` returns rgb (h, w, 3) uint8 and valid (h, w) bool for window (x, y, w, h) in
    displayed pixels; a window reaching past the scene is padded with black, invalid pixels. The arrays
    may be read-only views of a buffer the reader keeps: copy before writing into them.
    """

    def __init__(self, path: str, info: SceneInfo, bands: tuple[int, ...] | None):
        self.path = path
        self.info = info
        self.bands = tuple(bands) if bands else None
        if self.bands is not None and max(self.bands) > info.bands:
            raise UnreadableImage(
                f"the source asks for bands {list(self.bands)} but the file has {info.bands} band(s)"
            )

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        pass

    def read_rgb(self, window: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        W, H = self.info.width, self.info.height
        if window is None:
            window = (0, 0, W, H)
        x, y, w, h = (int(v) for v in window)
        if w < 1 or h < 1:
            raise ValueError(f"empty window {window}")
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 >= x1 or y0 >= y1:
            return np.zeros((h, w, 3), np.uint8), np.zeros((h, w), bool)
        rgb, valid = self._read((x0, y0, x1 - x0, y1 - y0))
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return rgb, valid
        # Padding: the part outside the scene is nodata.
        out_rgb = np.zeros((h, w, 3), np.uint8)
        out_valid = np.zeros((h, w), bool)
        out_rgb[y0 - y : y1 - y, x0 - x : x1 - x] = rgb
        out_valid[y0 - y : y1 - y, x0 - x : x1 - x] = valid
        return out_rgb, out_valid

    def read_thumbnail(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene reduced so that its longer side is at most `max_side` (area average)."""
        raise NotImplementedError

    def _read(self, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def _pil_reason(fmt: str, exc: BaseException) -> str:
    msg = str(exc)
    if "truncated" in msg or isinstance(exc, EOFError):
        return f"truncated {fmt.upper()} ({_short(msg)})"
    return f"corrupt {fmt.upper()} data ({_short(msg) or type(exc).__name__})"


class PillowSceneReader(SceneReader):
    """JPEG/PNG/BMP/WebP/GIF decoded whole by Pillow on first read, converted to RGB once, then sliced.

    A scene whose decoded image already is 8-bit RGB as is (`plain_rgb`) can also be used as a Pillow
    image (`image()`), skipping the copy into an RGB array, and when nothing at all changes its pixels
    (`unchanged`) its file's bytes (`source_bytes()`) stand for the decoded pixels.
    """

    def __init__(
        self,
        path: str,
        info: SceneInfo,
        bands: tuple[int, ...] | None,
        image: Image.Image | None = None,
        data: bytes | None = None,
    ):
        super().__init__(path, info, bands)
        self._image = image  # opened (header read) by open_path; decoded on first read
        self._data = data  # the file's bytes, when open_path read it whole
        self._decoded: Image.Image | None = None
        self._rgb: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        # From the header: the decoded image is the scene's 8-bit RGB (no palette, alpha, CMYK or grey
        # to convert, no band selection, nothing to mask). Unknown without the opened image: False.
        self._plain = (
            image is not None
            and info.mode == "RGB"
            and "transparency" not in image.info
            and self.bands in (None, (1, 2, 3))
        )
        self._frames = int(getattr(image, "n_frames", 1) or 1) if image is not None else 1

    @property
    def plain_rgb(self) -> bool:
        """The decoded image is the scene's 8-bit RGB as is (see `image()`)."""
        return self._plain

    def unchanged(self, fmt: str) -> bool:
        """The file, as it is, holds this scene's pixels in format `fmt` (jpeg or png): plain RGB, no
        EXIF orientation to apply, a single frame. Its bytes can then stand in for an encoding."""
        return self.plain_rgb and self.info.orientation == 1 and self.info.format == fmt and self._frames == 1

    def source_bytes(self) -> bytes:
        """The file's bytes (kept from open_path's read, else read now)."""
        if self._data is None:
            self._data = fs.read_bytes(self.path) if not fs.is_plain(self.path) else _read_file(self.path)
        return self._data

    def _decode(self) -> Image.Image:
        """The decoded image with its EXIF orientation applied, in Pillow's mode for the file."""
        if self._decoded is not None:
            return self._decoded
        fmt = self.info.format
        try:
            im = self._image if self._image is not None else Image.open(_pil_source(self.path))
            self._image = None
            im.load()
            if self.info.orientation != 1:
                with im:
                    im = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
            raise UnreadableImage(_pil_reason(fmt, exc)) from None
        except Image.DecompressionBombError:
            raise UnreadableImage(f"{fmt.upper()} too large for Pillow") from None
        if im.size != (self.info.width, self.info.height):
            raise UnreadableImage(f"decoded size {im.size[0]}x{im.size[1]} differs from the header")
        self._decoded = im
        return im

    def image(self) -> Image.Image:
        """The decoded scene as an RGB Pillow image (only for `plain_rgb` scenes; read-only by contract,
        and not after read_rgb)."""
        if not self.plain_rgb or self._rgb is not None:
            raise ValueError(f"{self.path}: not a plain 8-bit RGB image, or read as arrays; use read_rgb")
        return self._decode()

    def _load(self) -> None:
        im = self._decode()
        try:
            rgb, valid = _pil_to_rgb(im, self.bands)
        except UnreadableImage:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
            raise UnreadableImage(_pil_reason(self.info.format, exc)) from None
        finally:
            im.close()  # the arrays are copies: the decoded image is not needed any more
            self._decoded = None
        rgb.flags.writeable = False
        self._rgb = rgb
        if valid is not None:
            valid.flags.writeable = False
            self._valid = valid
        else:
            self._valid = np.ones(rgb.shape[:2], bool)
            self._valid.flags.writeable = False

    def close(self) -> None:
        for im in (self._image, self._decoded):
            if im is not None:
                im.close()
        self._image = self._decoded = None

    def _read(self, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if self._rgb is None:
            self._load()
        assert self._rgb is not None and self._valid is not None
        x, y, w, h = window
        return self._rgb[y : y + h, x : x + w], self._valid[y : y + h, x : x + w]

    def read_thumbnail(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        rgb, valid = self.read_rgb(None)
        factor = -(-max(rgb.shape[:2]) // max_side)
        if factor <= 1:
            return rgb, valid
        small = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).reduce(factor))
        small_valid = np.asarray(Image.fromarray(valid.astype(np.uint8) * 255).reduce(factor)) >= 128
        return small, small_valid


def _pil_to_rgb(im: Image.Image, bands: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A loaded Pillow image -> rgb (H, W, 3) uint8 and valid (H, W) bool, or None when all valid."""
    mode = im.mode
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    elif mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("LA" if mode == "L" else "RGBA")
        mode = im.mode
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im, mode = im.convert("RGB"), "RGB"
    elif mode == "La":
        im, mode = im.convert("LA"), "LA"
    elif mode == "RGBa":
        im, mode = im.convert("RGBA"), "RGBA"

    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W) -> (H, W, 1)
    alpha = None
    if mode in ("LA", "RGBA"):
        alpha = arr[:, :, -1]
        arr = arr[:, :, :-1]
    color = arr
    if bands:
        color = arr[:, :, [b - 1 for b in bands]]
    elif color.shape[2] > 3:
        color = color[:, :, :3]
    valid = None if alpha is None else alpha > 0
    if color.dtype != np.uint8:
        # 16-bit / 32-bit / float greyscale: per-scene percentile stretch from a decimated sample.
        chw = np.moveaxis(color, 2, 0)  # (H, W, C) -> (C, H, W)
        ok = valid if valid is not None else None
        if color.dtype.kind == "f":
            finite = np.isfinite(color).all(axis=2)
            ok = finite if ok is None else ok & finite
            valid = ok if not ok.all() else valid
        step = max(1, -(-max(color.shape[:2]) // STRETCH_SAMPLE_SIDE))
        limits = percentile_limits(chw[:, ::step, ::step], None if ok is None else ok[::step, ::step])
        color = np.stack([stretch_band(chw[c], *limits[c]) for c in range(chw.shape[0])], axis=-1)
    if color.shape[2] == 1:
        rgb = np.repeat(color, 3, axis=2)
    elif color.shape[2] == 2:
        rgb = np.repeat(color[:, :, :1], 3, axis=2)
    else:
        rgb = np.ascontiguousarray(color)
    if valid is not None:
        if valid.all():
            valid = None
        else:
            # Nodata black, into a new array: rgb may be Pillow's read-only buffer.
            rgb = rgb * valid[:, :, None]
    return rgb, valid


@dataclass
class _BandPlan:
    """Which bands to read from a rasterio dataset and how to turn them into RGB."""

    color: tuple[int, ...]  # 1-based band indexes of the colour bands read
    kind: str  # gray | rgb | palette | cmyk
    alpha: int | None  # 1-based band index of an alpha band
    nodata: float | None
    internal_mask: bool
    lut: np.ndarray | None = None  # palette (256, 4) uint8
    nbits_scale: int = 1  # NBITS < 8: scale 0..2^n-1 to 0..255

    @property
    def indexes(self) -> list[int]:
        return list(self.color) + ([self.alpha] if self.alpha else [])


def _plan_bands(ds: Any, bands: tuple[int, ...] | None) -> _BandPlan:
    from rasterio.enums import ColorInterp, MaskFlags

    ci = list(ds.colorinterp)
    alpha_bands = [i + 1 for i, c in enumerate(ci) if c == ColorInterp.alpha]
    alpha = alpha_bands[0] if alpha_bands else None
    flags = ds.mask_flag_enums[0] if ds.count else []
    internal = (
        MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags and MaskFlags.nodata not in flags
    )
    nodata = ds.nodata
    lut = None
    if bands:
        color = tuple(bands)
        kind = "gray" if len(color) == 1 else "rgb"
    elif ci and ci[0] == ColorInterp.palette:
        color, kind = (1,), "palette"
        cmap = ds.colormap(1)
        lut = np.zeros((256, 4), np.uint8)
        for k, v in cmap.items():
            if 0 <= k < 256:
                lut[k] = v
    elif [c.name for c in ci[:4]] == ["cyan", "magenta", "yellow", "black"]:
        color, kind = (1, 2, 3, 4), "cmyk"
    elif all(c in ci for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        color = tuple(ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
        kind = "rgb"
    else:
        others = [b for b in range(1, ds.count + 1) if b not in alpha_bands]
        if len(others) >= 3:
            color, kind = tuple(others[:3]), "rgb"
        else:
            color, kind = tuple(others[:1] or [1]), "gray"
    if alpha in color:
        alpha = None
    nbits = ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
    scale = 1
    if nbits and kind in ("gray", "rgb") and ds.dtypes[0] == "uint8" and int(nbits) < 8:
        scale = 255 // (2 ** int(nbits) - 1)
    return _BandPlan(
        color=color, kind=kind, alpha=alpha, nodata=nodata, internal_mask=internal, lut=lut, nbits_scale=scale
    )


class RasterioSceneReader(SceneReader):
    """TIFF/GeoTIFF, JPEG 2000 and very large JPEG/PNG, read through one open rasterio dataset by windows.

    Full-width strips (what slicing asks for) are read in column chunks of at most READ_CHUNK_BYTES and
    the rows a strip shares with the previous one (tile overlap, the shifted last row) are reused, so
    each pixel is decoded once.
    """

    def __init__(
        self,
        path: str,
        info: SceneInfo | None,
        bands: tuple[int, ...] | None,
        *,
        fmt: str = "tiff",
        size: int = 0,
    ):
        self._env: Any = gdal_env()
        self._env.__enter__()
        self._ds: Any = None
        try:
            self._ds = _open_rasterio(path)
            if info is None:
                info = _info_from_dataset(self._ds, fmt, size)
            super().__init__(path, info, bands)
            self._stored = (self._ds.width, self._ds.height)
            self._plan = _plan_bands(self._ds, self.bands)
        except BaseException:
            self.close()
            raise
        self._limits: np.ndarray | None = None
        self._needs_stretch = (
            self._plan.kind in ("gray", "rgb")
            and np.dtype(self._ds.dtypes[self._plan.color[0] - 1]) != np.uint8
        )
        self._strip: tuple[int, int, np.ndarray, np.ndarray] | None = None  # y0, y1, rgb, valid (full width)

    def close(self) -> None:
        if self._env is None:
            return
        if self._ds is not None:
            self._ds.close()
            self._ds = None
        self._env.__exit__(None, None, None)
        self._env = None

    # -- raw reads ---------------------------------------------------------------------------------
    def _raw(self, window: tuple[int, int, int, int], out_shape: tuple[int, int] | None = None) -> np.ndarray:
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        x, y, w, h = window
        kwargs: dict[str, Any] = {"indexes": self._plan.indexes, "window": Window(x, y, w, h)}
        if out_shape is not None:
            kwargs["out_shape"] = (len(self._plan.indexes), *out_shape)
            kwargs["resampling"] = Resampling.nearest if self._needs_stretch else Resampling.average
        try:
            return self._ds.read(**kwargs)
        except RasterioError as exc:
            raise UnreadableImage(
                f"cannot decode {self.info.format.upper()} data at {window} ({_short(str(exc))})"
            ) from None

    def _raw_mask(
        self, window: tuple[int, int, int, int], out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        x, y, w, h = window
        try:
            m = self._ds.read_masks(1, window=Window(x, y, w, h), out_shape=out_shape)
        except RasterioError as exc:
            raise UnreadableImage(f"cannot read the mask at {window} ({_short(str(exc))})") from None
        return m > 0

    def _valid_of(self, raw: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        """(C, h, w) raw (colour bands then alpha) -> valid (h, w) or None when every pixel is valid."""
        plan = self._plan
        nc = len(plan.color)
        valid: np.ndarray | None = None

        def both(a: np.ndarray) -> np.ndarray:
            return a if valid is None else valid & a

        if plan.alpha:
            valid = both(raw[nc] > 0)
        if mask is not None:
            valid = both(mask)
        if plan.nodata is not None:
            if np.isnan(plan.nodata):
                nod = np.isnan(raw[0])
                for c in range(1, nc):
                    nod &= np.isnan(raw[c])
            else:
                nod = raw[0] == plan.nodata
                for c in range(1, nc):
                    nod &= raw[c] == plan.nodata
            valid = both(~nod)
        if raw.dtype.kind == "f":
            bad = np.isnan(raw[0])
            for c in range(1, nc):
                bad |= np.isnan(raw[c])
            valid = both(~bad)
        if plan.kind == "palette" and plan.lut is not None and (plan.lut[:, 3] < 255).any():
            valid = both(plan.lut[raw[0], 3] > 0)
        return valid

    def _stretch_limits(self) -> np.ndarray:
        """Per-band 2-98 percentiles from one decimated read of the scene, computed once.

        With overviews, or for a scene of a few megapixels, GDAL decimates the whole scene. Without
        overviews a decimated read still decodes every block, so a large scene is sampled instead by an
        8x8 grid of block-sized windows: the cost stays that of 64 blocks whatever the scene size.
        """
        if self._limits is None:
            W, H = self._stored
            overviews = self._ds.overviews(self._plan.color[0])
            if overviews or W * H <= 4 * STRETCH_SAMPLE_SIDE**2:
                factor = max(1, -(-max(W, H) // STRETCH_SAMPLE_SIDE))
                shape = (max(1, H // factor), max(1, W // factor))
                raw = self._raw((0, 0, W, H), out_shape=shape)
                mask = self._raw_mask((0, 0, W, H), out_shape=shape) if self._plan.internal_mask else None
            else:
                bh, bw = self.info.block or (256, 256)
                sh, sw = min(bh, 256, H // 8), min(bw, 256, W // 8)
                windows = [
                    (
                        (W - sw) * i // 7 // bw * bw if W - sw >= bw else 0,
                        (H - sh) * j // 7 // bh * bh if H - sh >= bh else 0,
                        sw,
                        sh,
                    )
                    for j in range(8)
                    for i in range(8)
                ]
                # (C, sh, sw) per window -> (C, 1, 64 * sh * sw)
                raw = np.concatenate(
                    [self._raw(win).reshape(len(self._plan.indexes), 1, -1) for win in windows], axis=2
                )
                mask = None
                if self._plan.internal_mask:
                    mask = np.concatenate([self._raw_mask(win).reshape(1, -1) for win in windows], axis=1)
            valid = self._valid_of(raw, mask)
            self._limits = percentile_limits(raw[: len(self._plan.color)], valid)
            log.debug("%s: stretch limits %s", self.path, self._limits.tolist())
        return self._limits

    def _convert(self, raw: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """(C, h, w) raw -> (h, w, 3) uint8; invalid pixels black."""
        plan = self._plan
        color = raw[: len(plan.color)]
        h, w = raw.shape[1:]
        if plan.kind == "palette":
            assert plan.lut is not None
            rgb = plan.lut[:, :3][color[0]]
        elif plan.kind == "cmyk":
            rgb = cmyk_to_rgb(color)
        else:
            if self._needs_stretch:
                limits = self._stretch_limits()
                chans = [stretch_band(color[c], *limits[c]) for c in range(len(plan.color))]
            else:
                chans = [color[c] for c in range(len(plan.color))]
            if plan.nbits_scale > 1:
                chans = [c * np.uint8(plan.nbits_scale) for c in chans]
            if valid is not None:
                # Black out nodata on contiguous band planes: a boolean-mask assignment on the
                # interleaved array costs ten times more.
                chans = [np.multiply(c, valid, dtype=np.uint8) for c in chans]
            rgb = np.empty((h, w, 3), np.uint8)
            for i in range(3):
                rgb[:, :, i] = chans[i if len(chans) == 3 else 0]
            return rgb
        if valid is not None:
            rgb *= valid[:, :, None]
        return rgb

    def _read_stored(self, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """A window of the stored (un-oriented) image, in column chunks of bounded size."""
        x, y, w, h = window
        nbytes = len(self._plan.indexes) * h * np.dtype(self._ds.dtypes[0]).itemsize
        bw = self.info.block[1] if self.info.block else 256
        chunk = max(bw, (READ_CHUNK_BYTES // max(nbytes, 1)) // bw * bw)
        if chunk >= w:
            return self._convert_window(window)
        rgb = np.empty((h, w, 3), np.uint8)
        valid = np.empty((h, w), bool)
        # Chunks start on block boundaries so each block is decoded by one read.
        cx = x
        while cx < x + w:
            cx1 = min(x + w, (cx // bw + 1) * bw + chunk - bw)
            r, v = self._convert_window((cx, y, cx1 - cx, h))
            rgb[:, cx - x : cx1 - x] = r
            valid[:, cx - x : cx1 - x] = v
            cx = cx1
        return rgb, valid

    def _convert_window(self, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        raw = self._raw(window)
        mask = self._raw_mask(window) if self._plan.internal_mask else None
        valid = self._valid_of(raw, mask)
        rgb = self._convert(raw, valid)
        if valid is None:
            valid = np.ones(raw.shape[1:], bool)
        return rgb, valid

    def _read(self, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        x, y, w, h = window
        o = self.info.orientation
        if o != 1:
            sw, sh = self._stored
            rgb, valid = self._read_stored(stored_window(window, o, sw, sh))
            return np.ascontiguousarray(orient_array(rgb, o)), np.ascontiguousarray(orient_array(valid, o))
        if x != 0 or w != self.info.width:
            return self._read_stored(window)
        # Full-width strip: reuse rows shared with the previous strip.
        prev = self._strip
        if prev is not None and prev[0] <= y < prev[1] <= y + h:
            py0, py1, prgb, pvalid = prev
            keep = py1 - y
            rgb = np.empty((h, w, 3), np.uint8)
            valid = np.empty((h, w), bool)
            rgb[:keep] = prgb[y - py0 :]
            valid[:keep] = pvalid[y - py0 :]
            if h > keep:
                nrgb, nvalid = self._read_stored((0, py1, w, h - keep))
                rgb[keep:] = nrgb
                valid[keep:] = nvalid
        elif prev is not None and prev[0] <= y and y + h <= prev[1]:
            py0, _, prgb, pvalid = prev
            return prgb[y - py0 : y - py0 + h], pvalid[y - py0 : y - py0 + h]
        else:
            rgb, valid = self._read_stored(window)
        rgb.flags.writeable = False
        valid.flags.writeable = False
        self._strip = (y, y + h, rgb, valid)
        return rgb, valid

    def read_thumbnail(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        W, H = self.info.width, self.info.height
        factor = -(-max(W, H) // max_side)
        if factor <= 1:
            return self.read_rgb(None)
        sw, sh = self._stored
        shape = (max(1, sh // factor), max(1, sw // factor))
        raw = self._raw((0, 0, sw, sh), out_shape=shape)
        mask = self._raw_mask((0, 0, sw, sh), out_shape=shape) if self._plan.internal_mask else None
        valid = self._valid_of(raw, mask)
        rgb = self._convert(raw, valid)
        if valid is None:
            valid = np.ones(shape, bool)
        o = self.info.orientation
        return np.ascontiguousarray(orient_array(rgb, o)), np.ascontiguousarray(orient_array(valid, o))


def open_scene(path: str, info: SceneInfo, bands: tuple[int, ...] | None = None) -> SceneReader:
    """Open a scene whose header was read by read_header (a context manager). Raises UnreadableImage."""
    path = fs_path(os.fspath(path))
    if info.backend == "rasterio":
        return RasterioSceneReader(path, info, bands)
    return PillowSceneReader(path, info, bands)


def open_path(path: str, bands: tuple[int, ...] | None = None) -> SceneReader:
    """Identify and open a scene with one open of the file (header and pixels); `reader.info` is its
    header. What slicing uses: scan has already checked the file's end, so this does not re-read it."""
    path = fs_path(os.fspath(path))
    # Pillow decodes a small file faster from memory than from a file object it reads in pieces.
    head, data, size = _read_head_and_tail(path, tail=False, whole_up_to=WHOLE_READ_BYTES)
    fmt = sniff_format(head)
    if fmt in PILLOW_FORMATS:
        im = _pil_open(io.BytesIO(data) if len(data) == size else _pil_source(path), fmt)
        if im is not None:
            try:
                info = _info_from_pil(im, fmt)
            except BaseException:
                im.close()
                raise
            if info is not None:
                return PillowSceneReader(
                    path, info, bands, image=im, data=data if len(data) == size else None
                )
            im.close()
    return RasterioSceneReader(path, None, bands, fmt=fmt, size=size)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UnreadableImage(f"cannot read the file ({exc.strerror or exc})") from None


def read_rgb_whole(
    path: str, bands: tuple[int, ...] | None = None, max_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A whole image as rgb (H, W, 3) uint8 and valid (H, W); reduced by area averaging to at most
    `max_side` pixels on its longer side when given (bounds memory for huge benchmark images)."""
    info = read_header(path)
    with open_scene(path, info, bands) as reader:
        if max_side is not None and max(info.width, info.height) > max_side:
            return reader.read_thumbnail(max_side)
        return reader.read_rgb(None)


def bounds_of(transform: tuple[float, ...] | None, window: tuple[int, int, int, int]) -> list[float] | None:
    """(minx, miny, maxx, maxy) of a pixel window under an affine transform (all four corners, so rotated
    grids give their bounding box)."""
    if transform is None:
        return None
    a, b, c, d, e, f = transform
    x, y, w, h = window
    xs = [a * px + b * py + c for px, py in ((x, y), (x + w, y), (x, y + h), (x + w, y + h))]
    ys = [d * px + e * py + f for px, py in ((x, y), (x + w, y), (x, y + h), (x + w, y + h))]
    return [min(xs), min(ys), max(xs), max(ys)]


def bounds_json(bounds: list[float] | None) -> str | None:
    return None if bounds is None else json.dumps([round(v, 9) for v in bounds])
