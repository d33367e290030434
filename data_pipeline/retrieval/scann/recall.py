"""Exact search and the recall check that guards every index build.

Recall@k is measured against exact squared-L2 search on held-out queries. Queries that are
database keys themselves make recall look better than it is (the key is its own nearest
neighbour at distance 0), so the build passes keys the index has not seen: validation-split keys
when the database has them, else `noisy_queries` (database keys + small Gaussian noise).

Ties. Real corpora repeat chunks (licence headers, templates), and identical chunks have
identical keys, so the exact top-k is not unique: any of the copies is a right answer. A
returned neighbour therefore counts as correct when its exact distance to the query is within
a small tolerance of the k-th exact distance (`tie_tolerance`), not only when it is the id
exact search happened to pick. A database with fewer than k keys is measured on the keys it
has.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.retrieval.scann.params import IndexParams


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int, *,
                 key_block: int = 65_536, query_block: int = 512,
                 return_distances: bool = False):
    """Exact k nearest keys by squared L2: keys [n, d], queries [Q, d] -> ids int64 [Q, k]
    (and, with `return_distances`, their squared L2 distances float32 [Q, k], inf where -1).

    Blocked over queries and keys (keys may be a np.memmap), so memory stays at about
    query_block x key_block floats whatever n is. Nearest first; -1 where n < k.
    """
    queries = np.asarray(queries, dtype=np.float32)
    num_keys = keys.shape[0]
    take = min(k, num_keys)
    out = np.full((len(queries), k), -1, np.int64)
    out_d = np.full((len(queries), k), np.inf, np.float32)
    for q0 in range(0, len(queries), query_block):
        q = queries[q0:q0 + query_block]
        best_d = np.full((len(q), 0), np.inf, np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        for k0 in range(0, num_keys, key_block):
            block = np.asarray(keys[k0:k0 + key_block], dtype=np.float32)
            # |q - x|^2 = |q|^2 - 2 q.x + |x|^2; |q|^2 does not change the ranking of one query.
            dists = (block * block).sum(1)[None, :] - 2.0 * (q @ block.T)
            t = min(take, dists.shape[1])
            part = np.argpartition(dists, t - 1, axis=1)[:, :t]
            best_d = np.concatenate([best_d, np.take_along_axis(dists, part, 1)], axis=1)
            best_i = np.concatenate([best_i, part + k0], axis=1)
            if best_d.shape[1] > take:
                keep = np.argpartition(best_d, take - 1, axis=1)[:, :take]
                best_d = np.take_along_axis(best_d, keep, 1)
                best_i = np.take_along_axis(best_i, keep, 1)
        order = np.argsort(best_d, axis=1, kind="stable")
        out[q0:q0 + len(q), :take] = np.take_along_axis(best_i, order, 1)
        out_d[q0:q0 + len(q), :take] = (np.take_along_axis(best_d, order, 1)
                                        + (q * q).sum(1)[:, None])
    return (out, out_d) if return_distances else out


def key_distances(keys: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared L2 from each query [Q, d] to keys[ids] [Q, k] (-1 -> inf), float32, computed
    as `exact_search` computes them (so two equal keys give bit-equal distances)."""
    queries = np.asarray(queries, dtype=np.float32)
    ids = np.asarray(ids)
    valid = ids >= 0
    flat = np.unique(ids[valid])
    rows = np.asarray(keys[flat], dtype=np.float32)  # sorted reads on a memmap
    where = np.searchsorted(flat, np.where(valid, ids, flat[0] if flat.size else 0))
    out = np.full(ids.shape, np.inf, np.float32)
    if flat.size:
        x = rows[where]  # [Q, k, d]
        d = (x * x).sum(-1) - 2.0 * np.einsum("qkd,qd->qk", x, queries) + (
            queries * queries).sum(1)[:, None]
        out = np.where(valid, d.astype(np.float32), np.float32(np.inf))
    return out


def tie_tolerance(kth_distance: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """How far past the k-th exact distance a returned neighbour still counts as a tie:
    1e-5 of the distances' scale (float32 rounding of |q|^2 - 2 q.x + |x|^2)."""
    scale = np.abs(kth_distance) + (np.asarray(queries, np.float32) ** 2).sum(1)
    return 1e-5 * scale + 1e-12


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k ids [Q, k] found anywhere in the approximate top-k [Q, k].

    -1 (missing) entries of `exact_ids` are not counted.
    """
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"recall_at_k: {approx_ids.shape[0]} approximate rows vs "
                         f"{exact_ids.shape[0]} exact rows")
    wanted = exact_ids >= 0
    # [Q, k_exact, k_approx] membership: k is small (10), so the cube is cheap.
    found = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(axis=2) & wanted
    total = int(wanted.sum())
    return float(found.sum()) / total if total else 1.0


def noisy_queries(keys: np.ndarray, num: int, *, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """`num` held-out-like queries float32 [num, d]: random keys + Gaussian noise.

    The noise std per dimension is `noise` x the keys' root-mean-square spread around their
    mean, so the query is near, not on, its source key. Use validation-split keys instead when
    the database has them.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(keys.shape[0], size=min(num, keys.shape[0]), replace=False))
    picked = np.asarray(keys[rows], dtype=np.float32)
    sample = np.asarray(keys[np.sort(rng.choice(keys.shape[0], min(10_000, keys.shape[0]),
                                                replace=False))], dtype=np.float32)
    spread = float(np.sqrt(((sample - sample.mean(0)) ** 2).mean()))
    picked += rng.standard_normal(picked.shape, dtype=np.float32) * np.float32(noise * spread)
    return picked


