"""Helpers shared by the benchmark scripts: thread pinning, median timings, peak memory of a
subprocess, machine description, and the markdown + JSON output every script writes.

Import this module before numpy and call `pin_threads()` first: BLAS and OpenMP read their thread
counts once, when they load.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "GDAL_NUM_THREADS",
)


def pin_threads(n: int = 1) -> dict[str, str]:
    """Set every thread-count variable to n in this process (for itself and its children)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    return {name: str(n) for name in THREAD_VARIABLES}


# ---------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Wall-clock and CPU seconds (this process) of each repeat, and their medians.

    On a shared machine the wall time includes waiting for a core; the CPU time does not, so the two
    side by side show how much of a figure is contention.
    """

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return _median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return _median(self.cpu_seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "cpu_median_s": self.cpu_median,
            "runs_s": self.seconds,
            "cpu_runs_s": self.cpu_seconds,
        }


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _timed(fn: Callable[[], Any], timing: Timing) -> Any:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    timing.cpu_seconds.append(time.process_time() - cpu)
    timing.seconds.append(time.perf_counter() - wall)
    return result


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> tuple[Timing, Any]:
    """Median timing of fn() over `repeats` calls after `warmup` untimed ones; also the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    timing = Timing()
    for _ in range(repeats):
        result = _timed(fn, timing)
    return timing, result


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, Timing]:
    """Time several functions in turn, repeat after repeat, so that drift in machine load hits
    them all alike (A B C A B C ..., not A A A B B B)."""
    timings = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _timed(fn, timings[name])
    return timings


@dataclass
class Measured:
    """A finished subprocess: its output, exit status, wall time and peak resident memory."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float = 0.0  # user + system, the child's and those of its children it waited for


def run_measured(
    command: Sequence[str], env: dict[str, str] | None = None, timeout_s: float | None = None
) -> Measured:
    """Run a command to its end; peak RSS is that child's own, from os.wait4's rusage, and its CPU time
    includes the processes it started and waited for (a process pool's workers).

    Output goes to temporary files, so the child never blocks on a full pipe. Past timeout_s the
    child is killed (returncode then negative).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command), stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})}
        )
        deadline = math.inf if timeout_s is None else start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so tell Popen
        out.seek(0)
        err.seek(0)
        # Linux reports ru_maxrss in KiB.
        return Measured(
            proc.returncode,
            out.read(),
            err.read(),
            wall,
            usage.ru_maxrss * 1024,
            usage.ru_utime + usage.ru_stime,
        )


# ---------------------------------------------------------------------------------------------------
# Real tiles


def real_data_folder() -> Path:
    """Real aerial and satellite scenes: $RS_REAL_DATA, else ../shared/data/rs-real beside the repository."""
    return Path(
        os.environ.get("RS_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "rs-real"
    )


def curated_tiles(real: Path, size: int, work: Path, per_shard: int = 128) -> list[str]:
    """`rscurate run` over the scenes in `real` into `size` px tiles (scenes no larger stay whole), in
    WORK/curated{size}; a finished curation already there is reused. Returns the shard paths."""
    import yaml

    from rscurate import pipeline
    from rscurate.recipe import load_recipe

    out = work / f"curated{size}"
    done = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    if done and (out / "stats.json").exists():
        return done
    recipe = {
        "name": f"rsreal{size}",
        "sources": [{"name": "rs-real", "root": str(real)}],
        "slice": {"max_side": size, "tile_size": size},
        "shard": {"max_samples": per_shard},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"recipe{size}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pipeline.run(load_recipe(path), out, workers=1)
    return sorted(str(p) for p in (out / "shards").glob("*.tar"))


# ---------------------------------------------------------------------------------------------------
# Describing the run


def machine() -> dict[str, Any]:
    """CPU, cores, OS, Python and key library versions: enough to tell two runs' machines apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("numpy", "scipy", "PIL", "imagehash", "pandas"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # a missing library is simply not listed
            continue
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores_usable": affinity,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "threads": {name: os.environ.get(name) for name in THREAD_VARIABLES[:3]},
    }


def command_line() -> str:
    """The command that ran this script, as one could paste it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, sections: Sequence[str], info: dict[str, Any]) -> str:
    """A markdown section: title, the tables, then machine, date and exact command."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = info.get("load_average")
    load_text = f", load average {', '.join(f'{x:.2f}' for x in load)} at start" if load else ""
    lines = [f"## {title}", "", *sections, ""]
    lines.append(f"Machine: {info['cpu']}, {info['cores_usable']} usable cores{load_text}; {info['os']}.")
    lines.append(
        f"Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items()))
        + "."
    )
    lines.append(f"Date: {when}. Command: `{command_line()}`")
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
