"""Pass 4: benchmark decontamination that survives flips, small rotations, re-crops and benchmark images cut
from larger scenes.

Nothing near a held-out benchmark image may reach the shards. Each exclusion records how it was found in
`benchmark_mechanism`, the benchmark image in `benchmark_match` (and its recipe name in `benchmark`), the
variant that matched in `benchmark_variant` and, where it applies, a window in `benchmark_window`:

* ``listed``   the source lists the file in a benchmark test split (decided by the exclude pass).
* ``scene``    the scene's pHash (of its thumbnail) lies within `benchmark_max_distance` of a benchmark image,
               a flip or rotation of it, or it tilted by 2 degrees: the scene goes with all its tiles.
* ``tile``     a tile lies that near a benchmark image as it is or tilted.
* ``dihedral`` a tile lies that near one of the 7 other flips and 90-degree rotations of a benchmark image.
* ``crop``     a tile is a re-crop of a benchmark image: near a sub-window of it (`benchmark_window`, in
               the benchmark image's pixels).
* ``window``   the tile holds at least WINDOW_OVERLAP of a benchmark image found inside its scene, at the
               benchmark image's size (`benchmark_window`, in scene pixels).

Within `benchmark_max_distance` bits a whole-image match counts as it is, as it always did. Up to
`benchmark_verify_distance` bits, and for every sub-window and scene-window match, the hash match is only a
candidate: the pixels must confirm it (`Source.score`: the texture of both, high-passed at 48x48, correlated
over small shifts and scales, agreeing in at least two quadrants). 64-bit pHash searched over
thousands of windows per benchmark image meets real look-alikes; the pixel check tells them apart.

The cost sits on the benchmark side wherever it can: benchmarks are thousands of images, the corpus
millions of tiles. Each benchmark image is hashed once in its 8 flips/rotations and 2 tilts and over a pyramid
of sub-windows (`crop_windows`: scales from `benchmark_crop_min` to CROP_MAX of its sides, scales and
positions `benchmark_crop_step` of a window apart); every tile is then searched once, with rscurate.dedup's
multi-index hashing, against all of them. The other direction, a benchmark image inside a larger scene, needs
windows of the scene: `WindowSearch` runs in the slice pass on the grey that slicing makes of each kept tile
anyway, hashes windows at each benchmark size every SCENE_STRIDE (at most `benchmark_scene_windows` per scene
and size), searches and verifies them there; only its matches travel on, in the scenes table.

Window hashes are made cheaply: the image is resized (Pillow LANCZOS, as pHash does) once per scale so that a
window is WINDOW pixels wide, every window is cut from it and box-reduced to pHash's 32x32, and the DCT runs on
all of them at once (a matrix product). A window hash is thus not bit-identical to the pHash of the cut-out
window, but within a bit or two of it (on average one), which the radius absorbs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from rscurate import dedup
from rscurate.hash import (
    DIHEDRAL,
    VARIANTS,
    from_hex_array,
    phash_batch,
    phash_variants,
    table_hashes,
    thumbnail_hashes,
    to_hex,
)
from rscurate.raster import UnreadableImage, read_rgb_whole
from rscurate.recipe import ExcludeConfig

log = logging.getLogger(__name__)

MECHANISMS = ("listed", "scene", "tile", "dihedral", "crop", "window")
# Small rotations of each whole benchmark image hashed as references too (degrees; pHash moves by up to
# 10 bits at 3 degrees, and a reference at 2 degrees brings any rotation of 1-3 degrees within 4).
TILTS = (-2.0, 2.0)
# What the whole-image reference hashes of a benchmark image are, in the order `variants` stores them.
REFERENCE_VARIANTS = (*VARIANTS, *(f"tilt{t:+g}" for t in TILTS))
# Benchmark images larger than this are reduced (area average) before hashing; pHash looks at 32x32.
BENCHMARK_MAX_SIDE = 4096
# Side of a window in the resized image it is cut from, before the 2x2 box reduction to 32x32.
WINDOW = 64
CROP_MAX = 0.95  # largest crop of the pyramid; above it a crop is a shifted whole image, for `tile`
# Pixels between neighbouring scene windows in the resized scene (of WINDOW per window: 3%). Measured on
# the planted set, the hash of a window moves by up to 8 bits when it slides by 3% of its side: at this
# stride a planted benchmark lies within 6 bits of a window 99% of the time (within 8: always), at 5% only
# 89%. A scene whose window count at this stride exceeds benchmark_scene_windows gets a wider one.
SCENE_STRIDE = 2
# A scene is searched for windows only when it is larger than a benchmark image by this area factor.
SCENE_AREA_FACTOR = 1.5
# The reduced grey copy of a scene that windows are cut from holds at most this many pixels.
SCENE_GREY_PIXELS = 32_000_000
# A tile holding at least this fraction of a benchmark image found in its scene goes (the window's
# position is known to a few percent of its side, well inside this margin).
WINDOW_OVERLAP = 0.2
# Matches of one benchmark image in one scene that overlap more than this (intersection over union)
# are one match.
WINDOW_IOU = 0.3
MIN_WINDOW_STD = 2.0  # near-constant windows (sea, nodata) are not searched: their hash is noise
# Candidates verified per tile or per scene window search, nearest first (bounds the pixel work).
MAX_CANDIDATES = 24
MAX_SCENE_CANDIDATES = 256
VERIFY_BATCH = 4096  # tiles whose staged bytes are read at once for verification, at most
VERIFY_TASKS_PER_WORKER = 4  # fewer tiles per batch when that gives each worker this many batches...
VERIFY_MIN_BATCH = 16  # ...but not fewer than this (a batch reads the benchmark images it needs; a tile
# with candidates costs milliseconds of pixel checks, the reads far less)
# Verification: the candidate and the benchmark (or scene) box, both at VERIFY_SIDE px, high-passed,
# compared by normalised correlation at every offset up to VERIFY_MARGIN px and at each scale and angle.
# At 32 px, fields with regular crop rows (synthetic ones, and real farmland) correlated at 0.52-0.53 with
# other such fields; at 48 px they fall to 0.34-0.45 while every planted copy still passes (measured on
# the planted set: recall unchanged, no false match on it or on 27,000 EuroSAT chips); at 64 px small
# misalignments start to cost true matches.
VERIFY_SIDE = 48
VERIFY_MARGIN = 6
VERIFY_BLUR = 2  # box radius of the local mean the high-pass removes
VERIFY_SCALES = (0.96, 1.0, 1.04)
# Rotations searched: none beyond the references' own (tilted references stand for small rotations; a
# search over +-2 degrees as well tripled the cost of a check and changed no decision on the planted set).
VERIFY_ANGLES = (0.0,)
VERIFY_MAX_SIDE = 1024  # benchmark images are read back at most this large for verification
# ...and at least two quadrants of the box must agree this well on their own (see Source.score).
VERIFY_QUADRANT = 0.3
TILE_COLUMNS = (
    "benchmark_distance",
    "benchmark",
    "benchmark_match",
    "benchmark_mechanism",
    "benchmark_variant",
    "benchmark_window",
)


class DecontamSection(Protocol):
    """The recipe keys decontamination reads (the `exclude` section; read-only, so the frozen recipe
    dataclasses match)."""

    @property
    def benchmark_max_distance(self) -> int: ...
    @property
    def benchmark_invariant(self) -> str: ...
    @property
    def benchmark_crop_min(self) -> float | None: ...
    @property
    def benchmark_crop_step(self) -> float: ...
    @property
    def benchmark_scene_windows(self) -> int: ...
    @property
    def benchmark_verify_distance(self) -> int: ...
    @property
    def benchmark_verify_score(self) -> float: ...


# ---------------------------------------------------------------------------------------------------
# Window hashes


def _stride(step: float) -> int:
    """Pixels between neighbouring windows in the resized image."""
    return max(1, round(step * WINDOW))


def _positions(n: int, stride: int) -> np.ndarray:
    """Window starts along an axis of n resized pixels: every `stride`, and the last one flush."""
    starts = np.arange(0, n - WINDOW + 1, stride)
    if starts[-1] != n - WINDOW:
        starts = np.append(starts, n - WINDOW)
    return starts


def pyramid_sides(crop_min: float, step: float) -> list[int]:
    """Resized sides, one per scale: a window of WINDOW pixels is a crop of WINDOW / side of the image."""
    first, last = round(WINDOW / CROP_MAX), round(WINDOW / crop_min)
    sides: list[int] = []
    side = float(first)
    while round(side) < last:
        if not sides or round(side) > sides[-1]:
            sides.append(round(side))
        side *= 1 + step
    sides.append(last)
    return sides


def crop_windows(width: int, height: int, crop_min: float, step: float) -> np.ndarray:
    """(K, 4) int64 windows (x, y, w, h) of a width x height benchmark image, in `crop_hashes` order.

    Deterministic in its arguments, so the windows need not be stored next to their hashes.
    """
    rows = []
    stride = _stride(step)
    for side in pyramid_sides(crop_min, step):
        starts = _positions(side, stride)
        ys, xs = np.meshgrid(starts, starts, indexing="ij")  # (S, S) each, row by row
        scale_x, scale_y = width / side, height / side
        w, h = round(WINDOW * scale_x), round(WINDOW * scale_y)
        rows.append(
            np.stack(
                [
                    np.round(xs.ravel() * scale_x),
                    np.round(ys.ravel() * scale_y),
                    np.full(xs.size, w),
                    np.full(xs.size, h),
                ],
                axis=1,
            )
        )
    return np.concatenate(rows).astype(np.int64)


def crop_hashes(grey: np.ndarray, crop_min: float, step: float) -> np.ndarray:
    """(K,) uint64 hashes of the sub-windows `crop_windows` lists, of an (H, W) uint8 grey image."""
    image = Image.fromarray(np.ascontiguousarray(grey))
    stride = _stride(step)
    out = []
    for side in pyramid_sides(crop_min, step):
        resized = np.asarray(image.resize((side, side), Image.Resampling.LANCZOS))  # (side, side)
        starts = _positions(side, stride)
        out.append(_window_hashes(resized, starts, starts)[0])
    return np.concatenate(out) if out else np.empty(0, np.uint64)


def _window_hashes(
    resized: np.ndarray, ys: np.ndarray, xs: np.ndarray, min_std: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the WINDOW x WINDOW windows of `resized` starting at every (ys[i], xs[j]), row by row,
    and a (len(ys) * len(xs),) bool: False where the window is near-constant (std under min_std)."""
    # Sums of every 2x2 block, at every offset: a window's 32x32 reduction is every other one of them.
    grid = resized.astype(np.uint16)
    rows = grid[:-1] + grid[1:]
    blocks = rows[:, :-1] + rows[:, 1:]  # (H - 1, W - 1), 4x the 2x2 mean
    side = WINDOW - 1
    views = np.lib.stride_tricks.sliding_window_view(blocks, (side, side))[:, :, ::2, ::2]  # (H', W', 32, 32)
    hashes = np.empty(ys.size * xs.size, dtype=np.uint64)
    varied = np.ones(ys.size * xs.size, dtype=bool)
    rows_per_block = max(1, 4096 // max(1, xs.size))
    for start in range(0, ys.size, rows_per_block):
        picked = views[ys[start : start + rows_per_block, None], xs[None, :]]  # (r, X, 32, 32), copied
        small = picked.reshape(-1, WINDOW // 2, WINDOW // 2)
        at = slice(start * xs.size, start * xs.size + small.shape[0])
        hashes[at] = thumbnail_hashes(small)  # the bits do not depend on the 4x scale
        if min_std > 0:  # every other pixel is plenty for telling a flat window
            varied[at] = _std_rows(small[:, ::2, ::2].reshape(small.shape[0], -1)) >= 4 * min_std
    return hashes, varied


def _std_rows(values: np.ndarray) -> np.ndarray:
    """(N,) standard deviation of each row of an (N, K) integer array from the sums of x and x^2 in float64
    (one pass, faster than np.std's two). With K a power of two and K * max(x)^2 under 2^53 (here 256 values
    of at most 1020) every step before the square root is exact, so the result is np.std's to the bit."""
    x = values.astype(np.float64)
    n = x.shape[1]
    mean = x.sum(axis=1) / n
    return np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x) / n - mean * mean, 0.0))


