"""pHash of tiles, bit-identical to ``imagehash.phash`` and batched; pass 4, benchmark decontamination.

The steps are imagehash 4.3's: grey with Pillow's ``convert('L')``, LANCZOS resize to 32x32, DCT-II
(``scipy.fftpack.dct``) along rows and then columns, the top-left 8x8 coefficients, a bit set where a
coefficient exceeds their median, bits read row by row with the first as the most significant.

Pillow still does the grey conversion and the resize, tile by tile, because bit-identity rests on its
fixed-point LANCZOS weights. The DCT, median and bit packing run once for a whole batch. The DCT is
scipy.fftpack's, not a matrix product: on a flat tile every AC coefficient is exactly 0 through the FFT
but about 1e-11 through a matrix product, and the bits of flat tiles would change.

A hash is a Python int or a uint64 in memory and 16 lowercase hex digits in tables, as imagehash
prints it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.fftpack
from PIL import Image

log = logging.getLogger(__name__)

HASH_SIZE = 8  # the hash is HASH_SIZE x HASH_SIZE bits
RESIZE = 32  # imagehash's hash_size * highfreq_factor
_BATCH = 4096  # tiles per DCT call: about 16 KiB of float64 temporaries each
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_VALUE = np.full(128, 255, dtype=np.uint8)  # ASCII code -> nibble; 255: not a hex digit
_HEX_VALUE[_HEX_DIGITS] = np.arange(16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


class ExcludeSection(Protocol):
    """The recipe section `run` reads (read-only, so the frozen recipe dataclasses match)."""

    @property
    def benchmark_max_distance(self) -> int: ...


# ---------------------------------------------------------------------------------------------------
# Hashing


def phash(tile: np.ndarray) -> int:
    """64-bit pHash of an (H, W, 3) RGB or (H, W) grey uint8 tile, equal to imagehash.phash's."""
    return int(_dct_bits(_grey_32(tile)[None])[0])


def phash_batch(tiles: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N,) uint64 pHashes of N tiles, each (H, W, 3) RGB or (H, W) grey uint8; sizes may differ."""
    hashes = np.empty(len(tiles), dtype=np.uint64)
    for start in range(0, len(tiles), _BATCH):
        block = tiles[start : start + _BATCH]
        small = np.empty((len(block), RESIZE, RESIZE), dtype=np.uint8)  # (N, 32, 32) grey
        for i, tile in enumerate(block):
            small[i] = _grey_32(tile)
        hashes[start : start + len(block)] = _dct_bits(small)
    return hashes


def _grey_32(tile: np.ndarray) -> np.ndarray:
    """(32, 32) uint8: Pillow's grey conversion and LANCZOS resize of one tile."""
    tile = np.asarray(tile)
    if tile.dtype != np.uint8 or not (tile.ndim == 2 or (tile.ndim == 3 and tile.shape[2] == 3)):
        raise ValueError(f"a tile must be (H, W, 3) or (H, W) uint8, got {tile.dtype} {tile.shape}")
    if tile.shape[0] == 0 or tile.shape[1] == 0:
        raise ValueError(f"a tile must have at least one pixel, got shape {tile.shape}")
    image = Image.fromarray(np.ascontiguousarray(tile))
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image.resize((RESIZE, RESIZE), Image.Resampling.LANCZOS))


