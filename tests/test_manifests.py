"""Dataset manifests: every shipped manifest validates, recipes point at real manifests, and the loader's
errors name the file, the key and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rscurate import recipe as recipe_mod
from rscurate.manifest import (
    BENCHMARK_INHERITED,
    OVERLAP_RELATIONS,
    SOURCE_INHERITED,
    TASKS,
    BenchmarkManifest,
    ManifestError,
    SourceManifest,
    glob_match,
    glob_problem,
    held_out_matcher,
    inherited_fields,
    iter_manifests,
    load_benchmark_manifest,
    load_manifest,
    load_source_manifest,
    missing_source_message,
    read_exclude_list,
)
from rscurate.recipe import RecipeError, recipe_from_dict

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
SOURCE_FILES = sorted((MANIFESTS / "sources").glob("*.yaml"))
BENCHMARK_FILES = sorted((MANIFESTS / "benchmarks").glob("*.yaml"))
RECIPE_FILES = sorted(MANIFESTS.glob("*.yaml"))
# The evaluation sets SelectiveMAE reports (the results table of its README and paper).
SELECTIVEMAE_BENCHMARKS = {"aid", "nwpu-resisc45", "dior", "dior-r", "loveda", "spacenet-v1"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(scope="module")
def sources() -> dict[str, SourceManifest]:
    return {p.stem: load_source_manifest(p) for p in SOURCE_FILES}


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, BenchmarkManifest]:
    return {p.stem: load_benchmark_manifest(p) for p in BENCHMARK_FILES}


def test_the_shipped_manifests_are_there():
    assert len(SOURCE_FILES) >= 40
    assert {p.stem for p in RECIPE_FILES} == {
        "opticalrs-13m",
        "opticalrs-4m",
        "opticalrs-13m-release",
        "opticalrs-4m-release",
    }


def test_the_release_recipe_reads_the_split_zip_as_downloaded(tmp_path, monkeypatch):
    """The OpticalRS-4M release recipe, run over a split ZIP laid out as the release is: every image
    inside it is found, read without unpacking and sharded, under the path it has once unpacked."""
    from _images import textured, write_jpeg, write_png
    from test_archive import split_zip, write_zip

    from rscurate import pipeline

    unpacked = tmp_path / "unpacked"
    for i in range(4):
        (unpacked / "OpticalRS-4M" / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        write_jpeg(unpacked / "OpticalRS-4M" / f"set{i % 2}" / f"{i:05d}.jpg", textured(96, 96, seed=i))
    write_png(unpacked / "OpticalRS-4M" / "set1" / "00004.png", textured(90, 110, seed=4))
    data_root = tmp_path / "data"
    whole = write_zip(tmp_path / "whole.zip", unpacked)
    split_zip(whole, data_root / "OpticalRS-4M" / "OpticalRS-4M.zip", 8_000)
    assert (data_root / "OpticalRS-4M" / "OpticalRS-4M.z02").is_file()
    for b in ("AID", "NWPU-RESISC45", "DIOR", "LoveDA", "SpaceNet-1"):
        (data_root / b).mkdir()  # the benchmark datasets, empty here
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    recipe = recipe_mod.load_recipe(MANIFESTS / "opticalrs-4m-release.yaml")
    result = pipeline.run(recipe, tmp_path / "out", workers=1)
    assert result.stats["kept"] == 5 and result.stats["inputs"]["by_status"]["ok"] == 5
    inputs = pd.read_parquet(tmp_path / "out" / "inputs.parquet")
    assert sorted(inputs["relpath"]) == [
        "OpticalRS-4M/set0/00000.jpg",
        "OpticalRS-4M/set0/00002.jpg",
        "OpticalRS-4M/set1/00001.jpg",
        "OpticalRS-4M/set1/00003.jpg",
        "OpticalRS-4M/set1/00004.png",
    ]
    assert all(p.startswith(str(data_root / "OpticalRS-4M" / "OpticalRS-4M.zip!")) for p in inputs["path"])


# ---------------------------------------------------------------- every manifest


@pytest.mark.parametrize("path", SOURCE_FILES, ids=_ids(SOURCE_FILES))
def test_source_manifest_is_complete(path: Path):
    m = load_source_manifest(path)
    assert m.name == path.stem and m.kind == "source"
    assert m.task in TASKS
    for key in ("title", "homepage", "licence", "layout", "folder"):
        assert getattr(m, key).strip(), key
    assert m.patterns
    for pattern in m.patterns + m.ignore_patterns + m.exclude_patterns:
        assert glob_problem(pattern) is None, pattern
    assert isinstance(m.optical, bool)
    if m.bands is not None:
        assert len(m.bands) in (1, 3) and min(m.bands) >= 1
    # Nothing in a source list is the paper's: every source is marked as our reconstruction, except the
    # authors' own released corpora.
    assert m.reconstruction is not m.name.endswith("-release") and m.reconstruction_notes.strip()
    for o in m.overlaps:
        assert o.relation in OVERLAP_RELATIONS


@pytest.mark.parametrize("path", BENCHMARK_FILES, ids=_ids(BENCHMARK_FILES))
def test_benchmark_manifest_is_complete(path: Path):
    m = load_benchmark_manifest(path)
    assert m.name == path.stem and m.kind == "benchmark"
    assert m.task in TASKS
    for key in ("title", "homepage", "licence", "layout", "folder", "evaluated_split"):
        assert getattr(m, key).strip(), key
    assert m.patterns, "a benchmark must say which test images to hash"
    for pattern in m.patterns:
        assert glob_problem(pattern) is None, pattern


def test_every_selectivemae_benchmark_has_a_manifest(benchmarks):
    assert set(benchmarks) == SELECTIVEMAE_BENCHMARKS


def test_iter_manifests_reads_both_kinds():
    found = list(iter_manifests(MANIFESTS / "sources")) + list(iter_manifests(MANIFESTS / "benchmarks"))
    assert len(found) == len(SOURCE_FILES) + len(BENCHMARK_FILES)
    assert {type(m) for m in found} == {SourceManifest, BenchmarkManifest}
    kinds = {m.name: m.kind for m in iter_manifests(MANIFESTS / "benchmarks")}
    assert kinds["dior"] == "benchmark"


def test_lower_case_overlap_names_are_manifests(sources, benchmarks):
    # Lower-case names refer to our manifests; names of datasets we have no manifest for keep their own spelling.
    known = set(sources) | set(benchmarks)
    for m in list(sources.values()) + list(benchmarks.values()):
        for o in m.overlaps:
            if o.dataset == o.dataset.lower() and " " not in o.dataset:
                assert o.dataset in known, f"{m.name}: overlap with unknown manifest {o.dataset!r}"


def test_documented_overlaps_are_declared(sources, benchmarks):
    def rel(m, other):
        return {o.relation for o in m.overlaps if o.dataset == other}

    assert "same_pixels" in rel(sources["isaid"], "dota-v1")
    assert "contains" in rel(sources["dota-v2"], "dota-v1")
    assert "same_pixels" in rel(sources["dior"], "dior-r")
    assert "same_pixels" in rel(benchmarks["dior-r"], "dior")
    assert "same_pixels" in rel(sources["deepglobe-building"], "spacenet-v2")
    assert "same_pixels" in rel(sources["spacenet-v2"], "deepglobe-building")
    assert "contains" in rel(sources["nwpu-vhr10"], "isprs-vaihingen")
    assert "contains" in rel(sources["openearthmap"], "xbd")
    assert "contains" in rel(sources["cowc"], "isprs-potsdam")


# ---------------------------------------------------------------- benchmarks held out by their source


def test_benchmark_test_images_are_excluded_by_their_source(sources, benchmarks):
    linked = {b.name: b.source for b in benchmarks.values() if b.source}
    assert linked == {"dior": "dior", "dior-r": "dior", "loveda": "loveda"}
    for b in benchmarks.values():
        if b.source is None:
            continue
        s = sources[b.source]
        assert set(b.patterns) <= set(s.exclude_patterns), b.name
        assert set(b.test_lists) <= set(s.exclude_lists), b.name
        assert s.folder == b.folder


def test_benchmark_only_datasets_are_no_source(sources):
    assert not {"aid", "nwpu-resisc45", "spacenet-v1", "dior-r"} & set(sources)


def test_dior_test_split_is_held_out_by_folder_and_by_list(sources, tmp_path):
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    (tmp_path / "ImageSets/Main/test.txt").write_text("11726\n11727\n")
    held_out = held_out_matcher(sources["dior"], tmp_path)
    assert held_out("JPEGImages-test/11726.jpg")
    assert held_out("JPEGImages-test/23463.jpg")  # by folder, even if test.txt were incomplete
    assert held_out("JPEGImages-trainval/11727.jpg")  # by list, if folders were merged
    assert not held_out("JPEGImages-trainval/00001.jpg")


def test_hold_outs_ignore_the_case_of_the_extension(sources, tmp_path):
    # The scanner picks `X.JPG` through `*.jpg`; the hold-out must catch it too.
    assert held_out_matcher(sources["floodnet"], tmp_path)("FloodNet/test/test-org-img/7577.JPG")
    assert not held_out_matcher(sources["floodnet"], tmp_path)("FloodNet/train/train-org-img/7577.JPG")


def test_a_missing_exclude_list_is_an_error_not_a_silent_pass(sources, tmp_path):
    with pytest.raises(ManifestError, match=r"exclude_lists\[0\].*ImageSets/Main/test.txt not found"):
        held_out_matcher(sources["dior"], tmp_path)


def test_read_exclude_list_takes_the_stem_of_the_first_token(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# comment\n\n11726\nbeach_298.jpg /home/x/AID/images/Beach 0\nBeach/beach_1.JPG\nM-33-20-D-c-4-2_0\n"
    )
    assert read_exclude_list(lst) == {"11726", "beach_298", "beach_1", "M-33-20-D-c-4-2_0"}


# What each manifest's patterns pick (an image, not a mask) and hold out: (manifest, path, picked, held out).
CASES = [
    ("loveda", "Train/Urban/images_png/1366.png", True, False),
    ("loveda", "Train/Urban/masks_png/1366.png", False, False),
    ("loveda", "Val/Rural/images_png/2522.png", True, True),
    ("loveda", "Test/Urban/images_png/4191.png", True, True),
    ("isaid", "train/images/P0001.png", True, False),
    ("isaid", "train/images/P0001_instance_id_RGB.png", False, False),
    ("isaid", "test/images/P0006.png", True, True),
    ("dota-v2", "train/images/P0001.png", True, False),
    ("dota-v2", "test-dev/images/P9000.png", True, True),
    ("dota-v2", "test-challenge/images/P9100.png", True, True),
    ("dota-v2", "train/labelTxt-v2.0/P0001.txt", False, False),
    ("fmow-rgb", "train/airport/airport_0/airport_0_0_rgb.jpg", True, False),
    ("fmow-rgb", "train/airport/airport_0/airport_0_0_msrgb.jpg", False, False),
    ("fmow-rgb", "test/0000000/0000000_0_rgb.jpg", True, True),
    ("million-aid", "train/agriculture_land/arable_land/dry_field/P1.jpg", True, False),
    ("million-aid", "test/P0990000.jpg", True, False),
    ("isprs-potsdam", "2_Ortho_RGB/top_potsdam_2_10_RGB.tif", True, False),
    ("isprs-potsdam", "2_Ortho_RGB/top_potsdam_2_13_RGB.tif", True, True),
    ("isprs-potsdam", "4_Ortho_RGBIR/top_potsdam_2_10_RGBIR.tif", False, False),
    ("isprs-vaihingen", "top/top_mosaic_09cm_area1.tif", True, False),
    ("isprs-vaihingen", "top/top_mosaic_09cm_area2.tif", True, True),
    ("isprs-vaihingen", "top/top_mosaic_09cm_area20.tif", True, True),
    ("isprs-vaihingen", "top/top_mosaic_09cm_area21.tif", True, False),
    ("inria", "train/images/austin1.tif", True, False),
    ("inria", "train/gt/austin1.tif", False, False),
    ("inria", "test/images/bellingham1.tif", True, True),
    ("levir-cd", "train/A/train_1.png", True, False),
    ("levir-cd", "train/label/train_1.png", False, False),
    ("levir-cd", "test/B/test_1.png", True, True),
    ("xbd", "tier3/images/joplin-tornado_00000000_pre_disaster.png", True, False),
    ("xbd", "train/targets/joplin-tornado_00000000_pre_disaster_target.png", False, False),
    ("xbd", "test/images/guatemala-volcano_00000000_post_disaster.png", True, True),
    ("spacenet-v2", "AOI_2_Vegas_Train/RGB-PanSharpen/RGB-PanSharpen_AOI_2_Vegas_img1.tif", True, False),
    ("spacenet-v2", "AOI_2_Vegas_Train/MUL/MUL_AOI_2_Vegas_img1.tif", False, False),
    ("spacenet-v2", "AOI_2_Vegas_Test_public/RGB-PanSharpen/RGB-PanSharpen_AOI_2_Vegas_img9.tif", True, True),
    ("spacenet-v6", "train/AOI_11_Rotterdam/SAR-Intensity/x.tif", False, False),
    ("cowc", "datasets/ground_truth_sets/Toronto_ISPRS/03553.png", True, False),
    ("deepglobe-landcover", "train/119_sat.jpg", True, False),
    ("deepglobe-landcover", "train/119_mask.png", False, False),
    ("deepglobe-landcover", "test/200_sat.jpg", True, True),
    ("vedai", "Vehicules1024/00000000_co.png", True, False),
    ("vedai", "Vehicules1024/00000000_ir.png", False, False),
    ("vedai", "Vehicules512/00000000_co.png", False, False),
    ("xview", "val_images/100.tif", True, True),
    ("floodnet", "FloodNet-Supervised_v1.0/test/test-org-img/7577.jpg", True, True),
]


@pytest.mark.parametrize(("name", "relpath", "picked", "held"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_patterns_pick_images_and_hold_out_test_splits(sources, tmp_path, name, relpath, picked, held):
    m = sources[name]
    is_picked = any(glob_match(relpath, p) for p in m.patterns) and not any(
        glob_match(relpath, p) for p in m.ignore_patterns
    )
    assert is_picked is picked
    assert held_out_matcher(m, tmp_path)(relpath) is held


def test_cowc_annotation_rasters_are_ignored(sources):
    m = sources["cowc"]
    path = "datasets/ground_truth_sets/Toronto_ISPRS/03553_Annotated_Cars.png"
    assert any(glob_match(path, p) for p in m.patterns)
    assert any(glob_match(path, p) for p in m.ignore_patterns)


# ---------------------------------------------------------------- globs


def test_glob_match_agrees_with_pathlib_on_every_shipped_pattern(sources, benchmarks, tmp_path):
    paths = {c[1] for c in CASES} | {
        "a.jpg",
        "deep/er/still/x.tif",
        "JPEGImages-test/11726.jpg",
        "JPEGImages-trainval/00001.jpg",
        "FullDataSet/AllImages/100000001.bmp",
        "Images/beach/beach00.tif",
        "SN1/3band/3band_AOI_1_RIO_img1.tif",
        "SN1/8band/8band_AOI_1_RIO_img1.tif",
        "output/M-33-20-D-c-4-2_0.jpg",
        "output/M-33-20-D-c-4-2_0_m.png",
        "Real/subset/test/A/00001.jpg",
        "uavid_train/seq1/Images/000000.png",
        "region/images/x.tif",
        "x[1].png",
        ".hidden/y.png",
    }
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    patterns = {
        p
        for m in list(sources.values()) + list(benchmarks.values())
        for p in m.patterns + getattr(m, "ignore_patterns", ()) + getattr(m, "exclude_patterns", ())
    } | {"x[[]1].png", "*.png", "**/*.png", "?.jpg", "deep/**/*.tif", "*/*/*/x.tif", "[!a].jpg"}
    for pattern in sorted(patterns):
        expected = {p.relative_to(tmp_path).as_posix() for p in tmp_path.glob(pattern) if p.is_file()}
        got = {rel for rel in paths if glob_match(rel, pattern)}
        assert got == expected, pattern


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "empty"),
        ("/abs/*.png", "absolute"),
        ("a\\b.png", "backslash"),
        ("../x/*.png", "'..'"),
        ("a//b.png", "empty path segment"),
        ("train/", "empty path segment"),
        ("a**/b.png", "whole segment"),
        ("train/**", "picks folders"),
        ("img[0-9.png", "unclosed"),
        ("*.{jpg,png}", "braces"),
    ],
)
def test_bad_globs_are_named(pattern, problem):
    assert problem in (glob_problem(pattern) or "")


# ---------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def recipes() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in RECIPE_FILES}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_manifest_references_exist(path: Path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["name"] == path.stem
    for section, kind in (("sources", "source"), ("benchmarks", "benchmark")):
        names = [e["name"] for e in data[section]]
        assert len(names) == len(set(names)), f"{section}: duplicate names"
        for entry in data[section]:
            assert set(entry) == {"name", "manifest", "root"}, entry
            target = path.parent / entry["manifest"]
            assert target.is_file(), f"{entry['name']}: {entry['manifest']} does not exist"
            assert entry["manifest"] == f"{section}/{entry['name']}.yaml"
            m = load_manifest(target)
            assert m.kind == kind
            assert entry["root"] == f"${{DATA_ROOT}}/{m.folder}"
    assert {e["name"] for e in data["benchmarks"]} == SELECTIVEMAE_BENCHMARKS


def test_recipes_keep_one_member_of_each_same_pixels_group(recipes, sources):
    for name, data in recipes.items():
        chosen = {e["name"] for e in data["sources"]}
        for s in chosen:
            twins = {o.dataset for o in sources[s].overlaps if o.relation == "same_pixels"} & chosen
            assert not twins, f"{name}: {s} and {twins} are the same pixels"
        # The DOTA group enters once, as its superset.
        assert not {"dota-v1", "isaid", "deepglobe-building"} & chosen
        # Benchmark-only datasets never enter as sources.
        assert not {"aid", "nwpu-resisc45", "spacenet-v1"} & chosen


def test_4m_is_a_subset_of_13m_with_the_same_settings(recipes):
    big, small = recipes["opticalrs-13m"], recipes["opticalrs-4m"]
    assert [e["name"] for e in small["sources"]] == [
        e["name"] for e in big["sources"] if e["name"] in {s["name"] for s in small["sources"]}
    ]
    assert len(small["sources"]) < len(big["sources"])
    for key in ("benchmarks", "exclude", "slice", "dedup", "shard"):
        assert small[key] == big[key], key
    assert big["dedup"]["max_distance"] == 4
    assert big["exclude"]["benchmark_max_distance"] == 4


def test_a_shared_root_is_always_a_held_out_benchmark(recipes, sources, benchmarks):
    # The rule recipe.py needs once manifests land: a benchmark may share a source's root only when that
    # source's manifest holds out exactly the benchmark's test images.
    for data in recipes.values():
        by_root = {e["root"]: e["name"] for e in data["sources"]}
        for e in data["benchmarks"]:
            if e["root"] in by_root:
                b, s = benchmarks[e["name"]], sources[by_root[e["root"]]]
                assert b.source == s.name
                assert set(b.patterns) <= set(s.exclude_patterns)


def _resolved(entries: list[dict], load, cls) -> list[dict]:
    fields = {f.name for f in dataclasses.fields(cls)}
    out = []
    for e in entries:
        inherited = inherited_fields(load(MANIFESTS / e["manifest"]))
        merged = {**inherited, **{k: v for k, v in e.items() if k != "manifest"}}
        out.append({k: v for k, v in merged.items() if k in fields})
    return out


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_inherited_fields_pass_todays_recipe_validation(path: Path, monkeypatch):
    # Manifest values go through recipe.py's own checks (task, patterns, bands, optical), using only the
    # keys SourceConfig has today. Benchmarks are left out: recipe.py does not yet allow a shared root.
    monkeypatch.setenv("DATA_ROOT", "/data")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    sources = _resolved(data["sources"], load_source_manifest, recipe_mod.SourceConfig)
    recipe = recipe_from_dict(
        {
            "name": data["name"],
            "sources": sources,
            **{k: data[k] for k in ("exclude", "slice", "dedup", "shard")},
        },
        base_dir=path.parent,
        where=str(path),
        check_roots=False,
    )
    assert len(recipe.sources) == len(data["sources"])
    first = load_source_manifest(path.parent / data["sources"][0]["manifest"])
    assert recipe.sources[0].root == f"/data/{first.folder}"
    assert recipe.slice.tile_size == 512


def test_inherited_fields_are_the_documented_ones(sources, benchmarks):
    dota = inherited_fields(sources["dota-v2"])
    assert tuple(dota) == SOURCE_INHERITED
    assert dota["patterns"] == ["*/images/**/*.png"] and dota["task"] == "detection"
    assert inherited_fields(benchmarks["loveda"]) == {"patterns": list(benchmarks["loveda"].patterns)}
    assert BENCHMARK_INHERITED == ("patterns",)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_loads_once_recipe_py_knows_manifests(path: Path, monkeypatch):
    if "manifest" not in {f.name for f in dataclasses.fields(recipe_mod.SourceConfig)}:
        pytest.skip("recipe.py has no `manifest:` key yet (the lead adds it)")
    monkeypatch.setenv("DATA_ROOT", "/data")
    recipe = recipe_mod.load_recipe(path, check_roots=False)
    assert len(recipe.sources) == len(yaml.safe_load(path.read_text())["sources"])


# ---------------------------------------------------------------- README


def test_readme_lists_every_manifest(sources, benchmarks):
    readme = (MANIFESTS / "README.md").read_text(encoding="utf-8")
    for m in list(sources.values()) + list(benchmarks.values()):
        assert f"`{m.name}`" in readme, m.name
        assert m.homepage in readme, m.homepage


# ---------------------------------------------------------------- errors a user can cause


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _valid_source_text() -> str:
    return (MANIFESTS / "sources" / "inria.yaml").read_text(encoding="utf-8")


def test_a_valid_copy_loads(tmp_path):
    assert load_source_manifest(_write(tmp_path, "inria", _valid_source_text())).name == "inria"


def test_typo_key_names_file_key_and_fix(tmp_path):
    path = _write(tmp_path, "inria", _valid_source_text().replace("patterns:\n", "paterns:\n", 1))
    with pytest.raises(ManifestError) as info:
        load_source_manifest(path)
    msg = str(info.value)
    assert str(path) in msg and "'paterns'" in msg and "did you mean 'patterns'" in msg
    assert isinstance(info.value, RecipeError)


def test_wrong_type_names_file_key_and_fix(tmp_path):
    text = _valid_source_text().replace('patterns:\n  - "*/images/*.tif"', 'patterns: "*/images/*.tif"')
    with pytest.raises(
        ManifestError, match=r"inria\.yaml: patterns: expected a list, got str.*write a YAML list"
    ):
        load_source_manifest(_write(tmp_path, "inria", text))
    text = _valid_source_text().replace("optical: true", 'optical: "maybe"')
    with pytest.raises(ManifestError, match=r"inria\.yaml: optical: expected true or false, got 'maybe'"):
        load_source_manifest(_write(tmp_path, "inria", text))
    text = _valid_source_text().replace("image_count: 360", "image_count: many")
    with pytest.raises(ManifestError, match=r"image_count: expected an integer"):
        load_source_manifest(_write(tmp_path, "inria", text))


def test_bad_values_say_what_to_use(tmp_path):
    text = _valid_source_text().replace("task: segmentation", "task: segmentaton")
    with pytest.raises(
        ManifestError, match=r"task: 'segmentaton' is not a task; use one of .*did you mean 'segmentation'"
    ):
        load_source_manifest(_write(tmp_path, "inria", text))
    text = _valid_source_text().replace('"test/images/*.tif"', '"test/images/"')
    with pytest.raises(
        ManifestError, match=r"exclude_patterns\[0\]: 'test/images/' has an empty path segment"
    ):
        load_source_manifest(_write(tmp_path, "inria", text))
    text = _valid_source_text().replace("unverified: [licence]", "unverified: [licenze]")
    with pytest.raises(
        ManifestError, match=r"unverified\[0\]: 'licenze' is not a field.*did you mean 'licence'"
    ):
        load_source_manifest(_write(tmp_path, "inria", text))
    text = _valid_source_text().replace("homepage: project.inria.fr/aerialimagelabeling\n", "")
    with pytest.raises(ManifestError, match=r"missing key 'homepage'"):
        load_source_manifest(_write(tmp_path, "inria", text))


def test_name_must_match_the_file_and_kind_the_folder(tmp_path):
    with pytest.raises(ManifestError, match=r"name: 'inria' differs from the file name 'other\.yaml'"):
        load_source_manifest(_write(tmp_path, "other", _valid_source_text()))
    bench = (MANIFESTS / "benchmarks" / "aid.yaml").read_text(encoding="utf-8")
    with pytest.raises(ManifestError, match=r"kind: is 'benchmark' but a source manifest was expected"):
        load_source_manifest(_write(tmp_path, "aid", bench))
    with pytest.raises(ManifestError, match=r"not valid YAML"):
        load_source_manifest(_write(tmp_path, "bad", "name: [unclosed\n"))
    with pytest.raises(ManifestError, match=r"manifest file not found"):
        load_source_manifest(tmp_path / "absent.yaml")
    with pytest.raises(ManifestError, match=r"manifest folder not found"):
        list(iter_manifests(tmp_path / "absent"))


def test_missing_source_message_is_one_actionable_line(sources):
    msg = missing_source_message(sources["dota-v2"], "/data/DOTA-v2")
    assert "\n" not in msg
    assert "dota-v2" in msg and "DOTA v2.0" in msg
    assert "/data/DOTA-v2/*/images/**/*.png" in msg
    assert "captain-whu.github.io/DOTA/dataset.html" in msg
    fmow = missing_source_message(sources["fmow-rgb"], "/data/fMoW-RGB")
    assert "s3://spacenet-dataset/Hosted-Datasets/fmow/fmow-rgb" in fmow


def test_allow_missing_leaves_out_absent_sources_with_a_message(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    recipe_path = MANIFESTS / "opticalrs-4m.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    first = data["sources"][0]
    present = tmp_path / Path(first["root"]).name
    present.mkdir()
    for b in data.get("benchmarks", []):
        (tmp_path / Path(b["root"]).name).mkdir(exist_ok=True)
    with pytest.raises(RecipeError, match="--allow-missing"):
        recipe_mod.load_recipe(recipe_path)
    recipe = recipe_mod.load_recipe(recipe_path, allow_missing=True)
    every = recipe_mod.load_recipe(recipe_path, check_roots=False).sources
    # Benchmark roots that double as source roots (DIOR, LoveDA) exist too, so those sources stay.
    expected = [s.name for s in every if Path(s.root).is_dir()]
    assert first["name"] in expected and len(expected) < len(every)
    assert [s.name for s in recipe.sources] == expected
    assert len(recipe.missing) == len(every) - len(expected)
    gone = next(s for s in every if s.name not in expected)
    assert recipe.missing[0].startswith(f"{gone.name}: ") and "get it from" in recipe.missing[0]
