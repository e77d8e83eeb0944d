"""rscurate.decontam: benchmark decontamination through flips, rotations, re-crops and scenes that contain a
benchmark image; the planted-transform recall on real imagery is the test of it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import aerialish
from PIL import Image

from rscurate import decontam, pipeline, planted
from rscurate import hash as rshash
from rscurate.recipe import ExcludeConfig, load_recipe
from rscurate.schema import RecipeError

# ---------------------------------------------------------------------------------------------------
# The pass on hand-made hashes


@dataclass
class Exclude:
    """The recipe keys the pass reads: today's behaviour (the image as it is, within 4 bits, no check)."""

    benchmark_max_distance: int = 4
    benchmark_invariant: str = "none"
    benchmark_crop_min: float | None = None
    benchmark_crop_step: float = 0.05
    benchmark_scene_windows: int = 0
    benchmark_verify_distance: int = 4
    benchmark_verify_score: float = 0.5


def flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def tiles_table(hashes: list[int], statuses: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "key": [f"t{i}" for i in range(len(hashes))],
            "path": [f"/scene{i}.png" for i in range(len(hashes))],
            "phash": [rshash.to_hex(h) for h in hashes],
            "status": statuses,
            "reason": [None if s == "kept" else "nodata" for s in statuses],
        },
        index=pd.Index([10 * i for i in range(len(hashes))], name="row"),
    )


def bench_table(hashes: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "benchmark": "b",
            "path": [f"/bench/{i}.png" for i in range(len(hashes))],
            "status": "ok",
            "phash": [rshash.to_hex(h) for h in hashes],
        }
    )


def values(column: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in column]


def no_inputs() -> pd.DataFrame:
    return pd.DataFrame({"path": pd.Series([], dtype=object), "status": [], "reason": [], "scene_phash": []})


def test_tiles_within_the_distance_are_excluded_inclusive() -> None:
    bench_a, bench_b = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    hashes = [
        flip(bench_a, [0, 1, 2, 3]),  # distance 4: excluded
        flip(bench_a, [0, 1, 2, 3, 4]),  # distance 5: kept
        bench_b,  # distance 0
        flip(bench_b, [60]),  # distance 1
        flip(bench_a, [5]),  # not kept: left alone even though it matches
        0x5555555555555555,  # far from both
    ]
    tiles = tiles_table(hashes, ["kept", "kept", "kept", "kept", "excluded", "kept"])
    before = tiles.copy()
    _, out, summary = decontam.run(Exclude(), no_inputs(), tiles, bench_table([bench_a, bench_b]))

    pd.testing.assert_frame_equal(tiles, before)  # input untouched
    assert list(out.index) == list(tiles.index)
    assert list(out["status"]) == ["excluded", "kept", "excluded", "excluded", "excluded", "kept"]
    assert [None if pd.isna(r) else r for r in out["reason"]] == [
        "benchmark",
        None,
        "benchmark",
        "benchmark",
        "nodata",
        None,
    ]
    assert out["benchmark_distance"].dtype == "Int64"
    assert out["benchmark_distance"].tolist() == [4, pd.NA, 0, 1, pd.NA, pd.NA]
    assert values(out["benchmark_match"])[:4] == ["/bench/0.png", None, "/bench/1.png", "/bench/1.png"]
    assert values(out["benchmark_mechanism"])[:4] == ["tile", None, "tile", "tile"]
    assert summary["tiles"] == {"tile": 3} and summary["references"]["whole"] == 2 * 3  # as is, 2 tilts


def test_the_nearest_benchmark_is_reported() -> None:
    bench = [flip(0, [0, 1, 2]), flip(0, [3])]  # distances 3 and 1 from the tile
    _, out, _ = decontam.run(Exclude(), no_inputs(), tiles_table([0], ["kept"]), bench_table(bench))
    assert out["benchmark_distance"].tolist() == [1]
    assert out["benchmark_match"].tolist() == ["/bench/1.png"]


def test_radius_zero_and_no_benchmarks() -> None:
    tiles = tiles_table([7, 8], ["kept", "kept"])
    _, out, _ = decontam.run(Exclude(benchmark_max_distance=0), no_inputs(), tiles, bench_table([7, 9]))
    assert list(out["status"]) == ["excluded", "kept"]
    _, untouched, summary = decontam.run(Exclude(), no_inputs(), tiles, bench_table([]))
    assert list(untouched["status"]) == ["kept", "kept"]
    assert untouched["benchmark_distance"].isna().all() and summary["references"]["benchmarks"] == 0


