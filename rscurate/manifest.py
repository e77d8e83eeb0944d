"""Dataset manifests: how a public dataset lies on disk, where to get it, and which of its files are held out.

A source manifest (`manifests/sources/*.yaml`, `kind: source`) describes one dataset a recipe can draw
tiles from. A benchmark manifest (`manifests/benchmarks/*.yaml`, `kind: benchmark`) describes an
evaluation set whose test images are decontamination targets. A recipe entry points at one with
`manifest:` and inherits `patterns`, `ignore_patterns`, `exclude_patterns`, `exclude_lists`, `task`,
`optical` and `bands` from it (see manifests/README.md).

Validation follows recipe.py: an unknown key, a wrong type or a bad value is a `ManifestError` whose
message names the file, the key and what to change.

Glob semantics, shared by the scanner and the exclusion matcher: patterns are POSIX paths relative to the
dataset root, matched like `pathlib.Path.glob` on Linux (`glob_match`). `*`, `?` and `[...]` match within
one path segment; a segment that is exactly `**` matches zero or more whole segments. The scanner compares
file extensions case-insensitively, and so does `held_out_matcher`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rscurate.schema import SUPPORTED_EXTENSIONS, RecipeError, build, did_you_mean, read_yaml

# `mixed`: a corpus already curated from datasets of several tasks (the released OpticalRS archives).
TASKS = ("scene_classification", "detection", "segmentation", "change_detection", "event", "mixed")
# How two datasets share pixels; `same_pixels` groups keep one member in a recipe.
OVERLAP_RELATIONS = (
    "same_pixels",  # the same image files (possibly re-encoded), different labels
    "contains",  # this dataset includes (part of) the other's images
    "contained_in",  # the other dataset includes (part of) this one's images
    "derived_from",  # re-cut, re-tiled or resampled from the other's images
    "shares_imagery",  # same provider and area, different cuts or resolutions
)
BIT_DEPTHS = (8, 16)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class ManifestError(RecipeError):
    """A mistake in a dataset manifest that the user can fix."""


@dataclass(frozen=True)
class Overlap:
    """This dataset shares pixels with `dataset` (a manifest name, or a plain name when we have none)."""

    dataset: str
    relation: str
    note: str = ""


@dataclass(frozen=True)
class Split:
    """One official split as it lies under the root: documentation, not a selector."""

    name: str
    where: str
    count: int | None = None
    note: str = ""


@dataclass(frozen=True)
class SourceManifest:
    name: str
    kind: str
    title: str
    homepage: str
    licence: str
    task: str
    optical: bool
    # Conventional folder name under DATA_ROOT; recipes use root: ${DATA_ROOT}/<folder>.
    folder: str
    layout: str
    patterns: tuple[str, ...]
    # True when including this dataset (or any choice below) is ours, not the paper's.
    reconstruction: bool
    download: str = ""
    bands: tuple[int, ...] | None = None
    bit_depth: int = 8
    image_count: int | None = None
    # [smallest side, largest side] in pixels over the dataset's images.
    image_size: tuple[int, ...] | None = None
    gsd: str = ""
    # Files the patterns pick that are not imagery (masks, annotation rasters): dropped before the scan.
    ignore_patterns: tuple[str, ...] = ()
    # Held out as benchmark test data: globs relative to root, and split-list files relative to root.
    exclude_patterns: tuple[str, ...] = ()
    exclude_lists: tuple[str, ...] = ()
    exclude_note: str = ""
    splits: tuple[Split, ...] = ()
    overlaps: tuple[Overlap, ...] = ()
    notes: str = ""
    reconstruction_notes: str = ""
    # Field names whose values could not be checked against a primary source.
    unverified: tuple[str, ...] = ()
    # Where the manifest was read from; not a YAML key.
    path: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BenchmarkManifest:
    name: str
    kind: str
    title: str
    homepage: str
    licence: str
    task: str
    folder: str
    layout: str
    # Which split the paper's numbers are computed on.
    evaluated_split: str
    # The test images to hash against (globs relative to root); what the recipe's benchmark entry inherits.
    patterns: tuple[str, ...]
    # True when the evaluated split is our assumption rather than published by the SelectiveMAE authors.
    reconstruction: bool
    download: str = ""
    metric: str = ""
    test_count: int | None = None
    # Split-list files (relative to root) that name the evaluated test images, where the dataset ships them.
    test_lists: tuple[str, ...] = ()
    # The source manifest whose images include these test images; its exclude_patterns must cover `patterns`.
    source: str | None = None
    overlaps: tuple[Overlap, ...] = ()
    notes: str = ""
    reconstruction_notes: str = ""
    unverified: tuple[str, ...] = ()
    path: str | None = field(default=None, compare=False)


Manifest = SourceManifest | BenchmarkManifest
_KINDS: dict[str, type[SourceManifest] | type[BenchmarkManifest]] = {
    "source": SourceManifest,
    "benchmark": BenchmarkManifest,
}


# ---------------------------------------------------------------- globs


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` is not a usable file glob relative to a dataset root, or None if it is."""
    if not isinstance(pattern, str) or not pattern.strip():
        return "is empty"
    if pattern != pattern.strip():
        return "has leading or trailing spaces"
    if "\\" in pattern:
        return "uses a backslash; write paths with '/'"
    if pattern.startswith("/"):
        return "is absolute; write it relative to the dataset root"
    if "{" in pattern or "}" in pattern:
        return "uses braces, which are not glob syntax here; list each alternative as its own pattern"
    segments = pattern.split("/")
    for seg in segments:
        if seg == "":
            return "has an empty path segment ('//' or a trailing '/')"
        if seg in (".", ".."):
            return f"has a {seg!r} segment; patterns must stay inside the dataset root"
        if "**" in seg and seg != "**":
            return f"has '**' inside the segment {seg!r}; '**' must be a whole segment, as in 'a/**/*.png'"
        if not _brackets_closed(seg):
            return f"has an unclosed '[' in {seg!r}"
    if segments[-1] == "**":
        return "ends in '**', which picks folders, not files; end it with a file pattern such as '**/*.png'"
    return None


