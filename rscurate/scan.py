"""Pass 1: walk the source roots, read image headers and hash file contents -> the inputs table.

`list_files` walks (symlink loops never hang it; a symlink that leaves the source root is listed as an
error, not followed) and `run` reads each listed file: size, sha256 of its bytes, and the header fields
(format, size, bands, dtype, CRS, nodata) without decoding pixels. A file that cannot be read gets
status `error` and a reason a person understands; the run goes on. Archives (a root that is one, or
archives in a root folder) are listed member by member and read without unpacking (rscurate.archive).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd

from rscurate import archive, fs
from rscurate.manifest import glob_problem, matches_any
from rscurate.raster import WHOLE_READ_BYTES, UnreadableImage, fs_path, path_text, read_header
from rscurate.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

LIST_COLUMNS = ["source", "path", "relpath", "status", "reason"]
INPUT_COLUMNS = [
    "source",
    "path",
    "relpath",
    "size_bytes",
    "sha256",
    "format",
    "width",
    "height",
    "bands",
    "dtype",
    "crs",
    "nodata",
    "status",
    "reason",
]
OUTSIDE_ROOT = "symlink outside the source root (not followed)"


# --------------------------------------------------------------------------------------------------
# Patterns


def _fold_extension(path: str) -> str:
    """Lower-case the extension of the last path component: extensions match case-insensitively."""
    slash = path.rfind("/")
    dot = path.rfind(".")
    if dot > slash + 1:
        return path[:dot] + path[dot:].lower()
    return path


def compile_patterns(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A matcher for '/'-separated paths relative to a root.

    Glob semantics are manifest.glob_match's (pathlib's: `*`, `?`, `[...]` within a segment, a `**`
    segment for any depth), except that the file extension matches case-insensitively, so `**/*.jpg`
    also picks `DJI_0005.JPG`. A malformed pattern is a RecipeError naming it.
    """
    folded = []
    for p in patterns:
        problem = glob_problem(p)
        if problem:
            raise RecipeError(f"pattern {p!r} {problem}")
        folded.append(_fold_extension(p))
    return lambda relpath: matches_any(_fold_extension(relpath), folded)


# --------------------------------------------------------------------------------------------------
# Walking


def walk(root: str, patterns: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """Files under `root` matching `patterns`, as (relpath, absolute path, error reason or None), sorted.

    `root` may be an archive (.zip, .tar, .tar.gz, ...) and a folder may hold archives: their members
    are listed as files (see _archive_entries); an archive that cannot be read raises ArchiveError.

    Symlinks inside the root are followed; a folder reached twice (a loop, or two links to one folder)
    is walked once. A symlink leading out of the root is listed with a reason instead of followed, as
    is a folder whose name matches the patterns, a broken symlink, or a fifo/socket/device.
    """
    match = compile_patterns(patterns)
    if fs.is_url(root):  # an object store or an http folder listing: no symlinks, no special files
        return [(rel, url, None) for rel, url in fs.find(root) if match(rel)]
    root = os.path.abspath(root)
    if archive.is_archive_name(root) and os.path.isfile(root):  # the root itself is an archive
        return [entry[1:] for entry in _archive_entries(root, "", match)]
    root_real = os.path.realpath(root)

    def inside(real: str) -> bool:
        return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)

    found: list[tuple[str, str, str | None]] = []
    archives: list[tuple[str, str]] = []  # (relpath, path) of the archives met, listed at the end
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            st = os.stat(abs_dir)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                log.debug("%s: already walked (symlink loop or alias), skipped", abs_dir)
                continue
            seen.add(key)
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            found.append((rel_dir or ".", abs_dir, "permission denied: the folder could not be listed"))
            continue
        except OSError as exc:
            found.append((rel_dir or ".", abs_dir, f"the folder could not be listed ({exc.strerror or exc})"))
            continue
        subdirs = []
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    if not os.path.exists(real):
                        if match(rel):
                            found.append((rel, e.path, _broken_link_reason(e.path)))
                    elif not inside(real):
                        # A linked folder is listed whatever its name: its images would otherwise vanish silently.
                        if os.path.isdir(real) or match(rel):
                            found.append((rel, e.path, f"{OUTSIDE_ROOT}: -> {real}"))
                    elif os.path.isdir(real):
                        subdirs.append(rel)
                    elif archive.is_archive_name(e.name) and os.path.isfile(real):
                        archives.append((rel, e.path))
                    elif match(rel):
                        found.append((rel, e.path, _special_reason(real)))
                elif e.is_dir(follow_symlinks=False):
                    if match(rel):
                        found.append((rel, e.path, "a directory, not a file (its name looks like an image)"))
                    subdirs.append(rel)
                elif archive.is_archive_name(e.name) and e.is_file(follow_symlinks=False):
                    archives.append((rel, e.path))
                elif match(rel):
                    # is_file() answers from the directory entry; stat only the rare other kinds.
                    regular = e.is_file(follow_symlinks=False)
                    found.append((rel, e.path, None if regular else _special_reason(e.path)))
            except OSError as exc:
                if match(rel):
                    found.append((rel, e.path, f"cannot read the file ({exc.strerror or exc})"))
        stack.extend(reversed(subdirs))
    keyed = [(rel, rel, path, reason) for rel, path, reason in found]
    for rel, path in archives:
        folder = rel.rpartition("/")[0]
        keyed += _archive_entries(path, f"{folder}/" if folder else "", match, order_key=rel)
    keyed.sort(key=lambda t: t[0])
    return [entry[1:] for entry in keyed]