def test_the_pass_needs_its_columns() -> None:
    with pytest.raises(ValueError, match="phash"):
        decontam.run(
            Exclude(), no_inputs(), pd.DataFrame({"key": [], "path": [], "status": [], "reason": []}), None
        )


def test_a_scene_near_a_benchmark_goes_with_all_its_tiles() -> None:
    inputs = pd.DataFrame(
        {
            "path": ["/big.png", "/other.png"],
            "status": ["ok", "ok"],
            "reason": [None, None],
            "scene_phash": [
                rshash.to_hex(flip(77, [9])),
                rshash.to_hex(0x5555555555555555),
            ],
        }
    )
    tiles = tiles_table([1, 2, 0x5555555555555555], ["kept", "kept", "kept"])
    tiles = tiles.assign(path=["/big.png", "/big.png", "/other.png"])
    new_inputs, out, summary = decontam.run(Exclude(), inputs, tiles, bench_table([77]))
    assert new_inputs["status"].tolist() == ["excluded", "ok"]
    assert values(new_inputs["benchmark_mechanism"]) == ["scene", None]
    assert out["status"].tolist() == ["excluded", "excluded", "kept"]
    assert out["benchmark_mechanism"].tolist()[:2] == ["scene", "scene"]
    assert summary["scenes"] == 1


# ---------------------------------------------------------------------------------------------------
# Windows, references and the pixel check on generated images


def test_verification_batches_give_each_worker_a_few_within_bounds() -> None:
    assert decontam.verify_batch(100_000, 1) == decontam.VERIFY_BATCH
    assert decontam.verify_batch(4_000, 2) == 500  # 4 batches per worker
    assert decontam.verify_batch(50, 8) == decontam.VERIFY_MIN_BATCH


def test_crop_windows_cover_the_scales_and_positions_asked() -> None:
    windows = decontam.crop_windows(256, 200, 0.5, 0.05)
    sides = decontam.pyramid_sides(0.5, 0.05)
    assert sides[0] == round(decontam.WINDOW / decontam.CROP_MAX) and sides[-1] == 2 * decontam.WINDOW
    assert np.all(np.diff(sides) > 0) and max(b / a for a, b in zip(sides, sides[1:], strict=False)) < 1.07
    w, h = windows[:, 2] / 256, windows[:, 3] / 200
    assert np.allclose(w, h, atol=0.01) and w.min() == pytest.approx(0.5) and w.max() < 0.96
    assert (windows[:, 0] >= 0).all() and (windows[:, 0] + windows[:, 2] <= 256).all()
    assert (windows[:, 1] + windows[:, 3] <= 200).all()
    # every position of the smallest scale: the corner windows are there
    half = windows[windows[:, 2] == 128]
    assert {(0, 0), (128, 100)} <= {(int(x), int(y)) for x, y in half[:, :2]}


def test_window_hashes_are_within_a_few_bits_of_the_phash_of_the_cut_window() -> None:
    grey = np.asarray(Image.fromarray(aerialish(np.random.default_rng(5), 300, 300)).convert("L"))
    hashes = decontam.crop_hashes(grey, 0.5, 0.05)
    windows = decontam.crop_windows(300, 300, 0.5, 0.05)
    assert hashes.shape == (len(windows),)
    exact = rshash.phash_batch([grey[y : y + h, x : x + w] for x, y, w, h in windows])
    distance = np.bitwise_count(exact ^ hashes)
    assert np.mean(distance) < 2 and np.percentile(distance, 99) <= 6


def test_flat_window_filter_gives_numpys_std_to_the_bit() -> None:
    rng = np.random.default_rng(7)
    for high in (2, 9, 1021):  # near-flat, low contrast, the full range of 4x a 2x2 block sum
        values = rng.integers(0, high, (2000, 256)).astype(np.uint16)
        assert np.array_equal(decontam._std_rows(values), values.std(axis=1))


