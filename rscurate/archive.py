"""Source files inside archives, read without unpacking: ZIP (also split into .z01, .z02, ... parts),
tar, and compressed tar (.tar.gz/.tgz, .tar.bz2, .tar.xz).

A file inside an archive is named `ARCHIVE!INNER`: the archive's path on local disk, `!`, and the
member's name inside it ('/'-separated), e.g. `/data/AID.zip!AID/Airport/airport_1.jpg`. The archive
part ends at the first `.zip!`, `.tar!`, `.tgz!`, `.tar.gz!`, ... (extension case-insensitive), so a
member path is unambiguous as long as no folder above the archive is itself named like `x.zip!y`.
Names that are not UTF-8 go through `raster.path_text` / `raster.fs_path` like any other path.

How each kind is read:

* ZIP: random access through the central directory (the standard library's `zipfile`). A split
  archive (`zip -s`: NAME.z01, NAME.z02, ..., NAME.zip, as the OpticalRS-4M/13M releases ship) is read
  as the concatenation of its parts with this module's own reader of the central directory, which
  `zipfile` cannot do (it refuses archives that span several disks).
* tar: random access by member offset (`tarfile`, which reads every header once per process).
* compressed tar: no random access exists, so a compressed tar is only ever read front to back. Its
  listing is one pass; a process that reads its members in archive order streams it once
  (`MemberStream`); and the pipeline streams it once per pass in the parent and hands each task the
  bytes of its members (`MemberFeed` and `provided`), instead of decompressing once per member.

Errors: an archive that cannot be read as a whole (cut short, not an archive, a missing part) raises
`ArchiveError` naming it and what to do; a member that cannot be read (bad CRC, unsupported compression,
encrypted) raises `MemberError` (the scan records it as one `unreadable` input and goes on).
"""

from __future__ import annotations

