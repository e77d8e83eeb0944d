"""Benchmark: rscurate.hash.phash (per tile) and phash_batch against imagehash.phash per tile.

Same tiles, same run, repeats interleaved; one thread. Every method starts from the decoded uint8
array (imagehash through Image.fromarray), so decoding is not timed. Tiles are cut from the real
scenes under RS_REAL_DATA when it is set, else generated (smooth, aerial-like noise).

    .venv/bin/python benchmarks/bench_phash.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _common

_common.pin_threads(1)

import imagehash  # noqa: E402  (after pinning threads)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rscurate.hash import phash, phash_batch, phash_with_canonical, to_hex_array  # noqa: E402


def real_tiles(root: Path, size: int, limit: int) -> list[np.ndarray]:
    """Non-overlapping size x size tiles of the JPEG/PNG/BMP scenes under root, at most limit."""
    tiles: list[np.ndarray] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp"):
            continue
        with Image.open(path) as image:
            scene = np.asarray(image.convert("RGB"))  # (H, W, 3)
        for y in range(0, scene.shape[0] - size + 1, size):
            for x in range(0, scene.shape[1] - size + 1, size):
                tiles.append(np.ascontiguousarray(scene[y : y + size, x : x + size]))
                if len(tiles) == limit:
                    return tiles
    return tiles


def generated_tiles(size: int, count: int, seed: int) -> list[np.ndarray]:
    """Smooth colour fields plus fine noise: the DCT sees structure at every frequency."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        coarse = rng.normal(128, 40, size=(8, 8, 3)).clip(0, 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        noise = rng.integers(-12, 13, size=(size, size, 3))
        tiles.append((smooth + noise).clip(0, 255).astype(np.uint8))
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tiles and repeats (a few seconds)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    counts = {256: 200, 512: 50} if args.quick else {256: 1000, 512: 250}
    real_root = os.environ.get("RS_REAL_DATA")

    rows = []
    for size, count in counts.items():
        tiles = real_tiles(Path(real_root), size, count) if real_root else []
        n_real = len(tiles)
        tiles += generated_tiles(size, count - n_real, seed=size)
        origin = {0: "generated", count: "real"}.get(n_real, f"{n_real} real + {count - n_real} generated")

        theirs = [str(imagehash.phash(Image.fromarray(t))) for t in tiles]
        identical = int(sum(a == b for a, b in zip(to_hex_array(phash_batch(tiles)), theirs, strict=True)))
        # the slice pass's call: the same hashes, and the canonical-orientation ones beside them
        with_canonical = to_hex_array(phash_with_canonical(tiles)[:, 0])
        identical = min(identical, int(sum(a == b for a, b in zip(with_canonical, theirs, strict=True))))
        timings = _common.time_interleaved(
            {
                "imagehash.phash per tile": lambda tiles=tiles: [
                    imagehash.phash(Image.fromarray(t)) for t in tiles
                ],
                "rscurate phash per tile": lambda tiles=tiles: [phash(t) for t in tiles],
                "rscurate phash_batch": lambda tiles=tiles: phash_batch(tiles),
                "rscurate phash_with_canonical": lambda tiles=tiles: phash_with_canonical(tiles),
            },
            repeats=repeats,
        )
        baseline = timings["imagehash.phash per tile"].median
        for method, timing in timings.items():
            rows.append(
                {
                    "tile px": size,
                    "tiles": len(tiles),
                    "source": origin,
                    "method": method,
                    "median s": timing.median,
                    "CPU s": timing.cpu_median,
                    "tiles/s": len(tiles) / timing.median,
                    "speed vs imagehash": baseline / timing.median,
                    "bit-identical": f"{identical}/{len(tiles)}",
                    "runs_s": timing.seconds,
                }
            )

    info = _common.machine()
    columns = [
        "tile px",
        "tiles",
        "source",
        "method",
        "median s",
        "CPU s",
        "tiles/s",
        "speed vs imagehash",
        "bit-identical",
    ]
    text = _common.report(
        "pHash: rscurate.hash vs imagehash",
        [
            _common.markdown_table(rows, columns),
            "",
            f"One thread; median of {repeats} interleaved repeats (median s: wall clock, CPU s: CPU time); every method starts from the decoded "
            "uint8 array. Bit-identical: our hex string equals str(imagehash.phash(...)). phash_with_canonical "
            "is what the slice pass calls: the same pHash and, from the same DCT, the pHash in the tile's "
            "canonical orientation (for dedup.invariant dihedral).",
        ],
        info,
    )
    print(text)
    _common.write_json(args.json, {"benchmark": "phash", "repeats": repeats, "rows": rows, "machine": info})
    if any(r["bit-identical"].split("/")[0] != r["bit-identical"].split("/")[1] for r in rows):
        sys.exit("pHash differs from imagehash on some tiles")


if __name__ == "__main__":
    main()