def test_the_pixel_check_tells_a_copy_from_a_lookalike() -> None:
    rng = np.random.default_rng(6)
    image = np.asarray(Image.fromarray(aerialish(rng, 256, 256)).convert("L"))
    other = np.asarray(Image.fromarray(aerialish(rng, 256, 256)).convert("L"))
    source = decontam.Source(image)
    box = (0, 0, 256, 256)
    crop = image[40:200, 30:190]
    noisy = np.clip(image.astype(int) + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    vec = decontam.template
    assert source.score(vec(noisy), box) > 0.9
    assert source.score(vec(crop), (30, 40, 160, 160)) > 0.9
    # a 2-degree rotation is checked against the benchmark image tilted the same way (its tilt reference)
    turned = vec(decontam.tilted(image, 2.0))
    assert decontam.Source(decontam.oriented(image, "tilt+2")).score(turned, box) > 0.9
    assert source.score(vec(other), box) < 0.4
    assert decontam.template(np.full((64, 64), 90, np.uint8)) is None  # nothing to compare on a flat image
    # Open water with one bright edge in a corner correlates with any image that has an edge there, but
    # only in that quadrant: not a match.
    water = np.clip(90 + rng.normal(0, 1.5, (256, 256)), 0, 255).astype(np.uint8)
    edged = image.copy()
    edged[200:, 200:] = 230
    water[200:, 200:] = 230
    assert decontam.Source(edged).score(vec(water), box) == -1.0


def test_a_benchmark_image_is_found_inside_a_larger_scene(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    scene = aerialish(rng, 900, 1200)
    bench = tmp_path / "bench.png"
    Image.fromarray(np.rot90(scene[300:556, 700:956])).save(bench)  # a rotated crop of the scene
    table = decontam.benchmark_run(
        pd.DataFrame({"benchmark": ["b"], "path": [str(bench)], "relpath": ["bench.png"]})
    )
    assert table["status"].tolist() == ["ok"] and len(table["variants"].iloc[0].split()) == 10
    search = decontam.WindowSearch(ExcludeConfig(), table)
    assert search.scene(256, 256) is None and search.scene(300, 300) is None  # no room for a window
    watch = search.scene(1200, 900)
    assert watch is not None
    grey = np.asarray(Image.fromarray(scene).convert("L"))
    for y in range(0, 900, 300):  # fed tile by tile, as slicing does
        for x in range(0, 1200, 400):
            watch.add(np.ascontiguousarray(grey[y : y + 300, x : x + 400]), x, y)
    found = json.loads(watch.finish() or "[]")
    assert len(found) == 1
    assert found[0]["path"] == str(bench) and found[0]["variant"] == "rot270"  # rot270 undoes the rot90
    x, y, w, h = found[0]["window"]
    assert abs(x - 700) <= 12 and abs(y - 300) <= 12 and (w, h) == (256, 256)
    assert found[0]["score"] >= 0.5
    # and nothing in a scene that does not hold it
    other = search.scene(1200, 900)
    assert other is not None
    other.add(np.asarray(Image.fromarray(aerialish(rng, 900, 1200)).convert("L")), 0, 0)
    assert other.finish() is None


# ---------------------------------------------------------------------------------------------------
# Recipe keys


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("exclude", {"benchmark_invariant": "flips"}, "use none or dihedral"),
        ("exclude", {"benchmark_crop_min": 0.99}, "between 0.2 and 0.95"),
        ("exclude", {"benchmark_crop_step": 0.5}, "between 0.01 and 0.25"),
        ("exclude", {"benchmark_scene_windows": -1}, "at least 0"),
        ("exclude", {"benchmark_verify_distance": 2}, "between benchmark_max_distance"),
        ("exclude", {"benchmark_verify_score": 1.5}, "correlation between -1 and 1"),
        ("dedup", {"invariant": "rotations"}, "use none or dihedral"),
    ],
)
def test_recipe_refuses_bad_decontamination_keys(
    tmp_path: Path, section: str, values: dict, message: str
) -> None:
    (tmp_path / "a").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "sources": [{"name": "a", "root": "a"}], section: values}))
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(recipe)
    assert f"{section}.{next(iter(values))}" in str(info.value)


def test_recipe_takes_null_crop_min_as_whole_images_only(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"name": "r", "sources": [{"name": "a", "root": "a"}], "exclude": {"benchmark_crop_min": None}}
        )
    )
    assert load_recipe(recipe).exclude.benchmark_crop_min is None
    assert replace(load_recipe(recipe).exclude, benchmark_crop_min=0.5).benchmark_invariant == "dihedral"


# ---------------------------------------------------------------------------------------------------
# The planted set on real imagery (RS_REAL_DATA)

REAL = os.environ.get("RS_REAL_DATA")


