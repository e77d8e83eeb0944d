"""Pass 5: near-duplicate search over 64-bit perceptual hashes, and one kept tile per cluster.

The search is multi-index hashing. The 64 bits are cut into `m` chunks; two hashes within Hamming
distance `d` differ in at most `d` chunks, so they agree exactly on at least `r = m - d` of them. Every
set of `r` chunks is a key; hashes sharing a key value are candidates, and a popcount of their XOR
decides. With `r >= 2` the keys are long enough (20-22 bits for d = 4: 6 chunks, 15 keys) that buckets
stay small; `_plan` picks `m` from a cost model and falls back to all pairs when that is cheaper.

For each key the bits of every hash are permuted so that the key's chunks come first. A bit permutation
keeps Hamming distances, so after one `np.sort` the hashes sharing a key are contiguous runs, compared
in permuted form at offsets 1, 2, ... within each run. A pair that agrees on several keys is kept only by
the first of them (its `r` lowest agreeing chunks), so each pair comes out once.

Equal hashes are collapsed first: flat and nodata tiles all hash alike, and one bucket holding them
would cost n^2 candidates. Candidates are verified in blocks, so memory stays linear in the input.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from rscurate.hash import table_hashes

log = logging.getLogger(__name__)

MAX_DISTANCE = 32  # beyond half the bits "near" means nothing, and every method turns into all pairs
Method = Literal["auto", "mih", "brute"]

_CANDIDATE_BLOCK = 1 << 22  # candidate pairs verified at once (about 200 MB of temporaries)
_EDGE_BUFFER = 1 << 23  # edges `group` holds before folding them into a spanning forest
_MAX_KEYS = 1000
_LARGE_BUCKET = 50_000  # hashes sharing one key before a warning
# Cost model in ns on one core, from benchmarks/bench_dedup.py; only the ratios matter.
_NS_PER_HASH_AND_KEY = 120.0  # permute + sort + run detection, per hash and key
_NS_PER_CANDIDATE = 15.0  # expand + XOR + popcount, per candidate pair
_NS_PER_PAIR_BRUTE = 3.0  # XOR + popcount in blocks, per pair


class DedupSection(Protocol):
    """The recipe section `run` reads (read-only, so the frozen recipe dataclasses match)."""

    @property
    def max_distance(self) -> int: ...
    @property
    def invariant(self) -> str: ...


# ---------------------------------------------------------------------------------------------------
# Public search functions


def group(
    hashes: np.ndarray, max_distance: int, *, method: Method = "auto", also: np.ndarray | None = None
) -> np.ndarray:
    """Cluster label of each hash: connected components of "Hamming distance <= max_distance".

    hashes: (N,) uint64. Returns (N,) int64; a label is the smallest index in its cluster, so equal
    labels mean one cluster and the labels do not depend on the method. With `also` ((N,) uint64, a
    second hash of each item, such as the pHash in the item's canonical orientation), two items are
    near when their hashes are or their second hashes are: the clusters of both, joined.
    """
    h = _check_hashes(hashes, "hashes")
    d = _check_distance(max_distance)
    if also is not None:
        second = _check_hashes(also, "also")
        if second.shape != h.shape:
            raise ValueError(f"also must hold one hash per item: {second.shape} for {h.shape} hashes")
        first, other = group(h, d, method=method), group(second, d, method=method)
        # Every item joined to its cluster's label in either grouping; a label is an item index.
        items = np.arange(h.size)
        component = _components(h.size, [items, items], [first, other])
        root = np.full(component.max() + 1, h.size, dtype=np.int64)
        np.minimum.at(root, component, items)
        return root[component]
    if h.size == 0:
        return np.empty(0, dtype=np.int64)
    values, first, inverse = _distinct(h)  # (U,), (U,), (N,)
    n_values = values.size

    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    held = 0
    for a, b, _ in _join(values, values, d, _plan(n_values, n_values, d, True, method), self_join=True):
        edges_a.append(a)
        edges_b.append(b)
        held += a.size
        if held > _EDGE_BUFFER:
            # Connectivity is all we need: a spanning forest of the edges so far is at most U edges.
            a_all, b_all = _spanning_forest(_components(n_values, edges_a, edges_b))
            edges_a, edges_b, held = [a_all], [b_all], a_all.size
    component = _components(n_values, edges_a, edges_b)  # (U,)

    root = np.full(component.max() + 1, h.size, dtype=np.int64)
    np.minimum.at(root, component, first)
    labels = root[component][inverse]  # (N,)
    log.debug("group: %d hashes, %d distinct, %d clusters", h.size, n_values, root.size)
    return labels


def query(
    hashes: np.ndarray, reference: np.ndarray, max_distance: int, *, method: Method = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference hash within max_distance of each hash; ties go to the lowest reference index.

    hashes: (N,) uint64, reference: (R,) uint64. Returns (match, distance), both (N,) int64: the index
    into `reference` and the Hamming distance, or -1 and -1 where nothing lies within max_distance.
    """
    h = _check_hashes(hashes, "hashes")
    return Index(reference, max_distance, method=method, queries=h.size).query(h)


class Index:
    """Reference hashes prepared for searching, once for many calls: `query` (the nearest within
    max_distance) and `neighbours` (all within it, or the k nearest).

    The bit permutations and sorts of the reference side are kept when they take at most `keep_bytes`
    (they are then done once, not per call); otherwise each call redoes them, as one `query` would.
    `queries` is the expected number of hashes per call, for choosing the chunking.
    """

    def __init__(
        self,
        reference: np.ndarray,
        max_distance: int,
        *,
        method: Method = "auto",
        queries: int | None = None,
        keep_bytes: int = 256 << 20,
    ):
        ref = _check_hashes(reference, "reference")
        self.max_distance = _check_distance(max_distance)
        self.size = ref.size
        self.values, self.first, _ = _distinct(ref)  # (V,), (V,)
        n_queries = self.values.size if queries is None else max(1, queries)
        self.plan = _plan(n_queries, self.values.size, self.max_distance, False, method)
        self._prepared: list[tuple[_Key, np.ndarray]] | None = None
        if (
            self.plan is not None
            and self.values.size * 8 * math.comb(len(self.plan.widths), self.plan.agree) <= keep_bytes
        ):
            self._prepared = [(key, np.sort(key.permute(self.values))) for key in self.plan.keys()]

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(match, distance), each (N,) int64, as the module-level `query`."""
        h = _check_hashes(hashes, "hashes")
        match = np.full(h.size, -1, dtype=np.int64)
        distance = np.full(h.size, -1, dtype=np.int64)
        if h.size == 0 or self.size == 0:
            return match, distance
        values, _, inverse = _distinct(h)  # (U,), -, (N,)
        # One int64 per candidate orders by distance, then reference index.
        no_match = np.iinfo(np.int64).max
        best = np.full(values.size, no_match, dtype=np.int64)  # (U,)
        for a, b, dist in self._join(values):
            np.minimum.at(best, a, (dist << _SCORE_SHIFT) | self.first[b])
        best = best[inverse]  # (N,)
        found = best != no_match
        match[found] = best[found] & ((1 << _SCORE_SHIFT) - 1)
        distance[found] = best[found] >> _SCORE_SHIFT
        return match, distance

    def neighbours(
        self, hashes: np.ndarray, k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, distance), each (P,) int64: hashes[i] lies within max_distance of reference[j].

        Sorted by i, then distance, then j; with `k`, at most the k nearest per hash. A reference value
        that occurs several times is reported at its first position only.
        """
        h = _check_hashes(hashes, "hashes")
        empty = np.empty(0, dtype=np.int64)
        if h.size == 0 or self.size == 0:
            return empty, empty, empty
        values, _, inverse = _distinct(h)
        found = list(self._join(values))
        a = np.concatenate([f[0] for f in found] or [empty])
        b = self.first[np.concatenate([f[1] for f in found] or [empty])]
        dist = np.concatenate([f[2] for f in found] or [empty])
        # Expand distinct query values back to positions.
        members = np.argsort(inverse, kind="stable")  # (N,)
        counts = np.bincount(inverse, minlength=values.size)  # (U,)
        starts = np.cumsum(counts) - counts
        reps = counts[a]
        i = members[
            np.repeat(starts[a], reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
        ]
        j, dist = np.repeat(b, reps), np.repeat(dist, reps)
        order = np.lexsort((j, dist, i))
        i, j, dist = i[order], j[order], dist[order]
        if k is not None and i.size:
            rank = np.arange(i.size) - np.searchsorted(i, i, side="left")  # position within each i's run
            keep = rank < k
            i, j, dist = i[keep], j[keep], dist[keep]
        return i, j, dist

    def _join(self, values: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Blocks of (a, b, distance): values[a] and self.values[b] within max_distance, each pair once."""
        if self._prepared is None:
            yield from _join(values, self.values, self.max_distance, self.plan, self_join=False)
            return
        for key, p_right in self._prepared:
            p_left = np.sort(key.permute(values))  # (U,) in key order
            yield from _cross_key(values, self.values, p_left, p_right, key, self.max_distance)


def pairs(
    hashes: np.ndarray, max_distance: int, *, method: Method = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of positions within max_distance: (i, j, distance), each (P,) int64, i < j, sorted.

    Equal hashes are searched once, then expanded: k equal hashes give k(k-1)/2 pairs at distance 0,
    so call `group` rather than this on tables with many flat tiles.
    """
    h = _check_hashes(hashes, "hashes")
    d = _check_distance(max_distance)
    empty = np.empty(0, dtype=np.int64)
    if h.size == 0:
        return empty, empty, empty
    values, _, inverse = _distinct(h)
    found = list(_join(values, values, d, _plan(values.size, values.size, d, True, method), self_join=True))
    a = np.concatenate([f[0] for f in found] or [empty])
    b = np.concatenate([f[1] for f in found] or [empty])
    dist = np.concatenate([f[2] for f in found] or [empty])

    # Positions holding each distinct value: members[starts[v] : starts[v] + counts[v]].
    members = np.argsort(inverse, kind="stable")  # (N,)
    counts = np.bincount(inverse, minlength=values.size)  # (U,)
    starts = np.cumsum(counts) - counts
    i_near, j_near, k = _cartesian(members, starts, counts, a, b)
    same = np.flatnonzero(counts > 1)
    i_same, j_same, _ = _cartesian(members, starts, counts, same, same)
    upper = i_same < j_same

    i = np.concatenate([np.minimum(i_near, j_near), i_same[upper]])
    j = np.concatenate([np.maximum(i_near, j_near), j_same[upper]])
    dist = np.concatenate([dist[k], np.zeros(int(upper.sum()), dtype=np.int64)])
    order = np.lexsort((j, i))
    return i[order], j[order], dist[order]


# ---------------------------------------------------------------------------------------------------
# The dedup pass


def run(cfg: DedupSection, tiles: pd.DataFrame, source_order: Mapping[str, int]) -> pd.DataFrame:
    """Pass 5: keep one tile per near-duplicate cluster among the `kept` tiles.

    The kept one has the most pixels (width * height), then the earliest source in the recipe
    (lowest `source_order`), then the lowest key. The others become status `duplicate`, reason
    `duplicate`, with `duplicate_of` (the kept key) and `duplicate_distance` (Hamming distance to it,
    which can exceed max_distance when a cluster is a chain). Other rows pass through unchanged.
    Returns a new table with every input row, in input order.
    """
    missing = {"key", "source", "width", "height", "phash", "status", "reason"} - set(tiles.columns)
    if missing:
        raise ValueError(f"dedup: the tiles table lacks columns {sorted(missing)}")
    out = tiles.copy()
    if "duplicate_of" not in out.columns:
        out["duplicate_of"] = pd.Series(None, index=out.index, dtype=object)
    out["duplicate_distance"] = (
        out["duplicate_distance"].astype("Int64")
        if "duplicate_distance" in out.columns
        else pd.Series(pd.NA, index=out.index, dtype="Int64")
    )

    rows = np.flatnonzero((out["status"] == "kept").to_numpy())  # (K,) positions of the kept tiles
    if rows.size == 0:
        return out
    kept = out.iloc[rows]
    unknown = sorted(set(kept["source"]) - set(source_order))
    if unknown:
        raise ValueError(f"dedup: sources {unknown} are not in the recipe's source order")
    hashes = table_hashes(kept)  # (K,)
    canonical = _canonical_hashes(kept) if getattr(cfg, "invariant", "none") == "dihedral" else None
    labels = group(hashes, cfg.max_distance, also=canonical)  # (K,)

    # Only clusters of two or more need ranking; most tiles are alone in theirs.
    clustered = np.flatnonzero(np.bincount(labels, minlength=rows.size)[labels] > 1)  # (C,)
    ranked = pd.DataFrame(
        {
            "label": labels[clustered],
            "pixels": -(kept["width"].to_numpy(np.int64) * kept["height"].to_numpy(np.int64))[clustered],
            "source": kept["source"].map(source_order).to_numpy(np.int64)[clustered],
            "key": kept["key"].to_numpy()[clustered],
            "position": clustered,
        }
    ).sort_values(["label", "pixels", "source", "key"], kind="stable")
    keeper = ranked.drop_duplicates("label").set_index("label")["position"]  # label -> kept position
    keeper_of = np.arange(rows.size)  # (K,) position of each tile's kept tile
    keeper_of[clustered] = keeper.loc[labels[clustered]].to_numpy()
    is_duplicate = keeper_of != np.arange(rows.size)

    dup_rows = rows[is_duplicate]
    keys = kept["key"].to_numpy()
    distance = np.bitwise_count(hashes[is_duplicate] ^ hashes[keeper_of[is_duplicate]]).astype(np.int64)
    if canonical is not None:  # a flipped copy is near in its canonical orientation, not as it is
        turned = np.bitwise_count(canonical[is_duplicate] ^ canonical[keeper_of[is_duplicate]])
        distance = np.minimum(distance, turned.astype(np.int64))
    mask = np.zeros(len(out), dtype=bool)
    mask[dup_rows] = True
    out.loc[mask, "status"] = "duplicate"
    out.loc[mask, "reason"] = "duplicate"
    out.loc[mask, "duplicate_of"] = keys[keeper_of[is_duplicate]]
    out.loc[mask, "duplicate_distance"] = distance
    log.info(
        "dedup: %d kept tiles in %d clusters, %d marked duplicate (max_distance %d)",
        rows.size,
        rows.size - dup_rows.size,
        dup_rows.size,
        cfg.max_distance,
    )
    return out


def _canonical_hashes(kept: pd.DataFrame) -> np.ndarray:
    """(K,) uint64 from the `phash_canonical` column the slice pass writes, for dedup.invariant dihedral."""
    column = kept["phash_canonical"] if "phash_canonical" in kept.columns else None
    if column is None or column.isna().any():
        raise ValueError(
            "dedup.invariant dihedral needs the canonical-orientation pHash of every kept tile (tiles "
            "column phash_canonical), which an older slice pass did not record; slice again: rscurate "
            "slice RECIPE --out OUT --force, then rscurate run RECIPE --out OUT"
        )
    return column.to_numpy(dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------
# Input checks and small helpers

_SCORE_SHIFT = 56  # query scores: distance above, reference index (< 2^56) below


def _check_hashes(hashes: np.ndarray, name: str) -> np.ndarray:
    h = np.asarray(hashes)
    if h.dtype != np.uint64 or h.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D uint64 array, got {h.dtype} with shape {h.shape}; "
            "convert hex strings with rscurate.hash.from_hex_array"
        )
    return h


def _check_distance(max_distance: int) -> int:
    if isinstance(max_distance, bool) or not isinstance(max_distance, int | np.integer):
        raise ValueError(f"max_distance must be an integer, got {max_distance!r}")
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise ValueError(f"max_distance must lie in 0..{MAX_DISTANCE}, got {max_distance}")
    return int(max_distance)


def _distinct(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (U,) sorted distinct hashes, first (U,) smallest position of each, inverse (N,)."""
    # np.unique is far slower than this on 10M+ uint64 (numpy 2.4, measured).
    order = np.argsort(h, kind="stable")  # (N,)
    ordered = h[order]
    new = np.empty(h.size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(h.size, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], order[new], inverse  # stable sort: the first of a run is its smallest position


def _positions(sorted_values: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Positions of needles (all present) in sorted_values; sorting needles first keeps it fast."""
    order = np.argsort(needles)
    out = np.empty(needles.size, dtype=np.int64)
    out[order] = np.searchsorted(sorted_values, needles[order])
    return out


def _components(n: int, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """(n,) connected-component id of each node of the undirected graph with edges a[k] - b[k]."""
    a_all = np.concatenate(a) if a else np.empty(0, dtype=np.int64)
    if a_all.size == 0:
        return np.arange(n, dtype=np.int64)
    b_all = np.concatenate(b)
    graph = coo_array((np.ones(a_all.size, dtype=np.int8), (a_all, b_all)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return component.astype(np.int64)


def _spanning_forest(component: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each node to its component's smallest node: the same components, < n edges."""
    root = np.full(component.max() + 1, component.size, dtype=np.int64)
    np.minimum.at(root, component, np.arange(component.size))
    node_root = root[component]
    a = np.flatnonzero(node_root != np.arange(component.size))
    return a, node_root[a]


def _cartesian(
    members: np.ndarray, starts: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (x, y) with x a member of group a[k] and y of group b[k]; also k for each."""
    n_a, n_b = counts[a], counts[b]
    size = n_a * n_b  # (P,)
    k = np.repeat(np.arange(a.size), size)  # (S,) which pair
    local = np.arange(k.size) - np.repeat(np.cumsum(size) - size, size)  # (S,) index in the pair's grid
    x = members[starts[a][k] + local // n_b[k]]
    y = members[starts[b][k] + local % n_b[k]]
    return x, y, k


# ---------------------------------------------------------------------------------------------------
# Multi-index hashing


@dataclass(frozen=True)
class _Plan:
    """m chunks of `widths` bits (chunk 0 the most significant); keys are sets of `agree` chunks."""

    widths: tuple[int, ...]
    agree: int

    @property
    def offsets(self) -> tuple[int, ...]:  # lowest bit of each chunk
        return tuple(64 - sum(self.widths[: c + 1]) for c in range(len(self.widths)))

    def keys(self) -> Iterator[_Key]:
        for chunks in itertools.combinations(range(len(self.widths)), self.agree):
            yield _Key(self, chunks)


class _Key:
    """One key: the bit permutation that brings its chunks to the top, and the check that a pair
    agreeing on it agrees on no lower-numbered chunk outside it (so that only this key reports it)."""

    def __init__(self, plan: _Plan, chunks: tuple[int, ...]):
        widths, offsets = plan.widths, plan.offsets
        order = list(chunks) + [c for c in range(len(widths)) if c not in chunks]
        self.bits = sum(widths[c] for c in chunks)
        self.shift = 64 - self.bits
        dst: dict[int, int] = {}
        top = 64
        for c in order:
            top -= widths[c]
            dst[c] = top
        # Chunks that stay neighbours move together.
        self.moves: list[tuple[int, int, int]] = []  # (source offset, destination offset, width)
        for n, c in enumerate(order):
            if n and c == order[n - 1] + 1:
                self.moves[-1] = (offsets[c], dst[c], self.moves[-1][2] + widths[c])
            else:
                self.moves.append((offsets[c], dst[c], widths[c]))
        self.earlier_masks = [
            np.uint64(((1 << widths[c]) - 1) << dst[c]) for c in range(max(chunks)) if c not in chunks
        ]

    def permute(self, x: np.ndarray) -> np.ndarray:
        return _move_bits(x, self.moves)

    def unpermute(self, x: np.ndarray) -> np.ndarray:
        return _move_bits(x, [(dst, src, width) for src, dst, width in self.moves])

    def first_key(self, xor: np.ndarray) -> np.ndarray:
        """(P,) bool: for pairs with permuted XOR `xor`, is this key the first they agree on?"""
        first = np.ones(xor.size, dtype=bool)
        for mask in self.earlier_masks:
            first &= (xor & mask) != 0
        return first


def _move_bits(x: np.ndarray, moves: list[tuple[int, int, int]]) -> np.ndarray:
    """Bit fields of x rearranged: each move (src, dst, width) puts bits [src, src + width) at dst."""
    if moves[0][2] == 64:
        return x.copy()
    out = np.empty_like(x)
    part = np.empty_like(x)
    for n, (src, dst, width) in enumerate(moves):
        field = out if n == 0 else part
        mask = np.uint64((1 << width) - 1)
        if src > dst:
            np.right_shift(x, np.uint64(src - dst), out=field)
            np.bitwise_and(field, mask << np.uint64(dst), out=field)
        else:
            np.bitwise_and(x, mask << np.uint64(src), out=field)
            if dst > src:
                np.left_shift(field, np.uint64(dst - src), out=field)
        if n:
            np.bitwise_or(out, part, out=out)
    return out


def _plan(n_left: int, n_right: int, d: int, self_join: bool, method: Method) -> _Plan | None:
    """The cheapest chunking by the cost model, or None for all pairs."""
    if method not in ("auto", "mih", "brute"):
        raise ValueError(f"method must be 'auto', 'mih' or 'brute', got {method!r}")
    n_pairs = n_left * (n_left - 1) / 2 if self_join else float(n_left) * n_right
    n_sorted = n_left if self_join else n_left + n_right
    best: tuple[float, _Plan] | None = None
    for m in range(d + 1, min(64, d + 9) + 1):
        agree = m - d
        n_keys = math.comb(m, agree)
        if n_keys > _MAX_KEYS:
            continue
        key_bits = agree * (64 // m)
        cost = n_keys * (n_sorted * _NS_PER_HASH_AND_KEY + n_pairs * 2.0**-key_bits * _NS_PER_CANDIDATE)
        if best is None or cost < best[0]:
            widths = tuple(64 // m + (1 if c < 64 % m else 0) for c in range(m))
            best = (cost, _Plan(widths, agree))
    if method == "brute" or best is None:
        return None
    if method == "auto" and n_pairs * _NS_PER_PAIR_BRUTE < best[0]:
        return None
    log.debug("multi-index hashing: %d chunks, keys of %d chunks", len(best[1].widths), best[1].agree)
    return best[1]


def _join(
    left: np.ndarray, right: np.ndarray, d: int, plan: _Plan | None, *, self_join: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of (a, b, distance), int64 each: left[a] and right[b] within distance d, each pair once.

    left, right: sorted distinct uint64. For a self-join (right is left) only pairs a < b.
    """
    if self_join and d == 0:
        return  # distinct values: nothing lies at distance 0
    if plan is None:
        yield from _join_brute(left, right, d, self_join=self_join)
        return
    for key in plan.keys():
        p_left = key.permute(left)  # (U,) in key order
        p_left.sort()
        if self_join:
            for a, b, dist in _runs_self(p_left, key, d):
                yield (
                    _positions(left, key.unpermute(p_left[a])),
                    _positions(right, key.unpermute(p_left[b])),
                    dist,
                )
        else:
            p_right = key.permute(right)  # (V,)
            p_right.sort()
            yield from _cross_key(left, right, p_left, p_right, key, d)


def _cross_key(
    left: np.ndarray, right: np.ndarray, p_left: np.ndarray, p_right: np.ndarray, key: _Key, d: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """_join's blocks for one key, from both sides permuted by it and sorted."""
    keys_right = p_right >> np.uint64(key.shift)
    keys_left = p_left >> np.uint64(key.shift)
    lo = np.searchsorted(keys_right, keys_left, side="left")
    hi = np.searchsorted(keys_right, keys_left, side="right")
    del keys_left, keys_right
    for a, b, dist in _ranges_cross(p_left, p_right, lo, hi, key, d):
        yield (
            _positions(left, key.unpermute(p_left[a])),
            _positions(right, key.unpermute(p_right[b])),
            dist,
        )


def _runs_self(p: np.ndarray, key: _Key, d: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Verified pairs (a, b, distance) of positions in p (sorted, permuted by key), a < b.

    Pairs at offset t = 1, 2, ... within each run of equal keys: the positions still in a run shrink
    with t, so the work is the number of candidates and memory stays below len(p).
    """
    below = np.uint64(1) << np.uint64(key.shift)  # x < below: the pair shares the key bits
    xor = p[1:] ^ p[:-1]  # (U - 1,)
    active = np.flatnonzero(xor < below)  # positions whose successor shares their key
    xor = xor[active]
    t = 1
    while active.size:
        dist = np.bitwise_count(xor)
        ok = np.flatnonzero(dist <= d)
        ok = ok[key.first_key(xor[ok])]
        if ok.size:
            yield active[ok], active[ok] + t, dist[ok].astype(np.int64)
        t += 1
        active = active[: np.searchsorted(active, p.size - t)]  # those with a position t further on
        xor = p[active + t] ^ p[active]
        same = np.flatnonzero(xor < below)
        active, xor = active[same], xor[same]
    if t > _LARGE_BUCKET:
        log.warning(
            "near-duplicate search: %d hashes share one key (of %d); the search is quadratic in that "
            "bucket. Many almost-equal hashes usually mean blank or nodata tiles that should be "
            "excluded before dedup.",
            t,
            p.size,
        )


def _ranges_cross(
    p_left: np.ndarray, p_right: np.ndarray, lo: np.ndarray, hi: np.ndarray, key: _Key, d: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Verified pairs (a, b, distance): p_left[a] against p_right[b] for b in [lo[a], hi[a])."""
    for a, b in _range_blocks(lo, hi):
        xor = p_left[a] ^ p_right[b]
        dist = np.bitwise_count(xor)
        ok = np.flatnonzero(dist <= d)
        ok = ok[key.first_key(xor[ok])]
        if ok.size:
            yield a[ok], b[ok], dist[ok].astype(np.int64)


def _range_blocks(lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (a, b) for every a and every b in [lo[a], hi[a]), in blocks of about _CANDIDATE_BLOCK."""
    counts = hi - lo
    rows = np.flatnonzero(counts > 0)
    counts, lo = counts[rows], lo[rows]
    ends = np.cumsum(counts)  # (R,) candidates up to and including each row
    start = 0
    while start < rows.size:
        before = ends[start] - counts[start]
        stop = max(start + 1, int(np.searchsorted(ends, before + _CANDIDATE_BLOCK, side="right")))
        c = counts[start:stop]
        row_of = np.repeat(np.arange(start, stop), c)  # (B,) block row of each candidate
        # Index of each candidate within its row's range: block offset minus the row's first offset.
        step = np.arange(row_of.size) + before - (ends[row_of] - counts[row_of])
        yield rows[row_of], lo[row_of] + step
        start = stop


def _join_brute(
    left: np.ndarray, right: np.ndarray, d: int, *, self_join: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All pairs, a block of left rows against all of right at a time."""
    rows_per_block = max(1, _CANDIDATE_BLOCK // max(1, right.size))
    for start in range(0, left.size, rows_per_block):
        block = left[start : start + rows_per_block]
        dist = np.bitwise_count(block[:, None] ^ right[None, :])  # (B, R)
        near = dist <= d
        if self_join:
            near &= np.arange(right.size)[None, :] > np.arange(start, start + block.size)[:, None]
        a, b = np.nonzero(near)
        if a.size:
            yield a + start, b.astype(np.int64), dist[a, b].astype(np.int64)