def measure_recall(searcher, keys: np.ndarray, sample_queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of `searcher` (a ShardSearcher or ShardedSearcher) against exact search, ties
    counted as correct (see the module docstring).

    keys [n, d]: exactly the keys the searcher indexes, row i = chunk searcher.first_chunk + i.
    sample_queries [Q, d]: held-out queries (see module docstring).
    Returns:
      the share of the min(k, n) exact neighbours per query that the searcher returned, or
      returned a neighbour as close as (a tie of) the k-th exact one in their place.
    """
    queries = np.asarray(sample_queries, dtype=np.float32)
    approx_ids, _ = searcher.search(queries, k)
    exact_ids, exact_d = exact_search(keys, queries, k, return_distances=True)
    wanted = (exact_ids >= 0).sum(1)  # min(k, n) per query
    if int(wanted.sum()) == 0:
        return 1.0
    kth = exact_d[np.arange(len(queries)), np.maximum(wanted - 1, 0)]
    local = np.where(approx_ids >= 0, approx_ids - searcher.first_chunk, -1)
    approx_d = key_distances(keys, queries, local)
    # Each returned id counts once (a searcher that repeats an id gains nothing).
    first = np.ones(local.shape, bool)
    for j in range(1, local.shape[1]):
        first[:, j] = ~(local[:, :j] == local[:, j:j + 1]).any(1)
    close = (local >= 0) & first & (approx_d <= (kth + tie_tolerance(kth, queries))[:, None])
    correct = np.minimum(close.sum(1), wanted)
    return float(correct.sum()) / float(wanted.sum())


def shard_recall_part(searcher, keys: np.ndarray, queries: np.ndarray, k: int = 10
                      ) -> dict[str, np.ndarray]:
    """What one index shard contributes to the recall@k of a sharded index (`merged_recall`):
    the shard's approximate top-k (global ids, ScaNN distances, and the ids' exact distances)
    and its exact top-k distances, for `queries` [Q, d]. `keys`: the shard's keys."""
    queries = np.asarray(queries, dtype=np.float32)
    approx_ids, approx_d = searcher.search(queries, k)
    local = np.where(approx_ids >= 0, approx_ids - searcher.first_chunk, -1)
    _, exact_d = exact_search(keys, queries, k, return_distances=True)
    return {"approx_ids": approx_ids.astype(np.int64), "approx_d": approx_d.astype(np.float32),
            "approx_exact_d": key_distances(keys, queries, local),
            "exact_d": exact_d.astype(np.float32)}


def merged_recall(parts, queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of a sharded index from its shards' `shard_recall_part`s, in shard order.

    The approximate lists are merged as the sharded searcher merges them (the k smallest
    ScaNN distances, ties to the earlier shard); the exact k-th distance is the k-th smallest
    over the shards' exact lists; ties count as in `measure_recall`. One shard at a time is
    held, so the index never has to fit one machine.
    """
    queries = np.asarray(queries, dtype=np.float32)
    ids = d = exact_of_ids = exact = None
    for part in parts:
        if ids is None:
            ids, d = part["approx_ids"], part["approx_d"]
            exact_of_ids, exact = part["approx_exact_d"], part["exact_d"]
            continue
        all_d = np.concatenate([d, part["approx_d"]], axis=1)
        order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(np.concatenate([ids, part["approx_ids"]], axis=1), order, 1)
        exact_of_ids = np.take_along_axis(
            np.concatenate([exact_of_ids, part["approx_exact_d"]], axis=1), order, 1)
        d = np.take_along_axis(all_d, order, 1)
        exact = np.sort(np.concatenate([exact, part["exact_d"]], axis=1), axis=1)[:, :k]
    if ids is None:
        return 1.0
    exact = np.sort(exact, axis=1)
    wanted = np.isfinite(exact).sum(1)  # min(k, n) per query
    if int(wanted.sum()) == 0:
        return 1.0
    kth = exact[np.arange(len(queries)), np.maximum(wanted - 1, 0)]
    first = np.ones(ids.shape, bool)
    for j in range(1, ids.shape[1]):
        first[:, j] = ~(ids[:, :j] == ids[:, j:j + 1]).any(1)
    close = (ids >= 0) & first & (exact_of_ids <= (kth + tie_tolerance(kth, queries))[:, None])
    correct = np.minimum(close.sum(1), wanted)
    return float(correct.sum()) / float(wanted.sum())


def check_recall(recall: float, params: IndexParams, *, where: str = "index") -> None:
    """Raises DataError when `recall` < params.recall_floor, naming the knob to raise."""
    if recall >= params.recall_floor:
        return
    if params.brute_force:
        raise DataError(
            f"{where}: recall@10 = {recall:.3f} < index.recall_floor = {params.recall_floor} "
            "with brute-force search, which is exact: the keys or queries are broken "
            "(NaN, all equal?); check the embedding stage")
    more_leaves = min(params.num_leaves, max(params.num_leaves_to_search * 2,
                                             params.num_leaves_to_search + 1))
    raise DataError(
        f"{where}: recall@10 = {recall:.3f} < index.recall_floor = {params.recall_floor} "
        f"(num_leaves={params.num_leaves}, num_leaves_to_search={params.num_leaves_to_search}, "
        f"reorder_k={params.reorder_k}). Raise --config.index.num_leaves_to_search "
        f"(e.g. {more_leaves}) first, then --config.index.reorder_k "
        f"(e.g. {params.reorder_k * 2}), or lower --config.index.recall_floor")