@pytest.fixture(scope="module")
def planted_run(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("planted")
    # Three scenes of the four hold benchmark chips: the largest (a 14 Mpx photo) is the benchmark's.
    chosen = planted.build(real_data, seed=1, n_in_scene=12, in_scene_scenes=planted.IN_SCENE_SCENES[1:])
    recipe = planted.write(chosen, root)
    pipeline.run(load_recipe(recipe), root / "out", until="hash", workers=1)
    layout = pipeline.layout_of(root / "out")
    inputs = pd.read_parquet(layout.table("hash", "inputs"))
    tiles = pd.read_parquet(layout.table("hash", "tiles"))
    benchmarks = pd.read_parquet(layout.table("exclude", "benchmarks"))
    return {
        "root": root,
        "inputs": inputs,
        "tiles": tiles,
        "benchmarks": benchmarks,
        "result": planted.evaluate(root, inputs, tiles),
        "summary": json.loads(layout.marker("hash").read_text())["summary"],
    }


@pytest.mark.realdata
@pytest.mark.slow
def test_planted_copies_are_caught_whatever_the_transform(planted_run: dict) -> None:
    result = planted_run["result"]
    assert set(result["transforms"]) == set(planted.TRANSFORMS)
    recall = {name: entry["recall"] for name, entry in result["transforms"].items()}
    assert min(recall.values()) >= 0.95, recall
    for name, entry in result["transforms"].items():
        assert entry["n"] == 40 and entry["right"] == entry["caught"], name  # caught as its own benchmark
    mechanisms = {m for entry in result["transforms"].values() for m in entry["mechanisms"]}
    assert {"tile", "dihedral", "crop"} <= mechanisms
    assert set(result["transforms"]["crop50-60"]["mechanisms"]) == {"crop"}
    assert set(result["transforms"]["hflip"]["mechanisms"]) == {"dihedral"}


@pytest.mark.realdata
@pytest.mark.slow
def test_planted_benchmarks_inside_scenes_are_found(planted_run: dict) -> None:
    assert planted_run["result"]["in_scene"]["n"] == 12
    assert planted_run["result"]["in_scene"]["recall"] >= 0.9, planted_run["result"]["in_scene"]


@pytest.mark.realdata
@pytest.mark.slow
def test_no_real_distinct_chip_or_scene_tile_is_taken_for_a_benchmark(planted_run: dict) -> None:
    result = planted_run["result"]
    assert result["negatives"]["distinct_chips"] > 100 and result["negatives"]["scene_tiles"] > 10
    assert result["false_matches"] == []
    # The hash search did propose look-alikes; the pixel check turned them down.
    assert planted_run["summary"]["candidates"] > planted_run["summary"]["verified"]


@pytest.mark.realdata
@pytest.mark.slow
def test_before_this_pass_flips_and_crops_went_through(planted_run: dict) -> None:
    caught = planted.baseline(planted_run["tiles"], planted_run["benchmarks"])
    today = planted.evaluate(planted_run["root"], planted_run["inputs"], planted_run["tiles"], caught)
    recall = {name: entry["recall"] for name, entry in today["transforms"].items()}
    assert recall["hflip"] == 0 and recall["rot90"] == 0 and recall["crop80-90"] == 0
    assert recall["jpeg"] == 1 and recall["rotate"] < 0.95
    assert today["in_scene"]["recall"] == 0 and today["false_matches"] == []


@pytest.mark.realdata
@pytest.mark.slow
def test_pixel_checks_spread_over_worker_processes_decide_the_same(
    planted_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rscurate.executors import ProcessExecutor

    monkeypatch.setattr(decontam, "VERIFY_MIN_BATCH", 1)  # batches of a few tiles: many tasks, same decisions
    layout = pipeline.layout_of(planted_run["root"] / "out")
    inputs = pd.read_parquet(layout.table("slice", "inputs"))
    tiles = pd.read_parquet(layout.table("slice", "tiles"))
    executor = ProcessExecutor(2)
    try:
        _, again, summary = decontam.run(
            load_recipe(planted_run["root"] / "recipe.yaml").exclude,
            inputs,
            tiles,
            planted_run["benchmarks"],
            locate=lambda keys: pipeline._staged_where(layout, set(keys)),
            map_fn=executor.map,
            workers=lambda: executor.workers,
        )
    finally:
        executor.close()
    assert summary == {k: v for k, v in planted_run["summary"].items() if k in summary}  # less _decisions
    columns = ["key", "status", "reason", *decontam.TILE_COLUMNS]
    plain = [[values(again[c]) for c in columns], [values(planted_run["tiles"][c]) for c in columns]]
    assert [[str(v) for v in col] for col in plain[0]] == [[str(v) for v in col] for col in plain[1]]


@pytest.mark.realdata
@pytest.mark.slow
def test_stats_count_each_benchmark_per_mechanism(planted_run: dict) -> None:
    tiles = planted_run["tiles"]
    counts = decontam.summary(planted_run["inputs"], tiles)["by_benchmark"]["planted-bench"]
    hit = tiles[tiles["reason"] == "benchmark"]
    assert sum(v["tiles"] for v in counts.values()) == len(hit)
    assert counts["window"]["tiles"] == int((hit["benchmark_mechanism"] == "window").sum()) > 0
    assert list(counts) == [m for m in decontam.MECHANISMS if m in counts]
