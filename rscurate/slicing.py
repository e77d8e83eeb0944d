"""Pass 3: cut scenes into tiles, filter nodata and blank tiles, hash and encode what is kept.

Each scene is opened once and read in strips (one row of windows at a time, at most STRIP_BYTES of RGB),
so memory is bounded by the scene's width, never its area. From each strip, the same in-memory pixels
give every tile's nodata fraction, its blank check, its pHash (rscurate.hash.phash_batch, batched across
tiles and scenes) and its encoded bytes; a reduced copy of each strip builds the scene thumbnail whose
pHash is the scene's (a scene of one tile takes that tile's). Each pixel is decoded once.

A scene that stays whole and that Pillow decodes to 8-bit RGB as is skips the arrays: its grey, blank
check and pHash come from the decoded image, and with `shard.reencode: auto` a file that already is a
JPEG (PNG when the shards hold PNG) with no EXIF orientation to apply goes into the shard byte for byte
(`copied`): no second JPEG generation, no encode. `reencode: always` encodes every tile.

Tile reasons: ``nodata`` (more than exclude.max_nodata_fraction of the tile is nodata: declared nodata,
alpha 0, NaN or edge padding) and ``blank`` (the luminance of its valid pixels has a standard deviation
under exclude.min_std). A scene is ``blank`` when no tile survives, ``too_small`` when the edge policy
leaves no window, ``unreadable: <why>`` when decoding fails part-way (its tiles are then dropped).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from rscurate.archive import ArchiveError
from rscurate.hash import phash_with_canonical, to_hex_array
from rscurate.raster import PillowSceneReader, SceneReader, UnreadableImage, bounds_json, bounds_of, open_path
from rscurate.recipe import ExcludeConfig, ShardConfig, SliceConfig, SourceConfig
from rscurate.sample import make_key

log = logging.getLogger(__name__)

TILE_COLUMNS = [
    "key",
    "source",
    "path",
    "task",
    "x",
    "y",
    "width",
    "height",
    "nodata_fraction",
    "phash",
    "phash_canonical",  # the pHash in the tile's canonical orientation (UInt64), for dedup.invariant
    "status",
    "reason",
    "crs",
    "bounds",
    "data",
    "image_sha256",
    "copied",
]
# benchmark_windows: benchmark images found inside the scene (rscurate.decontam.WindowSearch), JSON text
SCENE_COLUMNS = ["path", "scene_phash", "status", "reason", "tiles", "kept", "benchmark_windows"]
# RGB bytes of one strip read; a row of windows wider than this is read in several column groups.
STRIP_BYTES = 96 << 20
# Longer side of the scene thumbnail that the scene pHash is computed from.
THUMB_SIDE = 512
# The blank check looks at every BLANK_STEP-th pixel in each direction: plenty for a standard deviation.
BLANK_STEP = 4
PNG_COMPRESS_LEVEL = 6
# Encoded bytes slicing.run gathers before handing them to its sink: whole scenes, in one frame.
SINK_BYTES = 8 << 20


Window = tuple[int, int, int, int]  # x, y, w, h


# --------------------------------------------------------------------------------------------------
# Windows (pure)


def axis_windows(n: int, tile: int, overlap: int, edge: str) -> list[tuple[int, int]]:
    """(start, size) of the windows along one axis of length n.

    Windows start every tile - overlap pixels. At the far edge: `shift` moves the last window inward so
    it ends at n (still full size), `pad` keeps it where it falls, reaching past n (the reader pads it
    with nodata), `drop` leaves the partial window out. An axis shorter than a tile gives one window of
    size n (shift), one padded window (pad), or none (drop).
    """
    stride = tile - overlap
    if n <= tile:
        if edge == "drop":
            return [(0, tile)] if n == tile else []
        return [(0, tile if edge == "pad" else n)]
    starts = [0]
    while starts[-1] + tile < n:
        starts.append(starts[-1] + stride)
    if starts[-1] + tile > n:
        if edge == "shift":
            starts[-1] = n - tile
            if len(starts) > 1 and starts[-1] == starts[-2]:
                starts.pop()
        elif edge == "drop":
            starts.pop()
    return [(s, tile) for s in starts]


def windows(width: int, height: int, cfg: SliceConfig) -> list[Window]:
    """Tile windows (x, y, w, h) of a width x height scene, row by row; the whole scene when both sides
    are at most cfg.max_side."""
    if width <= cfg.max_side and height <= cfg.max_side:
        return [(0, 0, width, height)]
    xs = axis_windows(width, cfg.tile_size, cfg.overlap, cfg.edge)
    ys = axis_windows(height, cfg.tile_size, cfg.overlap, cfg.edge)
    return [(x, y, w, h) for y, h in ys for x, w in xs]


# --------------------------------------------------------------------------------------------------
# Per-tile work


def encode(rgb: np.ndarray, shard: ShardConfig) -> bytes:
    """Deterministic bytes: fixed encoder settings, no EXIF, ICC or other metadata."""
    return encode_image(Image.fromarray(rgb), shard)


def encode_image(image: Image.Image, shard: ShardConfig) -> bytes:
    buf = io.BytesIO()
    if shard.image_format == "jpg":
        image.save(
            buf,
            format="JPEG",
            quality=shard.jpeg_quality,
            subsampling="4:2:0",
            optimize=False,
            progressive=False,
        )
    else:
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def luminance_std(image: np.ndarray, valid: np.ndarray | None = None, step: int = BLANK_STEP) -> float:
    """Standard deviation of the 8-bit luminance over valid pixels, from every step-th pixel.

    `image` is the (H, W) grey of Pillow's convert('L') or an (H, W, 3) RGB tile, whose luminance is
    computed here with the same integer weights (ITU-R 601-2: (19595 R + 38470 G + 7471 B + 2^15) >> 16).
    """
    sub = image[::step, ::step]
    if sub.ndim == 3:  # (h', w', 3) -> (h', w') grey as Pillow rounds it
        wide = sub.astype(np.uint32)
        sub = (wide[..., 0] * 19595 + wide[..., 1] * 38470 + wide[..., 2] * 7471 + 0x8000) >> 16
    luma = sub[valid[::step, ::step]] if valid is not None else sub
    n = luma.size
    if n == 0:
        return 0.0
    luma = luma.astype(np.float64).ravel()
    mean = float(luma.sum()) / n
    var = float(np.dot(luma, luma)) / n - mean * mean
    return math.sqrt(max(var, 0.0))


@dataclass
class _Columns:
    """Column lists of the tiles table, appended to tile by tile (cheaper than a dict per tile)."""

    cols: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in TILE_COLUMNS})

    def __len__(self) -> int:
        return len(self.cols["key"])

    def extend(self, other: _Columns) -> None:
        for c in TILE_COLUMNS:
            self.cols[c].extend(other.cols[c])

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.cols, columns=TILE_COLUMNS)
        for c in ("x", "y", "width", "height"):
            df[c] = df[c].astype(np.int64)
        df["nodata_fraction"] = df["nodata_fraction"].astype(np.float64)
        df["copied"] = df["copied"].astype(bool)
        # from the list: a column of ints and None would pass through float64 and lose the low bits
        df["phash_canonical"] = pd.array(self.cols["phash_canonical"], dtype="UInt64")
        return df


class _Hasher:
    """pHashes computed in batches across tiles and scenes: one DCT call per batch, not per tile.

    Holds at most `limit_bytes` of pixels before hashing: a tile is a view that keeps its whole strip (or
    decoded image) alive, so each underlying buffer is counted, once.
    """

    def __init__(self, limit_bytes: int = 32 << 20, limit_count: int = 512):
        self.limit_bytes, self.limit_count = limit_bytes, limit_count
        self.tiles: list[np.ndarray] = []
        # (list, index) to write each hex digest into, and a list to put the canonical hash at that index
        self.targets: list[tuple[list[Any], int, list[Any] | None]] = []
        self.bases: dict[int, int] = {}  # id of a buffer held -> its size, counted once

    def add(
        self, tile: np.ndarray, target: list[Any], index: int, canonical: list[Any] | None = None
    ) -> None:
        root = tile
        while isinstance(root.base, np.ndarray):
            root = root.base
        self.bases.setdefault(id(root), root.nbytes)
        self.tiles.append(tile)
        self.targets.append((target, index, canonical))
        if len(self.tiles) >= self.limit_count or sum(self.bases.values()) >= self.limit_bytes:
            self.flush()

    def flush(self) -> None:
        if self.tiles:
            both = phash_with_canonical(self.tiles)  # (N, 2): as is, canonical orientation
            for (target, index, canonical), hx, h in zip(
                self.targets, to_hex_array(both[:, 0]), both[:, 1].tolist(), strict=True
            ):
                target[index] = str(hx)
                if canonical is not None:
                    canonical[index] = h
        self.tiles, self.targets, self.bases = [], [], {}


def _strip_groups(wins: list[Window]) -> Iterator[tuple[Window, list[Window]]]:
    """Windows grouped into strips: one row of windows, split into column groups of bounded bytes."""
    for (y, h), same_row in groupby(wins, key=lambda w: (w[1], w[3])):
        row = list(same_row)
        group: list[Window] = []
        gx0 = row[0][0]
        for win in row:
            x, _, w, _ = win
            if group and (x + w - gx0) * h * 3 > STRIP_BYTES:
                gx1 = max(g[0] + g[2] for g in group)
                yield (gx0, y, gx1 - gx0, h), group
                group, gx0 = [], x
            group.append(win)
        gx1 = max(g[0] + g[2] for g in group)
        yield (gx0, y, gx1 - gx0, h), group


def slice_scene(
    cfg: SliceConfig,
    exclude: ExcludeConfig,
    shard: ShardConfig,
    path: str,
    source: SourceConfig,
    sha256: str,
    hasher: _Hasher | None = None,
    window_search: Any = None,
) -> tuple[_Columns, dict[str, Any]]:
    """Tiles of one scene and its scene record. Raises UnreadableImage when the scene cannot be read.

    With a shared `hasher`, the `phash` column and `scene_phash` are filled when the hasher flushes;
    without one they are complete on return. `window_search` (a decontam.WindowSearch) sees the grey of every
    kept tile and records the benchmark images it finds inside the scene in `benchmark_windows`.
    """
    own = hasher is None
    hasher = hasher or _Hasher()
    cols = _Columns()
    c = cols.cols
    scene: dict[str, Any] = {
        "path": path,
        "scene_phash": None,
        "status": "ok",
        "reason": None,
        "tiles": 0,
        "kept": 0,
        "benchmark_windows": None,
    }
    with open_path(path, source.bands) as reader:
        info = reader.info
        wins = windows(info.width, info.height, cfg)
        scene["tiles"] = len(wins)
        if not wins:
            scene.update(status="excluded", reason="too_small")
            return cols, scene
        scene_id = sha256[:16]
        geo = info.crs is not None and info.transform is not None
        whole = len(wins) == 1
        watch = window_search.scene(info.width, info.height) if window_search is not None else None

        def add(x: int, y: int, w: int, h: int, nodata: float, tile: _Tile) -> None:
            c["key"].append(make_key(source.name, scene_id, x, y))
            c["x"].append(x)
            c["y"].append(y)
            c["width"].append(w)
            c["height"].append(h)
            c["nodata_fraction"].append(nodata)
            c["phash"].append(None)
            c["phash_canonical"].append(None)
            c["status"].append(tile.status)
            c["reason"].append(tile.reason)
            c["bounds"].append(bounds_json(bounds_of(info.transform, (x, y, w, h))) if geo else None)
            c["data"].append(tile.data)
            c["image_sha256"].append(tile.sha256)
            c["copied"].append(tile.copied)
            if tile.grey is not None:  # kept; its pHash from the grey (the same bits as from rgb)
                hasher.add(tile.grey, c["phash"], len(c["phash"]) - 1, c["phash_canonical"])
                if watch is not None:
                    watch.add(tile.grey, x, y)

        thumb = None
        if whole and isinstance(reader, PillowSceneReader) and reader.plain_rgb:
            # The decoded image is the tile: grey, blank check, pHash and bytes straight from it.
            add(0, 0, info.width, info.height, 0.0, _judge_image(reader, exclude, shard, sha256))
        else:
            factor = max(1, math.ceil(max(info.width, info.height) / THUMB_SIDE))
            if not whole:
                thumb = np.zeros(
                    (math.ceil(info.height / factor), math.ceil(info.width / factor), 3), np.uint8
                )
            for (gx, gy, gw, gh), group in _strip_groups(wins):
                strip, strip_valid = reader.read_rgb((gx, gy, gw, gh))
                if thumb is not None:
                    _paste_thumbnail(thumb, strip, gx, gy, factor)
                for x, y, w, h in group:
                    rgb = strip[:, x - gx : x - gx + w] if (gx, gw) != (x, w) else strip
                    valid = strip_valid[:, x - gx : x - gx + w] if (gx, gw) != (x, w) else strip_valid
                    n_valid = int(np.count_nonzero(valid))
                    nodata = 1.0 - n_valid / (w * h)
                    add(x, y, w, h, nodata, _judge_array(rgb, valid, n_valid, nodata, exclude, shard))
    n = len(c["key"])
    c["source"].extend([source.name] * n)
    c["path"].extend([path] * n)
    c["task"].extend([source.task] * n)
    c["crs"].extend([info.crs if geo else None] * n)
    kept = sum(s == "kept" for s in c["status"])
    scene["kept"] = kept
    if watch is not None and kept:
        scene["benchmark_windows"] = watch.finish()
    if kept == 0:
        scene.update(status="excluded", reason="blank")
    elif whole:
        scene["scene_phash"] = c["phash"]  # resolved to the tile's hash once the hasher has flushed
    else:
        assert thumb is not None
        holder: list[Any] = [None]
        hasher.add(thumb, holder, 0)
        scene["scene_phash"] = holder
    if own:
        hasher.flush()
        _resolve(scene)
    return cols, scene


@dataclass
class _Tile:
    """What slicing decided for one window."""

    status: str
    reason: str | None = None
    data: bytes | None = None  # the encoded (or copied) image of a kept tile
    grey: np.ndarray | None = None  # (h, w) uint8 of a kept tile, for its pHash
    sha256: str | None = None  # of `data`
    copied: bool = False  # `data` is the source file's bytes


def _judge_array(
    rgb: np.ndarray,
    valid: np.ndarray,
    n_valid: int,
    nodata: float,
    exclude: ExcludeConfig,
    shard: ShardConfig,
) -> _Tile:
    """A window read as arrays (rgb (h, w, 3), valid (h, w)): nodata, blank, or kept and encoded."""
    if nodata > exclude.max_nodata_fraction:
        return _Tile("excluded", "nodata")
    # One Pillow image gives the grey (blank check, pHash) and the encoding.
    image = Image.fromarray(np.ascontiguousarray(rgb))
    grey = np.asarray(image.convert("L"))  # (h, w)
    if luminance_std(grey, valid if n_valid < valid.size else None) < exclude.min_std:
        return _Tile("excluded", "blank")
    data = encode_image(image, shard)
    return _Tile("kept", data=data, grey=grey, sha256=hashlib.sha256(data).hexdigest())


def _judge_image(reader: PillowSceneReader, exclude: ExcludeConfig, shard: ShardConfig, sha256: str) -> _Tile:
    """A whole scene decoded by Pillow as plain RGB: blank, or kept. Kept, its bytes are the file's own
    when shard.reencode is `auto` and the file already is what the shard holds (reencode_source),
    else the encoding of the decoded image; either way the pixels are decoded once."""
    image = reader.image()
    grey = np.asarray(image.convert("L"))  # (H, W)
    if luminance_std(grey) < exclude.min_std:
        return _Tile("excluded", "blank")
    if copyable(reader, shard):
        return _Tile("kept", data=reader.source_bytes(), grey=grey, sha256=sha256, copied=True)
    image.info.clear()  # no comment, ICC profile or EXIF carried into the encoding
    data = encode_image(image, shard)
    return _Tile("kept", data=data, grey=grey, sha256=hashlib.sha256(data).hexdigest())


# shard.image_format -> the file format whose bytes can go into a shard as they are.
_COPYABLE = {"jpg": "jpeg", "png": "png"}


def copyable(reader: SceneReader, shard: ShardConfig) -> bool:
    """The source file itself can be the sample's image: `shard.reencode` is auto, and the file is an
    8-bit RGB image of the shard's format with nothing to change (no EXIF orientation to apply, no
    palette, alpha, grey, CMYK or 16 bits to convert, no band selection, no nodata, one frame)."""
    return (
        shard.reencode == "auto"
        and isinstance(reader, PillowSceneReader)
        and reader.unchanged(_COPYABLE[shard.image_format])
    )


def _resolve(scene: dict[str, Any]) -> None:
    """scene_phash from the list the hasher wrote it into."""
    holder = scene["scene_phash"]
    if isinstance(holder, list):
        scene["scene_phash"] = holder[0]


def _paste_thumbnail(thumb: np.ndarray, strip: np.ndarray, x: int, y: int, factor: int) -> None:
    """Box-reduce a strip by `factor` into the scene thumbnail at (x, y) / factor."""
    if factor > 1:
        small = np.asarray(Image.fromarray(np.ascontiguousarray(strip)).reduce(factor))
    else:
        small = strip
    ty, tx = y // factor, x // factor
    h = min(small.shape[0], thumb.shape[0] - ty)
    w = min(small.shape[1], thumb.shape[1] - tx)
    if h > 0 and w > 0:
        thumb[ty : ty + h, tx : tx + w] = small[:h, :w]


# --------------------------------------------------------------------------------------------------
# Pass


def run(
    cfg: SliceConfig,
    exclude: ExcludeConfig,
    shard: ShardConfig,
    inputs: pd.DataFrame,
    sources: Sequence[SourceConfig],
    *,
    sink: Callable[[pd.DataFrame], None] | None = None,
    window_search: Any = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Slice the `ok` inputs of a partition -> (tiles, scenes); see the module docstring for reasons.

    With `sink`, the tiles (with their encoded `data` and `phash`) are handed to it in scene order, in
    frames of whole scenes holding about SINK_BYTES of encoded bytes, and the returned tiles table has
    `data` None: memory then holds SINK_BYTES of tiles, or one scene's if it has more.
    """
    by_name = {s.name: s for s in sources}
    rows = inputs[inputs["status"] == "ok"] if "status" in inputs else inputs
    tiles = _Columns()
    scenes: list[dict[str, Any]] = []
    hasher = _Hasher()
    pending: list[_Columns] = []  # scenes the hasher may owe hashes, or the sink has not had
    held = 0  # encoded bytes in `pending`

    def hand_over() -> None:
        """Hash what is pending; with a sink, hand it over as one frame (a frame per scene costs more
        than slicing a small scene) and drop its bytes."""
        hasher.flush()
        if sink is not None:
            batch = _Columns()
            for cols in pending:
                batch.extend(cols)
            if len(batch):
                sink(batch.frame())
            for cols in pending:
                cols.cols["data"] = [None] * len(cols)
        for cols in pending:
            tiles.extend(cols)
        pending.clear()

    # Column lists, not itertuples: reading arrow-backed columns element by element costs microseconds each.
    listed = zip(rows["source"].tolist(), rows["path"].tolist(), rows["sha256"].tolist(), strict=True)
    for row in (_SceneRow(*values) for values in listed):
        source = by_name[row.source]
        try:
            cols, scene = slice_scene(
                cfg, exclude, shard, row.path, source, row.sha256, hasher, window_search
            )
        except UnreadableImage as exc:
            log.warning("%s: %s", row.path, exc.reason)
            cols, scene = _Columns(), _error_scene(row.path, exc.reason)
        except ArchiveError:
            raise  # a whole archive became unreadable: the run stops with its name
        except Exception as exc:  # a bug or an exotic file must not stop a run over millions of scenes
            # The traceback only with --debug: a user reads the reason in inputs.parquet.
            log.warning(
                "%s: slicing failed (%s: %s)",
                row.path,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            cols, scene = (
                _Columns(),
                _error_scene(row.path, f"unexpected error ({type(exc).__name__}: {exc})"),
            )
        scenes.append(scene)
        pending.append(cols)
        if sink is not None:
            held += sum(len(d) for d in cols.cols["data"] if d is not None)
            if held >= SINK_BYTES:
                hand_over()
                held = 0
    hand_over()
    for scene in scenes:
        _resolve(scene)
    return tiles.frame(), pd.DataFrame(scenes, columns=SCENE_COLUMNS)


class _SceneRow(NamedTuple):
    source: str
    path: str
    sha256: str


def _error_scene(path: str, why: str) -> dict[str, Any]:
    return {
        "path": path,
        "scene_phash": None,
        "status": "error",
        "reason": f"unreadable: {why}",
        "tiles": 0,
        "kept": 0,
        "benchmark_windows": None,
    }


__all__ = ["windows", "axis_windows", "run", "slice_scene", "encode", "luminance_std", "copyable"]
