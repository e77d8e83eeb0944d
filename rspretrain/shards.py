"""Where shards are and how many samples they hold: expansion, opening (HTTP(S) with timeouts and retries),
and sample counts from whatever tool wrote them.

Counts come from the first source that lists every shard of a folder:

1. ``sizes.json`` (rscurate: basename -> count),
2. ``_info.json`` (timm's reader_wds layout, which rscurate writes too),
3. ``shardindex.json`` (a wids shard index: ``shardlist[].url`` / ``nsamples``),

then, shard by shard, img2dataset's ``{shard}_stats.json`` (``successes``), and for a local tar with none of
these a scan of its headers (member data is seeked over, never read), cached in ``_sample_counts.json`` next
to the shards when that folder is writable, else under the user's cache folder. A sample is what webdataset
makes of the tar: consecutive members sharing the name up to the first dot.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

log = logging.getLogger(__name__)

SIZE_FILES = ("sizes.json", "_info.json", "shardindex.json")  # per folder, in order of preference
COUNT_CACHE = "_sample_counts.json"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members
_MAX_BACKOFF_S = 30.0
_RETRY_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})  # other 4xx will not get better with time


class DataError(ValueError):
    """A problem with the shards or data options that the user can fix."""


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs and paths from brace patterns, globs, folders (every *.tar inside), files or URLs.

    `spec` is one string or a list; a string may join several specs with ``::`` (webdataset's convention).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if not part:
                continue
            for one in braceexpand.braceexpand(part):
                if is_url(one):
                    shards.append(one)
                    continue
                path = os.path.expanduser(one)
                if os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                elif glob.has_magic(path):
                    found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
                elif os.path.isfile(path):
                    found = [path]
                else:
                    raise DataError(f"shard {one} does not exist; check --shards")
                if not found:
                    raise DataError(f"no shards match {one!r}; check --shards")
                shards.extend(found)
    if not shards:
        raise DataError("no shards given; pass --shards (a brace pattern, glob, folder or URL)")
    return shards


@dataclass(frozen=True)
class UrlPolicy:
    """How hard to try an HTTP(S) shard: seconds per connect or read, extra tries, first backoff in seconds."""

    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0


def open_shard(location: str, policy: UrlPolicy = UrlPolicy()) -> Any:
    """A binary stream of one shard: a local file, an HTTP(S) URL (timeouts, retries with backoff), or any
    other webdataset URL (``pipe:``, ``gs://``, ...) through `wds.gopen`. Raises OSError once it gives up."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    if not location.startswith(("http://", "https://")):
        return wds.gopen(location, "rb")
    error = OSError("not tried")
    for attempt in range(policy.retries + 1):
        try:
            # the timeout bounds the connect and every read of the body: a stalled server cannot hang a worker
            return urllib.request.urlopen(location, timeout=policy.timeout)  # noqa: S310 (http(s) only)
        except urllib.error.HTTPError as exc:
            error = exc
            if exc.code not in _RETRY_HTTP:
                break
        except (OSError, ValueError) as exc:  # refused, reset, timed out, DNS, malformed
            error = exc if isinstance(exc, OSError) else OSError(str(exc))
        if attempt < policy.retries:
            delay = min(policy.backoff * 2**attempt, _MAX_BACKOFF_S)
            log.info(
                "%s: %s; try %d of %d in %.1f s", location, error, attempt + 2, policy.retries + 1, delay
            )
            time.sleep(delay)
    raise OSError(f"{location}: cannot open ({error})")


# --------------------------------------------------------------------------- sample counts


def count_samples(shards: Sequence[str], scan: bool = True) -> int | None:
    """Total samples in `shards`, or None if some shard's count cannot be found (see the module docstring).

    `scan=False` never reads a tar, only the files that list counts.
    """
    by_folder: dict[str, list[str]] = {}
    for shard in shards:
        by_folder.setdefault(_folder(shard), []).append(shard)
    total = 0
    for folder, members in by_folder.items():
        counts = _listed_counts(folder, [_basename(s) for s in members])
        if counts is None:
            counts = _per_shard_counts(folder, members, scan)
        if counts is None:
            return None
        total += sum(counts)
    return total


def _folder(shard: str) -> str:
    return posixpath.dirname(shard) if is_url(shard) else os.path.dirname(os.path.abspath(shard))


def _basename(shard: str) -> str:
    return posixpath.basename(shard) if is_url(shard) else os.path.basename(shard)


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if is_url(folder) else os.path.join(folder, name)


def _read_json(location: str) -> Any | None:
    """The JSON at a path or URL; None if absent, unreachable or not JSON (the caller tries the next source)."""
    try:
        with open_shard(location, UrlPolicy(timeout=30.0, retries=1)) as stream:
            text = stream.read().decode("utf-8")
    except Exception:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; ignoring it", location)
        return None


def _listed_counts(folder: str, names: list[str]) -> list[int] | None:
    """Counts of `names` from the first folder-wide size file that lists them all."""
    for size_file in SIZE_FILES:
        listed = _counts_in(_read_json(_join(folder, size_file)))
        if all(n in listed for n in names):
            return [listed[n] for n in names]
    return None


def _counts_in(info: Any) -> dict[str, int]:
    """basename -> sample count from rscurate's sizes.json, timm's _info.json or a wids shardindex.json."""
    if not isinstance(info, dict):
        return {}
    if info and all(_is_count(v) for v in info.values()):
        return {posixpath.basename(k): int(v) for k, v in info.items()}  # sizes.json
    if isinstance(info.get("shardlist"), list):  # wids
        return {
            posixpath.basename(str(s["url"])): int(s["nsamples"])
            for s in info["shardlist"]
            if isinstance(s, dict) and "url" in s and _is_count(s.get("nsamples"))
        }
    splits = info.get("splits")
    sections = list(splits.values()) if isinstance(splits, dict) else [info]
    counts: dict[str, int] = {}
    for section in sections:
        if not isinstance(section, dict):
            continue
        names = [
            n for pattern in section.get("filenames") or [] for n in braceexpand.braceexpand(str(pattern))
        ]
        lengths = section.get("shard_lengths") or []
        if len(names) == len(lengths):
            counts.update({posixpath.basename(n): int(c) for n, c in zip(names, lengths, strict=True)})
    return counts


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _per_shard_counts(folder: str, shards: list[str], scan: bool) -> list[int] | None:
    """img2dataset's {shard}_stats.json per shard, else (local tars) a header scan, cached."""
    counts: list[int] = []
    to_scan: list[str] = []
    stats_missing = False  # over HTTP, stop asking for stats files once one is missing
    for shard in shards:
        stem = _basename(shard).rsplit(".", 1)[0]
        stats = None if stats_missing else _read_json(_join(folder, f"{stem}_stats.json"))
        if isinstance(stats, dict) and _is_count(stats.get("successes")):
            counts.append(int(stats["successes"]))
            continue
        stats_missing = is_url(shard)
        if is_url(shard) or not scan:
            return None
        counts.append(-1)
        to_scan.append(shard)
    if to_scan:
        scanned = scan_counts(to_scan)
        found = iter(scanned[s] for s in to_scan)
        counts = [c if c >= 0 else next(found) for c in counts]
    return counts


def scan_counts(paths: Sequence[str]) -> dict[str, int]:
    """Samples per local tar from its headers, reusing and updating the count cache of its folder."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(os.path.dirname(os.path.abspath(path)), []).append(path)
    result: dict[str, int] = {}
    for folder, members in by_folder.items():
        cache, cache_path = _load_cache(folder)
        fresh = 0
        started = time.perf_counter()
        for path in members:
            stat = os.stat(path)
            name = os.path.basename(path)
            entry = cache.get(name)
            if not (
                isinstance(entry, dict)
                and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
                and _is_count(entry.get("samples"))
            ):
                if fresh == 0:
                    log.info("counting the samples of the tars in %s (headers only)", folder)
                entry = {
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "samples": count_tar_samples(path),
                }
                cache[name] = entry
                fresh += 1
            result[path] = int(entry["samples"])
        if fresh:
            where = _save_cache(folder, cache, cache_path)
            log.info(
                "counted %d tars in %.1f s%s",
                fresh,
                time.perf_counter() - started,
                f"; counts cached in {where}" if where else " (no writable place to cache the counts)",
            )
    return result


def count_tar_samples(path: str | Path) -> int:
    """Samples in one tar as webdataset groups them, from the member headers alone (data is seeked over)."""
    samples, previous = 0, None
    try:
        with open(path, "rb") as stream:
            for name, _ in tar_members(stream, read=False):
                prefix, _ = base_plus_ext(name)
                if prefix is not None and prefix != previous:
                    samples, previous = samples + 1, prefix
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read the tar headers of {path} ({exc}); is it a tar file?") from None
    return samples


# --------------------------------------------------------------------------- reading tars


def tar_members(stream: Any, read: bool = True) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member of a tar stream, in order, skipping webdataset's ``__*__`` meta
    members as its tar_file_iterator does. Reads sequentially, so pipes and HTTP bodies work; a gzip-
    compressed tar is recognised by its magic. `read=False` (seekable files) seeks over the data and
    yields empty bytes.

    The same members webdataset's tarfile-based reader yields, at a tenth of its CPU time per member
    (tarfile parses every header field in Python). Raises tarfile.ReadError on a header that fails its
    checksum and EOFError on a tar cut short.
    """
    head = _read_exact(stream, 512)
    if head[:2] == b"\x1f\x8b":  # gzip: decompress as we go (and read what we cannot seek over)
        stream, read = gzip.GzipFile(fileobj=cast(Any, _Prepend(head, stream)), mode="rb"), True
        head = _read_exact(stream, 512)
    long_name: str | None = None
    while head and head != _ZERO_BLOCK:
        if len(head) < 512:
            raise EOFError("tar cut short inside a header")
        if _checksum(head) != _octal(head[148:156]):
            raise tarfile.ReadError("tar header checksum mismatch")
        size, kind = _octal(head[124:136]), head[156:157]
        name = _text(head[:100])
        if head[257:263] == b"ustar\0" and head[345] != 0:  # POSIX ustar: a name prefix
            name = f"{_text(head[345:500])}/{name}"
        padded = size + (-size) % 512
        small = kind in (b"L", b"x", b"g")  # GNU long name, pax headers: always read
        if read or small:
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise EOFError(f"tar cut short inside {name}")
            data = data[:size]
        else:
            stream.seek(padded, os.SEEK_CUR)
            data = b""
        if kind == b"L":
            long_name = _text(data)
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):  # regular files
            name, long_name = long_name or name, None
            if not _is_meta(name):
                yield name, data
        elif kind != b"g":
            long_name = None  # directories, links, devices: not samples
        head = _read_exact(stream, 512)


