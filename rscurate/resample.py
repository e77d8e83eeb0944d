"""Pillow's grey LANCZOS reduction to a small square, bit for bit, for many tiles at once.

pHash starts from `image.convert("L").resize((32, 32), LANCZOS)` (rscurate.hash), one Pillow call per
tile; that resize is the largest cost of hashing. Pillow's resampling is separable fixed-point
arithmetic: per axis, integer coefficients (22 fractional bits) computed from the LANCZOS kernel, a sum
per output pixel, rounding, and a clip to 0..255 after each pass. Those sums are integers below 2^31,
so a float64 matrix product computes them exactly: a few BLAS calls per pass over a chunk of tiles of
the same size replace a Python-level call per tile. The coefficient matrices are banded (a 256 -> 32 output
pixel weighs 48 inputs), so each product runs over column blocks with only the input rows they weigh, and
a chunk is sized to stay in the core's cache (CHUNK_VALUES), its buffer reused from chunk to chunk: a batch
converted to one large fresh array spent more in page faults and cache misses than in the products. The
products run on one BLAS thread (threadpoolctl): a pool of BLAS threads woken for each small product spent
ten times the CPU of one thread doing it (a worker process is one core's worth of work already).

Pillow chooses which axis it resamples first, and the choice has changed between versions. So for each
tile size the order is not assumed but observed once: a probe image is resized by Pillow and by both
orders here, and the order that reproduces Pillow is kept. If neither does (a future Pillow computing
differently), that size goes through Pillow itself. The grey conversion is Pillow's own.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
from PIL import Image
from threadpoolctl import ThreadpoolController

log = logging.getLogger(__name__)

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit resampling
_HALF = float(1 << (PRECISION_BITS - 1))
_SCALE = float(1 << PRECISION_BITS)
# float64 values of one chunk of same-size tiles (1 MB): 2 tiles of 256 px, 32 of 64 px.
CHUNK_VALUES = 1 << 17
# Column blocks each coefficient matrix is cut into (fewer multiply-adds on zeros; more BLAS calls).
BAND_BLOCKS = 2


def _lanczos(x: float) -> float:
    """Pillow's LANCZOS (a = 3) kernel."""

    def sinc(v: float) -> float:
        if v == 0.0:
            return 1.0
        v *= math.pi
        return math.sin(v) / v

    return sinc(x) * sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


