"""Typed YAML: build dataclasses from `yaml.safe_load` data, refusing unknown keys and wrong types.

Shared by the curation recipe (recipe.py), the dataset manifests (manifest.py) and rspretrain's training
config, so all three speak with one voice: every message names the file, the key and what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jp2")


class RecipeError(ValueError):
    """A mistake in a recipe or manifest that the user can fix."""


# libyaml's safe loader when present: the same results as yaml.safe_load, several times faster.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | Path, what: str, error: type[Exception] = RecipeError) -> Any:
    """The safely parsed content of a YAML file; a missing, unreadable or malformed file is `error`."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{where}: {what} file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{where}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise error(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def convert(tp: Any, value: Any, where: str, key: str, error: type[Exception] = RecipeError) -> Any:
    """Check `value` against the annotation `tp`; YAML lists become tuples or lists, mappings dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, where, key, error)
    if origin is typing.Literal:
        if value not in args:
            raise error(f"{where}: {key}: {value!r}; use one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise error(
                f"{where}: {key}: expected a list, got {type(value).__name__} {value!r}; "
                f"write a YAML list, e.g. [{value!r}]"
            )
        if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
            item_types = [args[0] if args else Any] * len(value)
        elif len(args) != len(value):
            raise error(f"{where}: {key}: expected {len(args)} values, got {len(value)}")
        else:
            item_types = list(args)
        items = [
            convert(t, v, where, f"{key}[{i}]", error)
            for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        ]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, key, error)
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(
                f"{where}: {key}: expected a string, got {type(value).__name__} {value!r}; quote it in the YAML"
            )
        return value
    raise TypeError(f"unsupported annotation {tp}")


def build(cls: Any, data: Any, where: str, prefix: str = "", error: type[Exception] = RecipeError) -> Any:
    """Instantiate dataclass `cls` from a mapping; the field `path` (where it was read from) is not a key."""
    if not isinstance(data, Mapping):
        label = prefix or "the file"
        raise error(f"{where}: {label}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: f for f in dataclasses.fields(cls) if f.name != "path" and not f.metadata.get("internal")
    }
    for k in data:
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else str(k)
            raise error(
                f"{where}: unknown key {key!r}{did_you_mean(str(k), fields)}; known keys here: {', '.join(fields)}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{where}: missing key {key!r}; add it")
            continue
        kwargs[name] = convert(hints[name], data[name], where, key, error)
    return cls(**kwargs)
