"""The curation recipe: a YAML file, validated into typed dataclasses, one per section.

Defaults < YAML. An unknown key, a wrong type, a missing root or a value out of range is a
`RecipeError` whose message names the file, the key and what to change; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rscurate import archive, fs
from rscurate import manifest as manifests
from rscurate.schema import SUPPORTED_EXTENSIONS, RecipeError, build, read_yaml

DEFAULT_PATTERNS = tuple(f"**/*{ext}" for ext in SUPPORTED_EXTENSIONS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class SourceConfig:
    name: str
    root: str
    task: str = "unspecified"
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    bands: tuple[int, ...] | None = None
    optical: bool = True
    # Files held out because they belong to a benchmark's test split (reason `benchmark`): exact paths, globs and
    # split-list files, all relative to `root`. A source manifest supplies the globs and lists.
    exclude_paths: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    exclude_lists: tuple[str, ...] = ()
    # Files the patterns pick that are not imagery (masks, annotation rasters): never scanned.
    ignore_patterns: tuple[str, ...] = ()
    # A manifest under manifests/sources/ (relative to the recipe) that supplies the keys above.
    manifest: str | None = None


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str
    root: str
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    manifest: str | None = None


@dataclass(frozen=True)
class ExcludeConfig:
    min_side: int = 64
    max_nodata_fraction: float = 0.5
    benchmark_max_distance: int = 4
    # A tile whose 8-bit luminance has a standard deviation below this is `blank` (near-constant).
    min_std: float = 2.0
    # Benchmark decontamination beyond the image as it is (rscurate.decontam): its 8 flips/rotations,
    # sub-windows down to crop_min of its sides, windows of larger scenes; hash matches up to
    # verify_distance are confirmed on pixels (correlation >= verify_score).
    benchmark_invariant: str = "dihedral"
    benchmark_crop_min: float | None = 0.5
    benchmark_crop_step: float = 0.035
    benchmark_scene_windows: int = 131072
    benchmark_verify_distance: int = 6
    benchmark_verify_score: float = 0.5


@dataclass(frozen=True)
class SliceConfig:
    max_side: int = 1024
    tile_size: int = 512
    overlap: int = 0
    edge: str = "shift"


@dataclass(frozen=True)
class DedupConfig:
    max_distance: int = 4
    # `dihedral`: a flipped or 90-degree-rotated copy is a near-duplicate too (rscurate.dedup)
    invariant: str = "none"


@dataclass(frozen=True)
class ShardConfig:
    max_samples: int = 1000
    image_format: str = "jpg"
    jpeg_quality: int = 95
    shuffle_seed: int = 0
    # auto: a whole 8-bit RGB JPEG (PNG for png shards) that needs no change goes in as the file's bytes;
    # always: every tile is encoded anew.
    reencode: str = "auto"


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[SourceConfig, ...]
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    exclude: ExcludeConfig = field(default_factory=ExcludeConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    # Where the recipe was read from, and the sources left out by --allow-missing: not YAML keys.
    path: str | None = field(default=None, compare=False)
    missing: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})

    def source_order(self) -> dict[str, int]:
        """Recipe position of each source: lower wins dedup ties."""
        return {s.name: i for i, s in enumerate(self.sources)}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        data.pop("missing")
        return _plain(data)

    def fingerprint(self) -> str:
        """Hash of everything that changes the outputs; a resumed run must match it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _held_out_by(b: BenchmarkConfig, s: SourceConfig) -> bool:
    """A benchmark may share a source's root when the source's manifest holds exactly its test files out."""
    if not (b.manifest and s.manifest):
        return False
    bm = manifests.load_benchmark_manifest(b.manifest)
    sm = manifests.load_source_manifest(s.manifest)
    return bm.source == sm.name and set(b.patterns) <= set(s.exclude_patterns)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_recipe(
    path: str | os.PathLike[str], *, check_roots: bool = True, allow_missing: bool = False
) -> Recipe:
    """Read, expand and validate a recipe file.

    A source whose root folder is missing is an error, unless `allow_missing`: then it is left out and its
    one-line explanation lands in `Recipe.missing`. A missing benchmark root is always an error.
    """
    path = Path(path)
    where = str(path)
    data = read_yaml(path, "recipe")
    return recipe_from_dict(
        data,
        base_dir=path.parent.resolve(),
        where=where,
        check_roots=check_roots,
        allow_missing=allow_missing,
    )


