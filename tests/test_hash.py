"""rscurate.hash: pHash bit-identical to imagehash, its flip/rotation variants, the hex codec."""

from __future__ import annotations

import os
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rscurate import hash as rshash


def reference(tile: np.ndarray) -> str:
    return str(imagehash.phash(Image.fromarray(tile)))


def generated_tiles() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    yy, xx = np.mgrid[0:200, 0:300]
    tiles = {
        "noise_17x33": rng.integers(0, 256, (17, 33, 3), dtype=np.uint8),
        "noise_256": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "noise_512": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        "noise_1x1": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        "noise_3x500": rng.integers(0, 256, (3, 500, 3), dtype=np.uint8),
        "noise_narrow_range": rng.integers(100, 103, (256, 256, 3), dtype=np.uint8),
        "grey_noise_64": rng.integers(0, 256, (64, 64), dtype=np.uint8),
        "grey_noise_255x129": rng.integers(0, 256, (255, 129), dtype=np.uint8),
        "ramp_x": np.repeat(np.tile(ramp, (256, 1))[:, :, None], 3, axis=2),
        "ramp_y": np.repeat(np.tile(ramp[:, None], (1, 256))[:, :, None], 3, axis=2),
        "ramp_diagonal": np.stack([(xx + yy) % 256, xx % 256, yy % 256], axis=2).astype(np.uint8),
        "grey_ramp": np.tile(ramp, (256, 1)),
        "checkerboard": np.repeat((((xx // 8 + yy // 8) % 2) * 255).astype(np.uint8)[:, :, None], 3, 2),
        "red_only": np.stack(
            [rng.integers(0, 256, (128, 128)), np.zeros((128, 128)), np.zeros((128, 128))], 2
        ).astype(np.uint8),
    }
    for value in (0, 1, 128, 255):
        tiles[f"flat_{value}"] = np.full((256, 256, 3), value, dtype=np.uint8)
        tiles[f"grey_flat_{value}"] = np.full((512, 512), value, dtype=np.uint8)
    return tiles


TILES = generated_tiles()


@pytest.mark.parametrize("name", sorted(TILES))
def test_phash_matches_imagehash(name: str) -> None:
    tile = TILES[name]
    assert rshash.to_hex(rshash.phash(tile)) == reference(tile)


def test_phash_batch_matches_imagehash_on_many_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rshash, "_BATCH", 37)  # several DCT batches, the last one partial
    rng = np.random.default_rng(1)
    tiles = []
    for _ in range(150):
        h, w = rng.integers(8, 200, size=2)
        kind = rng.integers(0, 4)
        if kind == 0:
            tile = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 1:  # smooth: the DCT's low frequencies dominate, as in real scenes
            base = rng.normal(size=(4, 4, 3))
            tile = np.asarray(
                Image.fromarray((base * 40 + 128).clip(0, 255).astype(np.uint8)).resize(
                    (w, h), Image.Resampling.BILINEAR
                )
            )
        elif kind == 2:
            tile = rng.integers(0, 256, (h, w), dtype=np.uint8)
        else:
            tile = np.full((h, w, 3), rng.integers(0, 256), dtype=np.uint8)
        tiles.append(tile)
    tiles += list(TILES.values())
    ours = rshash.to_hex_array(rshash.phash_batch(tiles))
    assert list(ours) == [reference(t) for t in tiles]


def test_phash_of_a_strided_crop() -> None:
    scene = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    crop = scene[10:266:1, 20:276]  # a view, not contiguous
    assert not crop.flags.c_contiguous
    assert rshash.to_hex(rshash.phash(crop)) == reference(np.ascontiguousarray(crop))


def test_phash_batch_accepts_a_4d_array_and_nothing() -> None:
    stack = np.stack([TILES["noise_256"], TILES["ramp_x"], TILES["flat_0"]])  # (N, H, W, 3)
    assert list(rshash.to_hex_array(rshash.phash_batch(stack))) == [reference(t) for t in stack]
    empty = rshash.phash_batch([])
    assert empty.dtype == np.uint64 and empty.shape == (0,)


@pytest.mark.parametrize(
    "tile",
    [
        np.zeros((8, 8, 3), dtype=np.uint16),
        np.zeros((8, 8, 4), dtype=np.uint8),
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((0, 8, 3), dtype=np.uint8),
        np.zeros(8, dtype=np.uint8),
    ],
)
def test_phash_rejects_what_imagehash_would_not_see_as_rgb(tile: np.ndarray) -> None:
    with pytest.raises(ValueError, match="tile"):
        rshash.phash(tile)


# ---------------------------------------------------------------------------------------------------
# Hex codec


def test_hex_round_trip_and_imagehash_format() -> None:
    tile = TILES["ramp_diagonal"]
    text = reference(tile)
    assert rshash.from_hex(text) == rshash.phash(tile)
    assert rshash.to_hex(rshash.from_hex(text)) == text
    assert rshash.from_hex(text.upper()) == rshash.phash(tile)
    assert rshash.to_hex(0) == "0" * 16
    assert rshash.to_hex(np.uint64(2**64 - 1)) == "f" * 16
    assert rshash.from_hex("8000000000000000") == 1 << 63


def test_hex_arrays_round_trip() -> None:
    rng = np.random.default_rng(3)
    hashes = np.concatenate(
        [
            np.array([0, 1, 1 << 63, 2**64 - 1], dtype=np.uint64),
            rng.integers(0, 2**64, 1000, dtype=np.uint64, endpoint=False),
        ]
    )
    text = rshash.to_hex_array(hashes)
    assert text.dtype == np.dtype("<U16")
    assert list(text) == [f"{int(h):016x}" for h in hashes]
    np.testing.assert_array_equal(rshash.from_hex_array(text), hashes)
    np.testing.assert_array_equal(rshash.from_hex_array(pd.Series(list(text))), hashes)
    np.testing.assert_array_equal(rshash.from_hex_array(list(text)), hashes)
    assert rshash.from_hex_array([]).dtype == np.uint64


@pytest.mark.parametrize(
    "bad", ["", "0" * 15, "0" * 17, "0x" + "0" * 14, "g" + "0" * 15, " " + "0" * 15, "é" + "0" * 15, "None"]
)
def test_from_hex_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="16 hex digits"):
        rshash.from_hex(bad)
    with pytest.raises(ValueError, match=r"item 1"):
        rshash.from_hex_array(["0" * 16, bad])


def test_from_hex_array_names_a_missing_value() -> None:
    with pytest.raises(ValueError, match="None"):
        rshash.from_hex_array(pd.Series(["0" * 16, None], dtype=object))


def test_to_hex_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        rshash.to_hex(-1)
    with pytest.raises(ValueError):
        rshash.to_hex(1 << 64)
    with pytest.raises(ValueError, match="uint64"):
        rshash.to_hex_array(np.array([1, 2], dtype=np.int64))


# ---------------------------------------------------------------------------------------------------
# Flips and rotations


def dihedral(tile: np.ndarray, variant: str) -> np.ndarray:
    """The tile flipped/rotated as rscurate.hash.DIHEDRAL says, done by numpy independently."""
    ops = {
        "identity": lambda a: a,
        "hflip": lambda a: a[:, ::-1],
        "vflip": lambda a: a[::-1],
        "rot180": lambda a: np.rot90(a, 2),
        "transpose": lambda a: np.swapaxes(a, 0, 1),
        "rot90": lambda a: np.rot90(a, 1),
        "rot270": lambda a: np.rot90(a, 3),
        "transverse": lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
    }
    return np.ascontiguousarray(ops[variant](tile))


VARIED = {k: v for k, v in TILES.items() if "flat" not in k and "narrow" not in k}


@pytest.mark.parametrize("name", sorted(VARIED))
def test_phash_variants_are_the_phash_of_each_flip_and_rotation(name: str) -> None:
    tile = VARIED[name]
    variants = rshash.phash_variants([tile])[0]
    assert rshash.VARIANTS == tuple(rshash.DIHEDRAL)
    expected = [rshash.phash(dihedral(tile, v)) for v in rshash.VARIANTS]
    assert [rshash.to_hex(h) for h in variants] == [rshash.to_hex(h) for h in expected]


def test_flips_act_on_the_coefficients_exactly_and_transposes_nearly() -> None:
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(40)]
    canonical = rshash.phash_with_canonical(tiles)
    assert (canonical[:, 0] == rshash.phash_batch(tiles)).all()
    for variant in rshash.VARIANTS:
        turned = rshash.phash_with_canonical([dihedral(t, variant) for t in tiles])[:, 1]
        distance = np.bitwise_count(turned ^ canonical[:, 1])
        if not rshash.DIHEDRAL[variant][0]:
            assert (distance == 0).all(), variant  # flips: the same canonical hash, bit for bit
        else:
            # Transposes: Pillow rounds between its two resize passes, so a few bits may move, and where
            # the two first harmonics are nearly equal the canonical orientation itself may differ.
            assert np.median(distance) == 0 and (distance <= 4).mean() >= 0.9, (variant, distance)
    # and the canonical hash is not the plain one for most tiles: it does pick an orientation
    assert (canonical[:, 0] != canonical[:, 1]).mean() > 0.5


def test_thumbnail_hashes_by_matrix_product_equal_the_fft_on_varied_thumbnails() -> None:
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (200, 32, 32)).astype(np.uint8)
    assert (rshash.thumbnail_hashes(small) == rshash._dct_bits(small)).all()
    # scaling every pixel (a 2x2 sum instead of a mean) changes no bit
    assert (rshash.thumbnail_hashes(small.astype(np.uint16) * 4) == rshash._dct_bits(small)).all()


