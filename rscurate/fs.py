"""Local paths and fsspec URLs behind the few calls the passes need.

A location is either a local path (the default, handled with `os` as before) or a URL with a scheme
(`s3://`, `gs://`, `http(s)://`, ...), handled by fsspec; `file://` URLs are turned into local paths
(`local_path`). A third kind, a file inside a local archive (`/data/AID.zip!AID/x.jpg`), is read through
rscurate.archive: `is_plain` is False for it and for URLs, and the read calls below serve all three.
What each side guarantees:

* Writes of whole files are atomic on both: a local file goes to a temporary name and is renamed; an
  object store commits an object only when its single upload completes (`write_bytes`, `put_file`).
* Listings are never served from fsspec's listing cache: other processes (Dask workers) write here.
* http(s) is read-only: sources and benchmarks may live there, OUT may not.

Remote protocols need their fsspec implementation installed (s3fs for s3://, gcsfs for gs://, aiohttp
for http(s)://); configuration (endpoint, credentials) comes from the environment as each library
reads it, e.g. AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID for s3fs, or FSSPEC_S3_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from typing import IO, Any
from urllib.parse import unquote

from rscurate import archive

# Read in blocks this large from remote files: big enough for throughput, small enough that reading a
# header does not download a whole image.
READ_BLOCK = 4 << 20
READ_ONLY_PROTOCOLS = ("http", "https")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class RemoteError(Exception):
    """A URL that cannot be used as asked (user-fixable: a missing package, a read-only protocol)."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` other than file://."""
    match = _SCHEME.match(os.fspath(location))
    return match is not None and match.group(1).lower() != "file"


def is_plain(location: str | os.PathLike[str]) -> bool:
    """True for a file read with `os`: neither a URL nor a file inside an archive (`ARCHIVE!INNER`)."""
    location = os.fspath(location)
    return not is_url(location) and not archive.is_member(location)


def local_path(location: str | os.PathLike[str]) -> str:
    """`file:///data/x` -> `/data/x`; anything else unchanged."""
    location = os.fspath(location)
    return location[len("file://") :] if location.lower().startswith("file://") else location


def protocol(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def protocol_problem(url: str, *, write: bool = False) -> str | None:
    """Why fsspec cannot serve `url` here (its package is missing, or the protocol is read-only); None if it can."""
    import fsspec

    proto = protocol(url)
    if write and proto in READ_ONLY_PROTOCOLS:
        return f"{proto}:// is read-only; write OUT to a folder or an object store (s3://, gs://, ...)"
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as exc:
        return f"{proto}:// needs a package that is not installed ({exc})"
    except ValueError:
        return f"{proto}:// is not a protocol fsspec knows"
    return None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL."""
    import fsspec

    problem = protocol_problem(url)
    if problem:
        raise RemoteError(f"{url}: {problem}")
    return fsspec.core.url_to_fs(url)


def join(base: str, *names: str) -> str:
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(base, *names)


def _fresh(fs: Any, path: str) -> None:
    fs.invalidate_cache(path)


def exists(location: str) -> bool:
    if archive.is_member(location):
        try:
            archive.member_size(location)
        except (FileNotFoundError, archive.ArchiveError, archive.MemberError):
            return False
        return True
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem(location)
    _fresh(fs, posixpath.dirname(path))
    return bool(fs.exists(path))


def listdir(location: str) -> list[str]:
    """Names directly under a folder (files and folders), sorted; [] when it does not exist."""
    if not is_url(location):
        try:
            return sorted(os.listdir(location))
        except FileNotFoundError:
            return []
    fs, path = filesystem(location)
    _fresh(fs, path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != path.rstrip("/"))


def remove(location: str) -> None:
    """Delete a file; nothing happens when it is missing."""
    if not is_url(location):
        try:
            os.unlink(location)
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    _fresh(fs, posixpath.dirname(path))


def read_bytes(location: str) -> bytes:
    if archive.is_member(location):
        return archive.read_member(location)
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem(location)
    return bytes(fs.cat_file(path))


def write_bytes(url: str, data: bytes) -> None:
    """One upload: an object store never shows a partial object. URLs only (local writes rename a
    temporary file; see pipeline.write_parquet)."""
    problem = protocol_problem(url, write=True)
    if problem:
        raise RemoteError(f"{url}: {problem}")
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
    _fresh(fs, posixpath.dirname(path))


def put_file(local: str, url: str) -> None:
    """Upload a finished local file as one object."""
    problem = protocol_problem(url, write=True)
    if problem:
        raise RemoteError(f"{url}: {problem}")
    fs, path = filesystem(url)
    fs.put_file(local, path)
    _fresh(fs, posixpath.dirname(path))


def open_input(url: str, block_size: int = READ_BLOCK) -> IO[bytes]:
    """A seekable binary file object reading a URL in blocks, or a file inside an archive (Pillow,
    tarfile and hashing take it)."""
    if archive.is_member(url):
        return archive.open_member(url)
    fs, path = filesystem(url)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")  # type: ignore[no-any-return]


def size(url: str) -> int:
    if archive.is_member(url):
        return archive.member_size(url)
    fs, path = filesystem(url)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(url)
    if info.get("size") is None:
        raise OSError(f"{url}: the server does not give the file's size")
    return int(info["size"])


def sha256(url: str) -> str:
    """SHA-256 of a remote file's bytes, streamed (of a file in an archive: its bytes)."""
    if archive.is_member(url):
        return hashlib.sha256(archive.read_member(url)).hexdigest()
    digest = hashlib.sha256()
    with open_input(url) as f:
        while chunk := f.read(READ_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def find(root: str) -> list[tuple[str, str]]:
    """Every file under a URL folder as (path relative to root with '/', URL), sorted by relpath.

    Over http(s) this follows the links of the server's directory listings (an index page per folder).
    """
    fs, path = filesystem(root)
    _fresh(fs, path)
    base = path.rstrip("/")
    found = []
    for entry in fs.find(path, withdirs=False):
        if not entry.startswith(base + "/"):
            continue  # http listings may link outside the folder (parent links, absolute links)
        rel = entry[len(base) + 1 :]
        if protocol(root) in READ_ONLY_PROTOCOLS:
            rel = unquote(rel)  # listing links are percent-encoded; relpaths are names, as on disk
        found.append((rel, entry if is_url(entry) else fs.unstrip_protocol(entry)))
    return sorted(found)


def rasterio_opener(url: str) -> Any:
    """What rasterio.open(url, opener=...) takes to read a URL through fsspec (one config for all reads)."""
    fs, _ = filesystem(url)
    return fs
