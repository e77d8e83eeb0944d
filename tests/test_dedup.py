"""rscurate.dedup: near-duplicate search against brute force, and the keep-one-per-cluster pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from rscurate import dedup
from rscurate.hash import phash_batch, to_hex

# ---------------------------------------------------------------------------------------------------
# Brute force, the reference


def brute_pairs(h: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dist = np.bitwise_count(h[:, None] ^ h[None, :]).astype(np.int64)  # (N, N)
    i, j = np.nonzero(np.triu(dist <= d, k=1))
    return i, j, dist[i, j]


def brute_labels(h: np.ndarray, d: int) -> np.ndarray:
    i, j, _ = brute_pairs(h, d)
    graph = coo_array((np.ones(i.size), (i, j)), shape=(h.size, h.size))
    _, component = connected_components(graph, directed=False)
    smallest = {c: int(np.flatnonzero(component == c)[0]) for c in np.unique(component)}
    return np.array([smallest[c] for c in component], dtype=np.int64)


def brute_query(h: np.ndarray, ref: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.bitwise_count(h[:, None] ^ ref[None, :]).astype(np.int64)  # (N, R)
    dist = np.where(dist <= d, dist, 99)
    match = dist.argmin(axis=1)  # first minimum: the lowest reference index
    best = dist[np.arange(h.size), match]
    return np.where(best < 99, match, -1), np.where(best < 99, best, -1)


# ---------------------------------------------------------------------------------------------------
# Generated hashes


def flip_bits(h: np.ndarray, n_bits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each h[i] with n_bits[i] distinct random bits flipped."""
    out = h.copy()
    for i, k in enumerate(n_bits):
        for bit in rng.choice(64, size=int(k), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(bit)
    return out


def clustered_hashes(seed: int, n_centres: int = 150, copies: int = 6, max_flip: int = 10) -> np.ndarray:
    """Centres plus copies with 0..max_flip bits flipped (so near and not-so-near pairs), shuffled, plus
    exact repeats and uniform background."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**64, n_centres, dtype=np.uint64, endpoint=False)
    parts = [centres] + [
        flip_bits(centres, rng.integers(0, max_flip + 1, n_centres), rng) for _ in range(copies)
    ]
    parts.append(rng.integers(0, 2**64, 300, dtype=np.uint64, endpoint=False))
    h = np.concatenate(parts)
    rng.shuffle(h)
    return np.concatenate([h, h[:40], np.zeros(25, dtype=np.uint64)])


HASHES = clustered_hashes(0)


# ---------------------------------------------------------------------------------------------------
# group


@pytest.mark.parametrize("method", ["mih", "brute", "auto"])
@pytest.mark.parametrize("d", range(9))
def test_group_equals_brute_force_components(d: int, method: str) -> None:
    labels = dedup.group(HASHES, d, method=method)  # type: ignore[arg-type]
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, brute_labels(HASHES, d))


def test_group_finds_planted_pairs_among_random_hashes() -> None:
    rng = np.random.default_rng(5)
    background = rng.integers(0, 2**64, 20_000, dtype=np.uint64, endpoint=False)
    planted = flip_bits(background[:500], rng.integers(0, 5, 500), rng)  # 0..4 bits from their twin
    h = np.concatenate([background, planted])
    labels = dedup.group(h, 4, method="mih")
    np.testing.assert_array_equal(labels[20_000:], labels[:500])
    assert np.unique(labels).size == 20_000  # nothing else merged (uniform hashes: P(d <= 4) ~ 4e-14)


def test_group_exact_duplicates_form_one_cluster() -> None:
    h = np.array([9, 5, 9, 9, 5, 1 << 40], dtype=np.uint64)
    np.testing.assert_array_equal(dedup.group(h, 0), [0, 1, 0, 0, 1, 5])
    # Thousands of equal (flat-tile) hashes stay cheap: they are collapsed before the search.
    flat = np.zeros(50_000, dtype=np.uint64)
    assert (dedup.group(flat, 4, method="mih") == 0).all()


def test_group_is_transitive() -> None:
    a = np.uint64(0)
    b = a ^ np.uint64(0b111)  # 3 bits from a
    c = b ^ np.uint64(0b111000)  # 3 bits from b, 6 from a
    far = np.uint64(0xFFFF_0000_FFFF_0000)
    h = np.array([c, far, a, b], dtype=np.uint64)
    np.testing.assert_array_equal(dedup.group(h, 4, method="mih"), [0, 1, 0, 0])
    np.testing.assert_array_equal(dedup.group(h, 2, method="mih"), [0, 1, 2, 3])


def test_group_labels_are_the_smallest_index_and_follow_the_input_order() -> None:
    rng = np.random.default_rng(6)
    order = rng.permutation(HASHES.size)
    shuffled = HASHES[order]
    labels = dedup.group(shuffled, 4)
    np.testing.assert_array_equal(labels, dedup.group(shuffled, 4))
    assert (labels <= np.arange(labels.size)).all()
    assert (labels[labels] == labels).all()
    # Same partition as before shuffling: two tiles share a cluster in one iff in the other.
    original = dedup.group(HASHES, 4)[order]
    same_shuffled = labels[:, None] == labels[None, :]
    same_original = original[:, None] == original[None, :]
    np.testing.assert_array_equal(same_shuffled, same_original)


def test_group_with_small_blocks_and_edge_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "_CANDIDATE_BLOCK", 7)
    monkeypatch.setattr(dedup, "_EDGE_BUFFER", 5)
    for d in (3, 6):
        np.testing.assert_array_equal(dedup.group(HASHES, d, method="mih"), brute_labels(HASHES, d))
        np.testing.assert_array_equal(dedup.group(HASHES, d, method="brute"), brute_labels(HASHES, d))


def test_group_warns_about_a_huge_bucket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dedup, "_LARGE_BUCKET", 50)
    rng = np.random.default_rng(7)
    # 200 hashes equal in their top 40 bits: one bucket for every key made of the top chunks.
    h = (np.uint64(0xABCDEF1234) << np.uint64(24)) | rng.integers(0, 1 << 24, 200, dtype=np.uint64)
    with caplog.at_level("WARNING", logger="rscurate.dedup"):
        labels = dedup.group(h, 4, method="mih")
    np.testing.assert_array_equal(labels, brute_labels(h, 4))
    assert "share one key" in caplog.text


def test_group_edge_cases() -> None:
    empty = dedup.group(np.empty(0, dtype=np.uint64), 4)
    assert empty.dtype == np.int64 and empty.shape == (0,)
    np.testing.assert_array_equal(dedup.group(np.array([7], dtype=np.uint64), 4), [0])
    h = np.array([0, 2**64 - 1], dtype=np.uint64)
    np.testing.assert_array_equal(dedup.group(h, 32), [0, 1])


@pytest.mark.parametrize(
    ("hashes", "d", "match"),
    [
        (np.array([1, 2], dtype=np.int64), 4, "uint64"),
        (np.zeros((2, 2), dtype=np.uint64), 4, "1-D"),
        (["00ff00ff00ff00ff"], 4, "from_hex_array"),
        (np.zeros(2, dtype=np.uint64), -1, "0..32"),
        (np.zeros(2, dtype=np.uint64), 33, "0..32"),
        (np.zeros(2, dtype=np.uint64), 2.0, "integer"),
        (np.zeros(2, dtype=np.uint64), True, "integer"),
    ],
)
def test_group_rejects_bad_input(hashes: object, d: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dedup.group(hashes, d)  # type: ignore[arg-type]


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="method"):
        dedup.group(HASHES, 4, method="faiss")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# query and pairs


@pytest.mark.parametrize("method", ["mih", "brute"])
@pytest.mark.parametrize("d", range(9))
def test_query_equals_brute_force(d: int, method: str) -> None:
    rng = np.random.default_rng(d)
    reference = HASHES[:900]
    queries = np.concatenate(
        [
            flip_bits(HASHES[:300], rng.integers(0, 9, 300), rng),
            HASHES[900:1100],
            np.zeros(3, dtype=np.uint64),
        ]
    )
    match, distance = dedup.query(queries, reference, d, method=method)  # type: ignore[arg-type]
    expected_match, expected_distance = brute_query(queries, reference, d)
    np.testing.assert_array_equal(match, expected_match)
    np.testing.assert_array_equal(distance, expected_distance)
    assert (match >= 0).sum() > 50  # the test means something at every radius


def test_query_ties_go_to_the_lowest_reference_index() -> None:
    reference = np.array([0b1000, 0b0001, 0b0001, 0b0010], dtype=np.uint64)
    match, distance = dedup.query(np.array([0, 0b0001], dtype=np.uint64), reference, 4, method="mih")
    np.testing.assert_array_equal(match, [0, 1])  # three at distance 1: index 0; equal values: index 1
    np.testing.assert_array_equal(distance, [1, 0])


def test_query_with_nothing_on_either_side() -> None:
    h = np.array([1, 2], dtype=np.uint64)
    match, distance = dedup.query(h, np.empty(0, dtype=np.uint64), 4)
    np.testing.assert_array_equal(match, [-1, -1])
    np.testing.assert_array_equal(distance, [-1, -1])
    match, distance = dedup.query(np.empty(0, dtype=np.uint64), h, 4)
    assert match.shape == distance.shape == (0,)


@pytest.mark.parametrize("method", ["mih", "brute"])
@pytest.mark.parametrize("d", [0, 2, 4, 7])
def test_pairs_equal_brute_force(d: int, method: str) -> None:
    i, j, distance = dedup.pairs(HASHES, d, method=method)  # type: ignore[arg-type]
    expected = brute_pairs(HASHES, d)
    for got, want in zip((i, j, distance), expected, strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------
# The dedup pass


@dataclass
class Dedup:
    max_distance: int = 4


SOURCES = {"first": 0, "second": 1}


def listed(column: pd.Series) -> list[object]:
    """Values with every missing marker (None, NaN, pd.NA: pandas versions differ) as None."""
    return [None if pd.isna(v) else v for v in column]


def table(rows: list[tuple[str, str, int, int, int, str]]) -> pd.DataFrame:
    """rows of (key, source, width, height, hash, status)."""
    return pd.DataFrame(
        {
            "key": [r[0] for r in rows],
            "source": [r[1] for r in rows],
            "width": [r[2] for r in rows],
            "height": [r[3] for r in rows],
            "phash": [to_hex(r[4]) for r in rows],
            "status": [r[5] for r in rows],
            "reason": [None if r[5] == "kept" else "blank" for r in rows],
        }
    )


def test_dedup_keeps_the_tile_with_most_pixels() -> None:
    tiles = table(
        [
            ("a", "first", 256, 256, 0b0000, "kept"),
            ("b", "second", 512, 512, 0b0111, "kept"),  # most pixels, though later source and key
            ("c", "first", 256, 256, 0xFF00_FF00_FF00_FF00, "kept"),  # far away: its own cluster
        ]
    )
    before = tiles.copy()
    out = dedup.run(Dedup(), tiles, SOURCES)
    pd.testing.assert_frame_equal(tiles, before)
    assert list(out["status"]) == ["duplicate", "kept", "kept"]
    assert listed(out["reason"]) == ["duplicate", None, None]
    assert listed(out["duplicate_of"]) == ["b", None, None]
    assert out["duplicate_distance"].dtype == "Int64"
    assert out["duplicate_distance"].tolist() == [3, pd.NA, pd.NA]


def test_dedup_ties_break_by_source_order_then_key() -> None:
    tiles = table(
        [
            ("z", "second", 256, 256, 0b0001, "kept"),
            ("y", "first", 256, 256, 0b0010, "kept"),  # earlier source wins over key "x"
            ("x", "second", 256, 256, 0b0100, "kept"),
            # Same pixels, same source: key "m" < "n".
            ("n", "second", 100, 100, 0xFFFF_FFFF_0000_0000, "kept"),
            ("m", "second", 100, 100, 0xFFFF_FFFF_0000_0001, "kept"),
        ]
    )
    out = dedup.run(Dedup(), tiles, SOURCES)
    assert list(out["status"]) == ["duplicate", "kept", "duplicate", "duplicate", "kept"]
    assert listed(out["duplicate_of"]) == ["y", None, "y", "m", None]
    assert out["duplicate_distance"].tolist() == [2, pd.NA, 2, 1, pd.NA]


def test_dedup_chains_report_the_distance_to_the_kept_tile() -> None:
    a, b, c = 0, 0b111, 0b111111  # a-b 3, b-c 3, a-c 6
    tiles = table(
        [
            ("a", "first", 512, 512, a, "kept"),
            ("b", "first", 256, 256, b, "kept"),
            ("c", "first", 256, 256, c, "kept"),
        ]
    )
    out = dedup.run(Dedup(), tiles, SOURCES)
    assert listed(out["duplicate_of"]) == [None, "a", "a"]
    assert out["duplicate_distance"].tolist() == [pd.NA, 3, 6]


def test_dedup_leaves_other_rows_alone() -> None:
    tiles = table(
        [
            ("a", "first", 256, 256, 5, "excluded"),  # same hash as "b" but not kept: no part in it
            ("b", "second", 256, 256, 5, "kept"),
            ("c", "second", 256, 256, 5, "duplicate"),
        ]
    )
    tiles["duplicate_of"] = [None, None, "older"]
    tiles.index = pd.Index([7, 3, 5])
    out = dedup.run(Dedup(), tiles, SOURCES)
    assert list(out.index) == [7, 3, 5]
    assert list(out["status"]) == ["excluded", "kept", "duplicate"]
    assert listed(out["duplicate_of"]) == [None, None, "older"]
    assert listed(out["reason"]) == ["blank", None, "blank"]


def test_dedup_radius_zero_groups_only_equal_hashes() -> None:
    tiles = table(
        [
            ("a", "first", 256, 256, 8, "kept"),
            ("b", "first", 256, 256, 8, "kept"),
            ("c", "first", 256, 256, 9, "kept"),
        ]
    )
    out = dedup.run(Dedup(max_distance=0), tiles, SOURCES)
    assert list(out["status"]) == ["kept", "duplicate", "kept"]


def test_dedup_with_nothing_kept_and_with_an_unknown_source() -> None:
    tiles = table([("a", "first", 256, 256, 8, "excluded")])
    out = dedup.run(Dedup(), tiles, SOURCES)
    assert list(out["status"]) == ["excluded"] and out["duplicate_of"].isna().all()
    with pytest.raises(ValueError, match="elsewhere"):
        dedup.run(Dedup(), table([("a", "elsewhere", 256, 256, 8, "kept")]), SOURCES)
    with pytest.raises(ValueError, match="width"):
        dedup.run(Dedup(), tiles.drop(columns=["width"]), SOURCES)


def test_group_with_a_second_hash_joins_both_clusterings() -> None:
    rng = np.random.default_rng(11)
    h = rng.integers(0, 2**64, 300, dtype=np.uint64)
    also = rng.integers(0, 2**64, 300, dtype=np.uint64)
    h[1], also[2] = h[0] ^ np.uint64(0b11), also[1] ^ np.uint64(0b1)  # 0~1 by hash, 1~2 by the second hash
    labels = dedup.group(h, 4, also=also)
    # brute force: components of the union of both "within 4 bits" graphs
    i1, j1, _ = brute_pairs(h, 4)
    i2, j2, _ = brute_pairs(also, 4)
    graph = coo_array((np.ones(i1.size + i2.size), (np.r_[i1, i2], np.r_[j1, j2])), shape=(300, 300))
    _, component = connected_components(graph, directed=False)
    smallest = {c: int(np.flatnonzero(component == c)[0]) for c in np.unique(component)}
    np.testing.assert_array_equal(labels, [smallest[c] for c in component])
    assert labels[0] == labels[1] == labels[2] == 0
    with pytest.raises(ValueError, match="one hash per item"):
        dedup.group(h, 4, also=also[:5])


@dataclass
class DedupDihedral:
    max_distance: int = 4
    invariant: str = "dihedral"


def test_dedup_dihedral_takes_a_flipped_copy_for_a_duplicate() -> None:
    from conftest import aerialish

    rng = np.random.default_rng(12)
    chips = [aerialish(rng, 160, 160) for _ in range(3)]
    turned = [np.ascontiguousarray(np.rot90(chips[0])), np.ascontiguousarray(chips[1][:, ::-1])]
    images = chips + turned  # a, b, c, rot90(a), hflip(b)
    from rscurate.hash import phash_with_canonical

    both = phash_with_canonical(images)
    tiles = table([(k, "first", 160, 160, int(h), "kept") for k, h in zip("abcde", both[:, 0], strict=True)])
    tiles["phash_canonical"] = pd.array(both[:, 1].tolist(), dtype="UInt64")
    plain = dedup.run(Dedup(), tiles, SOURCES)
    assert list(plain["status"]) == ["kept"] * 5  # as they are, the flips are 20+ bits away
    out = dedup.run(DedupDihedral(), tiles, SOURCES)
    assert list(out["status"]) == ["kept", "kept", "kept", "duplicate", "duplicate"]
    assert listed(out["duplicate_of"]) == [None, None, None, "a", "b"]
    assert max(out["duplicate_distance"].dropna()) <= 4  # measured in the canonical orientation
    with pytest.raises(ValueError, match="rscurate slice RECIPE --out OUT --force"):
        dedup.run(DedupDihedral(), tiles.drop(columns=["phash_canonical"]), SOURCES)


def test_a_run_with_dedup_invariant_dihedral_drops_a_mirrored_chip(tmp_path: Path) -> None:
    import yaml
    from conftest import aerialish
    from PIL import Image

    from rscurate import pipeline
    from rscurate.recipe import load_recipe

    rng = np.random.default_rng(13)
    (tmp_path / "a").mkdir()
    chip = aerialish(rng, 200, 200)
    Image.fromarray(chip).save(tmp_path / "a" / "chip.png")
    Image.fromarray(np.ascontiguousarray(chip[::-1])).save(tmp_path / "a" / "mirrored.png")
    Image.fromarray(aerialish(rng, 200, 200)).save(tmp_path / "a" / "other.png")
    recipe = {"name": "d", "sources": [{"name": "a", "root": "a"}], "dedup": {"invariant": "dihedral"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    pipeline.run(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", workers=1)
    tiles = pd.read_parquet(tmp_path / "out" / "tiles.parquet").set_index("relpath")
    assert tiles["phash_canonical"].dtype == "UInt64" and tiles["phash_canonical"].notna().all()
    assert tiles.loc["mirrored.png", "status"] == "duplicate"
    assert tiles.loc["chip.png", "status"] == "kept" and tiles.loc["other.png", "status"] == "kept"


def test_dedup_names_tiles_without_a_valid_phash() -> None:
    tiles = table([("a", "first", 256, 256, 8, "kept"), ("b", "first", 256, 256, 8, "kept")])
    tiles.loc[1, "phash"] = None
    with pytest.raises(ValueError, match=r"\['b'\]"):
        dedup.run(Dedup(), tiles, SOURCES)


# ---------------------------------------------------------------------------------------------------
# Real imagery: pHashes of real tiles cluster far more than uniform ones

REAL = os.environ.get("RS_REAL_DATA")


@pytest.mark.realdata
@pytest.mark.skipif(not REAL, reason="set RS_REAL_DATA to the rs-real folder (see its SOURCES.md)")
def test_group_on_real_tile_hashes_equals_brute_force() -> None:
    from PIL import Image

    scenes = []
    for relpath in ("RSPrompter/073.jpg", "RSPrompter/286.jpg", "RSPrompter/288.jpg", "mmsegmentation/0.png"):
        with Image.open(Path(REAL or "") / relpath) as image:
            scene = np.asarray(image.convert("RGB"))
        scenes.append(
            [
                scene[y : y + 128, x : x + 128]
                for y in range(0, scene.shape[0] - 128, 48)
                for x in range(0, scene.shape[1] - 128, 48)
            ]
        )
    tiles_073 = scenes[0]
    h = phash_batch([tile for scene_tiles in scenes for tile in scene_tiles])
    for d in (4, 8):
        np.testing.assert_array_equal(dedup.group(h, d, method="mih"), brute_labels(h, d))
    # 073 and 286 are one scene with ships pasted in: most of their tiles pair up.
    labels = dedup.group(h, 4)
    per_scene = len(tiles_073)
    # Each tile of 073 against the tile of 286 at the same place.
    same = labels[:per_scene] == labels[per_scene : 2 * per_scene]
    assert same.mean() > 0.8