# ---------------------------------------------------------------------------------------------------
# Benchmark side: the references


def tilted(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """The image rotated by `degrees` about its centre, the corners filled by mirroring its edges."""
    pad = math.ceil(max(rgb.shape[:2]) * math.sin(math.radians(abs(degrees)))) + 2
    width = ((pad, pad), (pad, pad)) + (((0, 0),) if rgb.ndim == 3 else ())
    padded = Image.fromarray(np.pad(rgb, width, mode="reflect"))
    turned = np.asarray(padded.rotate(degrees, Image.Resampling.BICUBIC))
    return turned[pad:-pad, pad:-pad]


def benchmark_run(benchmarks: pd.DataFrame, cfg: DecontamSection | None = None) -> pd.DataFrame:
    """Hashes of each listed benchmark image; status ok | error with the reason.

    Adds `phash` (16 hex digits, the image as it is), `width` and `height` (of the image hashed, at most
    BENCHMARK_MAX_SIDE), `variants` (hex hashes of the 8 flips/rotations in VARIANTS order, then of the
    image tilted by each of TILTS; space-separated) and `crop_hashes` (the sub-window hashes as
    little-endian uint64 bytes in `crop_windows` order; empty when crops are off).
    """
    cfg = cfg or ExcludeConfig()
    out = benchmarks.copy().reset_index(drop=True)
    columns: dict[str, list[Any]] = {k: [] for k in ("phash", "width", "height", "variants", "crop_hashes")}
    status: list[str] = []
    reason: list[str | None] = []
    preset_status = out["status"] if "status" in out else pd.Series([None] * len(out))
    preset_reason = out["reason"] if "reason" in out else pd.Series([None] * len(out))
    for path, pre_s, pre_r in zip(out["path"], preset_status, preset_reason, strict=True):
        rgb = None
        if pre_s == "error":
            status.append("error")
            reason.append(pre_r)
        else:
            try:
                rgb, _ = read_rgb_whole(path, max_side=BENCHMARK_MAX_SIDE)
                status.append("ok")
                reason.append(None)
            except UnreadableImage as exc:
                log.warning("benchmark image %s cannot be hashed: %s", path, exc.reason)
                status.append("error")
                reason.append(f"unreadable: {exc.reason}")
        if rgb is None:
            for values in columns.values():
                values.append(None)
            continue
        hashes = np.concatenate([phash_variants([rgb])[0], phash_batch([tilted(rgb, t) for t in TILTS])])
        columns["phash"].append(to_hex(hashes[0]))
        columns["height"].append(int(rgb.shape[0]))
        columns["width"].append(int(rgb.shape[1]))
        columns["variants"].append(" ".join(to_hex(v) for v in hashes))
        crops = np.empty(0, np.uint64)
        if cfg.benchmark_crop_min is not None:
            grey = np.asarray(Image.fromarray(rgb).convert("L"))
            crops = crop_hashes(grey, cfg.benchmark_crop_min, cfg.benchmark_crop_step)
        columns["crop_hashes"].append(crops.astype("<u8").tobytes())
    for name, values in columns.items():
        out[name] = pd.array(values, dtype="Int64") if name in ("width", "height") else values
    out["status"] = status
    out["reason"] = reason
    return out


_EMPTY_REFS = (np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.int8), np.empty(0, np.int32))