@functools.lru_cache(maxsize=1024)
def coefficients(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) float64 of Pillow's integer LANCZOS coefficients for one axis (a banded
    matrix: column j holds the weights of output pixel j)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    matrix = np.zeros((in_size, out_size), np.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = [_lanczos((x + lo - center + 0.5) / filterscale) for x in range(hi - lo)]
        total = 0.0
        for w in weights:
            total += w  # summed in order, as Pillow does
        for x, w in enumerate(weights):
            k = w / total if total != 0.0 else w
            matrix[lo + x, out] = math.trunc(k * _SCALE + (-0.5 if k < 0 else 0.5))
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=1024)
def _bands(in_size: int, out_size: int) -> tuple[tuple[slice, slice, np.ndarray], ...]:
    """coefficients(in_size, out_size) cut into BAND_BLOCKS blocks of output columns, each block with
    only the input rows it weighs: (output columns, input rows, (rows, columns) float64 block). The sums
    are exact integers in any grouping, so the blocks give the dense product's values."""
    matrix = coefficients(in_size, out_size)
    step = -(-out_size // BAND_BLOCKS)
    blocks = []
    for start in range(0, out_size, step):
        cols = slice(start, min(start + step, out_size))
        weighed = np.flatnonzero(matrix[:, cols].any(axis=1))
        rows = slice(int(weighed[0]), int(weighed[-1]) + 1) if len(weighed) else slice(0, 0)
        block = np.ascontiguousarray(matrix[rows, cols])
        block.flags.writeable = False
        blocks.append((cols, rows, block))
    return tuple(blocks)


def _right(x: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """(M, in_size) @ coefficients(in_size, out_size) -> (M, out_size), block by block."""
    out = np.empty((x.shape[0], out_size), np.float64)
    for cols, rows, block in _bands(in_size, out_size):
        out[:, cols] = x[:, rows] @ block
    return out


def _left(x: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """coefficients(in_size, out_size).T @ (N, in_size, K) -> (N, out_size, K), block by block."""
    out = np.empty((x.shape[0], out_size, x.shape[2]), np.float64)
    for cols, rows, block in _bands(in_size, out_size):
        out[:, cols] = np.matmul(block.T, x[:, rows])  # (c, r) @ (N, r, K)
    return out


def _clip8(sums: np.ndarray) -> np.ndarray:
    """Pillow's clip8 of fixed-point sums (float64 holding exact integers), in place, as float64."""
    sums += _HALF
    np.floor(sums / _SCALE, out=sums)
    return np.clip(sums, 0.0, 255.0, out=sums)


def _horizontal_first(grey: np.ndarray, side: int) -> np.ndarray:
    """(N, H, W) float64 -> (N, side, side) float64, width resampled first."""
    n, h, w = grey.shape
    across = _clip8(_right(grey.reshape(n * h, w), w, side)).reshape(n, h, side)  # (N, H, side)
    return _clip8(_left(across, h, side))  # (side, H) @ (N, H, side)


def _vertical_first(grey: np.ndarray, side: int) -> np.ndarray:
    """(N, H, W) float64 -> (N, side, side) float64, height resampled first."""
    n, h, w = grey.shape
    down = _clip8(_left(grey, h, side))  # (side, H) @ (N, H, W) -> (N, side, W)
    return _clip8(_right(down.reshape(n * side, w), w, side)).reshape(n, side, side)


_ORDERS = {"hv": _horizontal_first, "vh": _vertical_first}


def _pillow(grey: np.ndarray, side: int) -> np.ndarray:
    """(H, W) uint8 -> (side, side) uint8 through Pillow itself."""
    return np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=4096)
def _order(h: int, w: int, side: int) -> str | None:
    """Which pass order reproduces Pillow for (h, w) -> (side, side): 'hv', 'vh', or None (use Pillow)."""
    rng = np.random.default_rng(h * 100_003 + w)
    for _ in range(3):
        probe = rng.integers(0, 256, (h, w), dtype=np.uint8)
        expected = _pillow(probe, side)
        matching = [
            name
            for name, fn in _ORDERS.items()
            if np.array_equal(fn(probe[None].astype(np.float64), side)[0], expected)
        ]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            break
    log.debug("resample: no exact match for %dx%d -> %d; using Pillow for this size", w, h, side)
    return None if not matching else matching[0]


@functools.cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # the BLAS libraries loaded in this process (once: about a millisecond)


def _one_blas_thread() -> AbstractContextManager[object]:
    return _controller().limit(limits=1, user_api="blas")


def grey_thumbnails(tiles: Sequence[np.ndarray], side: int = 32) -> np.ndarray:
    """(N, side, side) uint8: each tile ((H, W, 3) RGB or (H, W) grey uint8) as Pillow's
    `convert("L").resize((side, side), LANCZOS)`, bit for bit; tiles of one size go through together."""
    with _one_blas_thread():
        return _grey_thumbnails(tiles, side)


def _grey_thumbnails(tiles: Sequence[np.ndarray], side: int) -> np.ndarray:
    out = np.empty((len(tiles), side, side), np.uint8)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, tile in enumerate(tiles):
        _check(tile)
        by_shape.setdefault((int(tile.shape[0]), int(tile.shape[1])), []).append(i)
    for (h, w), index in by_shape.items():
        if (h, w) == (side, side):
            for i in index:
                out[i] = _as_grey(tiles[i])
            continue
        order = _order(h, w, side)
        if order is None:
            for i in index:
                out[i] = _pillow(_as_grey(tiles[i]), side)
            continue
        step = max(1, CHUNK_VALUES // (h * w))
        stack = np.empty((min(step, len(index)), h, w), np.float64)  # (n, H, W), reused chunk to chunk
        for start in range(0, len(index), step):
            chunk = index[start : start + step]
            for j, i in enumerate(chunk):
                stack[j] = _as_grey(tiles[i])
            out[chunk] = _ORDERS[order](stack[: len(chunk)], side)
    return out


def _check(tile: np.ndarray) -> None:
    if tile.dtype != np.uint8 or not (tile.ndim == 2 or (tile.ndim == 3 and tile.shape[2] == 3)):
        raise ValueError(f"a tile must be (H, W, 3) or (H, W) uint8, got {tile.dtype} {tile.shape}")
    if tile.shape[0] == 0 or tile.shape[1] == 0:
        raise ValueError(f"a tile must have at least one pixel, got shape {tile.shape}")


def _as_grey(tile: np.ndarray) -> np.ndarray:
    """(H, W) uint8 of a checked tile: Pillow's convert('L') of an RGB one."""
    if tile.ndim == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).convert("L"))
    return tile