# ---------------------------------------------------------------------------------------------------
# Real imagery (RS_REAL_DATA, see its SOURCES.md)

REAL = os.environ.get("RS_REAL_DATA")
needs_real = pytest.mark.skipif(
    not REAL, reason="set RS_REAL_DATA to the rs-real folder (see its SOURCES.md)"
)


def open_rgb(relpath: str) -> np.ndarray:
    """(H, W, 3) uint8; TIFFs through rasterio (the first three bands), the rest through Pillow."""
    path = Path(REAL or "") / relpath
    if path.suffix.lower() in (".tif", ".tiff"):
        rasterio = pytest.importorskip("rasterio")
        with rasterio.open(path) as src:
            return np.ascontiguousarray(src.read()[:3].transpose(1, 2, 0))  # (C, H, W) -> (H, W, C)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.realdata
@needs_real
@pytest.mark.parametrize(
    "relpath",
    [
        "RSPrompter/073.jpg",
        "mmsegmentation/0.png",
        "PaddleRS/optical.bmp",
        "rasterio/RGB.byte.tif",
        "DeepForest/OSBS_029.png",
    ],
)
def test_phash_matches_imagehash_on_real_crops(relpath: str) -> None:
    scene = open_rgb(relpath)
    h, w = scene.shape[:2]
    crops = [scene] + [scene[y : y + 256, x : x + 256] for y in (0, h // 3) for x in (0, w // 2)]
    crops.append(scene[:, :, 1])  # one band as grey
    assert list(rshash.to_hex_array(rshash.phash_batch(crops))) == [
        reference(np.ascontiguousarray(c)) for c in crops
    ]


@pytest.mark.realdata
@needs_real
@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("RSPrompter/073.jpg", "RSPrompter/286.jpg", 4),  # group H
        ("RSPrompter/288.jpg", "RSPrompter/297.jpg", 4),  # group I
        ("RSPrompter/477.jpg", "RSPrompter/617.jpg", 8),  # group J
        ("rasterio/RGB.byte.tif", "rasterio/rgb-byte-tenth.tif", 2),  # group A, 1/10 downsample
        ("rasterio/RGB.byte.tif", "rasterio/rgb_deflate.tif", 0),  # group A, same pixels
        ("DeepForest/OSBS_029.tif", "DeepForest/OSBS_029.png", 0),  # group E
    ],
)
def test_real_near_duplicate_distances(a: str, b: str, distance: int) -> None:
    assert int(np.bitwise_count(np.uint64(rshash.phash(open_rgb(a)) ^ rshash.phash(open_rgb(b))))) == distance


@pytest.mark.realdata
@needs_real
def test_real_crop_matches_its_source_scene() -> None:
    # Group F: demo.jpg is the top-left 1024 px of P0006, re-encoded as JPEG.
    scene = open_rgb("iSAID_Devkit/P0006.png")
    demo = open_rgb("mmrotate/demo.jpg")
    assert rshash.phash(scene[:1024, :1024]) == rshash.phash(demo)
    assert int(np.bitwise_count(np.uint64(rshash.phash(scene) ^ rshash.phash(demo)))) > 8