@dataclass
class References:
    """Benchmark hashes to search against, with what each one is: `bench` indexes the BenchmarkSet,
    `variant` indexes REFERENCE_VARIANTS, `window` indexes the image's `crop_windows` (-1: whole)."""

    hashes: np.ndarray  # (R,) uint64
    bench: np.ndarray  # (R,) int32
    variant: np.ndarray  # (R,) int8
    window: np.ndarray  # (R,) int32

    def __len__(self) -> int:
        return int(self.hashes.size)


@dataclass
class BenchmarkSet:
    """The ok rows of the benchmarks table, read into arrays."""

    names: np.ndarray  # (B,) object: the recipe's benchmark names
    paths: np.ndarray  # (B,) object
    sizes: np.ndarray  # (B, 2) int64: width, height of the image hashed
    variants: np.ndarray  # (B, V) uint64, REFERENCE_VARIANTS order
    crops: list[np.ndarray] = field(default_factory=list)  # B arrays of (K_b,) uint64

    @classmethod
    def from_table(cls, benchmarks: pd.DataFrame | None) -> BenchmarkSet:
        n_var = len(REFERENCE_VARIANTS)
        if benchmarks is None or not len(benchmarks) or "phash" not in benchmarks.columns:
            empty = np.empty(0, object)
            return cls(empty, empty, np.empty((0, 2), np.int64), np.empty((0, n_var), np.uint64), [])
        ok = benchmarks[(benchmarks["status"] == "ok") & benchmarks["phash"].notna()].reset_index(drop=True)
        if "variants" in ok.columns:
            variants = np.zeros((len(ok), n_var), np.uint64)
            for i, text in enumerate(ok["variants"]):
                variants[i] = from_hex_array(str(text).split())
        else:  # a table from before variants were hashed: every variant is the image as it is
            variants = np.repeat(from_hex_array(ok["phash"].to_numpy())[:, None], n_var, axis=1)
        if {"width", "height"} <= set(ok.columns):
            sizes = ok[["width", "height"]].to_numpy(np.int64)
        else:
            sizes = np.zeros((len(ok), 2), np.int64)
        crops = [
            np.frombuffer(b, dtype="<u8").astype(np.uint64)
            if isinstance(b, bytes)
            else np.empty(0, np.uint64)
            for b in (ok["crop_hashes"] if "crop_hashes" in ok.columns else [None] * len(ok))
        ]
        names = (
            ok["benchmark"].to_numpy(object) if "benchmark" in ok.columns else np.full(len(ok), "", object)
        )
        return cls(names, ok["path"].to_numpy(object), sizes, variants, crops)

    def __len__(self) -> int:
        return len(self.paths)

    def whole(self, invariant: str) -> References:
        """Each image as it is and tilted; with invariant `dihedral`, also its 7 flips and rotations."""
        chosen = [
            i for i, v in enumerate(REFERENCE_VARIANTS) if invariant == "dihedral" or v not in VARIANTS[1:]
        ]
        b = len(self)
        return References(
            np.ascontiguousarray(self.variants[:, chosen]).reshape(b * len(chosen)),
            np.repeat(np.arange(b, dtype=np.int32), len(chosen)),
            np.tile(np.array(chosen, np.int8), b),
            np.full(b * len(chosen), -1, np.int32),
        )

    def crop(self) -> References:
        """Every sub-window of every image (as it is)."""
        counts = np.array([c.size for c in self.crops], dtype=np.int64)
        if not counts.sum():
            return References(*_EMPTY_REFS)
        # 17 bytes a reference: at 2,812 sub-windows an image, 48 KB per benchmark image in memory.
        return References(
            np.concatenate(self.crops),
            np.repeat(np.arange(len(self), dtype=np.int32), counts),
            np.zeros(int(counts.sum()), np.int8),
            np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
        )

    def digest(self) -> str:
        """What the references are, for naming work that depends on them."""
        h = hashlib.sha256()
        for path, size, variants in zip(self.paths, self.sizes, self.variants, strict=True):
            h.update(f"{path}|{size[0]}x{size[1]}|".encode())
            h.update(variants.tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Verification: a hash match confirmed on pixels


def oriented(image: np.ndarray, variant: str) -> np.ndarray:
    """The (H, W) or (H, W, C) image flipped, rotated or tilted as REFERENCE_VARIANTS names it."""
    if variant not in DIHEDRAL:
        degrees = float(variant.removeprefix("tilt")) if variant.startswith("tilt") else 0.0
        return tilted(image, degrees) if degrees else image
    transpose, flip_rows, flip_cols = DIHEDRAL[variant]
    out = np.swapaxes(image, 0, 1) if transpose else image
    if flip_rows:
        out = out[::-1]
    if flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _highpass(x: np.ndarray) -> np.ndarray:
    """Texture only: the image minus its local mean, so that two smooth gradients do not correlate."""
    import scipy.ndimage  # here: the pixel checks run in the workers; the parent's import would be serial

    return x - scipy.ndimage.uniform_filter(x, 2 * VERIFY_BLUR + 1, mode="reflect")


def template(grey: np.ndarray) -> np.ndarray | None:
    """(S*S,) float32 unit vector of the high-passed S x S thumbnail, or None for a featureless image."""
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(grey)).resize(
            (VERIFY_SIDE, VERIFY_SIDE), Image.Resampling.LANCZOS
        ),
        np.float32,
    )
    vec = _highpass(small).ravel()
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 1e-3 * vec.size else None


