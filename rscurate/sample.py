"""What one shard sample is: the single contract between rscurate (writer) and rspretrain (reader).

A sample in a shard is two tar members sharing a key:

    {key}.jpg | {key}.png   the tile, 8-bit RGB
    {key}.json              metadata (fields below), UTF-8 JSON with sorted keys

Keys use only letters, digits, ``_`` and ``-``: WebDataset splits a member name at its first dot,
so a dot in a key would silently split a sample in two.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_EXTENSIONS = ("jpg", "png")
# Members rspretrain asks webdataset for, in order of preference.
IMAGE_MEMBER_SELECTOR = "jpg;png"
METADATA_EXTENSION = "json"
# Required metadata fields; `crs` and `bounds` are added for georeferenced scenes.
METADATA_FIELDS = ("source", "path", "x", "y", "width", "height", "phash", "task")
OPTIONAL_METADATA_FIELDS = ("crs", "bounds")

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


class SampleFormatError(ValueError):
    """A key or metadata record that breaks the shard contract."""


def source_slug(source: str) -> str:
    """A source name reduced to letters, digits and dashes (underscore separates key fields)."""
    slug = _UNSAFE.sub("-", source).strip("-")
    return slug or "source"


def make_key(source: str, scene_id: str, x: int, y: int) -> str:
    """Key of the tile at pixel offset (x, y) of a scene.

    `scene_id` identifies the scene within its source (rscurate uses a prefix of the content hash,
    so the key does not depend on where the dataset lies on disk). The result is deterministic and
    always matches KEY_PATTERN.
    """
    scene = _UNSAFE.sub("-", scene_id).strip("-") or hashlib.sha256(scene_id.encode()).hexdigest()[:16]
    key = f"{source_slug(source)}_{scene}_{int(x)}_{int(y)}"
    check_key(key)
    return key


def check_key(key: str) -> None:
    if not KEY_PATTERN.match(key):
        raise SampleFormatError(f"sample key {key!r} has characters other than letters, digits, '_' and '-'")


def encode_metadata(meta: dict[str, Any]) -> bytes:
    missing = [f for f in METADATA_FIELDS if f not in meta]
    if missing:
        raise SampleFormatError(f"sample metadata lacks {', '.join(missing)}")
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_metadata(data: bytes) -> dict[str, Any]:
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise SampleFormatError("sample metadata is not a JSON object")
    return meta