def _archive_entries(
    path: str, prefix: str, match: Callable[[str], bool], order_key: str = ""
) -> list[tuple[str, str, str, str | None]]:
    """(sort key, relpath, path, reason) of the members of an archive that match, in archive order.

    A member's relpath is where it would lie after unpacking the archive in its own folder (`prefix`):
    shards, patterns and held-out lists then see the same paths as for the unpacked dataset. Its path
    is `ARCHIVE!INNER` (rscurate.archive). The sort key of a zip or tar member is its relpath; the
    members of a compressed tar keep the archive's order, as one block, because only that order reads
    it without decompressing it again.
    """
    streamed = archive.is_compressed_tar(path)
    out = []
    for i, member in enumerate(archive.list_members(path)):
        inner = posixpath.normpath(member.name.lstrip("/")) if member.name.strip("/.") else ""
        if not inner or inner.startswith("../") or member.kind == "dir":
            continue
        rel = prefix + inner
        if not match(rel):
            continue
        reason = None
        if member.kind == "link":
            reason = "a link inside an archive (not followed)"
        elif member.kind != "file":
            reason = "not a regular file (inside an archive)"
        key = f"{order_key}\x00{i:012d}" if streamed else rel
        out.append((key, rel, archive.member_path(path, member.name), reason))
    return out


def _broken_link_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
    return "broken symlink (its target does not exist)"


