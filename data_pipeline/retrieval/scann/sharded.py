"""Fan-out over index shards and an exact merge of their top-k lists.

Every shard returns its own top-k (global ids, squared L2); the k nearest over the union are the
k smallest distances of the concatenation, so the merge is exact: the sharded result equals
the single-index result whenever each shard's own top-k is right. A shard is any object with
`.first_chunk`, `.num_chunks` and `.search_tf(queries, k)` (e.g. a remote shard's client).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tensorflow as tf

from data_pipeline.retrieval.scann.shard import pad_topk, search_numpy


class Shard(Protocol):
    first_chunk: int
    num_chunks: int

    def search_tf(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]: ...


def merge_topk(ids: Sequence[tf.Tensor], dists: Sequence[tf.Tensor], k: int
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-shard ids int64 [Q, k_s] / dists [Q, k_s] -> the k closest over all: [Q, k] each."""
    all_ids = tf.concat(list(ids), axis=1)  # [Q, sum k_s]
    all_dists = tf.concat(list(dists), axis=1)
    take = min(k, all_ids.shape[1]) if all_ids.shape[1] is not None else k
    # top_k of the negated distances = the smallest distances, in ascending order.
    neg_top, positions = tf.math.top_k(-all_dists, k=take, sorted=True)
    merged_ids = tf.gather(all_ids, positions, batch_dims=1)
    return pad_topk(merged_ids, -neg_top, k)


class ShardedSearcher:
    """Searches every shard and merges; ids are global chunk ids, distances squared L2."""

    def __init__(self, shards: Sequence[Shard]):
        if not shards:
            raise ValueError("ShardedSearcher needs at least one shard")
        self.shards = sorted(shards, key=lambda shard: shard.first_chunk)
        for before, after in zip(self.shards, self.shards[1:]):
            if before.first_chunk + before.num_chunks > after.first_chunk:
                raise ValueError(
                    f"index shards overlap: [{before.first_chunk}, "
                    f"{before.first_chunk + before.num_chunks}) and [{after.first_chunk}, ...)")
        self.first_chunk = self.shards[0].first_chunk
        last = self.shards[-1]
        self.num_chunks = last.first_chunk + last.num_chunks - self.first_chunk
        self.dim = getattr(self.shards[0], "dim", None)

    def __repr__(self) -> str:
        return f"ShardedSearcher({len(self.shards)} shards, {self.num_chunks} chunks)"

    def search_tf(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """queries float32 [Q, d] -> (global ids int64 [Q, k], dists float32 [Q, k]); pure TF.

        Unfilled slots (fewer than k keys in total) are -1 / +inf.
        """
        queries = tf.convert_to_tensor(queries, dtype=tf.float32)
        if len(self.shards) == 1:
            return self.shards[0].search_tf(queries, k)
        results = [shard.search_tf(queries, k) for shard in self.shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 65_536
               ) -> tuple[np.ndarray, np.ndarray]:
        """numpy float32 [Q, d] -> (ids int64 [Q, k], dists float32 [Q, k]), in query batches."""
        return search_numpy(self, queries, k, batch_size)
