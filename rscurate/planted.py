"""A planted decontamination test set built from real images: how often does a transformed copy of a
benchmark image get through, and how often is an unrelated real image taken for one?

From a folder of real aerial and satellite scenes (the shared `rs-real` set, whose SOURCES.md lists which
files show the same place), `build` cuts

* benchmark chips (CHIP px) from one group of scenes, and for each of them one copy per transform in
  `TRANSFORMS` (JPEG, brightness, resize, shifts and small rotations re-cut from the scene, the 7 flips
  and 90-degree rotations, and crops of 50-90% of the sides at random offsets): the corpus must lose
  every one of these;
* benchmark chips cut from large scenes of another group (`in_scene`), some flipped or re-encoded: the
  scenes go into the corpus whole, and the tiles covering those chips must go;
* distinct chips: every CHIP px cell of the remaining scenes (no scene shares a place with a benchmark
  scene), which must all stay.

`write` lays it out as a corpus with a recipe; `truth` says what should happen to each file. The test
(tests/test_decontam.py) and the benchmark (benchmarks/bench_decontam.py) evaluate the same set.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from rscurate.raster import read_rgb_whole

log = logging.getLogger(__name__)

CHIP = 256
# Scenes of the rs-real folder by role, one entry per place (its SOURCES.md groups near-duplicates:
# only one member of each group is used, so no "distinct" chip shows the place of a benchmark chip).
BENCHMARK_SCENES = (
    "DOTA_devkit/P0706.png",
    "DeepForest/5b90f92da0d7280005fab355_4310.tif",
    "DeepForest/AWPE Pigeon Lake 2020 DJI_0005.JPG",
    "DeepForest/test_tiled.tif",
    "RSPrompter/073.jpg",
    "RSPrompter/084.jpg",
    "RSPrompter/311.jpg",
    "RSPrompter/477.jpg",
    "RSPrompter/0.tif",
    "mmsegmentation/0.png",
    "mmsegmentation/2_10_0_0_512_512.png",
    "mmsegmentation/area1_0_0_512_512.png",
    "opengeos-data/berkeley.jpg",
    "opengeos-data/m_4709963_se_14_1_20100629.tif",
    "rasterio/cogeo.tif",
    "rio-tiler/pix4d_alpha_nodata.tif",
    "solaris/sample_geotiff.tif",
)
IN_SCENE_SCENES = (
    "GeoChat/7292.JPG",
    "DeepForest/5dded5bc0140b80006d2e565_23.tif",
    "mmrotate/dota_demo.jpg",
    "iSAID_Devkit/P0006.png",
)
DISTINCT_SCENES = (
    "DOTA_devkit/P1888.png",
    "RSPrompter/288.jpg",
    "RSPrompter/000002.jpg",
    "rasterio/RGB.byte.tif",
    "rasterio/goes.tif",
    "rio-color/rgb8.tif",
    "opengeos-data/1985.tif",
    "torchsat/jpeg_3channel_uint8.jpeg",
    "DeepForest/OSBS_029.png",
    "mmrotate/P0004__1__0___0.png",
    "rio-tiler/201404_13SED190110_201404_0x1500m_CL_1_alpha.tif",
    "PaddleRS/optical.bmp",
    "PaddleRS/multispectral.tif",
    "PaddleRS/sar_t2.tiff",
    "ChangeFormer/samples_LEVIR/A/test_102_0512_0000.png",
    "ChangeFormer/samples_LEVIR/A/test_2_0000_0000.png",
    "ChangeFormer/samples_LEVIR/A/test_2_0000_0512.png",
    "ChangeFormer/samples_LEVIR/A/test_55_0256_0000.png",
    "ChangeFormer/samples_LEVIR/A/test_77_0512_0256.png",
    "ChangeFormer/samples_LEVIR/A/test_7_0256_0512.png",
    "ChangeFormer/samples_LEVIR/A/train_36_0512_0512.png",
    "ChangeFormer/samples_LEVIR/A/val_27_0000_0256.png",
    "ChangeFormer/samples_LEVIR/B/test_102_0512_0000.png",
    "ChangeFormer/samples_LEVIR/B/test_2_0000_0000.png",
    "ChangeFormer/samples_LEVIR/B/test_2_0000_0512.png",
    "ChangeFormer/samples_LEVIR/B/test_55_0256_0000.png",
    "ChangeFormer/samples_LEVIR/B/test_77_0512_0256.png",
    "ChangeFormer/samples_LEVIR/B/test_7_0256_0512.png",
    "ChangeFormer/samples_LEVIR/B/train_36_0512_0512.png",
    "ChangeFormer/samples_LEVIR/B/val_27_0000_0256.png",
    "ChangeFormer/samples_DSIFN/A/0_2.png",
    "ChangeFormer/samples_DSIFN/A/1_1.png",
    "ChangeFormer/samples_DSIFN/A/3_4.png",
    "ChangeFormer/samples_DSIFN/A/5_3.png",
    "ChangeFormer/samples_DSIFN/B/0_2.png",
    "ChangeFormer/samples_DSIFN/B/1_1.png",
    "ChangeFormer/samples_DSIFN/B/3_4.png",
    "ChangeFormer/samples_DSIFN/B/5_3.png",
)
MARGIN = 24
# Benchmark chips are cut where the ground has some texture (see _texture): a chip of open water or of a
# bare field has no pHash of its own to find a crop of it by, and scene-classification benchmarks show
# scenes, not featureless ground.
MIN_TEXTURE = 4.0  # scene pixels kept free around a benchmark chip, for shifted and rotated re-cuts
CROP_BANDS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9))
DIHEDRAL_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "transpose": lambda a: np.swapaxes(a, 0, 1),
    "transverse": lambda a: np.rot90(a, 2).swapaxes(0, 1),
}
TRANSFORMS = (
    "jpeg",
    "brightness",
    "resize",
    "shift",
    "rotate",
    *DIHEDRAL_OPS,
    *(f"crop{int(lo * 100)}-{int(hi * 100)}" for lo, hi in CROP_BANDS),
)


@dataclass
class Chip:
    """A benchmark chip: where it was cut, and its pixels."""

    scene: str
    x: int
    y: int
    rgb: np.ndarray  # (CHIP, CHIP, 3) uint8


@dataclass
class PlantedSet:
    benchmarks: list[Chip]  # transformed copies of these are planted
    copies: list[tuple[str, int, np.ndarray, str]]  # (transform, benchmark index, rgb, parameters)
    in_scene: list[tuple[Chip, str, np.ndarray]]  # chips cut from `scenes`: (where, variant, benchmark rgb)
    scenes: dict[str, np.ndarray]  # large scenes that go into the corpus whole
    distinct: list[Chip]  # chips of unrelated scenes
    meta: dict[str, Any] = field(default_factory=dict)


def load_scene(root: Path, relpath: str) -> np.ndarray:
    """(H, W, 3) uint8, as the slice pass reads it (nodata black)."""
    rgb, _ = read_rgb_whole(str(root / relpath))
    return np.ascontiguousarray(rgb)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _rotated_cut(scene: np.ndarray, x: int, y: int, degrees: float) -> np.ndarray:
    """The CHIP px cut at (x, y) after rotating the scene about the chip's centre (no blank corners)."""
    pad = MARGIN
    region = scene[y - pad : y + CHIP + pad, x - pad : x + CHIP + pad]
    turned = Image.fromarray(np.ascontiguousarray(region)).rotate(degrees, Image.Resampling.BICUBIC)
    return np.asarray(turned)[pad : pad + CHIP, pad : pad + CHIP]


