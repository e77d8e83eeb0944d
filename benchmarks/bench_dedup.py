"""Benchmark: rscurate.dedup.group (multi-index hashing) on uniform random 64-bit hashes with
planted near-duplicates; time, peak memory and recall, against brute force where it is affordable.

Each configuration runs in its own single-threaded subprocess, so its peak RSS is its own (it
includes the input array and the interpreter, about 100 MB with numpy, scipy and pandas loaded).
Recall: every planted pair (a hash and a copy with 0..d bits flipped) must share a cluster, and for a
random sample of hashes every neighbour found by brute force over all N must share its cluster;
each sampled cluster is also checked to be connected at distance <= d (no false merges).

`dedup.invariant: dihedral` is timed side by side with `none` (interleaved, one process) at the largest
N: every item then has a second hash (its pHash in canonical orientation) and the clusters of both are
joined. The planted pairs there are flipped copies: near in the second hash only.

    .venv/bin/python benchmarks/bench_dedup.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import _common

_common.pin_threads(1)

import numpy as np  # noqa: E402  (after pinning threads)

from rscurate import dedup  # noqa: E402

PLANTED = 10_000
SAMPLE = 50
SEED = 0


# ---------------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def planted_hashes(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n,) uniform uint64 hashes in which PLANTED pairs lie 0..d bits apart; returns them and the
    two position arrays of the pairs."""
    planted = min(PLANTED, n // 2)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    first = rng.choice(n, size=2 * planted, replace=False)
    a, b = first[:planted], first[planted:]
    # Flip k of the 64 bits, k uniform in 0..d: the first k of a random ordering of the bit positions.
    flips = rng.integers(0, d + 1, planted)  # (P,)
    bit_order = np.argsort(rng.random((planted, 64)), axis=1)  # (P, 64) random permutations
    chosen = np.arange(64)[None, :] < flips[:, None]  # (P, 64) first k positions
    masks = np.bitwise_or.reduce(
        np.where(chosen, np.uint64(1) << bit_order.astype(np.uint64), np.uint64(0)), axis=1
    )  # (P,)
    h[b] = h[a] ^ masks
    return h, a, b


def check(
    h: np.ndarray, labels: np.ndarray, d: int, a: np.ndarray, b: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    planted_recall = float((labels[a] == labels[b]).mean()) if a.size else 1.0
    found = together = connected = 0
    for i in rng.choice(h.size, size=min(SAMPLE, h.size), replace=False):
        dist = np.bitwise_count(h ^ h[i])  # (N,) brute force against everything
        neighbours = np.flatnonzero(dist <= d)
        found += neighbours.size - 1
        together += int((labels[neighbours] == labels[i]).sum()) - 1
        members = np.flatnonzero(labels == labels[i])
        connected += int(_connected(h[members], d))
    return {
        "planted_pairs": int(a.size),
        "planted_recall": planted_recall,
        "sample": min(SAMPLE, h.size),
        "sample_neighbours": found,
        "sample_recall": together / found if found else 1.0,
        "sample_clusters_connected": connected,
    }


def _connected(members: np.ndarray, d: int) -> bool:
    """Is the graph "distance <= d" on these hashes one component? (brute force; clusters are small)"""
    if members.size > 2000:
        return False
    near = np.bitwise_count(members[:, None] ^ members[None, :]) <= d  # (M, M)
    reached = np.zeros(members.size, dtype=bool)
    reached[0] = True
    while True:
        grown = near[reached].any(axis=0) | reached
        if grown.sum() == reached.sum():
            return bool(reached.all())
        reached = grown


def worker(kind: str, n: int, d: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    if kind == "invariant":
        # Flipped copies: the second (canonical-orientation) hashes of a pair are 0..d bits apart.
        canonical, a, b = planted_hashes(n, d, rng)
        h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        runs = {"none": lambda: dedup.group(h, d), "dihedral": lambda: dedup.group(h, d, also=canonical)}
        timings = {name: _common.Timing() for name in runs}
        labels = {}
        for _ in range(repeats):  # interleaved, as time_interleaved, keeping the labels of the last repeat
            for name, fn in runs.items():
                labels[name] = _common._timed(fn, timings[name])
        none, dihedral = labels["none"], labels["dihedral"]
        return {
            "none": timings["none"].as_dict(),
            "dihedral": timings["dihedral"].as_dict(),
            "flipped_pairs": int(a.size),
            "flipped_recall_none": float((none[a] == none[b]).mean()),
            "flipped_recall_dihedral": float((dihedral[a] == dihedral[b]).mean()),
        }
    if kind == "naive":
        h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        timings = _common.time_interleaved(
            {
                "brute": lambda: dedup.group(h, d, method="brute"),
                "mih": lambda: dedup.group(h, d, method="mih"),
            },
            repeats=repeats,
        )
        same = bool((dedup.group(h, d, method="brute") == dedup.group(h, d, method="mih")).all())
        return {"brute": timings["brute"].as_dict(), "mih": timings["mih"].as_dict(), "same_labels": same}

    h, a, b = planted_hashes(n, d, rng)
    plan = dedup._plan(n, n, d, True, "auto")
    timing, labels = _common.time_call(lambda: dedup.group(h, d), repeats=repeats)
    result = {
        "time": timing.as_dict(),
        "clusters": int(np.unique(labels).size),
        "chunks": len(plan.widths) if plan else None,
        "keys": sum(1 for _ in plan.keys()) if plan else None,
    }
    result.update(check(h, labels, d, a, b, rng))
    return result


# ---------------------------------------------------------------------------------------------------
# Driver


def run_worker(kind: str, n: int, radii: list[int], repeats: list[int]) -> list[dict[str, Any]]:
    """Results of one worker process, one per radius; peak RSS is the process's, over all of them."""
    command = [sys.executable, __file__, "--worker", kind, "--n", str(n)]
    command += ["--d", ",".join(map(str, radii)), "--repeats", ",".join(map(str, repeats))]
    measured = _common.run_measured(command, timeout_s=600)
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{measured.stderr}")
    results = json.loads(measured.stdout.strip().splitlines()[-1])
    for result, d, r in zip(results, radii, repeats, strict=True):
        result.update(n=n, d=d, repeats=r, peak_rss_mb=measured.peak_rss_bytes / 2**20)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (under 30 s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=["group", "naive", "invariant"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        radii, repeats = map(int, args.d.split(",")), map(int, args.repeats.split(","))
        print(json.dumps([worker(args.worker, args.n, d, r) for d, r in zip(radii, repeats, strict=True)]))
        return

    started = time.perf_counter()
    info = _common.machine()
    if args.quick:
        scale = [(100_000, 3), (300_000, 3)]
        radius_n, naive_n = 100_000, 5_000
    else:
        scale = [(1_000_000, 3), (4_000_000, 1), (13_000_000, 1)]
        radius_n, naive_n = 1_000_000, 20_000

    # Each size in its own process, so that its peak RSS is its own.
    scale_rows = [run_worker("group", n, [4], [repeats])[0] for n, repeats in scale]
    # The radius sweep in one process (memory hardly depends on the radius): fewer interpreter starts.
    radii = list(range(9))
    radius_rows = run_worker("group", radius_n, radii, [3 if d <= 4 else 1 for d in radii])
    naive = run_worker("naive", naive_n, [4], [3])[0]
    invariant_n = scale[-1][0]
    invariant = run_worker("invariant", invariant_n, [4], [1 if invariant_n > 4_000_000 else 3])[0]
    extra = invariant["dihedral"]["median_s"] / invariant["none"]["median_s"] - 1
    extra_cpu = invariant["dihedral"]["cpu_median_s"] / invariant["none"]["cpu_median_s"] - 1
    default_on = extra <= 0.2 and extra_cpu <= 0.2

    def table_row(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "N": r["n"],
            "radius": r["d"],
            "chunks / keys": (
                "equal only"
                if r["d"] == 0
                else f"{r['chunks']} / {r['keys']}"
                if r["chunks"]
                else "all pairs"
            ),
            "group s": r["time"]["median_s"],
            "CPU s": r["time"]["cpu_median_s"],
            "repeats": r["repeats"],
            "peak RSS MB": r["peak_rss_mb"],
            "planted recall": f"{r['planted_recall']:.4f} ({r['planted_pairs']:,})",
            "sample recall": f"{r['sample_recall']:.4f} ({r['sample_neighbours']:,} nbrs)",
            "clusters connected": f"{r['sample_clusters_connected']}/{r['sample']}",
        }

    columns = list(table_row(scale_rows[0]))
    brute_s, mih_s = naive["brute"]["median_s"], naive["mih"]["median_s"]
    per_pair = brute_s / (naive_n * (naive_n - 1) / 2)
    extrapolated = {n: per_pair * n * (n - 1) / 2 for n, _ in scale}
    naive_rows = [
        {
            "N": naive_n,
            "all pairs s": brute_s,
            "mih s": mih_s,
            "ratio": brute_s / mih_s,
            "same labels": naive["same_labels"],
        }
    ] + [
        {
            "N": n,
            "all pairs s": f"{s:,.0f} (extrapolated, N^2)",
            "mih s": r["time"]["median_s"],
            "ratio": s / r["time"]["median_s"],
        }
        for (n, s), r in zip(extrapolated.items(), scale_rows, strict=True)
    ]
    text = _common.report(
        "Near-duplicate search: rscurate.dedup.group",
        [
            "Scaling at radius 4 (uniform random hashes, planted pairs):",
            "",
            _common.markdown_table([table_row(r) for r in scale_rows], columns),
            "",
            f"Radius 0..8 at N = {radius_n:,}, all in one process (peak RSS over the whole sweep):",
            "",
            _common.markdown_table([table_row(r) for r in radius_rows], columns),
            "",
            "Against naive all pairs (XOR + np.bitwise_count in blocks), radius 4:",
            "",
            _common.markdown_table(naive_rows, ["N", "all pairs s", "mih s", "ratio", "same labels"]),
            "",
            f"`dedup.invariant` at N = {invariant_n:,}, radius 4, interleaved in one process (dihedral: every "
            "hash has a second one, the pHash in canonical orientation, and the clusters of both are joined; "
            f"{invariant['flipped_pairs']:,} planted flipped pairs, near in the second hash only):",
            "",
            _common.markdown_table(
                [
                    {
                        "invariant": name,
                        "group s": invariant[name]["median_s"],
                        "CPU s": invariant[name]["cpu_median_s"],
                        "vs none": "" if name == "none" else f"{extra:+.0%} wall, {extra_cpu:+.0%} CPU",
                        "flipped pairs clustered": f"{invariant[f'flipped_recall_{name}']:.4f}",
                    }
                    for name in ("none", "dihedral")
                ],
                ["invariant", "group s", "CPU s", "vs none", "flipped pairs clustered"],
            ),
            "",
            f"Dihedral invariance costs {extra:+.0%} of the dedup time at this size, "
            + (
                "within the 20% that lets it be on by default."
                if default_on
                else "more than the 20% that would let it be on by default: the default stays `none`."
            ),
            "",
            "One thread per process. group s: wall-clock median over `repeats` runs; CPU s: the process's "
            "CPU time for the same runs (on a shared machine, wall minus CPU is time spent waiting for "
            "a core). Peak RSS: the whole worker process (input, interpreter, numpy, scipy, pandas). "
            f"Total benchmark wall time {time.perf_counter() - started:.0f} s.",
        ],
        info,
    )
    print(text)
    _common.write_json(
        args.json,
        {
            "benchmark": "dedup",
            "scale": scale_rows,
            "radius": radius_rows,
            "naive": naive,
            "invariant": {**invariant, "n": invariant_n, "extra_wall": extra, "extra_cpu": extra_cpu},
            "targets": [
                {
                    "target": "3b. `dedup.invariant: dihedral` cost (on by default if <= +20%)",
                    "value": f"{extra:+.0%} wall, {extra_cpu:+.0%} CPU at N = {invariant_n:,}; flipped pairs "
                    f"clustered {invariant['flipped_recall_dihedral']:.4f} (none: "
                    f"{invariant['flipped_recall_none']:.4f})",
                    "goal": "measured; default on only if <= +20%",
                    "status": "default on" if default_on else "default off (none)",
                }
            ],
            "machine": info,
        },
    )


if __name__ == "__main__":
    main()
