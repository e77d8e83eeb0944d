"""Shared fixtures: real imagery through RS_REAL_DATA, the synthesized corpus, and a tiny hand-made corpus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-imagery folder (shared/data/rs-real), from the environment variable RS_REAL_DATA."""
    value = os.environ.get("RS_REAL_DATA")
    if not value:
        pytest.skip("real-imagery test: set RS_REAL_DATA to the rs-real folder (e.g. ../shared/data/rs-real)")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"real-imagery test: RS_REAL_DATA={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def labeled_data() -> Path:
    """The shared labelled EuroSAT RGB set (shared/data/eurosat-rgb: 10 class folders, 27,000 64 px JPEGs),
    from the environment variable RS_LABELED_DATA."""
    value = os.environ.get("RS_LABELED_DATA")
    if not value:
        pytest.skip(
            "labelled real-data test: set RS_LABELED_DATA to the EuroSAT RGB folder (../shared/data/eurosat-rgb)"
        )
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"labelled real-data test: RS_LABELED_DATA={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rscurate synth` output (small): returns its recipe.yaml. Read-only for the tests."""
    from rscurate.synth import synth

    # large_side 1600: the tile grid has a tile at (1024, 1024), where synth plants a benchmark leak.
    return synth(tmp_path_factory.mktemp("synth") / "corpus", n_chips=16, large_side=1600, seed=0)


def aerialish(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour fields with rectangles ("fields", "roofs") and sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w] / 48.0
    channels = [
        np.sin(rng.uniform(0.2, 1.5) * xx + rng.uniform(0.2, 1.5) * yy + rng.uniform(0, 2 * np.pi))
        for _ in range(3)
    ]
    rgb = np.stack(channels, axis=-1) * 60 + 120  # (h, w, 3)
    for _ in range(12):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        rgb[y0 : y0 + int(rng.integers(8, h // 3)), x0 : x0 + int(rng.integers(8, w // 3))] = rng.uniform(
            20, 235, 3
        )
    rgb += rng.normal(0, 4, (h, w, 3))
    return rgb.clip(0, 255).astype(np.uint8)


MINI_RECIPE = {
    "name": "mini",
    "sources": [
        {"name": "alpha", "root": "alpha", "task": "classification"},
        {"name": "beta", "root": "beta", "task": "detection"},
    ],
    "benchmarks": [{"name": "bench", "root": "bench"}],
    "exclude": {"min_side": 64},
    "slice": {"max_side": 512, "tile_size": 256},
    "shard": {"max_samples": 4, "shuffle_seed": 7},
}
# What the mini corpus must curate to (asserted by several tests).
MINI_EXPECTED = {
    "inputs": 16,  # alpha 9, beta 7
    "by_reason": {"unreadable": 1, "exact_duplicate": 1, "too_small": 1, "blank": 1, "benchmark": 1},
    "kept": 18,  # alpha: 6 chips + 9 tiles of big.png; beta: 3 chips
    "duplicate": 1,  # beta/near_a01.jpg
    "shards": 5,  # 18 samples, at most 4 per shard
}


def write_mini_corpus(root: Path, recipe: dict | None = None) -> Path:
    """A tiny corpus with one case of everything the passes decide; returns its recipe.yaml."""
    rng = np.random.default_rng(1234)
    alpha, beta, bench = root / "alpha", root / "beta", root / "bench"
    for d in (alpha / "nested", beta, bench):
        d.mkdir(parents=True, exist_ok=True)
    chips = [aerialish(rng, 160, 160) for _ in range(7)]
    for i in range(6):
        Image.fromarray(chips[i]).save(alpha / f"a{i:02d}.png")
    Image.fromarray(chips[6]).save(alpha / "nested" / "a06.jpg", quality=92)
    Image.fromarray(aerialish(rng, 560, 700)).save(alpha / "big.png")  # 9 tiles of 256 (edge: shift)
    (alpha / "broken.png").write_bytes(b"<html>404 Not Found</html>\n")
    for i in range(3):
        Image.fromarray(aerialish(rng, 160, 160)).save(beta / f"b{i:02d}.png")
    shutil.copyfile(alpha / "a00.png", beta / "copy_a00.png")  # exact duplicate across sources
    near = np.clip(chips[1].astype(np.int16) + 3, 0, 255).astype(np.uint8)
    Image.fromarray(near).save(beta / "near_a01.jpg", quality=95)  # near-duplicate of a01
    Image.fromarray(aerialish(rng, 40, 40)).save(beta / "tiny.png")  # too small
    Image.fromarray(np.full((160, 160, 3), 90, np.uint8)).save(beta / "flat.png")  # blank
    leak = np.clip(chips[2].astype(np.int16) + 2, 0, 255).astype(np.uint8)
    Image.fromarray(leak).save(bench / "leak_a02.png")  # benchmark leak of a02
    Image.fromarray(aerialish(rng, 200, 200)).save(bench / "unrelated.png")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe or MINI_RECIPE, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mini_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipe.yaml of the tiny hand-made corpus (read-only)."""
    return write_mini_corpus(tmp_path_factory.mktemp("mini") / "corpus")


@pytest.fixture(scope="session")
def mini_curated(mini_recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run over the mini corpus (read-only: copy it before changing anything)."""
    from rscurate import pipeline
    from rscurate.recipe import load_recipe

    out = tmp_path_factory.mktemp("mini-out") / "out"
    pipeline.run(load_recipe(mini_recipe), out, workers=1)
    return out


def output_files(out: Path) -> dict[str, bytes]:
    """Every final output file (not the _work state) by relative path -> bytes."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "_work" not in p.relative_to(out).parts
    }
