"""Pass 2: header-level exclusion of inputs (no pixels). The benchmark images are hashed here too, by
rscurate.decontam.benchmark_run (re-exported).

Reason codes on the inputs table (the text before any ':' is the code):

* ``unreadable: <why>``  scan could not read the file (status ``error``)
* ``benchmark``         the source lists the file in ``exclude_paths`` (a benchmark's test image), or
                        the file has the same bytes as one that is listed
* ``not_optical``       the source is marked ``optical: false``
* ``too_small``         the shorter side is under ``exclude.min_side``
* ``exact_duplicate``   the same bytes (sha256) as an earlier file; the first by recipe source order,
                        then relpath, is kept and ``duplicate_of_path`` names it

``blank`` is decided later, from pixels, by slicing; ``benchmark`` by pHash, by the hash pass.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence

import numpy as np
import pandas as pd

from rscurate.decontam import BENCHMARK_MAX_SIDE, benchmark_run
from rscurate.manifest import held_out_matcher
from rscurate.recipe import ExcludeConfig, SourceConfig
from rscurate.scan import list_benchmark_files

__all__ = ["run", "benchmark_run", "list_benchmark_files", "REASONS", "BENCHMARK_MAX_SIDE"]

log = logging.getLogger(__name__)

REASONS = ("unreadable", "too_small", "blank", "not_optical", "exact_duplicate", "benchmark")


def _norm_relpath(p: str) -> str:
    return posixpath.normpath(p.replace("\\", "/")).lstrip("/")


def run(cfg: ExcludeConfig, inputs: pd.DataFrame, sources: Sequence[SourceConfig]) -> pd.DataFrame:
    """Status ok|excluded|error and a reason code per input; adds `duplicate_of_path`."""
    out = inputs.copy().reset_index(drop=True)
    status = out["status"].astype(object).to_numpy(copy=True)
    reason = out["reason"].astype(object).to_numpy(copy=True)
    dup_of = np.full(len(out), None, dtype=object)

    err = status == "error"
    reason[err] = [r if str(r).startswith("unreadable") else f"unreadable: {r}" for r in reason[err]]
    ok = status == "ok"

    by_name = {s.name: s for s in sources}
    unknown = sorted(set(out["source"]) - set(by_name))
    if unknown:
        raise ValueError(f"inputs name sources the recipe does not have: {', '.join(unknown)}")

    # Benchmark test files listed by path, and every file with the same bytes as one of them.
    listed = np.zeros(len(out), bool)
    rel = out["relpath"].astype(str).map(_norm_relpath)
    for src in sources:
        if src.exclude_patterns or src.exclude_lists:
            held_out = held_out_matcher(src, src.root)
            listed |= ((out["source"] == src.name) & rel.map(held_out).astype(bool)).to_numpy()
        if not src.exclude_paths:
            continue
        wanted = {_norm_relpath(p) for p in src.exclude_paths}
        here = (out["source"] == src.name).to_numpy() & rel.isin(wanted).to_numpy()
        listed |= here
        missing = wanted - set(rel[here])
        if missing:
            log.warning(
                "source %s: %d of its %d exclude_paths are not among the scanned files (first: %s); "
                "check the paths are relative to %s",
                src.name,
                len(missing),
                len(wanted),
                sorted(missing)[0],
                src.root,
            )
    sha = out["sha256"].to_numpy()
    leaked = set(sha[listed & ok]) - {None}
    bench = ok & (listed | np.isin(sha, list(leaked)))
    status[bench], reason[bench] = "excluded", "benchmark"
    ok &= ~bench

    optical = out["source"].map(lambda s: by_name[s].optical).to_numpy(bool)
    not_optical = ok & ~optical
    status[not_optical], reason[not_optical] = "excluded", "not_optical"
    ok &= ~not_optical

    short = np.minimum(out["width"].fillna(0).to_numpy(np.int64), out["height"].fillna(0).to_numpy(np.int64))
    small = ok & (short < cfg.min_side)
    status[small], reason[small] = "excluded", "too_small"
    ok &= ~small

    # Exact duplicates: keep the first by recipe source order, then relpath.
    order = {s.name: i for i, s in enumerate(sources)}
    cand = out[ok].assign(_o=out.loc[ok, "source"].map(order), _r=rel[ok])
    cand = cand.sort_values(["_o", "_r"], kind="stable")
    first = cand.groupby("sha256", sort=False)["path"].transform("first")
    dup = cand.index[cand["path"] != first]
    status[dup], reason[dup] = "excluded", "exact_duplicate"
    dup_of[dup] = first[dup].to_numpy()

    out["status"] = status
    out["reason"] = reason
    out["duplicate_of_path"] = dup_of
    counts = pd.Series(reason[status != "ok"]).map(lambda r: str(r).split(":")[0]).value_counts()
    log.info(
        "exclude: %d ok; %s", int((status == "ok").sum()), ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return out
