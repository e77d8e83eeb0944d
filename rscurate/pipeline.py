"""Runs the passes in order with resume: scan -> exclude -> slice -> hash -> dedup -> shard.

The pass functions (`scan.run`, `exclude.run`, `slicing.run`, `decontam.run`, `dedup.run`, `shard.assign`)
are pure table -> table functions; this module decides what runs, maps the per-row-independent ones
over partitions with an `Executor` (rscurate.executors: local pool or Dask), and persists what they
return under `OUT/_work/`:

    _work/{pass}.{table}.parquet   the tables a finished pass produced (inputs, benchmarks, tiles)
    _work/{pass}.done.json         written last: the pass is finished (and its per-pass counts)
    _work/slice/part-*.parquet     slice results per partition (see DATA_SUFFIX for its companions)
    _work/shard.plan.parquet       which key goes to which shard, for deciding whether a tar is current
    _work/log.jsonl                one line per pass execution: what ran and what was reused

Every file is written to a temporary name and renamed, so a killed run (or a killed worker, whose task
reruns elsewhere) leaves either the old state or the new one. A rerun redoes only unfinished passes,
partitions and shards; because every decision is a function of the recipe and the input files (never of
timing, worker count or executor), the final outputs are byte-identical to an uninterrupted run.

OUT may be an fsspec URL (s3://...): the final files are uploaded there, each as one object, and the
pass state lives in a local or shared `--work` folder instead (see layout_of).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from . import archive, fs, shard
from .executors import (  # noqa: F401  (re-exported: the executors lived here)
    IN_FLIGHT_PER_WORKER,
    THREAD_ENV,
    DaskExecutor,
    Executor,
    ExecutorError,
    ProcessExecutor,
    SerialExecutor,
    cpu_count,
    make_executor,
)
from .progress import NullProgress, Progress
from .recipe import ExcludeConfig, Recipe, ShardConfig, SliceConfig, SourceConfig
from .sample import encode_metadata

log = logging.getLogger(__name__)

PASSES = ("scan", "exclude", "slice", "hash", "dedup", "shard")
# Tables each pass persists under _work (the shard pass writes the final outputs instead).
_WRITES: dict[str, tuple[str, ...]] = {
    "scan": ("inputs",),
    "exclude": ("inputs", "benchmarks"),
    "slice": ("inputs", "tiles"),
    "hash": ("inputs", "tiles"),
    "dedup": ("tiles",),
    "shard": (),
}
INPUT_STATUSES = ("ok", "excluded", "error")
TILE_STATUSES = ("kept", "duplicate", "excluded")
FINAL_FILES = ("inputs.parquet", "tiles.parquet", "stats.json")

# A slice partition: consecutive ok inputs up to this many pixels or scenes. Fixed, so partitions
# (and their part files) do not depend on the worker count.
PARTITION_PIXELS = 64_000_000
PARTITION_SCENES = 512
# Files per scan task: enough that a task's fixed cost (its table, its hand-over) is small next to reading
# small files; fewer when the parent hands the tasks the bytes of compressed-tar members.
SCAN_CHUNK = 256
SCAN_CHUNK_FED = 64
# A slice partition's files: part-*.parquet (its tiles, without their bytes; written last, so it marks
# the partition done), part-*.scenes.parquet (its scenes), part-*.data.bin (the encoded bytes of its kept
# tiles, one after another as slicing produces them; the tiles file gives each one's data_offset and
# data_length). The shard pass reads every tile with one positioned read of exactly its bytes: a global
# shuffle draws each shard's tiles from every partition, and reading them from row groups of a columnar
# file would read (and copy) the whole group for each tile.
DATA_SUFFIX = ".data.bin"
# Columns of the part tiles files that locate the staged bytes; not part of the tiles table.
STAGING_COLUMNS = ("data_offset", "data_length")
SCENES_SUFFIX = ".scenes.parquet"


class OutputError(Exception):
    """An output folder that cannot be used as asked (user-fixable; exit code 2 at the CLI)."""


# --- files --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a run's files go. `out` is the local folder that holds `_work` and the recipe.yaml that
    claims it: OUT itself, or the --work folder when OUT is a URL. `final` is OUT as given, a folder or
    a URL: inputs.parquet, tiles.parquet, stats.json, recipe.yaml and shards/ are written there."""

    out: Path
    final: str = ""

    def __post_init__(self) -> None:
        if not self.final:
            object.__setattr__(self, "final", str(self.out))

    @property
    def remote(self) -> bool:
        return fs.is_url(self.final)

    @property
    def work(self) -> Path:
        return self.out / "_work"

    @property
    def shards(self) -> str:
        return fs.join(self.final, "shards")

    def final_file(self, name: str) -> str:
        return fs.join(self.final, name)

    @property
    def slice_dir(self) -> Path:
        return self.work / "slice"

    @property
    def recipe_file(self) -> Path:
        return self.out / "recipe.yaml"

    @property
    def log_file(self) -> Path:
        return self.work / "log.jsonl"

    @property
    def plan_file(self) -> Path:
        return self.work / "shard.plan.parquet"

    def table(self, pass_name: str, table: str) -> Path:
        return self.work / f"{pass_name}.{table}.parquet"

    def marker(self, pass_name: str) -> Path:
        return self.work / f"{pass_name}.done.json"


def layout_of(out: str | os.PathLike[str], work: str | os.PathLike[str] | None = None) -> Layout:
    """The Layout of OUT: a local folder keeps its state in OUT/_work; a URL keeps it under `work`
    (default: a folder per URL in the user's cache), which every worker must see too."""
    out = fs.local_path(out)
    if not fs.is_url(out):
        if work is not None:
            raise OutputError("--work is for an OUT that is a URL; a local OUT keeps its state in OUT/_work")
        return Layout(Path(out).absolute())
    problem = fs.protocol_problem(out, write=True)
    if problem:
        raise OutputError(f"--out {out}: {problem}")
    out = out.rstrip("/")
    if work is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        work = cache / "rscurate" / "work" / hashlib.sha256(out.encode()).hexdigest()[:16]
    return Layout(Path(fs.local_path(work)).absolute(), out)