def recipe_from_dict(
    data: Any,
    *,
    base_dir: Path | None = None,
    where: str = "recipe",
    check_roots: bool = True,
    allow_missing: bool = False,
) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the recipe must be a mapping with at least `name` and `sources`")
    base_dir = base_dir or Path.cwd()
    data = dict(data)
    for section in ("sources", "benchmarks"):
        if isinstance(data.get(section), list):
            data[section] = [
                _inherit(entry, base_dir, where, f"{section}[{i}]") for i, entry in enumerate(data[section])
            ]
    recipe = build(Recipe, data, where)
    sources = tuple(
        dataclasses.replace(s, root=_resolve_root(s.root, base_dir, where, f"sources[{i}].root"))
        for i, s in enumerate(recipe.sources)
    )
    benchmarks = tuple(
        dataclasses.replace(b, root=_resolve_root(b.root, base_dir, where, f"benchmarks[{i}].root"))
        for i, b in enumerate(recipe.benchmarks)
    )
    missing: list[str] = []
    if check_roots and allow_missing:
        present = []
        for s in sources:
            if "://" in s.root or _is_dir(s.root):
                present.append(s)
            else:
                missing.append(_missing_message(s))
        sources = tuple(present)
    recipe = dataclasses.replace(
        recipe, sources=sources, benchmarks=benchmarks, path=where, missing=tuple(missing)
    )
    _check(recipe, where, check_roots)
    return recipe


def _inherit(entry: Any, base_dir: Path, where: str, key: str) -> Any:
    """A source or benchmark entry with the keys its `manifest` supplies; keys the entry sets win."""
    if not isinstance(entry, dict) or entry.get("manifest") is None:
        return entry
    ref = entry["manifest"]
    if not isinstance(ref, str):
        raise RecipeError(f"{where}: {key}.manifest: expected a path to a manifest YAML, got {ref!r}")
    path = _absolute(os.path.expanduser(ref), base_dir, where, f"{key}.manifest")
    loader = (
        manifests.load_source_manifest if key.startswith("sources") else manifests.load_benchmark_manifest
    )
    m = loader(path)
    return {**manifests.inherited_fields(m), **entry, "manifest": str(path)}


def _missing_message(s: SourceConfig) -> str:
    if s.manifest:
        return manifests.missing_source_message(manifests.load_source_manifest(s.manifest), s.root)
    return f"{s.name}: folder {s.root} does not exist; fix the path or set the variable it uses"