def _is_meta(name: str) -> bool:
    """webdataset's tar_file_iterator skips these names."""
    return bool(
        ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix))
        or _SKIP_META.match(name)
    )


_ZERO_BLOCK = bytes(512)


def _read_exact(stream: Any, n: int) -> bytes:
    """Up to n bytes: fewer only at the end of the stream (HTTP bodies and pipes return short reads)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return bytes(data)
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _checksum(head: bytes) -> int:
    return sum(head[:148]) + 8 * 32 + sum(head[156:])  # the checksum field counts as spaces


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for members over 8 GB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError("not a tar header") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    """The path record of a pax extended header (records: "LEN key=value\\n")."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


class _Prepend:
    """A stream with some bytes already read put back in front (to sniff a gzip magic)."""

    def __init__(self, first: bytes, rest: Any) -> None:
        self.first, self.rest = first, rest

    def read(self, n: int = -1) -> bytes:
        if not self.first:
            return bytes(self.rest.read(n))
        if n < 0:
            out, self.first = self.first + self.rest.read(), b""
            return out
        out, self.first = self.first[:n], self.first[n:]
        return out if len(out) == n else out + self.rest.read(n - len(out))


def _cache_paths(folder: str) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rspretrain" / "sample-counts"
    digest = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [Path(folder) / COUNT_CACHE, user / f"{digest}.json"]


def _load_cache(folder: str) -> tuple[dict[str, Any], Path | None]:
    for path in _cache_paths(folder):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("tars"), dict):
            return dict(data["tars"]), path
    return {}, None


def _save_cache(folder: str, cache: dict[str, Any], loaded_from: Path | None) -> Path | None:
    """Write the cache atomically to the first writable place (where it was read, if that still is)."""
    candidates = _cache_paths(folder)
    if loaded_from is not None:
        candidates.remove(loaded_from)
        candidates.insert(0, loaded_from)
    text = json.dumps({"folder": folder, "tars": dict(sorted(cache.items()))}, indent=1) + "\n"
    for path in candidates:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            return path
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return None