def transform(name: str, chip: Chip, scene: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One transformed copy of a benchmark chip and a note of its parameters."""
    rgb = chip.rgb
    if name == "jpeg":
        q = int(rng.integers(50, 91))
        return _jpeg(rgb, q), f"quality {q}"
    if name == "brightness":
        delta = int(rng.choice([-1, 1]) * rng.integers(1, 9))
        return np.clip(rgb.astype(np.int16) + delta, 0, 255).astype(np.uint8), f"{delta:+d}"
    if name == "resize":
        side = int(rng.integers(CHIP // 2, CHIP * 9 // 10))
        small = Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((CHIP, CHIP), Image.Resampling.BILINEAR)), f"via {side} px"
    if name == "shift":
        dx, dy = (int(rng.choice([-1, 1]) * rng.integers(1, 5)) for _ in range(2))
        x, y = chip.x + dx, chip.y + dy
        return scene[y : y + CHIP, x : x + CHIP], f"dx {dx:+d} dy {dy:+d}"
    if name == "rotate":
        degrees = float(rng.choice([-1, 1]) * rng.uniform(1, 3))
        return _rotated_cut(scene, chip.x, chip.y, degrees), f"{degrees:+.2f} deg"
    if name in DIHEDRAL_OPS:
        return DIHEDRAL_OPS[name](rgb), ""
    lo, hi = (int(v) / 100 for v in name.removeprefix("crop").split("-"))
    scale = float(rng.uniform(lo, hi))
    side = round(scale * CHIP)
    x, y = (int(rng.integers(0, CHIP - side + 1)) for _ in range(2))
    return rgb[y : y + side, x : x + side], f"{side} px at ({x}, {y})"


def _texture(rgb: np.ndarray) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring grey pixels at 64 px: low
    for open water, bare fields and haze, high for built-up or wooded ground."""
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((64, 64), Image.Resampling.BOX), np.float32)
    return float((np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2)


def _free_cells(
    scene: np.ndarray, margin: int, taken: list[tuple[int, int]], rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Random chip positions inside the scene, `margin` from its edges, not overlapping `taken` or each
    other, on varied (not near-constant) content."""
    h, w = scene.shape[:2]
    spots: list[tuple[int, int]] = []
    for _ in range(200):
        if h - CHIP - 2 * margin < 0 or w - CHIP - 2 * margin < 0:
            break
        x = int(rng.integers(margin, w - CHIP - margin + 1))
        y = int(rng.integers(margin, h - CHIP - margin + 1))
        if any(abs(x - a) < CHIP + margin and abs(y - b) < CHIP + margin for a, b in [*taken, *spots]):
            continue
        cut = scene[y : y + CHIP, x : x + CHIP]
        if _texture(cut) < MIN_TEXTURE or (cut.max(axis=2) == 0).mean() > 0.01:  # featureless or nodata
            continue
        spots.append((x, y))
    return spots


def build(
    root: str | os.PathLike[str],
    seed: int = 0,
    n_benchmarks: int = 40,
    n_in_scene: int = 24,
    in_scene_scenes: tuple[str, ...] = IN_SCENE_SCENES,
) -> PlantedSet:
    """The planted set from the rs-real folder at `root` (see the module docstring)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    loaded = {rel: load_scene(root, rel) for rel in (*BENCHMARK_SCENES, *in_scene_scenes)}

    # Benchmark chips, spread over the scenes: one per scene per round until there are enough.
    benchmarks: list[Chip] = []
    taken: dict[str, list[tuple[int, int]]] = {rel: [] for rel in BENCHMARK_SCENES}
    while len(benchmarks) < n_benchmarks:
        added = 0
        for rel in BENCHMARK_SCENES:
            if len(benchmarks) >= n_benchmarks:
                break
            spots = _free_cells(loaded[rel], MARGIN, taken[rel], rng)
            if not spots:
                continue
            x, y = spots[0]
            taken[rel].append((x, y))
            scene = loaded[rel]
            benchmarks.append(Chip(rel, x, y, np.ascontiguousarray(scene[y : y + CHIP, x : x + CHIP])))
            added += 1
        if not added:
            raise ValueError(f"{root}: room for only {len(benchmarks)} benchmark chips, {n_benchmarks} asked")

    copies = []
    for name in TRANSFORMS:
        for i, chip in enumerate(benchmarks):
            rgb, note = transform(name, chip, loaded[chip.scene], rng)
            copies.append((name, i, np.ascontiguousarray(rgb), note))

    # Benchmark chips that are crops of large corpus scenes, some flipped or re-encoded on the way.
    in_scene: list[tuple[Chip, str, np.ndarray]] = []
    in_taken: dict[str, list[tuple[int, int]]] = {rel: [] for rel in in_scene_scenes}
    variants = ["identity", "identity", "jpeg", *DIHEDRAL_OPS]
    while len(in_scene) < n_in_scene:
        added = 0
        for rel in in_scene_scenes:
            if len(in_scene) >= n_in_scene:
                break
            spots = _free_cells(loaded[rel], 0, in_taken[rel], rng)
            if not spots:
                continue
            x, y = spots[0]
            in_taken[rel].append((x, y))
            cut = np.ascontiguousarray(loaded[rel][y : y + CHIP, x : x + CHIP])
            variant = variants[len(in_scene) % len(variants)]
            shown = _jpeg(cut, 75) if variant == "jpeg" else DIHEDRAL_OPS.get(variant, lambda a: a)(cut)
            in_scene.append((Chip(rel, x, y, cut), variant, np.ascontiguousarray(shown)))
            added += 1
        if not added:
            raise ValueError(f"{root}: room for only {len(in_scene)} in-scene benchmark chips")

    # Distinct chips: the grid cells of the unrelated scenes, and those of the benchmark scenes that stay
    # MARGIN clear of every benchmark chip (the same place, other ground: legitimate training data).
    distinct = []
    for rel in (*DISTINCT_SCENES, *BENCHMARK_SCENES):
        scene = loaded[rel] if rel in loaded else load_scene(root, rel)
        h, w = scene.shape[:2]
        for y in range(0, h - CHIP + 1, CHIP):
            for x in range(0, w - CHIP + 1, CHIP):
                near = [
                    (a, b)
                    for a, b in taken.get(rel, [])
                    if abs(x - a) < CHIP + MARGIN and abs(y - b) < CHIP + MARGIN
                ]
                cut = scene[y : y + CHIP, x : x + CHIP]
                # what the slice pass would keep: at most half nodata (black here), not blank
                if not near and (cut.max(axis=2) == 0).mean() <= 0.5 and cut.std() >= 2:
                    distinct.append(Chip(rel, x, y, np.ascontiguousarray(cut)))
    return PlantedSet(
        benchmarks,
        copies,
        in_scene,
        {rel: loaded[rel] for rel in in_scene_scenes},
        distinct,
        {"seed": seed, "root": str(root)},
    )


def _iou(a: list[int], b: list[int]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _slug(relpath: str) -> str:
    return relpath.replace("/", "_").replace(" ", "_").rsplit(".", 1)[0]


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG", compress_level=1)


def write(
    planted: PlantedSet, out: str | os.PathLike[str], recipe_extra: dict[str, Any] | None = None
) -> Path:
    """Lay the set out as a corpus under `out`; returns its recipe.yaml. `out/planted.json` is the truth:

    * copies: file, transform, the benchmark file it copies, parameters (each must be excluded);
    * in_scene: benchmark file, the scene file it was cut from, its window there, how it was changed
      (the scene's tiles covering that window must be excluded);
    * distinct: files that must stay, and scenes: the in_scene scenes (their other tiles must stay).
    """
    out = Path(out)
    truth: dict[str, Any] = {"meta": planted.meta, "copies": [], "in_scene": [], "distinct": [], "scenes": []}
    bench_files = []
    for i, chip in enumerate(planted.benchmarks):
        rel = f"benchmarks/bench-{i:03d}.png"
        _save(out / rel, chip.rgb)
        bench_files.append(rel)
    for name, i, rgb, note in planted.copies:
        rel = f"corpus/copies/{name}/bench-{i:03d}.png"
        _save(out / rel, rgb)
        truth["copies"].append({"file": rel, "transform": name, "benchmark": bench_files[i], "note": note})
    scene_files = {}
    for rel_scene, rgb in planted.scenes.items():
        rel = f"corpus/scenes/{_slug(rel_scene)}.png"
        _save(out / rel, rgb)
        scene_files[rel_scene] = rel
        truth["scenes"].append(rel)
    for i, (chip, variant, shown) in enumerate(planted.in_scene):
        rel = f"benchmarks/inscene-{i:03d}.png"
        _save(out / rel, shown)
        truth["in_scene"].append(
            {
                "benchmark": rel,
                "scene": scene_files[chip.scene],
                "window": [chip.x, chip.y, CHIP, CHIP],
                "variant": variant,
            }
        )
    for chip in planted.distinct:
        rel = f"corpus/distinct/{_slug(chip.scene)}-{chip.x}-{chip.y}.png"
        _save(out / rel, chip.rgb)
        truth["distinct"].append(rel)
    (out / "planted.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
    recipe = {
        "name": "planted",
        "sources": [
            {"name": "copies", "root": "corpus/copies"},
            {"name": "scenes", "root": "corpus/scenes"},
            {"name": "distinct", "root": "corpus/distinct"},
        ],
        "benchmarks": [{"name": "planted-bench", "root": "benchmarks"}],
        **(recipe_extra or {}),
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def baseline(tiles: pd.DataFrame, benchmarks: pd.DataFrame, max_distance: int = 4) -> pd.Series:
    """(tiles,) bool: what decontamination caught before this module's mechanisms, each tile against
    each benchmark image as it is, within max_distance bits (tiles already excluded for other reasons:
    False). The benchmarks table is the exclude pass's."""
    from rscurate import dedup
    from rscurate.decontam import BenchmarkSet
    from rscurate.hash import table_hashes

    candidates = (tiles["status"] == "kept") | (tiles["reason"] == "benchmark")
    caught = pd.Series(False, index=tiles.index)
    if candidates.any():
        reference = BenchmarkSet.from_table(benchmarks).variants[:, 0]  # the images as they are
        match, _ = dedup.query(table_hashes(tiles[candidates]), reference, max_distance)
        caught[candidates] = match >= 0
    return caught


def evaluate(
    out: str | os.PathLike[str], inputs: pd.DataFrame, tiles: pd.DataFrame, caught: pd.Series | None = None
) -> dict[str, Any]:
    """Recall per transform and false matches of a run over the corpus `write` laid out at `out`.

    `inputs` and `tiles` are the tables after the hash pass. A copy counts as caught when its tile is
    excluded as `benchmark` (`right` when benchmark_match is the image it copies); an in-scene benchmark
    when a tile covering its window is excluded naming it. False matches: distinct chips excluded as
    `benchmark`, and scene tiles excluded as `benchmark` that cover no planted window. `caught` ((tiles,)
    bool) replaces "excluded as benchmark", e.g. with `baseline` (match names are then unknown).
    """
    out = Path(out).resolve()
    truth = json.loads((out / "planted.json").read_text(encoding="utf-8"))
    flagged = (
        tiles["reason"] == "benchmark" if caught is None else caught.reindex(tiles.index, fill_value=False)
    )
    if caught is not None:
        tiles = tiles.assign(benchmark_match=None, benchmark_mechanism="as is, within 4")
    by_path = tiles.assign(flagged=flagged).groupby("path")
    status = {str(path): group for path, group in by_path}

    def hit(rel: str) -> tuple[bool, str | None, str | None]:
        group = status.get(str(out / rel))
        if group is None or not group["flagged"].any():
            return False, None, None
        row = group[group["flagged"]].iloc[0]
        return True, row.get("benchmark_match"), row.get("benchmark_mechanism")

    per: dict[str, dict[str, Any]] = {}
    for copy in truth["copies"]:
        caught, match, mechanism = hit(copy["file"])
        entry = per.setdefault(copy["transform"], {"n": 0, "caught": 0, "right": 0, "mechanisms": {}})
        entry["n"] += 1
        if caught:
            entry["caught"] += 1
            entry["right"] += int(match == str(out / copy["benchmark"]))
            entry["mechanisms"][mechanism] = entry["mechanisms"].get(mechanism, 0) + 1
    for entry in per.values():
        entry["recall"] = entry["caught"] / entry["n"]

    # Benchmark chips inside scenes: found when the scene's window search names the chip at its place
    # (or, for `caught`, when a tile covering it is caught); removed when every tile that holds at least
    # decontam.WINDOW_OVERLAP of it is excluded (a tile may be named after another benchmark it holds).
    from rscurate.decontam import WINDOW_OVERLAP

    windows = {}
    if "benchmark_windows" in inputs.columns:
        windows = {
            str(p): json.loads(t)
            for p, t in zip(inputs["path"], inputs["benchmark_windows"], strict=True)
            if isinstance(t, str)
        }
    found = removed = 0
    planted_boxes: dict[str, list[list[int]]] = {}
    for item in truth["in_scene"]:
        scene = str(out / item["scene"])
        planted_boxes.setdefault(scene, []).append(item["window"])
        group = status.get(scene)
        if group is None:
            continue
        x, y, w, h = item["window"]
        overlap = (np.minimum(group["x"] + group["width"], x + w) - np.maximum(group["x"], x)).clip(
            lower=0
        ) * (np.minimum(group["y"] + group["height"], y + h) - np.maximum(group["y"], y)).clip(lower=0)
        if caught is None:
            found += any(
                m["path"] == str(out / item["benchmark"]) and _iou(m["window"], item["window"]) > 0.5
                for m in windows.get(scene, [])
            )
        else:
            found += bool(group.loc[overlap > 0, "flagged"].any())
        holding = group[overlap >= WINDOW_OVERLAP * w * h]
        removed += bool(len(holding)) and bool(holding["flagged"].all())
    n_in = len(truth["in_scene"])
    in_scene = {"n": n_in, "found": found, "removed": removed, "recall": found / max(1, n_in)}

    false: list[str] = [rel for rel in truth["distinct"] if hit(rel)[0]]
    scene_tiles = 0
    for rel in truth["scenes"]:
        group = status.get(str(out / rel))
        if group is None:
            continue
        boxes = planted_boxes.get(str(out / rel), [])
        for r in group.itertuples():
            overlaps = any(
                min(r.x + r.width, x + w) > max(r.x, x) and min(r.y + r.height, y + h) > max(r.y, y)
                for x, y, w, h in boxes
            )
            scene_tiles += int(not overlaps)
            if r.flagged and not overlaps:
                false.append(f"{rel}@{r.x},{r.y}")
    return {
        "transforms": per,
        "in_scene": in_scene,
        "false_matches": false,
        "negatives": {"distinct_chips": len(truth["distinct"]), "scene_tiles": scene_tiles},
    }
