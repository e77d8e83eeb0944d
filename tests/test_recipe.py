"""Recipe mistakes a person makes, through the CLI (exit 2, one line naming the file, the key and the fix),
and a fuzzed loader: whatever the YAML holds, `load_recipe` returns a Recipe or raises RecipeError."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rscurate.cli import app
from rscurate.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
runner = CliRunner()


def valid_recipe() -> dict[str, Any]:
    """Roots relative to the recipe file, in the `folder` fixture."""
    return {
        "name": "mistakes",
        "sources": [{"name": "alpha", "root": "alpha", "task": "detection"}],
        "benchmarks": [{"name": "bench", "root": "bench"}],
        "exclude": {"min_side": 32},
        "slice": {"max_side": 512, "tile_size": 256, "overlap": 32},
        "shard": {"max_samples": 10},
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("alpha", "beta", "bench"):
        (tmp_path / name).mkdir()
    return tmp_path


def edited(recipe: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy with `value` at a dotted key ('sources.0.root'); the value `DELETE` removes the key."""
    out = copy.deepcopy(recipe)
    *parents, last = dotted.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        index = int(last)
        if value is DELETE:
            del node[index]
        elif index == len(node):
            node.append(value)
        else:
            node[index] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()

# (what the person did, the edit, words the one line must hold: the key and the fix)
MISTAKES = [
    ("typo in a key", "slice.tile_sise", 256, ["unknown key 'slice.tile_sise'", "did you mean 'tile_size'"]),
    ("typo in a top key", "sharding", {"max_samples": 3}, ["unknown key 'sharding'", "did you mean 'shard'"]),
    ("wrong type", "shard.max_samples", "many", ["shard.max_samples", "expected an integer, got 'many'"]),
    ("a bool as a number", "exclude.min_side", True, ["exclude.min_side", "expected an integer"]),
    ("a string for a list", "sources.0.patterns", "*.png", ["sources[0].patterns", "write a YAML list"]),
    ("a mapping for the list", "sources", {"name": "alpha"}, ["sources", "expected a list"]),
    (
        "missing root folder",
        "sources.0.root",
        "not-there",
        ["sources[0].root", "does not exist", "--allow-missing"],
    ),
    ("missing root key", "sources.0.root", DELETE, ["missing key 'sources[0].root'", "add it"]),
    ("missing name", "name", DELETE, ["missing key 'name'", "add it"]),
    (
        "benchmark root equal to a source root",
        "benchmarks.0.root",
        "alpha",
        ["benchmarks[0].root", "is also the root of source 'alpha'", "point it at the test split"],
    ),
    (
        "tile_size larger than max_side",
        "slice.tile_size",
        1024,
        ["slice.tile_size", "lower tile_size or raise max_side"],
    ),
    ("negative overlap", "slice.overlap", -8, ["slice.overlap", "must be at least 0"]),
    ("overlap as big as a tile", "slice.overlap", 256, ["slice.overlap", "smaller than tile_size (256)"]),
    ("unknown edge policy", "slice.edge", "wrap", ["slice.edge", "use shift, pad or drop"]),
    (
        "fraction out of range",
        "exclude.max_nodata_fraction",
        1.5,
        ["exclude.max_nodata_fraction", "between 0 and 1"],
    ),
    ("NaN threshold", "exclude.min_std", float("nan"), ["exclude.min_std", "at least 0"]),
    (
        "bad glob",
        "sources.0.patterns",
        ["**/*.{jpg,png}"],
        ["sources[0].patterns[0]", "list each alternative"],
    ),
    (
        "unset variable",
        "sources.0.root",
        "${RSCURATE_NOT_SET_ANYWHERE}/x",
        ["export RSCURATE_NOT_SET_ANYWHERE="],
    ),
    ("a name with a slash", "name", "my/set", ["name", "use only letters, digits"]),
    (
        "two sources, one name",
        "sources.1",
        {"name": "alpha", "root": "beta"},
        ["sources[1].name", "appears twice"],
    ),
    ("a path that looks like markup", "sources.0.root", "[/gone]", ["[/gone]", "does not exist"]),
]