def write_parquet(path: str | os.PathLike[str], df: pd.DataFrame, row_group_size: int | None = None) -> None:
    """Write a table atomically (temporary file, then rename; one upload to a URL); no index, so the
    bytes follow the rows."""
    if fs.is_url(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(
            pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False),
            buffer,
            row_group_size=row_group_size,
        )
        fs.write_bytes(str(path), buffer.getvalue().to_pybytes())
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    try:
        with _naming(path):
            pq.write_table(table, tmp, row_group_size=row_group_size)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path | str, data: Any, sort_keys: bool = True) -> None:
    if fs.is_url(path):
        fs.write_bytes(str(path), (json.dumps(data, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8"))
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _naming(path):
            tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written stats.json.tmp must not stay next to the outputs
        raise


def _append_log(layout: Layout, record: Mapping[str, Any]) -> None:
    with _naming(layout.log_file), open(layout.log_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names `path`: a full disk fails write() or close(), which name no file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # OSError("text") would lose its text
            exc.filename = str(path)
        raise


# Write failures on OUT that a person fixes outside rscurate: errno -> (what happened, what to do).
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on device", "free some space on that disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise your quota"),
    errno.EACCES: ("permission denied", "make {folder} writable for this user"),
    errno.EPERM: ("permission denied", "make {folder} writable for this user"),
    errno.EROFS: ("read-only file system", "put --out on a writable disk"),
}


def write_failure(exc: OSError) -> str | None:
    """One line for a file under OUT that could not be written (full disk, permissions), naming the file
    and the fix; None for any other OSError. Every write is atomic, so the run resumes once it is fixed."""
    if exc.errno not in _WRITE_FAILURES:
        return None
    what, fix = _WRITE_FAILURES[exc.errno]
    path = os.fsdecode(exc.filename) if exc.filename is not None else "a file in the output folder"
    fix = fix.format(folder=os.path.dirname(path) or ".")
    return (
        f"cannot write {path}: {what}; {fix} (or choose another --out), then run the same command again: "
        "it resumes where it stopped"
    )


def read_log(out: str | os.PathLike[str], work: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The pass executions recorded in OUT/_work/log.jsonl (--work/_work for a URL), oldest first."""
    path = layout_of(out, work).log_file
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # blank, or cut short by a kill or a full disk
            continue
    return records


_FINGERPRINT_LINE = re.compile(r"^# fingerprint: ([0-9a-f]+)\s*$", re.M)


def check_output(
    recipe: Recipe, out: str | os.PathLike[str], work: str | os.PathLike[str] | None = None
) -> bool:
    """Raise OutputError if OUT cannot take this recipe's outputs; True if OUT already belongs to it.

    OUT is usable when it is new or empty, or when its recipe.yaml has this recipe's fingerprint. For a
    URL, the local --work folder must be usable in the same way.
    """
    layout = layout_of(out, work)
    owned = [_check_owner(recipe, folder) for folder in _claimed(layout)]
    return all(owned)


def _claimed(layout: Layout) -> list[str]:
    """The folders a run claims with its recipe.yaml: OUT, and the --work folder of a URL."""
    return [layout.final, str(layout.out)] if layout.remote else [layout.final]


def _check_owner(recipe: Recipe, out: str) -> bool:
    if not fs.is_url(out) and os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} is a file; give a folder")
    recipe_file = fs.join(out, "recipe.yaml")
    fingerprint = recipe.fingerprint()
    if fs.exists(recipe_file):
        text = fs.read_bytes(recipe_file).decode("utf-8", errors="replace")
        match = _FINGERPRINT_LINE.search(text)
        if match is None:
            raise OutputError(
                f"{recipe_file} was not written by rscurate; choose an empty or new folder for --out"
            )
        if match.group(1) != fingerprint:
            try:
                old = yaml.safe_load(text) or {}
            except yaml.YAMLError:
                old = {}
            new = recipe.to_dict()
            differ = [k for k in new if old.get(k) != new[k]] if isinstance(old, dict) else []
            where = f" (they differ in: {', '.join(differ)})" if differ else ""
            raise OutputError(
                f"{out} was made by a different recipe{where}: fingerprint {match.group(1)}, this recipe "
                f"{fingerprint}. Use a new --out folder, or delete {out} to start over"
            )
        return True
    if fs.listdir(out):
        raise OutputError(
            f"{out} is not empty and has no rscurate recipe.yaml; choose an empty or new folder for --out"
        )
    return False


def _claim_output(recipe: Recipe, layout: Layout) -> None:
    """Check OUT (see check_output) and write recipe.yaml the first time (to OUT, and to --work for a URL)."""
    unclaimed = [folder for folder in _claimed(layout) if not _check_owner(recipe, folder)]
    fingerprint = recipe.fingerprint()
    header = f"# Resolved recipe written by rscurate. Outputs in this folder belong to it.\n# fingerprint: {fingerprint}\n"
    text = header + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
    for folder in unclaimed:
        if fs.is_url(folder):
            fs.write_bytes(fs.join(folder, "recipe.yaml"), text.encode("utf-8"))
            continue
        recipe_file = Path(folder) / "recipe.yaml"
        # recipe.yaml first: nothing else may precede it
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = recipe_file.with_name("recipe.yaml.tmp")
        try:
            with _naming(recipe_file):
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, recipe_file)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a leftover would make OUT look like a stranger's folder
            raise


# --- state --------------------------------------------------------------------------------------------


@dataclass
class State:
    inputs: pd.DataFrame | None = None
    benchmarks: pd.DataFrame | None = None
    tiles: pd.DataFrame | None = None


@dataclass
class PassReport:
    name: str
    ran: bool  # False: finished earlier and reused
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass
class RunResult:
    out: Path | str  # the folder, or the URL
    passes: list[PassReport]
    stats: dict[str, Any]
    seconds: float
    complete: bool  # every pass through shard is finished and the final outputs are written


@dataclass
class _Done:
    """What a pass returns: the new tables, its counts, and the files that must exist for it to count
    as finished (slice: `parts`, shard: `shards`), recorded in its marker."""

    state: State
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Context:
    recipe: Recipe
    layout: Layout
    executor: Executor
    progress: Progress
    partition_pixels: int
    detail: str = ""


def _outputs_of(layout: Layout, pass_name: str) -> list[str]:
    files = [str(layout.table(pass_name, t)) for t in _WRITES[pass_name]]
    if pass_name == "shard":
        files += [layout.final_file(f) for f in FINAL_FILES]
        files += [fs.join(layout.shards, shard.SIZES_FILE), fs.join(layout.shards, shard.INFO_FILE)]
    return files


def _is_done(layout: Layout, pass_name: str) -> bool:
    marker = layout.marker(pass_name)
    if not marker.exists():
        return False
    if not all(fs.exists(p) for p in _outputs_of(layout, pass_name)):
        return False
    record = json.loads(marker.read_text(encoding="utf-8"))
    if pass_name == "slice":
        parts = record.get("parts", [])
        # Parts staged in another layout (no part-*.data.bin, e.g. .data.parquet) are sliced again.
        n_data = sum(name.endswith(DATA_SUFFIX) for name in parts)
        n_scenes = sum(name.endswith(SCENES_SUFFIX) for name in parts)
        return n_data == n_scenes and all((layout.slice_dir / name).exists() for name in parts)
    if pass_name == "shard":
        present = set(fs.listdir(layout.shards))  # one listing, not a request per shard on a URL
        return all(name in present for name in record.get("shards", []))
    return True


def _invalidate(layout: Layout, pass_name: str, deep: bool = False) -> None:
    """Forget that a pass finished. Part files and tars stay (reused when still current) unless deep."""
    layout.marker(pass_name).unlink(missing_ok=True)
    if pass_name == "shard":
        for name in FINAL_FILES:
            fs.remove(layout.final_file(name))
    if deep and pass_name == "slice" and layout.slice_dir.exists():
        for p in layout.slice_dir.iterdir():
            p.unlink()
    if deep and pass_name == "shard":
        layout.plan_file.unlink(missing_ok=True)


def _load_state(layout: Layout, upto: int) -> State:
    """Tables as they stood after PASSES[upto - 1]: each from the latest pass before `upto` that wrote it."""
    state = State()
    for table in ("inputs", "benchmarks", "tiles"):
        for p in reversed(PASSES[:upto]):
            if table in _WRITES[p]:
                setattr(state, table, pd.read_parquet(layout.table(p, table)))
                break
    return state


def _summary_of(layout: Layout, pass_name: str) -> dict[str, Any]:
    marker = layout.marker(pass_name)
    if not marker.exists():
        return {}
    return dict(json.loads(marker.read_text(encoding="utf-8")).get("summary", {}))


# --- the run ------------------------------------------------------------------------------------------


def run(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    until: str = "shard",
    workers: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    executor: Executor | None = None,
    partition_pixels: int = PARTITION_PIXELS,
    work: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run the passes through `until`, resuming from what OUT already holds.

    `force` redoes `until` itself (and so every later pass). Raises OutputError when OUT belongs to
    another recipe. OUT may be a URL (s3://...): the final files go there and the pass state to `work`
    (see layout_of). `executor` (default: make_executor(workers)) is closed only if made here.
    """
    if until not in PASSES:
        raise OutputError(f"unknown pass {until!r}; passes are {', '.join(PASSES)}")
    started = time.perf_counter()
    layout = layout_of(out, work)
    _claim_output(recipe, layout)
    for d in (layout.work, layout.slice_dir, *([] if layout.remote else [Path(layout.shards)])):
        d.mkdir(parents=True, exist_ok=True)
    target = PASSES.index(until)
    if force:
        for p in PASSES[target:]:
            _invalidate(layout, p, deep=p == until)

    first = next((i for i in range(target + 1) if not _is_done(layout, PASSES[i])), None)
    reports = [
        PassReport(p, ran=False, summary=_summary_of(layout, p))
        for p in PASSES[: target + 1 if first is None else first]
    ]
    for r in reports:  # the log says what a resumed run did not redo, as well as what it ran
        _append_log(layout, {"pass": r.name, "event": "reused"})
    if first is None:
        stats = _stats_for(recipe, layout, target)
        return RunResult(
            _shown(layout), reports, stats, time.perf_counter() - started, _is_done(layout, "shard")
        )

    # Whatever follows a pass that reruns must rerun too.
    for p in PASSES[first:]:
        _invalidate(layout, p)

    state = _load_state(layout, first)
    own_executor = executor is None
    ex = executor if executor is not None else make_executor(workers)
    ctx = _Context(recipe, layout, ex, progress or NullProgress(), partition_pixels)
    failed = True
    try:
        _require_visible(ex, recipe, layout)
        for p in PASSES[first : target + 1]:
            t0, cpu0 = time.perf_counter(), time.process_time()
            ctx.detail = ""
            log.debug("pass %s: starting", p)
            before = replace(state)
            done = _PASS_FUNCS[p](ctx, state)
            state = done.state
            summary = {**_decisions(before, state), **done.summary}
            for table in _WRITES[p]:
                write_parquet(layout.table(p, table), getattr(state, table))
            # Continue from what was persisted, so a fresh run and a resumed one see the same frames.
            state = _load_state(layout, PASSES.index(p) + 1) if _WRITES[p] else state
            if p == "shard":
                _finish(ctx, state, summary, done.files["shards"])
            _write_json(layout.marker(p), {"pass": p, "summary": summary, **done.files})
            seconds = time.perf_counter() - t0
            _append_log(
                layout,
                {
                    "pass": p,
                    "event": "ran",
                    "seconds": round(seconds, 3),
                    # This process only, not its workers: on a shared machine, seconds minus this is
                    # waiting (for a core, for workers); with workers it is the pass's serial part.
                    "cpu_seconds": round(time.process_time() - cpu0, 3),
                    "workers": ex.workers,
                    "detail": ctx.detail,
                },
            )
            reports.append(PassReport(p, ran=True, seconds=seconds, summary=summary, detail=ctx.detail))
            log.debug("pass %s finished in %.1f s%s", p, seconds, f" ({ctx.detail})" if ctx.detail else "")
        failed = False
    finally:
        ctx.progress.finish()
        if own_executor:
            ex.close(cancel=failed)  # on Ctrl-C or an error, drop the partitions not started yet

    stats = _stats_for(recipe, layout, target, state)
    return RunResult(_shown(layout), reports, stats, time.perf_counter() - started, _is_done(layout, "shard"))


def _shown(layout: Layout) -> Path | str:
    """OUT as RunResult gives it: the folder, or the URL."""
    return layout.final if layout.remote else layout.out


def _require_visible(ex: Executor, recipe: Recipe, layout: Layout) -> None:
    """Workers on other machines must see the files this machine sees: the work folder (a probe file
    written here, so a same-named folder on another disk does not pass), OUT, and the roots."""
    if isinstance(ex, (SerialExecutor, ProcessExecutor)):
        return  # this machine's processes
    probe = layout.work / f"probe-{os.getpid()}-{time.time_ns()}"
    probe.write_bytes(b"")
    try:
        roots = [s.root for s in recipe.sources] + [b.root for b in recipe.benchmarks]
        claimed = [fs.join(layout.final, "recipe.yaml")] if layout.remote else []
        ex.require_visible([str(probe), *claimed, *roots])
    finally:
        probe.unlink(missing_ok=True)


def pending(
    out: str | os.PathLike[str], until: str = "shard", work: str | os.PathLike[str] | None = None
) -> list[str]:
    """The passes a run through `until` would execute now (the first unfinished one and what follows)."""
    layout = layout_of(out, work)
    target = PASSES.index(until)
    first = next((i for i in range(target + 1) if not _is_done(layout, PASSES[i])), None)
    return [] if first is None else list(PASSES[first : target + 1])


def _decisions(before: State, after: State) -> dict[str, Any]:
    """Per pass counts: how many rows this pass added or moved to each status (and reason)."""
    summary: dict[str, Any] = {}
    for table, id_col in (("inputs", "path"), ("tiles", "key")):
        new = getattr(after, table)
        if new is None or new is getattr(before, table):
            continue
        old = getattr(before, table)
        labels = np.array(_labels(new), dtype=object)
        if old is not None and len(old):
            # The label each row had before the pass (looked up by id, vectorised: tables of millions).
            previous = pd.Series(_labels(old), index=old[id_col].to_numpy(dtype=object), dtype=object)
            previous = previous[~previous.index.duplicated(keep="last")]
            prior = previous.reindex(new[id_col].to_numpy(dtype=object)).to_numpy(dtype=object)
            changed = labels[prior != labels].tolist()
        else:
            changed = labels.tolist()
        counts = Counter(changed)
        if counts:
            summary[table] = dict(sorted(counts.items()))
    return summary


_CODE = re.compile(r"^[a-z][a-z0-9_]*$")


def reason_code(reason: Any) -> str | None:
    """The reason code of a table's `reason`: 'unreadable: truncated PNG' -> 'unreadable'.

    Free text without a code (what scan records before exclude assigns codes) gives None.
    """
    if reason is None or reason is pd.NA or (isinstance(reason, float) and math.isnan(reason)):
        return None
    code = str(reason).split(":", 1)[0].strip()
    return code if _CODE.match(code) else None


def _reason_codes(reasons: pd.Series) -> list[str | None]:
    """reason_code of every value, computed once per distinct value (a table has a few)."""
    values = reasons.to_numpy(dtype=object)
    codes_of: dict[Any, str | None] = {}
    out: list[str | None] = []
    for r in values:
        missing = r is None or r is pd.NA or (isinstance(r, float) and math.isnan(r))
        if missing:
            out.append(None)
            continue
        code = codes_of.get(r, _UNSEEN)
        if code is _UNSEEN:
            code = codes_of[r] = reason_code(r)
        out.append(code)  # type: ignore[arg-type]
    return out


_UNSEEN = object()


def _labels(df: pd.DataFrame) -> list[str]:
    """`status`, or `status:code` when the reason's code is another word than the status, per row.

    Worked out once per distinct (status, reason) pair, not per row: a table of millions has a few dozen.
    """
    status_ids, statuses = pd.factorize(df["status"].to_numpy(dtype=object))
    if not len(df) or (status_ids < 0).any():  # empty, or a missing status: row by row
        return _row_labels(df)
    status_text = [str(s) for s in statuses]
    if "reason" not in df:
        return np.array(status_text, dtype=object)[status_ids].tolist()
    reason_ids, reasons = pd.factorize(df["reason"].to_numpy(dtype=object))  # -1: missing
    codes = [reason_code(r) for r in reasons] + [None]  # [-1] is the code of a missing reason
    n = len(reasons) + 1
    pairs, inverse = np.unique(status_ids.astype(np.int64) * n + (reason_ids + 1), return_inverse=True)
    labels = []
    for pair in pairs.tolist():
        status, code = status_text[pair // n], codes[pair % n - 1]
        labels.append(status if code is None or code == status else f"{status}:{code}")
    return np.array(labels, dtype=object)[inverse.ravel()].tolist()


def _row_labels(df: pd.DataFrame) -> list[str]:
    """_labels row by row."""
    status = np.array([str(s) for s in df["status"].to_numpy(dtype=object)], dtype=object)
    if "reason" not in df or not len(df):
        return status.tolist()
    codes = np.array(_reason_codes(df["reason"]), dtype=object)
    plain = np.array([c is None for c in codes], dtype=bool) | (codes == status)
    return np.where(plain, status, status + ":" + np.where(plain, "", codes)).tolist()


# --- passes -------------------------------------------------------------------------------------------


def _chunks(df: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [df.iloc[i : i + size].reset_index(drop=True) for i in range(0, len(df), size)]


@dataclass(frozen=True)
class _WithMembers:
    """A per-chunk function run with the chunk's compressed-tar members at hand (archive.provided)."""

    fn: Callable[[pd.DataFrame], pd.DataFrame]

    def __call__(self, item: tuple[pd.DataFrame, dict[str, bytes | str] | None]) -> pd.DataFrame:
        chunk, members = item
        with archive.provided(members):
            return self.fn(chunk)


def _member_feed(paths: Sequence[str]) -> archive.MemberFeed:
    """A feed of the listed files that lie in compressed tars (paths as the tables write them)."""
    return archive.MemberFeed(_fs_paths(paths))


def _fs_paths(paths: Sequence[str]) -> list[str]:
    from .raster import fs_path

    return [fs_path(p) for p in paths if archive.SEPARATOR in p]


def _mapped(
    ctx: _Context, name: str, fn: Callable[[pd.DataFrame], pd.DataFrame], df: pd.DataFrame, unit: str
) -> pd.DataFrame:
    ctx.progress.start(name, len(df), unit)
    unread = df["status"].isna() if "status" in df else pd.Series(True, index=df.index)
    feed = _member_feed(df.loc[unread, "path"].tolist())
    chunks = _chunks(df, SCAN_CHUNK_FED if feed else SCAN_CHUNK)

    def items() -> Iterator[tuple[pd.DataFrame, dict[str, bytes | str] | None]]:
        for chunk in chunks:  # members streamed as the executor asks for chunks, in listing order
            yield chunk, feed.take(_fs_paths(chunk["path"].tolist())) if feed else None

    results = []
    try:
        for chunk, result in zip(chunks, ctx.executor.map(_WithMembers(fn), items()), strict=True):
            results.append(result)
            ctx.progress.advance(len(chunk))
    finally:
        feed.close()
    if not results:
        return fn(df.iloc[0:0].reset_index(drop=True))
    return pd.concat(results, ignore_index=True)


def _pass_scan(ctx: _Context, state: State) -> _Done:
    from . import scan

    files = scan.list_files(ctx.recipe)
    inputs = _mapped(ctx, "scan", scan.run, files, "files")
    return _Done(State(inputs=inputs), {"files": len(inputs)})


def _pass_exclude(ctx: _Context, state: State) -> _Done:
    from . import decontam, exclude

    assert state.inputs is not None
    inputs = exclude.run(ctx.recipe.exclude, state.inputs, ctx.recipe.sources)
    listed = exclude.list_benchmark_files(ctx.recipe)
    hashed = functools.partial(decontam.benchmark_run, cfg=ctx.recipe.exclude)
    benchmarks = _mapped(ctx, "benchmarks", hashed, listed, "files")
    counts = dict(sorted(Counter(_labels(benchmarks)).items())) if len(benchmarks) else {}
    return _Done(State(inputs=inputs, benchmarks=benchmarks), {"benchmarks": counts})


@dataclass(frozen=True, eq=False)
class _SliceTask:
    name: str
    tiles_file: str
    scenes_file: str
    data_file: str
    pixels: int
    inputs: pd.DataFrame  # the partition's rows of the inputs table
    slice: SliceConfig
    exclude: ExcludeConfig
    shard: ShardConfig
    sources: tuple[SourceConfig, ...]
    # Bytes of the partition's files that lie in compressed tars, streamed by the parent (archive.MemberFeed).
    members: dict[str, bytes | str] | None = None
    windows: Any = None  # decontam.WindowSearch: benchmark images searched for inside the scenes


def _partitions(inputs: pd.DataFrame, max_pixels: int) -> list[pd.DataFrame]:
    """Consecutive rows, cut when a partition reaches max_pixels or PARTITION_SCENES scenes."""
    parts: list[pd.DataFrame] = []
    start = 0
    pixels = 0
    px = (inputs["width"].astype("int64") * inputs["height"].astype("int64")).to_numpy()
    for i, n in enumerate(px):
        pixels += int(n)
        if pixels >= max_pixels or i + 1 - start >= PARTITION_SCENES:
            parts.append(inputs.iloc[start : i + 1].reset_index(drop=True))
            start, pixels = i + 1, 0
    if start < len(inputs):
        parts.append(inputs.iloc[start:].reset_index(drop=True))
    return parts


def _slice_partition(task: _SliceTask) -> int:
    """Worker side: slice one partition and persist it (the pass function itself does no I/O to OUT).

    The encoded bytes of the kept tiles go to the data file every slicing.SINK_BYTES (whole scenes), so
    a worker holds a few MB of tiles, not a partition's. The temporary name is the task's own: a rerun of
    a task whose worker died (or still runs, cut off from the scheduler) never writes into its file.
    """
    from . import slicing

    tmp = Path(f"{task.data_file}.{os.urandom(6).hex()}.tmp")
    staged: dict[str, tuple[int, int]] = {}  # key -> offset, length of the encoded bytes

    def stage(scene_tiles: pd.DataFrame) -> None:
        for key, blob in zip(scene_tiles["key"].tolist(), scene_tiles["data"].tolist(), strict=True):
            if blob is not None:
                staged[key] = (f.tell(), len(blob))
                f.write(blob)

    try:
        with _naming(tmp), open(tmp, "wb") as f, archive.provided(task.members):
            tiles, scenes = slicing.run(
                task.slice,
                task.exclude,
                task.shard,
                task.inputs,
                task.sources,
                sink=stage,
                window_search=task.windows,
            )
        with _naming(Path(task.data_file)):
            os.replace(tmp, task.data_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tiles = tiles.drop(columns="data").reset_index(drop=True)
    where = [staged.get(k) for k in tiles["key"].tolist()]
    tiles["data_offset"] = pd.array([w[0] if w else None for w in where], dtype="Int64")
    tiles["data_length"] = pd.array([w[1] if w else None for w in where], dtype="Int64")
    write_parquet(task.scenes_file, scenes)
    write_parquet(task.tiles_file, tiles)  # written last: the part is done
    return len(tiles)


def _pass_slice(ctx: _Context, state: State) -> _Done:
    from . import decontam, slicing

    assert state.inputs is not None
    recipe, layout = ctx.recipe, ctx.layout
    inputs = state.inputs
    ok = inputs[inputs["status"] == "ok"].reset_index(drop=True)
    config = json.dumps(
        {k: recipe.to_dict()[k] for k in ("sources", "exclude", "slice", "shard")}, sort_keys=True
    ).encode()
    # The scene-window search runs here, on the pixels slicing decodes: its matches depend on the benchmarks.
    search: Any = decontam.WindowSearch(recipe.exclude, state.benchmarks)
    if search.enabled:
        config += search.digest().encode()
    else:
        search = None
    tasks = []
    for i, part in enumerate(_partitions(ok, ctx.partition_pixels)):
        ident = hashlib.sha256(config)
        ident.update(part[["source", "path", "sha256"]].to_csv(index=False).encode())
        name = f"part-{i:05d}-{ident.hexdigest()[:12]}"
        pixels = int((part["width"].astype("int64") * part["height"].astype("int64")).sum())
        tasks.append(
            _SliceTask(
                name,
                str(layout.slice_dir / f"{name}.parquet"),
                str(layout.slice_dir / f"{name}{SCENES_SUFFIX}"),
                str(layout.slice_dir / f"{name}{DATA_SUFFIX}"),
                pixels,
                part,
                recipe.slice,
                recipe.exclude,
                recipe.shard,
                recipe.sources,
                windows=search,
            )
        )
    wanted = {Path(f).name for t in tasks for f in (t.tiles_file, t.scenes_file, t.data_file)}

    def clean() -> None:
        for p in layout.slice_dir.iterdir():
            if p.name not in wanted:  # a stale partition, or a temporary file of a killed task or run
                p.unlink(missing_ok=True)

    clean()
    todo = [t for t in tasks if not all(Path(f).exists() for f in (t.tiles_file, t.scenes_file, t.data_file))]
    total = sum(t.pixels for t in tasks)
    ctx.progress.start("slice", total / 1e6, "Mpx")
    ctx.progress.advance((total - sum(t.pixels for t in todo)) / 1e6)
    feed = _member_feed([p for t in todo for p in t.inputs["path"].tolist()])

    if not feed:
        # Largest partitions first (a large scene is one partition): a long task handed out last would
        # leave the other workers idle at the end. Names and outputs do not depend on the order. With
        # compressed tars the order stays the archives' own, which the feed streams front to back.
        todo.sort(key=lambda t: -t.pixels)

    def fed() -> Iterator[_SliceTask]:  # compressed-tar members streamed once, as tasks are handed out
        for t in todo:
            yield replace(t, members=feed.take(_fs_paths(t.inputs["path"].tolist()))) if feed else t

    try:
        for task, _ in zip(todo, ctx.executor.map(_slice_partition, fed()), strict=True):
            ctx.progress.advance(task.pixels / 1e6)
    finally:
        feed.close()
    clean()
    ctx.detail = f"{len(todo)} partitions sliced, {len(tasks) - len(todo)} reused"

    tile_frames = []
    scene_frames = []
    for t in tasks:
        schema = pq.read_schema(t.tiles_file)
        tile_frames.append(
            pq.read_table(
                t.tiles_file, columns=[c for c in schema.names if c not in ("data", *STAGING_COLUMNS)]
            ).to_pandas()
        )
        scene_frames.append(pd.read_parquet(t.scenes_file))
    tiles = _concat(tile_frames, [c for c in slicing.TILE_COLUMNS if c != "data"])
    scenes = _concat(scene_frames, slicing.SCENE_COLUMNS)
    inputs, tiles = _apply_scenes(inputs, tiles, scenes)
    staged = tiles["image_sha256"].notna()
    copied = int((staged & tiles["copied"].astype(bool)).sum())
    # How many kept tiles are the source files' own bytes (shard.reencode auto) and how many were encoded.
    summary = {"copied": copied, "encoded": int(staged.sum()) - copied}
    return _Done(State(inputs, state.benchmarks, tiles), summary, {"parts": sorted(wanted)})


def _concat(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)


def _apply_scenes(
    inputs: pd.DataFrame, tiles: pd.DataFrame, scenes: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scene results into the inputs table; tiles get `relpath`; nothing stays kept from a scene that is not ok."""
    inputs = inputs.copy()
    by_path = scenes.set_index("path")
    if not by_path.index.is_unique:
        raise RuntimeError("slicing returned two scene rows for one path")
    inputs["scene_phash"] = inputs["path"].map(by_path["scene_phash"])
    if "benchmark_windows" in by_path.columns:  # benchmark images found inside the scene (rscurate.decontam)
        inputs["benchmark_windows"] = inputs["path"].map(by_path["benchmark_windows"])
    bad = scenes[scenes["status"] != "ok"]
    if len(bad):
        idx = inputs.index[inputs["path"].isin(bad["path"])]
        inputs.loc[idx, "status"] = inputs.loc[idx, "path"].map(bad.set_index("path")["status"])
        inputs.loc[idx, "reason"] = inputs.loc[idx, "path"].map(bad.set_index("path")["reason"])
    tiles = tiles.copy()
    tiles["relpath"] = tiles["path"].map(inputs.set_index("path")["relpath"])
    if tiles["key"].duplicated().any():
        dup = tiles.loc[tiles["key"].duplicated(), "key"].iloc[0]
        raise RuntimeError(f"two tiles share the key {dup}; keys must be unique")
    scene_reason = dict(zip(bad["path"], bad["reason"], strict=True))
    orphan = tiles["path"].isin(scene_reason) & (tiles["status"] == "kept")
    if orphan.any():
        tiles.loc[orphan, "status"] = "excluded"
        tiles.loc[orphan, "reason"] = [reason_code(scene_reason[p]) for p in tiles.loc[orphan, "path"]]
    return inputs, tiles


def _pass_hash(ctx: _Context, state: State) -> _Done:
    """Benchmark decontamination (rscurate.decontam): scenes and tiles near a benchmark image, its flips,
    rotations and sub-windows, and tiles covering a benchmark image found inside their scene."""
    from . import decontam

    assert state.inputs is not None and state.tiles is not None and state.benchmarks is not None
    ctx.progress.start("hash", 1, "pass")

    def locate(keys: list[str]) -> dict[str, tuple[str, int, int]]:  # staged bytes, for the pixel checks
        return _staged_where(ctx.layout, set(keys))

    inputs, tiles, summary = decontam.run(
        ctx.recipe.exclude,
        state.inputs,
        state.tiles,
        state.benchmarks,
        locate=locate,
        map_fn=ctx.executor.map,  # the pixel checks spread over the workers
        workers=lambda: ctx.executor.workers,
    )
    ctx.progress.advance(1)
    return _Done(State(inputs, state.benchmarks, tiles), summary)


def _pass_dedup(ctx: _Context, state: State) -> _Done:
    from . import dedup

    assert state.tiles is not None
    ctx.progress.start("dedup", 1, "pass")
    tiles = dedup.run(ctx.recipe.dedup, state.tiles, ctx.recipe.source_order())
    ctx.progress.advance(1)
    return _Done(State(state.inputs, state.benchmarks, tiles))


@dataclass(frozen=True, eq=False)
class _ShardTask:
    path: str
    image_ext: str
    # (key, data file of a slice partition, offset and length in it), in write order
    samples: tuple[tuple[str, str, int, int], ...]
    # The samples' rows of the tiles table (the columns their json needs, column -> values), in the same
    # order: the worker writes the json, so the parent's share of the pass does not grow with the number
    # of samples. Lists, not a frame: a frame per shard cost the parent a slice and a pickle of each column.
    rows: dict[str, list[Any]]


# Tiles-table columns a sample's json is made from (shard.sample_metadata).
_METADATA_COLUMNS = (
    "key",
    "source",
    "relpath",
    "x",
    "y",
    "width",
    "height",
    "phash",
    "task",
    "crs",
    "bounds",
)


def _read_tile_bytes(samples: Sequence[tuple[Any, ...]]) -> dict[str, bytes]:
    """Encoded tiles by key, from (key, data file, offset, length, ...) items: one positioned read of
    exactly each tile's bytes, in file order."""
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for key, data_file, offset, length, *_ in samples:
        by_file.setdefault(data_file, []).append((offset, length, key))
    data: dict[str, bytes] = {}
    for data_file, wanted in by_file.items():
        with _naming(Path(data_file)), open(data_file, "rb") as f:
            for offset, length, key in sorted(wanted):
                blob = os.pread(f.fileno(), length, offset)
                if len(blob) != length:
                    raise RuntimeError(
                        f"{data_file}: tile {key} needs bytes {offset}..{offset + length}, the file ends "
                        f"sooner (cut short? rerun the slice pass with --force)"
                    )
                data[key] = blob
    return data


def _write_shard_task(task: _ShardTask) -> int:
    """Worker side: one tar, written straight to OUT (a URL gets it as one upload of a finished tar).

    Locally the tar is staged under a name of this attempt's own, then renamed: an attempt rerun after
    its worker was lost (or cut off, still running) never writes into the same file as the first.
    """
    data = _read_tile_bytes(task.samples)
    records = (dict(zip(task.rows, values, strict=True)) for values in zip(*task.rows.values(), strict=True))
    metas = [encode_metadata(shard.sample_metadata(r)) for r in records]
    samples = (
        shard.Sample(key, task.image_ext, data[key], meta)
        for (key, *_), meta in zip(task.samples, metas, strict=True)
    )
    if not fs.is_url(task.path):
        staged = Path(f"{task.path}.{os.urandom(6).hex()}{shard.TMP_SUFFIX}")
        try:
            written = shard.write_shard(staged, samples)
            with _naming(Path(task.path)):
                os.replace(staged, task.path)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return written
    with tempfile.TemporaryDirectory(prefix="rscurate-shard-") as tmp:
        local = os.path.join(tmp, task.path.rsplit("/", 1)[-1])
        written = shard.write_shard(local, samples)
        fs.put_file(local, task.path)
    return written


def _staged_where(layout: Layout, keys: set[str] | None = None) -> dict[str, tuple[str, int, int]]:
    """Where each kept tile's bytes are (of `keys`, or all): the data file of its slice partition, and
    offset and length in it."""
    slice_record = json.loads(layout.marker("slice").read_text(encoding="utf-8"))
    where: dict[str, tuple[str, int, int]] = {}
    for name in slice_record["parts"]:
        if not name.endswith(DATA_SUFFIX):
            continue
        data_file = str(layout.slice_dir / name)
        located = pq.read_table(
            layout.slice_dir / (name.removesuffix(DATA_SUFFIX) + ".parquet"),
            columns=["key", *STAGING_COLUMNS],
        ).to_pydict()
        for key, offset, length in zip(*(located[c] for c in ("key", *STAGING_COLUMNS)), strict=True):
            if offset is not None and (keys is None or key in keys):
                where[key] = (data_file, offset, length)
    return where


def _pass_shard(ctx: _Context, state: State) -> _Done:
    assert state.tiles is not None
    recipe, layout = ctx.recipe, ctx.layout
    tiles = shard.assign(recipe.shard, recipe.name, state.tiles)
    plan = shard.plan(tiles)
    plan_df = pd.DataFrame(
        {
            "shard": [s for s, keys in plan.items() for _ in keys],
            "key": [k for keys in plan.values() for k in keys],
        }
    )
    current = False
    if layout.plan_file.exists():
        saved = pd.read_parquet(layout.plan_file)
        current = (
            saved["shard"].tolist() == plan_df["shard"].tolist()
            and saved["key"].tolist() == plan_df["key"].tolist()
        )
    present = []
    for name in fs.listdir(layout.shards):
        # A tar is current only if the plan that wrote it is this plan; temporary files are never current.
        if name.endswith(shard.TMP_SUFFIX) or (name.endswith(".tar") and (not current or name not in plan)):
            fs.remove(fs.join(layout.shards, name))
        else:
            present.append(name)
    if not current:
        write_parquet(layout.plan_file, plan_df)

    where = _staged_where(layout)
    todo = [name for name in plan if name not in present]
    wanted = tiles[tiles["shard"].isin(todo)].sort_values(["shard", "shard_position"])

    columns = [c for c in _METADATA_COLUMNS if c in wanted.columns]
    # Cut once into shards (`wanted` is sorted by shard): a frame per shard from groupby costs milliseconds
    # each, in the parent, for every one of 13,000 shards.
    names = wanted["shard"].to_numpy(dtype=object)
    starts = [0, *(np.flatnonzero(names[1:] != names[:-1]) + 1).tolist(), len(names)]
    keys_all = wanted["key"].tolist()
    table = {c: wanted[c].tolist() for c in columns}  # column lists, cut per shard

    def tasks() -> Iterator[_ShardTask]:  # built one shard at a time, as the executor asks for them
        for a, b in itertools.pairwise(starts):
            if a == b:
                continue
            samples = tuple((key, *where[key]) for key in keys_all[a:b])
            rows = {c: values[a:b] for c, values in table.items()}
            yield _ShardTask(fs.join(layout.shards, str(names[a])), recipe.shard.image_format, samples, rows)

    total = sum(len(k) for k in plan.values())
    ctx.progress.start("shard", total, "samples")
    ctx.progress.advance(total - len(wanted))
    for name, written in zip(todo, ctx.executor.map(_write_shard_task, tasks()), strict=True):
        if written != len(plan[name]):
            raise RuntimeError(f"{name}: wrote {written} samples, planned {len(plan[name])}")
        ctx.progress.advance(written)
    for name in fs.listdir(layout.shards):
        if name.endswith(shard.TMP_SUFFIX):  # left by an attempt whose worker died
            fs.remove(fs.join(layout.shards, name))
    ctx.detail = f"{len(todo)} shards written, {len(plan) - len(todo)} reused"
    sizes = {name: len(keys) for name, keys in plan.items()}
    if layout.remote:
        for file_name, data in shard.index_files(recipe.name, sizes).items():
            fs.write_bytes(fs.join(layout.shards, file_name), data)
    else:
        shard.write_index(layout.shards, recipe.name, sizes)
    return _Done(
        State(state.inputs, state.benchmarks, tiles),
        {"shards": len(sizes), "samples": total},
        {"shards": sorted(sizes)},
    )


_PASS_FUNCS: dict[str, Callable[[_Context, State], _Done]] = {
    "scan": _pass_scan,
    "exclude": _pass_exclude,
    "slice": _pass_slice,
    "hash": _pass_hash,
    "dedup": _pass_dedup,
    "shard": _pass_shard,
}


# --- final outputs and stats --------------------------------------------------------------------------


def final_inputs(recipe: Recipe, inputs: pd.DataFrame) -> pd.DataFrame:
    order = recipe.source_order()
    df = inputs.assign(_o=inputs["source"].map(order)).sort_values(["_o", "relpath"], kind="stable")
    return df.drop(columns="_o").reset_index(drop=True)


def final_tiles(tiles: pd.DataFrame) -> pd.DataFrame:
    return tiles.sort_values("key", kind="stable").reset_index(drop=True)


def _finish(ctx: _Context, state: State, summary: dict[str, Any], shard_names: Sequence[str]) -> None:
    """The shard pass's last step: inputs.parquet, tiles.parquet and stats.json (deterministic bytes)."""
    assert state.inputs is not None and state.tiles is not None
    recipe, layout = ctx.recipe, ctx.layout
    inputs = final_inputs(recipe, state.inputs)
    tiles = final_tiles(state.tiles)
    kept = int((tiles["status"] == "kept").sum())
    if kept != summary["samples"]:
        raise RuntimeError(f"{kept} kept tiles but {summary['samples']} samples planned into shards")
    if len(inputs) != inputs["path"].nunique():
        raise RuntimeError("inputs table lists a file twice")
    passes = {p: _summary_of(layout, p) for p in PASSES[:-1]}
    passes["shard"] = summary
    write_parquet(layout.final_file("inputs.parquet"), inputs)
    write_parquet(layout.final_file("tiles.parquet"), tiles)
    sizes = json.loads(fs.read_bytes(fs.join(layout.shards, shard.SIZES_FILE)))
    if sorted(sizes) != sorted(shard_names):
        raise RuntimeError("sizes.json does not list the planned shards")
    # Insertion order (recipe order of sources and passes, fixed order of statuses) is deterministic.
    _write_json(
        layout.final_file("stats.json"), compute_stats(recipe, inputs, tiles, passes, sizes), sort_keys=False
    )


def _count_table(df: pd.DataFrame, statuses: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    status_of = np.array([str(s) for s in df["status"].to_numpy(dtype=object)], dtype=object)
    status = Counter(status_of.tolist())
    reasons = Counter(c for c in _reason_codes(df["reason"]) if c is not None and c not in statuses)
    source_of = df["source"].to_numpy(dtype=object)
    by_source: dict[str, Any] = {}
    for src in sources:
        mine = source_of == src
        counts = Counter(status_of[mine].tolist())
        by_source[src] = {"total": int(mine.sum()), **{s: counts.get(s, 0) for s in statuses}}
    return {
        "total": len(df),
        "by_status": {s: status.get(s, 0) for s in statuses},
        "by_reason": dict(sorted(reasons.items())),
        "by_source": by_source,
    }


def compute_stats(
    recipe: Recipe,
    inputs: pd.DataFrame,
    tiles: pd.DataFrame | None,
    passes: Mapping[str, Any],
    sizes: Mapping[str, int],
) -> dict[str, Any]:
    """Counts per pass, per reason and per source; `kept` is the number of samples in the shards."""
    from . import decontam

    sources = [s.name for s in recipe.sources]
    if tiles is None:
        tiles = pd.DataFrame({c: pd.Series([], dtype=object) for c in ("status", "reason", "source")})
    return {
        "recipe": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "inputs": _count_table(inputs, INPUT_STATUSES, sources),
        "tiles": _count_table(tiles, TILE_STATUSES, sources),
        "passes": {p: dict(v) for p, v in passes.items() if v},
        "benchmarks": decontam.summary(inputs, tiles),
        "kept": int(sum(sizes.values())),
        "shards": len(sizes),
    }


def _stats_for(recipe: Recipe, layout: Layout, target: int, state: State | None = None) -> dict[str, Any]:
    """stats.json when the run is complete; otherwise counts over the latest persisted tables."""
    stats_file = layout.final_file("stats.json")
    if target == len(PASSES) - 1 and fs.exists(stats_file):
        return dict(json.loads(fs.read_bytes(stats_file)))
    if state is None:
        state = _load_state(layout, target + 1)
    passes = {p: _summary_of(layout, p) for p in PASSES[: target + 1]}
    assert state.inputs is not None
    return compute_stats(recipe, state.inputs, state.tiles, passes, {})


def load_stats(out: str | os.PathLike[str]) -> dict[str, Any]:
    """OUT/stats.json of a finished run (OUT: a folder or a URL)."""
    path = fs.join(fs.local_path(out), "stats.json")
    if not fs.exists(path):
        raise OutputError(
            f"{path} not found; finish a run into {out} first (rscurate run RECIPE --out {out})"
        )
    return dict(json.loads(fs.read_bytes(path)))