import bz2
import io
import logging
import os
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SEPARATOR = "!"
ZIP_EXTENSIONS = (".zip",)
TAR_EXTENSIONS = (".tar",)
COMPRESSED_TAR_EXTENSIONS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_EXTENSIONS = ZIP_EXTENSIONS + TAR_EXTENSIONS + COMPRESSED_TAR_EXTENSIONS
_MEMBER = re.compile(
    r"^(.*?\.(?:zip|tar|tgz|tbz2|txz|tar\.gz|tar\.bz2|tar\.xz))" + re.escape(SEPARATOR) + r"(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_SPLIT_PART = re.compile(r"\.z(\d+)$", re.IGNORECASE)
# Archives a process keeps open (each holds a file descriptor and, for tar, its member index).
OPEN_ARCHIVES = 8
# Members skipped on the way through a compressed tar that a later task wants are kept up to this many
# bytes (they are only skipped when the archive's order differs from the listing's).
FEED_BUFFER_BYTES = 256 << 20


class ArchiveError(Exception):
    """An archive that cannot be read as a whole (user-fixable: download it again, remove it)."""


class MemberError(Exception):
    """One member of a readable archive that cannot be read; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Member:
    name: str  # inner path, '/'-separated, as stored (trailing '/' of folders removed)
    size: int
    kind: str  # file | dir | link | other


# --------------------------------------------------------------------------------------------------
# Names


def is_archive_name(path: str) -> bool:
    """True for a file name with an archive extension (.zip, .tar, .tar.gz, ...)."""
    return path.lower().endswith(ARCHIVE_EXTENSIONS)


def is_compressed_tar(path: str) -> bool:
    return path.lower().endswith(COMPRESSED_TAR_EXTENSIONS)


def split(path: str) -> tuple[str, str] | None:
    """(archive path, inner name) of `ARCHIVE!INNER`; None for any other path."""
    if SEPARATOR not in path:
        return None
    match = _MEMBER.match(path)
    if match is None:
        return None
    return match.group(1), match.group(2)


def is_member(path: str) -> bool:
    return split(path) is not None


def member_path(archive: str, inner: str) -> str:
    return f"{archive}{SEPARATOR}{inner}"


def split_parts(path: str) -> list[str]:
    """The parts of a split ZIP in order (NAME.z01, NAME.z02, ..., NAME.zip), or [path] when it is whole."""
    if not path.lower().endswith(".zip"):
        return [path]
    folder, name = os.path.split(path)
    stem = name[:-4]
    numbered: list[tuple[int, str]] = []
    try:
        with os.scandir(folder or ".") as entries:
            for entry in entries:
                if entry.name[: len(stem)] == stem:
                    match = _SPLIT_PART.fullmatch(entry.name[len(stem) :])
                    if match:
                        numbered.append((int(match.group(1)), entry.path))
    except OSError:
        return [path]
    if not numbered:
        return [path]
    numbered.sort()
    missing = sorted(set(range(1, numbered[-1][0] + 1)) - {n for n, _ in numbered})
    if missing:
        raise ArchiveError(
            f"{path}: split ZIP archive is missing part {stem}.z{missing[0]:02d} (of {numbered[-1][0] + 1}); "
            "download every part into the same folder"
        )
    return [p for _, p in numbered] + [path]


def is_split_part(path: str) -> bool:
    """True for the .z01, .z02, ... parts of a split ZIP (read through its .zip part, never alone)."""
    return _SPLIT_PART.search(path) is not None


# --------------------------------------------------------------------------------------------------
# Archive readers


class Archive:
    """One open archive: its members in archive order, and their bytes."""

    seekable = True  # members can be read in any order at the cost of reading only them

    def __init__(self, path: str):
        self.path = path

    def members(self) -> list[Member]:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        """A seekable binary file object over one member."""
        return io.BytesIO(self.read(name))

    def close(self) -> None:
        pass

    def _lookup(self, table: Mapping[str, _T], name: str) -> _T:
        """`table[name]`, or FileNotFoundError naming the member."""
        try:
            return table[name]
        except KeyError:
            raise FileNotFoundError(member_path(self.path, name)) from None


def _broken(path: str, what: str, exc: BaseException | str) -> ArchiveError:
    return ArchiveError(
        f"{path}: cannot read the {what} ({exc}); the archive is probably cut short or damaged: download it "
        "again (or remove it from the source folder), then run the same command again"
    )


class ZipArchive(Archive):
    """A whole ZIP file, through zipfile."""

    def __init__(self, path: str):
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise _broken(path, "ZIP archive", exc) from None
        self._infos = {_clean(i.filename): i for i in self._zip.infolist()}

    def members(self) -> list[Member]:
        return [
            Member(name, info.file_size, "dir" if info.is_dir() else "file")
            for name, info in self._infos.items()
        ]

    def _info(self, name: str) -> zipfile.ZipInfo:
        return self._lookup(self._infos, name)

    def size(self, name: str) -> int:
        return int(self._info(name).file_size)

    def read(self, name: str) -> bytes:
        info = self._info(name)
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise MemberError(_zip_member_reason(exc)) from None
        except (NotImplementedError, RuntimeError) as exc:  # compression method, encryption
            raise MemberError(f"archive member cannot be read ({exc})") from None

    def open(self, name: str) -> IO[bytes]:
        info = self._info(name)
        if info.file_size <= _WHOLE_MEMBER_BYTES:
            return io.BytesIO(self.read(name))
        try:
            return self._zip.open(info)  # seekable; a backward seek re-reads a deflated member
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            raise MemberError(f"archive member cannot be read ({exc})") from None

    def close(self) -> None:
        self._zip.close()


# Members up to this size are read whole when opened (every image a slice pass decodes whole).
_WHOLE_MEMBER_BYTES = 64 << 20


def _zip_member_reason(exc: BaseException) -> str:
    text = str(exc)
    if "CRC" in text:
        return "archive member fails its CRC check (corrupt inside the archive)"
    return f"archive member is corrupt ({text or type(exc).__name__})"


def _clean(name: str) -> str:
    return name.rstrip("/")


class _Joined(io.RawIOBase):
    """Read-only, seekable view of several files one after another (the parts of a split ZIP)."""

    def __init__(self, paths: Sequence[str]):
        self._files = [open(p, "rb") for p in paths]
        self.starts: list[int] = []
        total = 0
        for f in self._files:
            self.starts.append(total)
            total += os.fstat(f.fileno()).st_size
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def pread(self, n: int, offset: int) -> bytes:
        chunks = []
        while n > 0 and offset < self._size:
            i = max(0, _bisect(self.starts, offset))
            f = self._files[i]
            end = self.starts[i + 1] if i + 1 < len(self.starts) else self._size
            take = min(n, end - offset)
            chunk = os.pread(f.fileno(), take, offset - self.starts[i])
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pread(len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _bisect(starts: list[int], offset: int) -> int:
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


_EOCD = struct.Struct("<4sHHHHLLH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQHHLLQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHLLLHHHHHLL")
_LOCAL = struct.Struct("<4sHHHHHLLLHH")


@dataclass(frozen=True)
class _Entry:
    offset: int  # of the local header in the joined parts
    method: int
    flags: int
    crc: int
    compressed: int
    size: int
    folder: bool


class SplitZipArchive(Archive):
    """A ZIP split into parts (NAME.z01, ..., NAME.zip): the central directory read here, offsets
    mapped from (disk, offset in disk) to the parts joined end to end."""

    def __init__(self, path: str, parts: Sequence[str]):
        super().__init__(path)
        try:
            self._joined = _Joined(parts)
        except OSError as exc:
            raise ArchiveError(f"{path}: cannot open its parts ({exc})") from None
        try:
            self._entries = self._read_directory()
        except (struct.error, ValueError) as exc:
            self._joined.close()
            raise _broken(path, "split ZIP archive's central directory", exc) from None
        except ArchiveError:
            self._joined.close()
            raise

    def _read_directory(self) -> dict[str, _Entry]:
        j = self._joined
        size = j._size
        tail = j.pread(min(size, 65536 + _EOCD.size), max(0, size - 65536 - _EOCD.size))
        at = tail.rfind(b"PK\x05\x06")
        if at < 0:
            raise _broken(self.path, "split ZIP archive", "no end-of-central-directory record")
        _, _, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        eocd_at = size - len(tail) + at
        if 0xFFFF in (cd_disk, count) or 0xFFFFFFFF in (cd_size, cd_offset):
            loc = j.pread(_EOCD64_LOCATOR.size, eocd_at - _EOCD64_LOCATOR.size)
            sig, disk64, offset64, _ = _EOCD64_LOCATOR.unpack(loc)
            if sig != b"PK\x06\x07":
                raise _broken(self.path, "split ZIP archive", "missing ZIP64 locator")
            rec = j.pread(_EOCD64.size, self._global(disk64, offset64))
            fields = _EOCD64.unpack(rec)
            if fields[0] != b"PK\x06\x06":
                raise _broken(self.path, "split ZIP archive", "bad ZIP64 end record")
            cd_disk, count, cd_size, cd_offset = fields[5], fields[7], fields[8], fields[9]
        directory = j.pread(cd_size, self._global(cd_disk, cd_offset))
        if len(directory) != cd_size:
            raise _broken(self.path, "split ZIP archive", "central directory cut short")
        entries: dict[str, _Entry] = {}
        pos = 0
        for _ in range(count):
            (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, disk, _, _, offset) = (
                _CENTRAL.unpack_from(directory, pos)
            )
            if sig != b"PK\x01\x02":
                raise _broken(self.path, "split ZIP archive", "bad central directory entry")
            pos += _CENTRAL.size
            raw = directory[pos : pos + nlen]
            extra = directory[pos + nlen : pos + nlen + xlen]
            pos += nlen + xlen + clen
            usize, csize, offset, disk = _zip64_fields(extra, usize, csize, offset, disk)
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
            entries[_clean(name)] = _Entry(
                self._global(disk, offset), method, flags, crc, csize, usize, name.endswith("/")
            )
        return entries

    def _global(self, disk: int, offset: int) -> int:
        if disk >= len(self._joined.starts):
            raise _broken(self.path, "split ZIP archive", f"it refers to part {disk + 1}, which is missing")
        return self._joined.starts[disk] + offset

    def members(self) -> list[Member]:
        return [Member(n, e.size, "dir" if e.folder else "file") for n, e in self._entries.items()]

    def _entry(self, name: str) -> _Entry:
        return self._lookup(self._entries, name)

    def size(self, name: str) -> int:
        return self._entry(name).size

    def read(self, name: str) -> bytes:
        e = self._entry(name)
        if e.flags & 0x1:
            raise MemberError("archive member is encrypted")
        head = self._joined.pread(_LOCAL.size, e.offset)
        if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
            raise MemberError("archive member is corrupt (bad local header)")
        fields = _LOCAL.unpack(head)
        start = e.offset + _LOCAL.size + fields[9] + fields[10]
        raw = self._joined.pread(e.compressed, start)
        try:
            if e.method == zipfile.ZIP_STORED:
                data = raw
            elif e.method == zipfile.ZIP_DEFLATED:
                data = zlib.decompressobj(-15).decompress(raw)
            elif e.method == zipfile.ZIP_BZIP2:
                data = bz2.decompress(raw)
            else:
                raise MemberError(
                    f"archive member uses compression method {e.method}, which is not supported"
                )
        except (zlib.error, OSError, ValueError) as exc:
            raise MemberError(f"archive member is corrupt ({exc})") from None
        if len(data) != e.size or zlib.crc32(data) != e.crc:
            raise MemberError("archive member fails its CRC check (corrupt inside the archive)")
        return data

    def close(self) -> None:
        self._joined.close()


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int, disk: int) -> tuple[int, int, int, int]:
    """The ZIP64 extra field's values for the central directory fields that hold their maximum."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if tag != 0x0001:
            continue
        at = 0
        if usize == 0xFFFFFFFF:
            (usize,) = struct.unpack_from("<Q", body, at)
            at += 8
        if csize == 0xFFFFFFFF:
            (csize,) = struct.unpack_from("<Q", body, at)
            at += 8
        if offset == 0xFFFFFFFF:
            (offset,) = struct.unpack_from("<Q", body, at)
            at += 8
        if disk == 0xFFFF:
            (disk,) = struct.unpack_from("<L", body, at)
        break
    return usize, csize, offset, disk


class TarArchive(Archive):
    """An uncompressed tar: every header read once, members read by offset."""

    def __init__(self, path: str):
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, "r:")
            infos = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _broken(path, "tar archive", exc) from None
        self._infos = {_clean(i.name): i for i in infos}

    def members(self) -> list[Member]:
        return [Member(name, info.size, _tar_kind(info)) for name, info in self._infos.items()]

    def _info(self, name: str) -> tarfile.TarInfo:
        return self._lookup(self._infos, name)

    def size(self, name: str) -> int:
        return int(self._info(name).size)

    def read(self, name: str) -> bytes:
        info = self._info(name)
        if not info.isfile():
            raise MemberError(f"archive member is not a regular file ({_tar_kind(info)})")
        f = self._tar.extractfile(info)
        assert f is not None
        data = f.read()
        if len(data) != info.size:
            raise _broken(self.path, "tar archive", f"member {name} ends early")
        return data

    def open(self, name: str) -> IO[bytes]:
        info = self._info(name)
        if info.size <= _WHOLE_MEMBER_BYTES or not info.isfile():
            return io.BytesIO(self.read(name))
        f = self._tar.extractfile(info)
        assert f is not None
        return f

    def close(self) -> None:
        self._tar.close()


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isfile():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym() or info.islnk():
        return "link"
    return "other"