def _brackets_closed(seg: str) -> bool:
    i = 0
    while i < len(seg):
        if seg[i] == "[":
            j = i + 1
            if j < len(seg) and seg[j] == "!":
                j += 1
            if j < len(seg) and seg[j] == "]":
                j += 1
            while j < len(seg) and seg[j] != "]":
                j += 1
            if j >= len(seg):
                return False
            i = j
        i += 1
    return True


def _segment_regex(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < len(seg) and seg[j] == "!":
                j += 1
            if j < len(seg) and seg[j] == "]":
                j += 1
            while seg[j] != "]":
                j += 1
            body = seg[i + 1 : j]
            # As in fnmatch: only '!' negates; '^', '[', ']' and '\\' inside are literal members.
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            for ch in "\\^[]":
                body = body.replace(ch, "\\" + ch)
            # A negated class never matches '/', as in pathlib where it only sees one segment.
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    problem = glob_problem(pattern)
    if problem:
        raise ValueError(f"glob {pattern!r} {problem}")
    parts: list[str] = []
    for seg in pattern.split("/")[:-1]:
        parts.append("(?:[^/]+/)*" if seg == "**" else _segment_regex(seg) + "/")
    parts.append(_segment_regex(pattern.split("/")[-1]))
    return re.compile("".join(parts))


def glob_match(relpath: str, pattern: str) -> bool:
    """Whether the POSIX path `relpath` (relative to a root) is one that `root.glob(pattern)` yields."""
    return _compile(pattern).fullmatch(relpath) is not None


def matches_any(relpath: str, patterns: typing.Iterable[str]) -> bool:
    return any(glob_match(relpath, p) for p in patterns)


# ---------------------------------------------------------------- what a recipe entry inherits

# Keys a recipe's source entry takes from its manifest unless the entry sets them itself.
SOURCE_INHERITED = (
    "task",
    "optical",
    "bands",
    "patterns",
    "ignore_patterns",
    "exclude_patterns",
    "exclude_lists",
)
# Keys a recipe's benchmark entry takes from its manifest (`patterns` = the test images to hash).
BENCHMARK_INHERITED = ("patterns",)


def inherited_fields(manifest: Manifest) -> dict[str, Any]:
    """The recipe-entry keys `manifest` supplies, as plain YAML-like data (lists, not tuples).

    A recipe resolves an entry as `{**inherited_fields(m), **entry}` minus `manifest`: keys the entry sets win.
    """
    keys = SOURCE_INHERITED if isinstance(manifest, SourceManifest) else BENCHMARK_INHERITED
    out: dict[str, Any] = {}
    for key in keys:
        value = getattr(manifest, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------- held-out files


def read_exclude_list(path: str | Path) -> frozenset[str]:
    """Image stems named by a split-list file.

    Each non-blank line not starting with '#' names one image by its first whitespace-separated token:
    an ID (`11726`), a file name (`beach_298.jpg`) or a path (`Beach/beach_298.jpg`). The folder part is
    dropped, and the extension too when it is an image extension, so the result compares with a file's stem.
    """
    stems: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stems.add(list_entry_stem(line.split()[0]))
    return frozenset(stems)


def list_entry_stem(entry: str) -> str:
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and f".{ext.lower()}" in SUPPORTED_EXTENSIONS:
        return stem
    return name


def held_out_matcher(spec: SourceManifest | Any, root: str | Path) -> Callable[[str], bool]:
    """A predicate on root-relative POSIX paths: True for files held out as benchmark test data.

    `spec` is a source manifest or a recipe source (anything with `exclude_patterns` and `exclude_lists`).
    A file is held out when it matches one of `exclude_patterns`, or when its stem (file name without the
    image extension) is named in one of `exclude_lists`. A missing list file is an error, not a silent
    pass: without it the benchmark's test images would be trained on.
    """
    label = getattr(spec, "manifest", None) or getattr(spec, "path", None) or spec.name
    title = getattr(spec, "title", spec.name)
    homepage = getattr(spec, "homepage", None)
    stems: set[str] = set()
    for i, rel in enumerate(spec.exclude_lists):
        list_path = Path(root) / rel
        if not list_path.is_file():
            where = f" (get it from {homepage})" if homepage else ""
            raise ManifestError(
                f"{label}: exclude_lists[{i}]: {list_path} not found; it names the test images of {title} "
                f"that must be held out. Lay the dataset out as the manifest's `layout` shows{where}, "
                "or fix the path"
            )
        stems |= read_exclude_list(list_path)
    patterns = spec.exclude_patterns
    folded = tuple(_fold_extension(p) for p in patterns)
    frozen = frozenset(stems)

    def held_out(relpath: str) -> bool:
        # The extension compares case-insensitively, as the scanner picks files: a `.JPG` the scan took
        # through `*.jpg` must not slip past a `test/*.jpg` hold-out.
        if matches_any(relpath, patterns) or matches_any(_fold_extension(relpath), folded):
            return True
        return bool(frozen) and list_entry_stem(relpath) in frozen

    return held_out


def _fold_extension(path: str) -> str:
    """`path` with the extension of its last segment lower-cased."""
    head, _, last = path.rpartition("/")
    stem, dot, ext = last.rpartition(".")
    if not dot or not stem:
        return path
    return f"{head}/{stem}.{ext.lower()}" if head else f"{stem}.{ext.lower()}"


def missing_source_message(manifest: Manifest, root: str | Path) -> str:
    """One line for a dataset folder that is not there: which dataset, which path, where to get it."""
    first = manifest.patterns[0]
    more = f" (and {len(manifest.patterns) - 1} more patterns)" if len(manifest.patterns) > 1 else ""
    where = f"{manifest.homepage}" + (f"; download: {manifest.download}" if manifest.download else "")
    return (
        f"{manifest.name}: {manifest.title} not found at {root} (expected files like {root}/{first}{more}); "
        f"get it from {where}, then point the recipe's root at it or set DATA_ROOT"
    )


# ---------------------------------------------------------------- loading


def load_source_manifest(path: str | Path) -> SourceManifest:
    manifest = _load(path, "source")
    assert isinstance(manifest, SourceManifest)
    return manifest


def load_benchmark_manifest(path: str | Path) -> BenchmarkManifest:
    manifest = _load(path, "benchmark")
    assert isinstance(manifest, BenchmarkManifest)
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    """Either kind, chosen by the file's `kind:` key."""
    return _load(path, None)


def iter_manifests(folder: str | Path) -> Iterator[Manifest]:
    """Every `*.yaml` manifest under `folder` (recursively), sorted by path, each validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: manifest folder not found")
    for path in sorted(folder.rglob("*.yaml")):
        yield load_manifest(path)


def manifest_from_dict(data: Any, *, where: str = "manifest", expected_kind: str | None = None) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: a manifest must be a mapping of keys (name, kind, title, ...)")
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ManifestError(f"{where}: kind: {kind!r}; write `kind: source` or `kind: benchmark`")
    if expected_kind is not None and kind != expected_kind:
        raise ManifestError(
            f"{where}: kind: is {kind!r} but a {expected_kind} manifest was expected; "
            f"{expected_kind} manifests live in manifests/{expected_kind}s/"
        )
    manifest = build(_KINDS[kind], data, where, "", ManifestError)
    manifest = dataclasses.replace(manifest, path=where)
    _check(manifest, where)
    return manifest


def _load(path: str | Path, expected_kind: str | None) -> Manifest:
    path = Path(path)
    where = str(path)
    data = read_yaml(path, "manifest", ManifestError)
    manifest = manifest_from_dict(data, where=where, expected_kind=expected_kind)
    if manifest.name != path.stem:
        raise ManifestError(
            f"{where}: name: {manifest.name!r} differs from the file name {path.name!r}; "
            f"rename the file to {manifest.name}.yaml or set name: {path.stem}"
        )
    return manifest


def _check(m: Manifest, where: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ManifestError(f"{where}: {key}: {msg}")

    if not _NAME.match(m.name):
        fail(
            "name",
            f"{m.name!r}: use lower-case letters, digits, '_', '-', '.', starting with a letter or digit",
        )
    for key in ("title", "homepage", "licence", "folder", "layout"):
        if not getattr(m, key).strip():
            fail(key, "must not be empty")
    if any(c.isspace() for c in m.homepage):
        fail("homepage", f"{m.homepage!r} contains spaces; give one address")
    if "/" in m.folder or "\\" in m.folder or m.folder in (".", ".."):
        fail("folder", f"{m.folder!r}: give one folder name (no '/'), the dataset's folder under DATA_ROOT")
    if m.task not in TASKS:
        hint = did_you_mean(m.task, TASKS)
        fail("task", f"{m.task!r} is not a task; use one of {', '.join(TASKS)}{hint}")
    if not m.patterns:
        fail(
            "patterns", "give at least one glob that picks the dataset's images, such as 'train/images/*.png'"
        )
    globs: list[tuple[str, tuple[str, ...]]] = [("patterns", m.patterns)]
    if isinstance(m, SourceManifest):
        globs += [("ignore_patterns", m.ignore_patterns), ("exclude_patterns", m.exclude_patterns)]
    for key, values in globs:
        for i, pattern in enumerate(values):
            problem = glob_problem(pattern)
            if problem:
                fail(f"{key}[{i}]", f"{pattern!r} {problem}")
    lists = m.exclude_lists if isinstance(m, SourceManifest) else m.test_lists
    list_key = "exclude_lists" if isinstance(m, SourceManifest) else "test_lists"
    for i, rel in enumerate(lists):
        if (
            not rel.strip()
            or rel.startswith("/")
            or "\\" in rel
            or ".." in rel.split("/")
            or any(c in rel for c in "*?[")
        ):
            fail(
                f"{list_key}[{i}]",
                f"{rel!r}: give the list file's path relative to the dataset root, without wildcards",
            )
    for i, o in enumerate(m.overlaps):
        if not o.dataset.strip():
            fail(f"overlaps[{i}].dataset", "name the other dataset")
        if o.relation not in OVERLAP_RELATIONS:
            fail(f"overlaps[{i}].relation", f"{o.relation!r}: use one of {', '.join(OVERLAP_RELATIONS)}")
    known = {f.name for f in dataclasses.fields(m) if f.name != "path"}
    for i, key in enumerate(m.unverified):
        if key not in known:
            fail(
                f"unverified[{i}]",
                f"{key!r} is not a field of this manifest; list field names such as 'layout'{did_you_mean(key, known)}",
            )
    if m.reconstruction and not m.reconstruction_notes.strip():
        fail(
            "reconstruction_notes",
            "say what is our reconstruction rather than the paper's (reconstruction is true)",
        )
    if isinstance(m, BenchmarkManifest):
        if not m.evaluated_split.strip():
            fail("evaluated_split", "name the split the paper's numbers are computed on")
        if m.test_count is not None and m.test_count < 1:
            fail("test_count", "must be at least 1")
        if m.source is not None and not _NAME.match(m.source):
            fail("source", f"{m.source!r}: give the name of a manifest in manifests/sources/")
        return
    if m.bands is not None and (len(m.bands) not in (1, 3) or any(b < 1 for b in m.bands)):
        fail("bands", "give 3 (or 1) band indices, counting from 1, or leave the key out for plain RGB")
    if m.bit_depth not in BIT_DEPTHS:
        fail("bit_depth", f"{m.bit_depth}: use 8 or 16")
    if m.image_count is not None and m.image_count < 1:
        fail("image_count", "must be at least 1, or leave the key out when unknown")
    if m.image_size is not None and (len(m.image_size) != 2 or not 1 <= m.image_size[0] <= m.image_size[1]):
        fail("image_size", "give [smallest side, largest side] in pixels, smallest first")
    if (m.exclude_patterns or m.exclude_lists) and not m.exclude_note.strip():
        fail("exclude_note", "say which benchmark test split the held-out files are")
    for i, s in enumerate(m.splits):
        if s.count is not None and s.count < 0:
            fail(f"splits[{i}].count", "must not be negative")