@pytest.mark.parametrize(("what", "key", "value", "words"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_recipe_mistake_is_one_line_exit_2(
    folder: Path, what: str, key: str, value: Any, words: list[str]
) -> None:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(edited(valid_recipe(), key, value), sort_keys=False))
    out = folder / "out"
    result = runner.invoke(app, ["run", str(path), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 2, (what, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, (what, result.output)
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for word in words:
        assert word in lines[0], (what, word, lines[0])
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing is written for a recipe that does not load


def test_yaml_syntax_error_and_non_mapping(folder: Path) -> None:
    path = folder / "recipe.yaml"
    for text, words in (
        ("name: x\nsources: [\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
        ("name: x\n\tsources: []\n", "not valid YAML"),
    ):
        path.write_text(text)
        result = runner.invoke(app, ["scan", str(path), "--out", str(folder / "out")])
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_manifest_mistake_names_the_manifest(folder: Path) -> None:
    """A typo inside a source manifest a recipe points at: the line names the manifest file and key."""
    manifest = folder / "manifests" / "sources" / "inria.yaml"
    manifest.parent.mkdir(parents=True)
    text = (MANIFESTS / "sources" / "inria.yaml").read_text(encoding="utf-8")
    manifest.write_text(text.replace("patterns:\n", "paterns:\n", 1), encoding="utf-8")
    recipe = {"name": "m", "sources": [{"name": "inria", "root": "alpha", "manifest": str(manifest)}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--out", str(folder / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert str(manifest) in result.output and "'paterns'" in result.output
    assert "did you mean 'patterns'" in result.output


# --------------------------------------------------------------------------------------------------
# Fuzzing the loader: a Recipe or a RecipeError, never another exception

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = [
    "name", "sources", "benchmarks", "exclude", "slice", "dedup", "shard", "root", "task", "patterns", "bands",
    "optical", "exclude_paths", "exclude_patterns", "exclude_lists", "ignore_patterns", "manifest", "min_side",
    "max_nodata_fraction", "benchmark_max_distance", "min_std", "max_side", "tile_size", "overlap", "edge",
    "max_distance", "max_samples", "image_format", "jpeg_quality", "shuffle_seed", "path", "missing",
]  # fmt: skip
SHIPPED_MANIFEST = str(MANIFESTS / "sources" / "inria.yaml")
SHIPPED_BENCHMARK = str(next((MANIFESTS / "benchmarks").glob("*.yaml")))
# Strings a path, glob or enum key meets: NUL, too long, a symlink loop, markup, variables, globs, manifests.
TRICKY_STRINGS = [
    "alpha", "beta", "bench", ".", "..", "/", "", "~", "~nobody/x", "${HOME}", "${NOT_SET_ANYWHERE}",
    "$HOME/x", "s3://bucket/x", "a\x00b", "x" * 5000, "alpha/" + "y" * 300, "loop", "loop/x", "[/x]",
    "**/*.png", "**", "a/**", "[", "*.{a,b}", "a//b", " *.png", "jpg", "png", "shift", "pad", "drop",
    SHIPPED_MANIFEST, SHIPPED_BENCHMARK, "manifests", "nan", "\udcff",
]  # fmt: skip
TRICKY = st.sampled_from(TRICKY_STRINGS)
STRINGS = st.one_of(st.text(max_size=12), TRICKY)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=2000),
    st.floats(allow_nan=True, allow_infinity=True),
    STRINGS,
    st.dates(),
    st.binary(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.sampled_from(KEYS), SCALARS), inner, max_size=5)
    ),
    max_leaves=20,
)


def _loads_or_refuses(load: Any, *args: Any, **kwargs: Any) -> Recipe | None:
    try:
        recipe = load(*args, **kwargs)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)  # one line
        return None
    assert isinstance(recipe, Recipe)
    return recipe


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    for name in ("alpha", "beta", "bench"):
        (base / name).mkdir()
    (base / "loop").symlink_to("loop")
    return base


STRING_KEYS = [
    "name", "sources.0.name", "sources.0.root", "sources.0.task", "sources.0.manifest", "benchmarks.0.name",
    "benchmarks.0.root", "benchmarks.0.manifest", "slice.edge", "shard.image_format",
]  # fmt: skip
LIST_KEYS = [
    "sources.0.patterns", "sources.0.exclude_paths", "sources.0.exclude_patterns", "sources.0.exclude_lists",
    "sources.0.ignore_patterns", "benchmarks.0.patterns",
]  # fmt: skip
NUMBER_KEYS = [
    "exclude.min_side", "exclude.max_nodata_fraction", "exclude.benchmark_max_distance", "exclude.min_std",
    "slice.max_side", "slice.tile_size", "slice.overlap", "dedup.max_distance", "shard.max_samples",
    "shard.jpeg_quality", "shard.shuffle_seed",
]  # fmt: skip
TRICKY_NUMBERS = [
    0, -1, 1, 15, 16, 2**63, -(2**63), 10**30, 0.5, 1.5, float("nan"), float("inf"), -float("inf"), True, "1", None,
]  # fmt: skip


def test_every_key_with_every_tricky_value(fuzz_folder: Path) -> None:
    """Exhaustive where hypothesis would only sample: each typed key gets each awkward value of its kind."""
    edits = [(k, v) for k in STRING_KEYS for v in TRICKY_STRINGS]
    edits += [(k, [v]) for k in LIST_KEYS for v in TRICKY_STRINGS]
    edits += [(k, v) for k in NUMBER_KEYS for v in TRICKY_NUMBERS]
    loaded = 0
    for key, value in edits:
        data = edited(valid_recipe(), key, value)
        loaded += _loads_or_refuses(recipe_from_dict, data, base_dir=fuzz_folder, where="f.yaml") is not None
    assert 0 < loaded < len(edits)  # some are fine (a task name, a seed), most are refused


@FUZZ
@given(data=VALUES)
def test_fuzz_any_data(fuzz_folder: Path, data: Any) -> None:
    _loads_or_refuses(recipe_from_dict, data, base_dir=fuzz_folder, where="fuzz.yaml")


DOTTED_KEYS = [
    "name", "sources", "sources.0", "sources.0.name", "sources.0.root", "sources.0.patterns", "sources.0.bands",
    "sources.0.manifest", "sources.0.exclude_lists", "sources.0.optical", "sources.0.extra", "benchmarks",
    "benchmarks.0", "benchmarks.0.root", "benchmarks.0.manifest", "benchmarks.0.patterns", "exclude",
    "exclude.min_side", "exclude.max_nodata_fraction", "exclude.min_std", "slice", "slice.tile_size",
    "slice.max_side", "slice.overlap", "slice.edge", "dedup.max_distance", "shard.max_samples",
    "shard.image_format", "shard.jpeg_quality", "shard.shuffle_seed", "unknown",
]  # fmt: skip


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(DOTTED_KEYS), st.one_of(TRICKY, SCALARS, VALUES, st.just(DELETE))),
        max_size=4,
    )
)
def test_fuzz_mutated_valid_recipe(fuzz_folder: Path, edits: list[tuple[str, Any]]) -> None:
    data = valid_recipe()
    for key, value in edits:
        try:
            data = edited(data, key, value)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue  # the edit's parent is no longer a mapping or list: skip that edit
    recipe = _loads_or_refuses(recipe_from_dict, data, base_dir=fuzz_folder, where="fuzz.yaml")
    if not edits:
        assert recipe is not None and recipe.slice.overlap == 32


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)), cut=st.integers(0, 400))
def test_fuzz_yaml_text(fuzz_folder: Path, text: str | bytes, cut: int) -> None:
    """Arbitrary bytes and text, and a valid recipe file cut short or spliced with them."""
    valid = yaml.safe_dump(valid_recipe(), sort_keys=False)
    path = fuzz_folder / "fuzz.yaml"
    for content in (text, valid[:cut] + (text if isinstance(text, str) else "") + valid[cut:], valid[:cut]):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        _loads_or_refuses(load_recipe, path)