class CompressedTarArchive(Archive):
    """A compressed tar: listed by one pass over the stream; members read by streaming (see MemberStream)."""

    seekable = False

    def __init__(self, path: str):
        super().__init__(path)
        self._members: list[Member] | None = None
        self._sizes: dict[str, int] = {}
        self._stream: MemberStream | None = None

    def members(self) -> list[Member]:
        if self._members is None:
            found = []
            try:
                with tarfile.open(self.path, "r|*") as tar:
                    for info in tar:
                        found.append(Member(_clean(info.name), info.size, _tar_kind(info)))
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise _broken(self.path, "compressed tar archive", exc) from None
            self._members = found
            self._sizes = {m.name: m.size for m in found}
        return self._members

    def size(self, name: str) -> int:
        if not self._sizes:
            self.members()
        try:
            return self._sizes[name]
        except KeyError:
            raise FileNotFoundError(member_path(self.path, name)) from None

    def read(self, name: str) -> bytes:
        self.size(name)  # FileNotFoundError for a name the archive lacks (GDAL probing for sidecars)
        if self._stream is None:
            self._stream = MemberStream(self.path)
        return self._stream.read(name)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class MemberStream:
    """Members of a compressed tar read front to back: reading in archive order decompresses the
    archive once; a member behind the cursor starts the stream over (and says so in the log)."""

    def __init__(self, path: str):
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._restarts = 0

    def _open(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r|*")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise _broken(self.path, "compressed tar archive", exc) from None

    def next(self) -> tuple[tarfile.TarInfo, bytes | None] | None:
        """The next member and its bytes (None for anything but a regular file); None at the end."""
        if self._tar is None:
            self._tar = self._open()
        try:
            info = self._tar.next()
            if info is None:
                return None
            if not info.isfile():
                return info, None
            f = self._tar.extractfile(info)
            assert f is not None
            data = f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise _broken(self.path, "compressed tar archive", exc) from None
        if len(data) != info.size:
            raise _broken(self.path, "compressed tar archive", f"member {info.name} ends early")
        return info, data

    def read(self, name: str) -> bytes:
        for attempt in range(2):
            while (item := self.next()) is not None:
                info, data = item
                if _clean(info.name) == name:
                    if data is None:
                        raise MemberError(f"archive member is not a regular file ({_tar_kind(info)})")
                    return data
            self.close()  # past the end: start over once, the member may lie behind the cursor
            if attempt == 0:
                self._restarts += 1
                log.info("%s: reading %s again from the start (members asked out of order)", self.path, name)
        raise FileNotFoundError(member_path(self.path, name))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


# --------------------------------------------------------------------------------------------------
# The open archives of this process, and member access by path


_open: OrderedDict[tuple[str, int, int], Archive] = OrderedDict()
_lock = threading.Lock()
# Members handed to this process with its task (compressed tars): path -> bytes, or the reason the
# parent could not read them; and the archives they come from.
_provided: dict[str, bytes | str] = {}
_provided_archives: set[str] = set()


def open_archive(path: str) -> Archive:
    """The archive at `path`, kept open (per process) while it is unchanged on disk."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ArchiveError(f"{path}: archive not found (removed during the run?)") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read the archive ({exc.strerror or exc})") from None
    key = (path, st.st_size, st.st_mtime_ns)
    with _lock:
        found = _open.get(key)
        if found is not None:
            _open.move_to_end(key)
            return found
    low = path.lower()
    archive: Archive
    if low.endswith(ZIP_EXTENSIONS):
        parts = split_parts(path)
        archive = ZipArchive(path) if len(parts) == 1 else SplitZipArchive(path, parts)
    elif low.endswith(TAR_EXTENSIONS):
        archive = TarArchive(path)
    elif low.endswith(COMPRESSED_TAR_EXTENSIONS):
        archive = CompressedTarArchive(path)
    else:
        raise ArchiveError(f"{path}: not an archive this reader knows ({', '.join(ARCHIVE_EXTENSIONS)})")
    with _lock:
        _open[key] = archive
        while len(_open) > OPEN_ARCHIVES:
            _, old = _open.popitem(last=False)
            old.close()
    return archive


def close_all() -> None:
    with _lock:
        while _open:
            _, old = _open.popitem()
            old.close()


def _parts(path: str) -> tuple[str, str]:
    found = split(path)
    if found is None:
        raise ValueError(f"{path!r} is not a path inside an archive (ARCHIVE{SEPARATOR}INNER)")
    return found


def read_member(path: str) -> bytes:
    """The bytes of `ARCHIVE!INNER`. Raises MemberError, ArchiveError or FileNotFoundError."""
    if path in _provided:
        return _given(path)
    _not_provided(path)
    archive, inner = _parts(path)
    return open_archive(archive).read(inner)


def _given(path: str) -> bytes:
    value = _provided[path]
    if isinstance(value, str):
        raise MemberError(value)
    return value


def _not_provided(path: str) -> None:
    """A task that brought members of a compressed tar brought all it may read from it: any other name
    (GDAL probing for sidecar files) is missing, rather than a reason to stream the archive."""
    found = split(path)
    if found is not None and found[0] in _provided_archives and path not in _provided:
        raise FileNotFoundError(path)


def open_member(path: str) -> IO[bytes]:
    """A seekable binary file object over `ARCHIVE!INNER`."""
    if path in _provided:
        return io.BytesIO(_given(path))
    _not_provided(path)
    archive, inner = _parts(path)
    return open_archive(archive).open(inner)


def member_size(path: str) -> int:
    if path in _provided:
        return len(_given(path))
    _not_provided(path)
    archive, inner = _parts(path)
    return open_archive(archive).size(inner)


@contextmanager
def provided(members: dict[str, bytes | str] | None) -> Iterator[None]:
    """Serve these members' bytes from memory inside the block (what a task brings for compressed tars)."""
    if not members:
        yield
        return
    archives = {_parts(path)[0] for path in members} - _provided_archives
    _provided.update(members)
    _provided_archives.update(archives)
    try:
        yield
    finally:
        for path in members:
            _provided.pop(path, None)
        _provided_archives.difference_update(archives)


# --------------------------------------------------------------------------------------------------
# Listing


def list_members(path: str) -> list[Member]:
    """Every member of the archive at `path`, in archive order."""
    return open_archive(path).members()


# --------------------------------------------------------------------------------------------------
# Feeding tasks the members of compressed tars


class MemberFeed:
    """Bytes of the compressed-tar members each task needs, streaming every such archive once.

    `take(paths)` returns {path: bytes} for the paths of a task that live in compressed tars (a reason
    string instead of bytes for a member that cannot be read, which the task records). Asked in
    archive order (the order `scan` lists them in), each archive is decompressed once, front to back;
    members met on the way that a later task wants are buffered (up to FEED_BUFFER_BYTES), and a member
    already passed and not buffered starts that archive's stream over.
    """

    def __init__(self, wanted: Iterable[str]):
        self._wanted = {p for p in wanted if _is_streamed(p)}
        self._streams: dict[str, MemberStream] = {}
        self._buffer: dict[str, bytes] = {}
        self._buffered = 0

    def __bool__(self) -> bool:
        return bool(self._wanted)

    def take(self, paths: Iterable[str]) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for path in paths:
            if path in self._wanted:
                try:
                    out[path] = self._get(path)
                except MemberError as exc:
                    out[path] = exc.reason
                except FileNotFoundError:
                    out[path] = "no longer found in the archive (was it changed during the run?)"
        return out

    def _get(self, path: str) -> bytes:
        if path in self._buffer:
            kept = self._buffer.pop(path)
            self._buffered -= len(kept)
            self._wanted.discard(path)
            return kept
        archive, inner = _parts(path)
        stream = self._streams.get(archive)
        if stream is None:
            stream = self._streams[archive] = MemberStream(archive)
        for attempt in range(2):
            while (item := stream.next()) is not None:
                info, data = item
                here = member_path(archive, _clean(info.name))
                if here == path:
                    self._wanted.discard(path)
                    if data is None:
                        raise MemberError(f"archive member is not a regular file ({_tar_kind(info)})")
                    return data
                if (
                    data is not None
                    and here in self._wanted
                    and self._buffered + len(data) <= FEED_BUFFER_BYTES
                ):
                    self._buffer[here] = data
                    self._buffered += len(data)
            stream.close()
            if attempt == 0:
                log.info("%s: reading it again from the start for %s (out of order)", archive, inner)
        raise FileNotFoundError(path)

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._buffer.clear()


def _is_streamed(path: str) -> bool:
    found = split(path)
    return found is not None and is_compressed_tar(found[0])
