"""rscurate.resample: Pillow's grey LANCZOS reduction, bit for bit, batched."""

from __future__ import annotations

import numpy as np
import pytest
from _images import textured
from PIL import Image

from rscurate import resample


def pillow_32(tile: np.ndarray) -> np.ndarray:
    image = Image.fromarray(tile)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS))


def test_equals_pillow_bit_for_bit_on_every_kind_of_size() -> None:
    rng = np.random.default_rng(7)
    shapes = [
        (256, 256),
        (512, 512),
        (32, 32),
        (31, 33),
        (8, 700),
        (700, 9),
        (1024, 37),
        (600, 600),
        (147, 57),
    ]
    shapes += [(int(rng.integers(4, 600)), int(rng.integers(4, 600))) for _ in range(14)]
    tiles = []
    for i, (h, w) in enumerate(shapes):
        if i % 3 == 0:
            tiles.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noise: every pixel matters
        elif i % 3 == 1:
            tiles.append(textured(h, w, seed=i))
        else:
            tiles.append(textured(h, w, bands=1, seed=i)[:, :, 0])  # grey tiles
    tiles += [np.zeros((64, 64, 3), np.uint8), np.full((300, 200), 255, np.uint8)]  # the clip ends
    got = resample.grey_thumbnails(tiles)
    assert got.shape == (len(tiles), 32, 32) and got.dtype == np.uint8
    for tile, mine in zip(tiles, got, strict=True):
        assert np.array_equal(mine, pillow_32(tile)), tile.shape


def test_tiles_of_one_size_share_a_batch_and_keep_their_order() -> None:
    tiles = [textured(256, 256, seed=s) for s in range(5)] + [textured(100, 90, seed=9)]
    order = [3, 5, 0, 1, 4, 2]
    got = resample.grey_thumbnails([tiles[i] for i in order])
    for k, i in enumerate(order):
        assert np.array_equal(got[k], pillow_32(tiles[i]))


def test_bad_tiles_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resample.grey_thumbnails([np.zeros((10, 10, 3), np.uint16)])
    with pytest.raises(ValueError, match="at least one pixel"):
        resample.grey_thumbnails([np.zeros((0, 10), np.uint8)])
