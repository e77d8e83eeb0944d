"""Pass 6: seeded global shuffle of the kept tiles, byte-reproducible WebDataset tars, and `verify`.

`assign` is the pass function (pure): it gives every kept tile its shard. `write_shard` writes one tar
atomically (temporary name, then `os.replace`), `write_index` writes `sizes.json` and timm's
`_info.json`, and `verify` re-reads a finished output folder against `tiles.parquet`.

Tars are written in `tarfile`'s USTAR format (its member header, filled into a template per member:
`_ustar_header`) rather than with webdataset's `TarWriter`: in webdataset 1.0.2 `TarWriter` computes
its `format` argument but opens the tar with the default (PAX) format, and importing webdataset imports
torch (about 2 s in every worker process). Every header field that
could vary between runs is fixed (mtime 0, uid/gid 0, empty uname/gname, mode 0o644), so the same
samples in the same order give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .recipe import ShardConfig
from .sample import (
    IMAGE_EXTENSIONS,
    KEY_PATTERN,
    METADATA_EXTENSION,
    METADATA_FIELDS,
    OPTIONAL_METADATA_FIELDS,
    encode_metadata,
)

SIZES_FILE = "sizes.json"
INFO_FILE = "_info.json"
TMP_SUFFIX = ".tmp"
# The split name timm's reader_wds looks up in `_info.json` (`--train-split train`).
INFO_SPLIT = "train"


class ShardError(Exception):
    """A shard output folder that cannot be read or verified as asked (user-fixable)."""


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def shard_sizes(n_samples: int, max_samples: int) -> list[int]:
    """Split n samples into the fewest shards of at most max_samples, sizes differing by at most one.

    Even sizes keep every shard (and so every loader worker) equally long.
    """
    if n_samples == 0:
        return []
    n_shards = math.ceil(n_samples / max_samples)
    base, extra = divmod(n_samples, n_shards)
    return [base + (1 if i < extra else 0) for i in range(n_shards)]


def assign(cfg: ShardConfig, name: str, tiles: pd.DataFrame) -> pd.DataFrame:
    """Pass 6 (pure): a seeded global shuffle of the kept tiles, cut into shards.

    Returns `tiles` with a `shard` column (the tar's basename; None for tiles not kept) and
    `shard_position` (the sample's index inside its tar; -1 for tiles not kept). The result depends
    only on the set of kept keys and the seed, not on row order or worker count.
    """
    out = tiles.copy()
    kept = np.sort(out.loc[out["status"] == "kept", "key"].to_numpy(dtype=object).astype(str))
    if len(np.unique(kept)) != len(kept):
        raise ValueError("duplicate keys among kept tiles; keys must be unique")
    order = kept[np.random.default_rng(cfg.shuffle_seed).permutation(len(kept))]
    shard_of: dict[str, str] = {}
    position: dict[str, int] = {}
    start = 0
    for index, size in enumerate(shard_sizes(len(order), cfg.max_samples)):
        basename = shard_name(name, index)
        for pos, key in enumerate(order[start : start + size]):
            shard_of[key] = basename
            position[key] = pos
        start += size
    out["shard"] = pd.Series([shard_of.get(k) for k in out["key"]], index=out.index, dtype=object)
    out["shard_position"] = np.array([position.get(k, -1) for k in out["key"]], dtype=np.int64)
    return out


run = assign


def plan(tiles: pd.DataFrame) -> dict[str, list[str]]:
    """Shard basename -> its keys in write order, from a table that went through `assign`."""
    kept = tiles.loc[tiles["shard"].notna(), ["key", "shard", "shard_position"]]
    kept = kept.sort_values(["shard", "shard_position"], kind="stable")
    return {str(s): list(group["key"]) for s, group in kept.groupby("shard", sort=True)}


def _present(value: Any) -> bool:
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def sample_metadata(row: Mapping[str, Any]) -> dict[str, Any]:
    """The `{key}.json` record of a tiles-table row (fields: rscurate.sample.METADATA_FIELDS).

    `path` is the scene's path relative to its source root, so shards do not depend on where the
    datasets were mounted; `crs` and `bounds` are added for georeferenced scenes.
    """
    meta: dict[str, Any] = {
        "source": str(row["source"]),
        "path": str(row["relpath"]),
        "x": int(row["x"]),
        "y": int(row["y"]),
        "width": int(row["width"]),
        "height": int(row["height"]),
        "phash": str(row["phash"]),
        "task": str(row["task"]),
    }
    crs = row.get("crs")
    if _present(crs) and crs != "":
        meta["crs"] = str(crs)
        bounds: Any = row.get("bounds")
        if _present(bounds):
            meta["bounds"] = json.loads(bounds) if isinstance(bounds, str) else [float(b) for b in bounds]
    return meta


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


@dataclass(frozen=True)
class Sample:
    key: str
    image_ext: str
    image: bytes
    metadata: bytes


def write_shard(path: str | os.PathLike[str], samples: Iterable[Sample]) -> int:
    """Write one tar atomically: members go to `{path}.tmp`, renamed to `path` once complete.

    Each sample gives `{key}.{image_ext}` then `{key}.json`. Returns the number of samples. If
    anything fails, the temporary file is removed and nothing exists under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    count = 0
    try:
        with open(tmp, "wb") as fileobj:
            offset = 0
            for sample in samples:
                if not KEY_PATTERN.match(sample.key):
                    raise ValueError(f"sample key {sample.key!r} breaks the key contract")
                if sample.image_ext not in IMAGE_EXTENSIONS:
                    raise ValueError(
                        f"image member extension {sample.image_ext!r} is not one of {IMAGE_EXTENSIONS}"
                    )
                for ext, data in ((sample.image_ext, sample.image), (METADATA_EXTENSION, sample.metadata)):
                    offset += _write_member(fileobj, f"{sample.key}.{ext}", data)
                count += 1
            # The end of the archive as TarFile.close() writes it: two zero blocks, then zeros up to a
            # whole record.
            end = 2 * tarfile.BLOCKSIZE
            end += -(offset + end) % tarfile.RECORDSIZE
            fileobj.write(tarfile.NUL * end)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _name_file(exc, path)
        raise
    return count


def _write_member(fileobj: io.BufferedWriter, name: str, data: bytes) -> int:
    """One regular-file member, as TarFile.addfile writes it in USTAR format (tarfile's own header,
    then the data padded to a whole block), without addfile's per-member copies; bytes written."""
    header = _ustar_header(name, len(data))
    padding = -len(data) % tarfile.BLOCKSIZE
    fileobj.write(header)
    fileobj.write(data)
    if padding:
        fileobj.write(tarfile.NUL * padding)
    return len(header) + len(data) + padding


# Offsets in a USTAR header (POSIX.1-1988): name, size and checksum fields; every other field of our
# members is the same (mode 0o644, uid/gid 0, mtime 0, regular file, empty link and owner names).
_NAME_FIELD, _SIZE_FIELD, _CHKSUM_FIELD = slice(0, 100), slice(124, 136), slice(148, 156)
_TEMPLATE = _tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
# The checksum of the template less its name and size fields (tarfile counts the checksum field as spaces).
_TEMPLATE_SUM = 256 + sum(_TEMPLATE) - sum(_TEMPLATE[_CHKSUM_FIELD]) - sum(_TEMPLATE[_SIZE_FIELD])


def _ustar_header(name: str, size: int) -> bytes:
    """tarfile's USTAR header of a member `_tarinfo(name, size)`, byte for byte, filled into a template:
    tarfile builds and checksums every field in Python (a third of the shard pass's CPU for chips). A name
    that is not ASCII or over 100 bytes, or a size of 8 GiB or more, goes through tarfile itself."""
    encoded = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not encoded or len(encoded) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)
    header = bytearray(_TEMPLATE)
    header[: len(encoded)] = encoded
    header[_SIZE_FIELD] = size_field
    header[148:155] = b"%06o\0" % chksum  # the field's eighth byte stays a space, as tarfile leaves it
    return bytes(header)


def _name_file(exc: BaseException, path: Path) -> None:
    """Let an OSError name the file being written: a full disk fails write(), which names none."""
    # Only errors with an errno: setting a file name on OSError("text") would hide its text.
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        exc.filename = str(path)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.write_bytes(_json_bytes(data))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _name_file(exc, path)
        raise


def info_record(name: str, sizes: Mapping[str, int]) -> dict[str, Any]:
    """timm's `_info.json` (timm.data.readers.reader_wds): split -> filenames, shard_lengths, num_samples."""
    filenames = sorted(sizes)
    return {
        "name": name,
        "splits": {
            INFO_SPLIT: {
                "name": INFO_SPLIT,
                "num_samples": int(sum(sizes.values())),
                "filenames": filenames,
                "shard_lengths": [int(sizes[f]) for f in filenames],
            }
        },
    }


def _index_records(name: str, sizes: Mapping[str, int]) -> dict[str, Any]:
    return {
        SIZES_FILE: {k: int(v) for k, v in sorted(sizes.items())},
        INFO_FILE: info_record(name, sizes),
    }


def index_files(name: str, sizes: Mapping[str, int]) -> dict[str, bytes]:
    """The bytes write_index writes, by file name (for an OUT that is a URL)."""
    return {file_name: _json_bytes(data) for file_name, data in _index_records(name, sizes).items()}


def write_index(shards_dir: str | os.PathLike[str], name: str, sizes: Mapping[str, int]) -> None:
    """Write `sizes.json` (shard basename -> samples) and `_info.json` next to the tars."""
    shards_dir = Path(shards_dir)
    for file_name, data in _index_records(name, sizes).items():
        _write_json_atomic(shards_dir / file_name, data)


# --- verify -------------------------------------------------------------------------------------------


@dataclass
class ShardCheck:
    """What one tar holds, as `check_shard` found it."""

    name: str
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"member {name!r} has an absolute name"
    if ".." in parts or "\\" in name:
        return f"member {name!r} climbs out of the extraction folder ('..')"
    if member.issym() or member.islnk():
        return f"member {name!r} is a link (to {member.linkname!r})"
    if member.ischr() or member.isblk() or member.isfifo():
        return f"member {name!r} is a device or fifo"
    if not member.isreg():
        return f"member {name!r} is not a regular file (type {member.type!r})"
    return None


def check_shard(path: str, expected: Mapping[str, Mapping[str, Any]]) -> ShardCheck:
    """Re-read one tar: safe member names and types, one image and one json per key, the image
    decodes to the recorded size (and digest), the json equals the record rebuilt from the tiles row.

    `expected`: key -> tiles-table row (as a dict) of the samples this shard should hold.
    """
    from PIL import Image

    name = os.path.basename(path)
    check = ShardCheck(name)
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                problem = _member_problem(member)
                if problem:
                    check.problems.append(f"{name}: {problem}")
                    continue
                base = PurePosixPath(member.name).name
                key, _, ext = base.partition(".")
                if not KEY_PATTERN.match(key) or "/" in member.name:
                    check.problems.append(f"{name}: member {member.name!r} is not a '{{key}}.{{ext}}' name")
                    continue
                fileobj = tar.extractfile(member)
                data = fileobj.read() if fileobj is not None else b""
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if ext in samples[key]:
                    check.problems.append(f"{name}: {key}.{ext} appears twice")
                samples[key][ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        check.problems.append(f"{name}: cannot read the tar ({exc})")
        return check

    for key in order:
        members = samples[key]
        check.keys.append(key)
        row = expected.get(key)
        if row is None:
            continue  # the caller knows every shard's keys and reports where this one belongs
        images = [e for e in members if e in IMAGE_EXTENSIONS]
        extra = sorted(set(members) - set(images) - {METADATA_EXTENSION})
        if len(images) != 1 or METADATA_EXTENSION not in members or extra:
            check.problems.append(
                f"{name}: sample {key} has members {sorted(members)}; expected one of {IMAGE_EXTENSIONS} and json"
            )
            continue
        image = members[images[0]]
        digest = row.get("image_sha256")
        if _present(digest) and hashlib.sha256(image).hexdigest() != digest:
            check.problems.append(
                f"{name}: {key}.{images[0]} differs from the tile that was written (sha256)"
            )
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
                size = img.size
        except Exception as exc:  # any decoder failure is a finding, not a crash
            check.problems.append(f"{name}: {key}.{images[0]} does not decode ({exc})")
        else:
            if size != (int(row["width"]), int(row["height"])):
                check.problems.append(
                    f"{name}: {key}.{images[0]} is {size[0]}x{size[1]}, tiles.parquet says {row['width']}x{row['height']}"
                )
        if members[METADATA_EXTENSION] != encode_metadata(sample_metadata(row)):
            check.problems.append(f"{name}: {key}.json does not match tiles.parquet")
    return check


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


def _check_shard_task(task: tuple[str, dict[str, dict[str, Any]]]) -> ShardCheck:
    return check_shard(*task)


def verify(out: str | os.PathLike[str], *, mapper: Mapper | None = None) -> VerifyReport:
    """Re-read every shard of an output folder and check it against `tiles.parquet`, `sizes.json`
    and `_info.json`: every kept tile in exactly one shard (the one tiles.parquet names), nothing
    else in any shard, counts equal. `mapper` maps the per-tar check (e.g. an executor's `map`).
    """
    out = Path(out)
    shards_dir = out / "shards"
    tiles_path = out / "tiles.parquet"
    if not tiles_path.is_file():
        raise ShardError(f"{tiles_path} not found; is {out} a finished rscurate output folder?")
    if not shards_dir.is_dir():
        raise ShardError(f"{shards_dir} not found; is {out} a finished rscurate output folder?")
    wanted = (
        "key",
        "status",
        "shard",
        "image_sha256",
        *METADATA_FIELDS,
        *OPTIONAL_METADATA_FIELDS,
        "relpath",
    )
    names = pq.read_schema(tiles_path).names
    tiles = pd.read_parquet(tiles_path, columns=[c for c in names if c in wanted])
    report = VerifyReport()
    problems = report.problems

    rows = tiles.to_dict("records")
    kept = {r["key"]: r for r in rows if r["status"] == "kept"}
    status_of = {r["key"]: r["status"] for r in rows}
    by_shard: dict[str, dict[str, dict[str, Any]]] = {}
    for key, r in kept.items():
        if not _present(r.get("shard")):
            problems.append(f"tiles.parquet: kept tile {key} has no shard")
            continue
        by_shard.setdefault(str(r["shard"]), {})[key] = r

    tars = sorted(p.name for p in shards_dir.iterdir() if p.name.endswith(".tar"))
    for p in sorted(shards_dir.iterdir()):
        if p.name.endswith(TMP_SUFFIX):
            problems.append(f"shards/{p.name}: an unfinished temporary file is left")
        elif p.is_symlink() and p.name.endswith(".tar"):
            problems.append(f"shards/{p.name}: is a symlink, not a shard")

    for name in sorted(set(by_shard) - set(tars)):
        problems.append(f"shards/{name}: missing ({len(by_shard[name])} kept tiles are assigned to it)")

    tasks = [(str(shards_dir / n), by_shard.get(n, {})) for n in tars if not (shards_dir / n).is_symlink()]
    mapped = (mapper or map)(_check_shard_task, tasks)
    seen: dict[str, str] = {}
    counts: dict[str, int] = {}
    for check in mapped:
        report.shards += 1
        problems.extend(check.problems)
        counts[check.name] = len(check.keys)
        report.samples += len(check.keys)
        for key in check.keys:
            if key in seen:
                problems.append(f"{check.name}: sample {key} is also in {seen[key]}")
                continue
            seen[key] = check.name
            if key not in kept:
                what = f"has status {status_of[key]!r}" if key in status_of else "is not in tiles.parquet"
                problems.append(f"{check.name}: sample {key} {what}")
            elif key not in by_shard.get(check.name, {}):
                problems.append(f"{check.name}: sample {key} belongs in {kept[key].get('shard')}")
    for key, r in kept.items():
        if key not in seen and _present(r.get("shard")) and r["shard"] in tars:
            problems.append(f"{r['shard']}: kept tile {key} is missing")

    problems.extend(_check_index(shards_dir, counts))
    return report


def _check_index(shards_dir: Path, counts: Mapping[str, int]) -> list[str]:
    problems: list[str] = []
    try:
        sizes = json.loads((shards_dir / SIZES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"shards/{SIZES_FILE}: cannot read ({exc})"]
    for name in sorted(set(sizes) | set(counts)):
        if name not in counts:
            problems.append(f"shards/{SIZES_FILE}: lists {name}, which is not in shards/")
        elif name not in sizes:
            problems.append(f"shards/{SIZES_FILE}: does not list {name}")
        elif int(sizes[name]) != counts[name]:
            problems.append(
                f"shards/{SIZES_FILE}: {name} has {counts[name]} samples, sizes.json says {sizes[name]}"
            )
    try:
        info = json.loads((shards_dir / INFO_FILE).read_text(encoding="utf-8"))
        split = info["splits"][INFO_SPLIT]
        listed = dict(zip(split["filenames"], split["shard_lengths"], strict=True))
        if listed != {k: int(v) for k, v in sizes.items()} or split["num_samples"] != sum(listed.values()):
            problems.append(
                f"shards/{INFO_FILE}: filenames/shard_lengths/num_samples disagree with {SIZES_FILE}"
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"shards/{INFO_FILE}: cannot read ({exc})")
    return problems