def _dct_bits(small: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of (N, 32, 32) uint8 grey thumbnails."""
    n = small.shape[0]
    # imagehash: dct(dct(pixels, axis=0), axis=1) on one (32, 32) image; axis 0 here is the batch.
    coeffs = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=1), axis=2)  # (N, 32, 32) float64
    low = coeffs[:, :HASH_SIZE, :HASH_SIZE].reshape(n, HASH_SIZE * HASH_SIZE)  # (N, 64)
    # The median of 64 values, as np.median computes it: the mean of the 32nd and 33rd smallest.
    middle = np.partition(low, (31, 32), axis=1)[:, 31:33]  # (N, 2)
    bits = low > (middle[:, :1] + middle[:, 1:]) / 2  # (N, 64) bool
    packed = np.packbits(bits, axis=1)  # (N, 8) uint8, first bit the most significant
    return packed.view(">u8").reshape(n).astype(np.uint64)


# ---------------------------------------------------------------------------------------------------
# Hex codec


def to_hex(h: int | np.integer) -> str:
    """16 lowercase hex digits, as str(imagehash.phash(...))."""
    value = int(h)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"a hash must lie in 0..2**64-1, got {value}")
    return f"{value:016x}"


def from_hex(s: str) -> int:
    """The hash written as 16 hex digits."""
    return int(from_hex_array([s])[0])


def to_hex_array(hashes: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (N,) str of 16 lowercase hex digits each (numpy '<U16')."""
    h = np.asarray(hashes)
    if h.dtype != np.uint64 or h.ndim != 1:
        raise ValueError(f"hashes must be a 1-D uint64 array, got {h.dtype} with shape {h.shape}")
    octets = h.astype(">u8").view(np.uint8).reshape(h.size, 8)  # (N, 8), most significant first
    nibbles = np.stack([octets >> 4, octets & 15], axis=2).reshape(h.size, 16)  # (N, 16)
    return _HEX_DIGITS[nibbles].view("S16").reshape(h.size).astype("<U16")


def from_hex_array(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    """(N,) hex strings of 16 digits (either case) -> (N,) uint64."""
    text = np.asarray(values, dtype=np.str_)
    if text.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of hex strings, got shape {text.shape}")
    n = text.size
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    valid = np.char.str_len(text) == 16
    if valid.all():
        codes = text.astype("<U16").view(np.uint32).reshape(n, 16)  # (N, 16) code points
        nibbles = _HEX_VALUE[np.minimum(codes, 127)]  # (N, 16), 255 where not a hex digit
        valid = (nibbles != 255).all(axis=1)
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(
            f"hash {text[bad]!r} (item {bad}) is not 16 hex digits; "
            f"{int((~valid).sum())} of {n} values are malformed"
        )
    octets = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (N, 8), most significant first
    return octets.view(">u8").reshape(n).astype(np.uint64)


def table_hashes(tiles: pd.DataFrame) -> np.ndarray:
    """(N,) uint64 from a table's `phash` column; a malformed value is an error naming its tile key."""
    values = tiles["phash"].to_numpy()
    try:
        return from_hex_array(values)
    except ValueError:
        bad = [
            k
            for k, v in zip(tiles["key"], values, strict=True)
            if not (isinstance(v, str) and _HEX16.fullmatch(v))
        ]
        raise ValueError(f"{len(bad)} tiles have no valid phash (16 hex digits), first {bad[:5]}") from None


# ---------------------------------------------------------------------------------------------------
# Pass 4: per-tile benchmark decontamination


def run(cfg: ExcludeSection, tiles: pd.DataFrame, benchmark_hashes: np.ndarray) -> pd.DataFrame:
    """Exclude every kept tile within cfg.benchmark_max_distance (inclusive) of a benchmark hash.

    benchmark_hashes: (B,) uint64. Matching tiles get status `excluded`, reason `benchmark` and
    `benchmark_distance` (nullable Int64, the distance to the nearest benchmark hash). Returns a new
    table with every input row, in input order.
    """
    from rscurate import dedup  # here, not above: dedup imports this module for the hex codec

    missing = {"key", "phash", "status", "reason"} - set(tiles.columns)
    if missing:
        raise ValueError(f"benchmark pass: the tiles table lacks columns {sorted(missing)}")
    out = tiles.copy()
    out["benchmark_distance"] = (
        out["benchmark_distance"].astype("Int64")
        if "benchmark_distance" in out.columns
        else pd.Series(pd.NA, index=out.index, dtype="Int64")
    )
    rows = np.flatnonzero((out["status"] == "kept").to_numpy())  # (K,) positions of the kept tiles
    if rows.size == 0 or len(benchmark_hashes) == 0:
        return out

    hashes = table_hashes(out.iloc[rows])  # (K,)
    match, distance = dedup.query(hashes, benchmark_hashes, cfg.benchmark_max_distance)
    hit = match >= 0
    mask = np.zeros(len(out), dtype=bool)
    mask[rows[hit]] = True
    out.loc[mask, "status"] = "excluded"
    out.loc[mask, "reason"] = "benchmark"
    out.loc[mask, "benchmark_distance"] = distance[hit]
    log.info(
        "benchmark: %d of %d kept tiles within distance %d of %d benchmark hashes, excluded",
        int(hit.sum()),
        rows.size,
        cfg.benchmark_max_distance,
        len(benchmark_hashes),
    )
    return out