def _resolve_root(root: str, base_dir: Path, where: str, key: str) -> str:
    def expand(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise RecipeError(f"{where}: {key} uses ${{{name}}}, which is not set; export {name}=... first")
        return os.environ[name]

    expanded = fs.local_path(os.path.expanduser(_ENV.sub(expand, root)))  # file:// is a local folder
    if "://" in expanded:
        problem = fs.protocol_problem(expanded)  # s3:// without s3fs installed, a typo in the scheme
        if problem:
            raise RecipeError(f"{where}: {key}: {expanded}: {problem}")
        return expanded.rstrip("/")
    return str(_absolute(expanded, base_dir, where, key))


def _absolute(path: str, base_dir: Path, where: str, key: str) -> Path:
    """`path` made absolute against the recipe's folder; a path no file system can take is a RecipeError."""
    if "\x00" in path:
        raise RecipeError(f"{where}: {key}: the path contains a NUL character; remove it")
    p = Path(path)
    if p.is_absolute():
        return p
    try:
        return (base_dir / p).resolve()
    except (OSError, RuntimeError) as exc:  # a name too long; a symlink loop (RuntimeError before 3.13)
        raise RecipeError(f"{where}: {key}: cannot resolve {path!r} ({exc}); fix the path") from None


def _is_dir(path: str) -> bool:
    """A root that can be read: a folder, or an archive file (.zip, .tar, .tar.gz, ...; rscurate.archive)."""
    try:
        return Path(path).is_dir() or (archive.is_archive_name(path) and Path(path).is_file())
    except (OSError, ValueError):  # a name too long, say: not a folder the run could read either
        return False


def _check_globs(prefix: str, entry: Any, keys: tuple[str, ...], fail: Any) -> None:
    """Malformed globs are refused here, naming the key, rather than when the scan compiles them."""
    for key in keys:
        for j, pattern in enumerate(getattr(entry, key)):
            problem = manifests.glob_problem(pattern)
            if problem:
                fail(f"{prefix}.{key}[{j}]", f"{pattern!r} {problem}")


def _check(recipe: Recipe, where: str, check_roots: bool) -> None:
    def fail(key: str, msg: str) -> None:
        raise RecipeError(f"{where}: {key}: {msg}")

    if not _NAME.match(recipe.name):
        fail(
            "name",
            f"{recipe.name!r} must start with a letter or digit and use only letters, digits, '_', '-', '.'",
        )
    if not recipe.sources and recipe.missing:
        fail(
            "sources", f"none of the {len(recipe.missing)} source folders exists; first: {recipe.missing[0]}"
        )
    if not recipe.sources:
        fail("sources", "list at least one source dataset")
    seen: set[str] = set()
    for i, s in enumerate(recipe.sources):
        if not _NAME.match(s.name):
            fail(f"sources[{i}].name", f"{s.name!r}: use letters, digits, '_', '-', '.'")
        if s.name in seen:
            fail(f"sources[{i}].name", f"{s.name!r} appears twice; give each source its own name")
        seen.add(s.name)
        if not s.patterns:
            fail(f"sources[{i}].patterns", "give at least one glob pattern, or leave the key out")
        _check_globs(f"sources[{i}]", s, ("patterns", "ignore_patterns", "exclude_patterns"), fail)
        if s.bands is not None and (len(s.bands) not in (1, 3) or any(b < 1 for b in s.bands)):
            fail(f"sources[{i}].bands", "give 3 (or 1) band indices, counting from 1")
        if check_roots and "://" not in s.root and not _is_dir(s.root):
            raise RecipeError(
                f"{where}: sources[{i}].root: {_missing_message(s)} (or run with --allow-missing)"
            )
    for i, b in enumerate(recipe.benchmarks):
        _check_globs(f"benchmarks[{i}]", b, ("patterns",), fail)
        if check_roots and "://" not in b.root and not _is_dir(b.root):
            fail(
                f"benchmarks[{i}].root",
                f"folder {b.root} does not exist; a benchmark must be present to keep it out",
            )
        for s in recipe.sources:
            if "://" not in b.root and Path(b.root) == Path(s.root) and not _held_out_by(b, s):
                fail(
                    f"benchmarks[{i}].root",
                    f"is also the root of source {s.name!r}; a benchmark must be held out, not trained on: point it "
                    "at the test split only, or give both manifests where the source's exclude_patterns cover it",
                )
    ex, sl, dd, sh = recipe.exclude, recipe.slice, recipe.dedup, recipe.shard
    if ex.min_side < 1:
        fail("exclude.min_side", "must be at least 1")
    if not 0.0 <= ex.max_nodata_fraction <= 1.0:
        fail("exclude.max_nodata_fraction", "must lie between 0 and 1")
    if not 0 <= ex.benchmark_max_distance <= 32:
        fail("exclude.benchmark_max_distance", "must lie between 0 and 32 bits")
    if not (math.isfinite(ex.min_std) and ex.min_std >= 0):  # NaN would silently keep every blank tile
        fail("exclude.min_std", f"{ex.min_std!r}: give a number of at least 0 (8-bit luminance levels)")
    if ex.benchmark_invariant not in ("none", "dihedral"):
        fail("exclude.benchmark_invariant", f"{ex.benchmark_invariant!r}: use none or dihedral")
    if ex.benchmark_crop_min is not None and not 0.2 <= ex.benchmark_crop_min < 0.95:
        fail(
            "exclude.benchmark_crop_min",
            f"{ex.benchmark_crop_min!r}: give the smallest crop (fraction of a side) between 0.2 and 0.95, "
            "or null to search whole benchmark images only",
        )
    if not 0.01 <= ex.benchmark_crop_step <= 0.25:
        fail("exclude.benchmark_crop_step", f"{ex.benchmark_crop_step!r}: must lie between 0.01 and 0.25")
    if ex.benchmark_scene_windows < 0:
        fail("exclude.benchmark_scene_windows", "must be at least 0 (0 turns the scene-window search off)")
    if not ex.benchmark_max_distance <= ex.benchmark_verify_distance <= 32:
        fail(
            "exclude.benchmark_verify_distance",
            f"{ex.benchmark_verify_distance} must lie between benchmark_max_distance "
            f"({ex.benchmark_max_distance}) and 32 bits",
        )
    if not (math.isfinite(ex.benchmark_verify_score) and -1.0 <= ex.benchmark_verify_score <= 1.0):
        fail(
            "exclude.benchmark_verify_score",
            f"{ex.benchmark_verify_score!r}: give a correlation between -1 and 1",
        )
    if sl.tile_size < 16:
        fail("slice.tile_size", "must be at least 16 pixels")
    if sl.tile_size > sl.max_side:
        fail(
            "slice.tile_size",
            f"{sl.tile_size} is larger than slice.max_side {sl.max_side}; lower tile_size or raise max_side",
        )
    if not 0 <= sl.overlap < sl.tile_size:
        fail("slice.overlap", f"must be at least 0 and smaller than tile_size ({sl.tile_size})")
    if sl.edge not in ("shift", "pad", "drop"):
        fail("slice.edge", f"{sl.edge!r}: use shift, pad or drop")
    if not 0 <= dd.max_distance <= 32:
        fail("dedup.max_distance", "must lie between 0 and 32 bits")
    if dd.invariant not in ("none", "dihedral"):
        fail("dedup.invariant", f"{dd.invariant!r}: use none or dihedral")
    if sh.max_samples < 1:
        fail("shard.max_samples", "must be at least 1")
    if sh.image_format not in ("jpg", "png"):
        fail("shard.image_format", f"{sh.image_format!r}: use jpg or png")
    if not 1 <= sh.jpeg_quality <= 100:
        fail("shard.jpeg_quality", "must lie between 1 and 100")
    if sh.reencode not in ("auto", "always"):
        fail("shard.reencode", f"{sh.reencode!r}: use auto (copy files that need no change) or always")