class Source:
    """A grey image that candidates are compared against: the best normalised correlation of a
    template with any box near a given one (small shifts and scales; rotations as VERIFY_ANGLES lists), on texture."""

    def __init__(self, grey: np.ndarray):
        self.grey = np.ascontiguousarray(grey)

    def score(self, vec: np.ndarray, box: Sequence[float]) -> float:
        x, y, w, h = (float(v) for v in box)
        side = VERIFY_SIDE + 2 * VERIFY_MARGIN
        # A region around the box, large enough for every scale and angle, mirrored where it leaves the image.
        half = 0.5 * max(w, h) * max(VERIFY_SCALES) * side / VERIFY_SIDE * 1.5 + 2
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = math.floor(cx - half), math.floor(cy - half)
        x1, y1 = math.ceil(cx + half), math.ceil(cy + half)
        image = Image.fromarray(self._region(x0, y0, x1, y1))
        rcx, rcy = cx - x0, cy - y0
        # Rotations and resizes at about twice the output resolution, not the source's: a box average first.
        factor = max(1, int(min(w, h) // (2 * VERIFY_SIDE)))
        if factor > 1:
            image = image.reduce(factor)
            w, h, rcx, rcy = w / factor, h / factor, rcx / factor, rcy / factor
        best, best_window = -1.0, np.zeros(VERIFY_SIDE * VERIFY_SIDE, np.float32)
        for angle in VERIFY_ANGLES:
            turned = (
                image if angle == 0 else image.rotate(angle, Image.Resampling.BILINEAR, center=(rcx, rcy))
            )
            for scale in VERIFY_SCALES:
                bw, bh = w * scale * side / VERIFY_SIDE, h * scale * side / VERIFY_SIDE
                patch = np.asarray(
                    turned.resize(
                        (side, side),
                        Image.Resampling.LANCZOS,
                        box=(rcx - bw / 2, rcy - bh / 2, rcx + bw / 2, rcy + bh / 2),
                    ),
                    np.float32,
                )
                corr, window = _best_correlation(_highpass(patch), vec)
                if corr > best:
                    best, best_window = corr, window
        # A match shows in more than one part of the image: a flat template (open water, say) with one
        # edge in a corner correlates with any image that has an edge there, and nowhere else.
        if best > -1 and _quadrant_agreement(vec, best_window) < VERIFY_QUADRANT:
            return -1.0
        return best

    def _region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        h, w = self.grey.shape
        if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
            return self.grey[y0:y1, x0:x1]
        ys = _mirror(np.arange(y0, y1), h)
        xs = _mirror(np.arange(x0, x1), w)
        return np.ascontiguousarray(self.grey[np.ix_(ys, xs)])


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into 0..n-1 (as np.pad's 'reflect'), for any distance outside."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def _best_correlation(patch: np.ndarray, vec: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest normalised correlation of the unit template `vec` (S*S,) with any S x S window of patch,
    and that window (S*S,)."""
    views = np.lib.stride_tricks.sliding_window_view(patch, (VERIFY_SIDE, VERIFY_SIDE))  # (P, P, S, S)
    flat = views.reshape(-1, VERIFY_SIDE * VERIFY_SIDE)  # (P*P, S*S)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    corr = centred @ vec / np.maximum(norms, 1e-6)  # (P*P,)
    corr[norms < 1e-3 * vec.size] = -1.0  # a featureless window confirms nothing
    k = int(corr.argmax())
    return float(corr[k]), flat[k]


def _quadrant_agreement(vec: np.ndarray, window: np.ndarray) -> float:
    """The second-highest normalised correlation of template and window over the 4 quadrants."""
    half = VERIFY_SIDE // 2
    a = vec.reshape(2, half, 2, half).transpose(0, 2, 1, 3).reshape(4, half * half)  # (4, s*s)
    b = window.reshape(2, half, 2, half).transpose(0, 2, 1, 3).reshape(4, half * half)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    corr = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-9)
    return float(np.sort(corr)[-2])


class BenchmarkPixels:
    """Benchmark images read back as grey for verification, the most recently used held up to
    `keep_bytes`."""

    def __init__(self, bset: BenchmarkSet, keep_bytes: int = 256 << 20):
        self.bset, self.keep_bytes = bset, keep_bytes
        self._cache: OrderedDict[int, tuple[np.ndarray, float, float] | None] = OrderedDict()
        self._held = 0

    def grey(self, b: int) -> tuple[np.ndarray, float, float] | None:
        """(grey, sx, sy): the image at most VERIFY_MAX_SIDE, and its scale from hashed-image pixels."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        try:
            rgb, _ = read_rgb_whole(str(self.bset.paths[b]), max_side=VERIFY_MAX_SIDE)
            grey = np.asarray(Image.fromarray(rgb).convert("L"))
            width, height = (int(v) for v in self.bset.sizes[b])
            entry: tuple[np.ndarray, float, float] | None = (
                grey,
                grey.shape[1] / max(width, 1),
                grey.shape[0] / max(height, 1),
            )
            self._held += grey.nbytes
        except (UnreadableImage, OSError) as exc:
            log.warning(
                "benchmark image %s cannot be read back to verify a match: %s", self.bset.paths[b], exc
            )
            entry = None
        self._cache[b] = entry
        while self._held > self.keep_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._held -= old[0].nbytes if old is not None else 0
        return entry


def decode_grey(blob: bytes) -> np.ndarray:
    """An encoded tile as (H, W) grey, decoded at reduced scale where JPEG allows (verification looks
    at VERIFY_SIDE px)."""
    with Image.open(io.BytesIO(blob)) as image:
        image.draft("L", (4 * VERIFY_SIDE, 4 * VERIFY_SIDE))
        return np.asarray(image.convert("L"))


# ---------------------------------------------------------------------------------------------------
# Benchmark inside a scene: windows of the scene, hashed in the slice pass


@dataclass(frozen=True)
class _SizeClass:
    """Benchmark references of one size (the variant's width and height in pixels)."""

    width: int
    height: int
    refs: References


class WindowSearch:
    """The slice pass's hook for finding benchmark images inside larger scenes.

    Built in the parent from the benchmarks table; pickled to the workers with the slice tasks. For each
    scene, `scene(width, height)` returns an object that takes the strips slicing reads (`add`) and, at
    the end (`finish`), the verified matches as records for the scenes table.
    """

    def __init__(self, cfg: DecontamSection, benchmarks: pd.DataFrame | None):
        self.bset = BenchmarkSet.from_table(benchmarks)
        self.max_windows = int(cfg.benchmark_scene_windows)
        self.radius = int(cfg.benchmark_verify_distance)
        self.threshold = float(cfg.benchmark_verify_score)
        whole = self.bset.whole(cfg.benchmark_invariant)
        sizes = self.bset.sizes[whole.bench]  # (R, 2)
        transposed = np.array([_transposes(REFERENCE_VARIANTS[v]) for v in whole.variant], dtype=bool)
        w = np.where(transposed, sizes[:, 1], sizes[:, 0])
        h = np.where(transposed, sizes[:, 0], sizes[:, 1])
        self.classes: list[_SizeClass] = []
        for cw, ch in sorted(set(zip(w.tolist(), h.tolist(), strict=True))):
            if cw < 1 or ch < 1:
                continue
            sel = (w == cw) & (h == ch)
            self.classes.append(
                _SizeClass(
                    cw,
                    ch,
                    References(whole.hashes[sel], whole.bench[sel], whole.variant[sel], whole.window[sel]),
                )
            )
        self._indexes: dict[int, dedup.Index] = {}
        self._pixels: BenchmarkPixels | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_indexes"], state["_pixels"] = {}, None  # rebuilt where used
        return state

    @property
    def enabled(self) -> bool:
        return self.max_windows > 0 and bool(self.classes)

    def digest(self) -> str:
        """Changes whenever the matches could: the references and the settings."""
        return f"{self.bset.digest()}-{self.max_windows}-{self.radius}-{self.threshold}"

    def scene(self, width: int, height: int) -> SceneWindows | None:
        """The window search of one width x height scene, or None when no benchmark fits in it."""
        if not self.enabled:
            return None
        fits = [
            i
            for i, c in enumerate(self.classes)
            if c.width <= width
            and c.height <= height
            and width * height >= SCENE_AREA_FACTOR * c.width * c.height
        ]
        return SceneWindows(self, width, height, fits) if fits else None

    def index(self, i: int, queries: int) -> dedup.Index:
        if i not in self._indexes:
            self._indexes[i] = dedup.Index(self.classes[i].refs.hashes, self.radius, queries=queries)
        return self._indexes[i]

    def pixels(self) -> BenchmarkPixels:
        if self._pixels is None:
            self._pixels = BenchmarkPixels(self.bset)
        return self._pixels


def _transposes(variant: str) -> bool:
    return variant in DIHEDRAL and DIHEDRAL[variant][0]


class SceneWindows:
    """One scene's window search: a reduced grey copy built strip by strip, then searched at the end."""

    def __init__(self, search: WindowSearch, width: int, height: int, classes: list[int]):
        self.search, self.width, self.height, self.classes = search, width, height, classes
        smallest = min(min(search.classes[i].width, search.classes[i].height) for i in classes)
        # Keep at least 2 * WINDOW px across the smallest benchmark size, and the copy bounded.
        factor = max(1, smallest // (2 * WINDOW))
        while math.ceil(width / factor) * math.ceil(height / factor) > SCENE_GREY_PIXELS:
            factor += 1
        self.factor = factor
        self.grey = np.zeros((math.ceil(height / factor), math.ceil(width / factor)), np.uint8)
        self.windows_hashed = 0

    def add(self, grey: np.ndarray, x: int, y: int) -> None:
        """A part of the scene as (h, w) grey uint8 whose top-left pixel is (x, y): slicing hands over
        the grey it made of each kept tile for its pHash."""
        small = grey if self.factor == 1 else np.asarray(Image.fromarray(grey).reduce(self.factor))
        ty, tx = y // self.factor, x // self.factor
        h = min(small.shape[0], self.grey.shape[0] - ty)
        w = min(small.shape[1], self.grey.shape[1] - tx)
        if h > 0 and w > 0:
            self.grey[ty : ty + h, tx : tx + w] = small[:h, :w]

    def finish(self) -> str | None:
        """The verified matches as JSON text for the scenes table (None when there are none), best first:
        benchmark name and image, variant, Hamming distance, correlation, window in scene pixels."""
        search = self.search
        source = Source(self.grey)
        accepted: list[dict[str, Any]] = []
        checked = 0
        image = Image.fromarray(self.grey)
        for i in self.classes:
            size = search.classes[i]
            # Resize so that a benchmark-sized window is WINDOW px; pick the stride that keeps the count capped.
            rw = max(WINDOW, round(self.width * WINDOW / size.width))
            rh = max(WINDOW, round(self.height * WINDOW / size.height))
            stride = SCENE_STRIDE
            while _count(rw, stride) * _count(rh, stride) > search.max_windows:
                stride += 1
            resized = np.asarray(image.resize((rw, rh), Image.Resampling.LANCZOS))
            ys, xs = _positions(rh, stride), _positions(rw, stride)
            hashes, varied = _window_hashes(resized, ys, xs, MIN_WINDOW_STD)
            self.windows_hashed += hashes.size
            where = np.flatnonzero(varied)
            at, ref, dist = search.index(i, where.size).neighbours(hashes[where], k=MAX_CANDIDATES)
            order = np.lexsort((ref, at, dist))  # nearest first
            # scene pixels per resized pixel, and per reduced pixel
            sx, sy = self.width / rw, self.height / rh
            for n in order:
                if checked >= MAX_SCENE_CANDIDATES:
                    break
                k = int(where[at[n]])
                px, py = int(xs[k % xs.size]), int(ys[k // xs.size])
                box = (px * sx, py * sy, WINDOW * sx, WINDOW * sy)  # scene pixels
                b = int(size.refs.bench[ref[n]])
                if any(m["_b"] == b and _iou(m["_box"], box) > WINDOW_IOU for m in accepted):
                    continue
                checked += 1
                variant = REFERENCE_VARIANTS[int(size.refs.variant[ref[n]])]
                score = self._verify(source, b, variant, box)
                if score >= search.threshold:
                    accepted.append(
                        {"_b": b, "_box": box, "variant": variant, "distance": int(dist[n]), "score": score}
                    )
        records = []
        for m in sorted(accepted, key=lambda m: (m["distance"], -m["score"], m["_b"])):
            x, y, w, h = m["_box"]
            records.append(
                {
                    "benchmark": str(search.bset.names[m["_b"]]),
                    "path": str(search.bset.paths[m["_b"]]),
                    "variant": m["variant"],
                    "distance": m["distance"],
                    "score": round(float(m["score"]), 3),
                    "window": [round(x), round(y), round(w), round(h)],
                }
            )
        return json.dumps(records, sort_keys=True) if records else None

    def _verify(self, source: Source, b: int, variant: str, box: Sequence[float]) -> float:
        read = self.search.pixels().grey(b)
        if read is None:
            return -1.0
        vec = template(oriented(read[0], variant))
        if vec is None:
            return -1.0
        f = self.factor
        return source.score(vec, [v / f for v in box])


def _count(n: int, stride: int) -> int:
    return (n - WINDOW) // stride + 1 + (1 if (n - WINDOW) % stride else 0)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


# ---------------------------------------------------------------------------------------------------
# Pass 4


# Where the staged bytes of kept tiles are: key -> (file, offset, length), for the keys asked.
Locate = Callable[[list[str]], Mapping[str, tuple[str, int, int]]]
# An executor's map: fn over items, results in item order (rscurate.executors); the built-in map will do.
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


@dataclass
class _Decision:
    """What matched one row: mechanism, benchmark index, variant name, distance, window text."""

    mechanism: str
    bench: int
    variant: str
    distance: int
    window: str | None = None


def run(
    cfg: DecontamSection,
    inputs: pd.DataFrame,
    tiles: pd.DataFrame,
    benchmarks: pd.DataFrame | None,
    *,
    locate: Locate | None = None,
    map_fn: MapFn | None = None,
    workers: Callable[[], int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Exclude every scene and kept tile near a benchmark image; returns (inputs, tiles, summary).

    Matching rows get status `excluded`, reason `benchmark` and the columns TILE_COLUMNS (inputs: those
    of whole-scene matches). `locate(keys)` says where the encoded bytes of kept tiles are, for checking
    hash matches beyond `benchmark_max_distance` on pixels (without it only matches within that distance
    count); the checks run in batches of up to VERIFY_BATCH tiles through `map_fn` (an executor's map, so
    that they spread over the workers; default: in this process), smaller ones when that gives each of
    `workers()` workers a few (asked only when there are checks to run: a Dask executor connects then);
    each tile's decision is its own, so the batches change nothing but the timing. The summary holds deterministic counts:
    references, candidates checked and confirmed, decisions per mechanism.
    """
    missing = {"key", "path", "phash", "status", "reason"} - set(tiles.columns)
    if missing:
        raise ValueError(f"benchmark pass: the tiles table lacks columns {sorted(missing)}")
    bset = BenchmarkSet.from_table(benchmarks)
    inputs, tiles = _with_columns(inputs), _with_columns(tiles)
    whole = bset.whole(cfg.benchmark_invariant)
    crop = bset.crop() if cfg.benchmark_crop_min is not None else References(*_EMPTY_REFS)
    summary: dict[str, Any] = {
        "references": {"benchmarks": len(bset), "whole": len(whole), "crop": len(crop)},
        "candidates": 0,
        "verified": 0,
    }
    if not len(bset):
        return inputs, tiles, summary

    # Per scene: a scene whose thumbnail hash is near a benchmark image goes, with all its tiles.
    scene_of: dict[str, _Decision] = {}  # path -> decision
    scene_at: dict[int, _Decision] = {}  # inputs position -> decision
    if "scene_phash" in inputs.columns:
        rows = np.flatnonzero(((inputs["status"] == "ok") & inputs["scene_phash"].notna()).to_numpy())
        hashes = from_hex_array(inputs["scene_phash"].to_numpy()[rows])
        match, distance = dedup.query(hashes, whole.hashes, cfg.benchmark_max_distance)
        # A scene of one tile is that tile: its match is named as the tile's would be (tile, dihedral).
        single = set(tiles["path"].value_counts().loc[lambda n: n == 1].index)
        for row, m, d in zip(rows, match, distance, strict=True):
            if m >= 0:
                path = str(inputs["path"].iat[row])
                decision = _whole_decision(whole, int(m), int(d), None if path in single else "scene")
                scene_at[int(row)] = scene_of[str(inputs["path"].iat[row])] = decision
    _apply(inputs, scene_at, bset)

    kept = np.flatnonzero((tiles["status"] == "kept").to_numpy())
    paths = tiles["path"].to_numpy(object)
    decided = {int(r): scene_of[paths[r]] for r in kept if paths[r] in scene_of}
    rest = np.array([r for r in kept if int(r) not in decided], dtype=np.int64)

    # Per tile: whole images (and their flips and tilts) within the distance that needs no check...
    if rest.size:
        match, distance = dedup.query(
            table_hashes(tiles.iloc[rest]), whole.hashes, cfg.benchmark_max_distance
        )
        for row, m, d in zip(rest, match, distance, strict=True):
            if m >= 0:
                decided[int(row)] = _whole_decision(whole, int(m), int(d))
        rest = np.array([r for r in rest if int(r) not in decided], dtype=np.int64)

    # ...then candidates up to benchmark_verify_distance, among whole images and their sub-windows,
    # each confirmed on pixels.
    if rest.size and locate is not None:
        found, (summary["candidates"], summary["verified"]) = _verified(
            cfg, tiles, rest, bset, whole, crop, locate, map_fn or map, workers
        )
        decided.update(found)

    # Per window: tiles covering a part of a benchmark image found inside their scene (slice pass).
    if "benchmark_windows" in inputs.columns and cfg.benchmark_scene_windows > 0:
        decided.update(_window_decisions(inputs, tiles, kept, decided, bset))
    _apply(tiles, decided, bset)
    counts = pd.Series([d.mechanism for d in decided.values()], dtype=object).value_counts()
    summary["tiles"] = {m: int(counts.get(m, 0)) for m in MECHANISMS[1:] if counts.get(m, 0)}
    summary["scenes"] = len(scene_of)
    log.info(
        "benchmark: %d scenes and %d tiles excluded (%s); %d candidates verified on pixels, %d confirmed",
        len(scene_of),
        len(decided),
        ", ".join(f"{k} {v}" for k, v in summary["tiles"].items()) or "none",
        summary["candidates"],
        summary["verified"],
    )
    return inputs, tiles, summary


def _with_columns(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in TILE_COLUMNS:
        if col == "benchmark_distance":
            out[col] = (
                out[col].astype("Int64")
                if col in out.columns
                else pd.Series(pd.NA, index=out.index, dtype="Int64")
            )
        elif col not in out.columns:
            out[col] = pd.Series(None, index=out.index, dtype=object)
    return out


def _whole_decision(whole: References, m: int, d: int, mechanism: str | None = None) -> _Decision:
    """A match with whole-image reference m: `tile`, or `dihedral` for a flip or 90-degree rotation."""
    variant = REFERENCE_VARIANTS[int(whole.variant[m])]
    if mechanism is None:
        mechanism = "dihedral" if variant in VARIANTS[1:] else "tile"
    return _Decision(mechanism, int(whole.bench[m]), variant, d)


def _apply(df: pd.DataFrame, decided: Mapping[int, _Decision], bset: BenchmarkSet) -> None:
    """Write decisions into the rows (positions) of df, in place."""
    if not decided:
        return
    rows = np.array(sorted(decided), dtype=np.int64)
    ds = [decided[int(r)] for r in rows]
    index = df.index[rows]
    df.loc[index, "status"] = "excluded"
    df.loc[index, "reason"] = "benchmark"
    df.loc[index, "benchmark_distance"] = pd.array([d.distance for d in ds], dtype="Int64")
    df.loc[index, "benchmark"] = [str(bset.names[d.bench]) for d in ds]
    df.loc[index, "benchmark_match"] = [str(bset.paths[d.bench]) for d in ds]
    df.loc[index, "benchmark_mechanism"] = [d.mechanism for d in ds]
    df.loc[index, "benchmark_variant"] = [d.variant for d in ds]
    df.loc[index, "benchmark_window"] = [d.window for d in ds]


def _verified(
    cfg: DecontamSection,
    tiles: pd.DataFrame,
    rows: np.ndarray,
    bset: BenchmarkSet,
    whole: References,
    crop: References,
    locate: Locate,
    map_fn: MapFn,
    workers: Callable[[], int] | None = None,
) -> tuple[dict[int, _Decision], tuple[int, int]]:
    """Tiles whose candidates (nearest first) pass the pixel check, and (candidates checked, confirmed)."""
    hashes = table_hashes(tiles.iloc[rows])  # (K,)
    r = cfg.benchmark_verify_distance
    kinds = []  # (tile position, ref index, distance, 0 whole / 1 crop)
    for kind, refs in ((0, whole), (1, crop)):
        if len(refs):
            at, ref, dist = dedup.Index(refs.hashes, r, queries=hashes.size).neighbours(
                hashes, k=MAX_CANDIDATES
            )
            kinds.append(np.stack([at, ref, dist, np.full(at.size, kind)], axis=1))
    cand = np.concatenate(kinds) if kinds else np.empty((0, 4), np.int64)
    if not cand.size:
        return {}, (0, 0)
    cand = cand[np.lexsort((cand[:, 3], cand[:, 1], cand[:, 2], cand[:, 0]))]  # by tile, distance, ...
    starts = np.flatnonzero(np.r_[True, cand[1:, 0] != cand[:-1, 0]])  # each tile's first candidate
    keys = tiles["key"].to_numpy(object)
    tile_rows = rows[cand[starts, 0]]  # (T,) the table row of each tile with candidates
    where = locate([str(keys[row]) for row in tile_rows])
    # What each candidate is, resolved here so that a task carries no reference arrays:
    # (table row, first candidate of the row's run, benchmark, variant index (-1: a sub-window), window, distance).
    is_crop = cand[:, 3] == 1
    bench = np.empty(cand.shape[0], np.int64)
    variant = np.full(cand.shape[0], -1, np.int64)
    window = np.full(cand.shape[0], -1, np.int64)
    bench[~is_crop] = whole.bench[cand[~is_crop, 1]]
    variant[~is_crop] = whole.variant[cand[~is_crop, 1]]
    bench[is_crop] = crop.bench[cand[is_crop, 1]]
    window[is_crop] = crop.window[cand[is_crop, 1]]
    table = np.stack([rows[cand[:, 0]], bench, variant, window, cand[:, 2]], axis=1)  # (C, 5)
    info = _Benchmarks(tuple(str(p) for p in bset.paths), bset.sizes.copy())
    batch = verify_batch(starts.size, workers() if workers is not None else 1)
    tasks = []
    for first in range(0, starts.size, batch):
        lo = starts[first]
        hi = starts[first + batch] if first + batch < starts.size else cand.shape[0]
        batch_rows = tile_rows[first : first + batch]
        located = {int(row): where[str(keys[row])] for row in batch_rows if str(keys[row]) in where}
        tasks.append(_VerifyTask(_VerifySettings.of(cfg), info, table[lo:hi], located))
    found: dict[int, _Decision] = {}
    checked = 0
    for decisions, n_checked in map_fn(_verify_task, tasks):
        checked += n_checked
        for row, (b, v, w, d) in decisions.items():
            if v < 0:
                found[row] = _Decision("crop", b, "identity", d, w)
            else:
                variant_name = REFERENCE_VARIANTS[v]
                mechanism = "dihedral" if variant_name in VARIANTS[1:] else "tile"
                found[row] = _Decision(mechanism, b, variant_name, d)
    return found, (checked, len(found))


def verify_batch(tiles: int, workers: int) -> int:
    """Tiles per verification batch: VERIFY_TASKS_PER_WORKER batches per worker, within
    [VERIFY_MIN_BATCH, VERIFY_BATCH]."""
    return max(VERIFY_MIN_BATCH, min(VERIFY_BATCH, -(-tiles // (VERIFY_TASKS_PER_WORKER * max(1, workers)))))


@dataclass(frozen=True)
class _Benchmarks:
    """What a verification task needs of the benchmark set: each image's path and hashed size."""

    paths: tuple[str, ...]
    sizes: np.ndarray  # (B, 2) int64


@dataclass(frozen=True)
class _VerifySettings:
    crop_min: float
    crop_step: float
    score: float

    @classmethod
    def of(cls, cfg: DecontamSection) -> _VerifySettings:
        return cls(cfg.benchmark_crop_min or CROP_MAX, cfg.benchmark_crop_step, cfg.benchmark_verify_score)


@dataclass(frozen=True, eq=False)
class _VerifyTask:
    settings: _VerifySettings
    benchmarks: _Benchmarks
    # (C, 5) int64, one row per candidate, grouped by tile, nearest first: table row, benchmark, variant
    # index into REFERENCE_VARIANTS (-1: a sub-window), window index, Hamming distance
    candidates: np.ndarray
    located: dict[int, tuple[str, int, int]]  # table row -> staged bytes (file, offset, length)


def _verify_task(task: _VerifyTask) -> tuple[dict[int, tuple[int, int, str | None, int]], int]:
    """Worker side: the pixel check of a batch of tiles' candidates, nearest first, until one passes.

    Returns {table row: (benchmark, variant index or -1, window text or None, distance)} and the number
    of checks made.
    """
    bset = BenchmarkSet(
        np.full(len(task.benchmarks.paths), "", object),
        np.array(task.benchmarks.paths, dtype=object),
        task.benchmarks.sizes,
        np.empty((len(task.benchmarks.paths), 0), np.uint64),
    )
    pixels = BenchmarkPixels(bset)
    windows: dict[int, np.ndarray] = {}
    found: dict[int, tuple[int, int, str | None, int]] = {}
    checked = 0
    rows = task.candidates[:, 0]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    for group in np.split(task.candidates, starts[1:]):
        row = int(group[0, 0])
        if row not in task.located:
            continue
        vec = template(decode_grey(_read_at(*task.located[row])))
        if vec is None:
            continue
        for _, b, v, w_index, dist in group[:MAX_CANDIDATES]:
            read = pixels.grey(int(b))
            if read is None:
                continue
            grey, sx, sy = read
            window = None
            if v < 0:  # a sub-window of the image as it is
                if b not in windows:
                    width, height = (int(x) for x in bset.sizes[b])
                    windows[int(b)] = crop_windows(
                        width, height, task.settings.crop_min, task.settings.crop_step
                    )
                x, y, w, h = (int(c) for c in windows[int(b)][int(w_index)])
                box = (x * sx, y * sy, w * sx, h * sy)
                window = f"{x},{y},{w},{h}"
            else:  # the whole image, flipped, rotated or tilted
                grey = oriented(grey, REFERENCE_VARIANTS[int(v)])
                box = (0.0, 0.0, float(grey.shape[1]), float(grey.shape[0]))
            checked += 1
            if Source(grey).score(vec, box) >= task.settings.score:
                found[row] = (int(b), int(v), window, int(dist))
                break
    return found, checked


def _read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        blob = os.pread(f.fileno(), length, offset)
    if len(blob) != length:
        raise RuntimeError(f"{path}: bytes {offset}..{offset + length} are past its end (cut short?)")
    return blob


def _window_decisions(
    inputs: pd.DataFrame,
    tiles: pd.DataFrame,
    kept: np.ndarray,
    decided: Mapping[int, _Decision],
    bset: BenchmarkSet,
) -> dict[int, _Decision]:
    """Kept tiles that cover at least WINDOW_OVERLAP of a window matched in their scene."""
    bench_index = {str(p): i for i, p in enumerate(bset.paths)}
    matches: dict[str, list[dict[str, Any]]] = {}
    for path, text in zip(inputs["path"], inputs["benchmark_windows"], strict=True):
        if isinstance(text, str) and text:
            matches[str(path)] = json.loads(text)
    out: dict[int, _Decision] = {}
    if not matches:
        return out
    cols = {c: tiles[c].to_numpy() for c in ("path", "x", "y", "width", "height")}
    for row in kept:
        row = int(row)
        if row in decided or cols["path"][row] not in matches:
            continue
        box = (
            float(cols["x"][row]),
            float(cols["y"][row]),
            float(cols["width"][row]),
            float(cols["height"][row]),
        )
        for m in matches[cols["path"][row]]:
            x, y, w, h = m["window"]
            if _intersection(box, (x, y, w, h)) >= WINDOW_OVERLAP * w * h and m["path"] in bench_index:
                out[row] = _Decision(
                    "window", bench_index[m["path"]], m["variant"], int(m["distance"]), f"{x},{y},{w},{h}"
                )
                break
    return out


def summary(inputs: pd.DataFrame, tiles: pd.DataFrame | None) -> dict[str, Any]:
    """stats.json's `benchmarks`: per benchmark, per mechanism, the tiles and scenes it removed; and the
    inputs held out by path lists (`listed`)."""
    out: dict[str, Any] = {}
    listed = 0
    if len(inputs) and "reason" in inputs.columns:
        is_bench = np.array([str(r).split(":", 1)[0].strip() == "benchmark" for r in inputs["reason"]], bool)
        matched = (
            inputs["benchmark_mechanism"].notna().to_numpy()
            if "benchmark_mechanism" in inputs.columns
            else np.zeros(len(inputs), bool)
        )
        listed = int((is_bench & ~matched).sum())
    if tiles is not None and len(tiles) and "benchmark_mechanism" in tiles.columns:
        hit = tiles[tiles["benchmark_mechanism"].notna()]
        for (name, mechanism), group in hit.groupby(["benchmark", "benchmark_mechanism"], sort=True):
            entry = out.setdefault(str(name), {})
            entry[str(mechanism)] = {"tiles": len(group), "scenes": int(group["path"].nunique())}
    for name, entry in out.items():
        out[name] = {m: entry[m] for m in MECHANISMS if m in entry}
    return {"listed": listed, "by_benchmark": dict(sorted(out.items()))}