def _special_reason(path: str) -> str | None:
    """None for a regular file; a reason for a fifo, socket or device (opening a fifo would block)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    kind = "a fifo" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind})"


def list_files(recipe: Recipe) -> pd.DataFrame:
    """Every file matched under each source root: source, path (absolute), relpath, status, reason.

    Sorted by recipe source order, then relpath. `status` is None for files to read, 'error' for what the
    walk already knows cannot be read (symlink out of the root, folder named like an image, ...).
    """
    rows: list[dict[str, Any]] = []
    for src in recipe.sources:
        ignored = compile_patterns(src.ignore_patterns) if src.ignore_patterns else None
        for relpath, path, reason in walk(src.root, src.patterns):
            if ignored is not None and ignored(relpath):
                continue  # masks and annotation rasters the source manifest says are not imagery
            rows.append(
                {
                    "source": src.name,
                    # Names that are not UTF-8 as text with \xNN escapes (raster.path_text): tables are UTF-8.
                    "path": path_text(path),
                    "relpath": path_text(relpath),
                    "status": "error" if reason else None,
                    "reason": path_text(reason) if reason else None,
                }
            )
        log.info(
            "source %s: %d files matched under %s",
            src.name,
            sum(r["source"] == src.name for r in rows),
            src.root,
        )
    return pd.DataFrame(rows, columns=LIST_COLUMNS)


def list_benchmark_files(recipe: Recipe) -> pd.DataFrame:
    """Every file matched under each benchmark root: benchmark, path, relpath, status, reason."""
    rows: list[dict[str, Any]] = []
    for bench in recipe.benchmarks:
        for relpath, path, reason in walk(bench.root, bench.patterns):
            rows.append(
                {
                    "benchmark": bench.name,
                    "path": path_text(path),
                    "relpath": path_text(relpath),
                    "status": "error" if reason else None,
                    "reason": path_text(reason) if reason else None,
                }
            )
    return pd.DataFrame(rows, columns=["benchmark", "path", "relpath", "status", "reason"])


# --------------------------------------------------------------------------------------------------
# Reading


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def scan_file(path: str) -> dict[str, Any]:
    """Size, sha256 and header fields of one file; status 'ok' or 'error' with a reason.

    A file of up to raster.WHOLE_READ_BYTES (every chip, most scenes) is read once: the same bytes give
    the hash and the header. A file inside an archive is read whole (rscurate.archive).
    """
    rec: dict[str, Any] = {c: None for c in INPUT_COLUMNS[3:]}
    path = fs_path(path)
    data: bytes | None = None
    try:
        if archive.is_member(path):
            data = archive.read_member(path)
            rec["size_bytes"] = len(data)
            rec["sha256"] = hashlib.sha256(data).hexdigest()
        elif fs.is_url(path):
            rec["size_bytes"] = fs.size(path)
            rec["sha256"] = fs.sha256(path)
        else:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise UnreadableImage("a directory, not a file (its name looks like an image)")
            if not stat.S_ISREG(st.st_mode):
                raise UnreadableImage("not a regular file")
            rec["size_bytes"] = st.st_size
            if st.st_size <= WHOLE_READ_BYTES:
                with open(path, "rb") as f:
                    data = f.read()
                rec["sha256"] = hashlib.sha256(data).hexdigest()
            else:
                rec["sha256"] = file_sha256(path)
        info = read_header(path, data)
    except archive.MemberError as exc:
        rec.update(status="error", reason=exc.reason)
        return rec
    except archive.ArchiveError:
        raise  # the whole archive is unreadable: the run stops with its name
    except UnreadableImage as exc:
        rec.update(status="error", reason=path_text(exc.reason))  # GDAL's messages may hold the name
        return rec
    except PermissionError:
        rec.update(status="error", reason="permission denied")
        return rec
    except FileNotFoundError:
        reason = (
            "broken symlink (its target does not exist)"
            if os.path.islink(path)
            else "file not found (removed during the run?)"
        )
        rec.update(status="error", reason=reason)
        return rec
    except OSError as exc:
        rec.update(status="error", reason=path_text(f"cannot read the file ({exc.strerror or exc})"))
        return rec
    except Exception as exc:  # a bug or an exotic file must not stop a scan of millions of files
        log.debug("%s: reading the header failed", path_text(path), exc_info=True)
        rec.update(status="error", reason=path_text(f"unexpected error ({type(exc).__name__}: {exc})"))
        return rec
    rec.update(
        format=info.format,
        width=info.width,
        height=info.height,
        bands=info.bands,
        dtype=info.dtype,
        crs=info.crs,
        nodata=info.nodata,
        status="ok",
        reason=None,
    )
    return rec


def run(files: pd.DataFrame) -> pd.DataFrame:
    """Pass 1 over a partition of `list_files` rows: adds the header and hash columns of INPUT_COLUMNS."""
    records = []
    n = len(files)
    presets = files["status"].tolist() if "status" in files else [None] * n
    reasons = files["reason"].tolist() if "reason" in files else [None] * n
    for source, path, relpath, preset, reason in zip(
        files["source"].tolist(),
        files["path"].tolist(),
        files["relpath"].tolist(),
        presets,
        reasons,
        strict=True,
    ):
        if preset == "error":
            rec: dict[str, Any] = {c: None for c in INPUT_COLUMNS[3:]}
            rec.update(status="error", reason=reason)
        else:
            rec = scan_file(path)
            if rec["status"] == "error":
                log.info("%s: %s", path, rec["reason"])
        records.append({"source": source, "path": path, "relpath": relpath, **rec})
    return to_inputs_frame(records)


def to_inputs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The inputs table of scanned records, its columns typed (built column by column: a frame per
    chunk of files is built often, and from dicts row by row it costs more than scanning small files)."""
    columns: dict[str, Any] = {c: [r[c] for r in records] for c in INPUT_COLUMNS}
    for col in ("size_bytes", "width", "height", "bands"):
        columns[col] = pd.array(columns[col], dtype="Int64")
    columns["nodata"] = pd.array(columns["nodata"], dtype="Float64")
    return pd.DataFrame(columns, columns=INPUT_COLUMNS)
