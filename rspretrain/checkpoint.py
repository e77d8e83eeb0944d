"""Checkpoints: atomic writes, `weights_only=True` loads, and a fall back to the previous good one.

A checkpoint is a dict of plain data and tensors only (no pickled classes), so `torch.load(weights_only=True)`
reads it and a crafted pickle is refused (export reads checkpoints only through `load_checkpoint`, and writes
safetensors). Files live in RUN/checkpoints/step-000001000.pt; the newest
`keep` are kept. A write goes to a temporary file in the same folder, is fsynced, then `os.replace`d, so a
crash leaves either the old file set or the new one, never a half-written checkpoint under a real name.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "rspretrain-checkpoint"
VERSION = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ours: the message names the file."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, newest (highest step) first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (temporary file, fsync, os.replace, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep`; also drop temporary files a killed writer left (only rank 0 writes, in turn)."""
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    for stale in (Path(run_dir) / FOLDER).glob(".step-*.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint with `weights_only=True`; CheckpointError if it cannot be trusted or read."""
    state = load_trusted(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rspretrain checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')}, this rspretrain reads {VERSION}"
        )
    return state


def load_trusted(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Any torch.save file holding plain data and tensors (ours, or an official MAE / SelectiveMAE one, whose
    `args` is an argparse.Namespace), read with `weights_only=True`; CheckpointError names what was refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        code = [line for line in lines if "GLOBAL" in line]
        if code:  # a class or function to import: what a crafted pickle needs to run code
            raise CheckpointError(
                f"{path}: refused, it holds more than plain data and tensors ({code[0]})"
            ) from None
        # not a zip and not a plain pickle either: bytes cut off or overwritten (zeros, garbage), never run
        why = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path}: truncated or corrupt, not a readable checkpoint ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt ({first})") from None
    return state


def load_latest(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, falling back to older ones; None if the run has none."""
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.error("%s; falling back to the previous checkpoint", exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no checkpoint of the run can be loaded: " + "; ".join(errors))
    return None


def resolve_checkpoint(
    run_or_file: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """A run folder (its newest good checkpoint) or a checkpoint file -> (path, state)."""
    target = Path(run_or_file)
    if target.is_dir():
        found = load_latest(target, map_location)
        if found is None:
            raise CheckpointError(f"{target}: no checkpoints in {target / FOLDER}")
        return found
    return target, load_checkpoint(target, map_location)


# --------------------------------------------------------------------------- RNG state as plain data


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and tuples (weights_only-loadable)."""
    version, mt, pos = random.getstate()[:3]
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), pos],
        "numpy": [
            np_name,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, pos = state["python"]
    random.setstate((version, tuple(mt), pos))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
