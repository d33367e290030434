"""In-graph retrieval: ScaNN search or BM25 candidate gather, document filters, token gather.

Everything here is TensorFlow ops (ScaNN's TF op searcher included), so it runs inside a
parallel tf.data map without the Python GIL. The search runs on a whole batch at once
(B * L queries per call), which is where ScaNN is efficient.

Where candidates come from (`NeighbourRetriever.query_chunks`, chosen by the searcher):
  "bert" database: a ScaNN search over the database's index with the query chunk's key.
  "bm25" database (`CandidateTable`): the query chunk's row of its split's BM25 candidate
    table, computed at build time in score order (bm25s is Python: it cannot run in-graph),
    so a query is a `tf.gather`; K is the table's width (manifest bm25.num_candidates).

Filter semantics (shared by training, precompute and evaluation, one function):
  fetch K = min(k * overfetch, database size, [bm25] table width) candidates in distance (or
  score) order; drop a candidate when its doc id equals the querying chunk's doc id
  (exclude_same_document; training) or is in `exclude_doc_ids` (evaluation); keep the first
  k survivors in that order; -1 where fewer than k survive.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import numpy as np
import tensorflow as tf

from data_pipeline.pipeline.tables import ChunkTable


class TFSearcher(Protocol):
    """What the pipeline needs from `data_pipeline.index.ShardedSearcher`."""

    def search_tf(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]: ...


class CandidateTable:
    """The searcher of a "bm25" database: candidates were computed at build time and live in
    each split's ChunkTable.candidates (int64 [N, num_candidates], score order, -1 = none).

    Args:
      num_candidates: K, the tables' width.
    """

    def __init__(self, num_candidates: int):
        self.num_candidates = int(num_candidates)


class NeighbourRetriever:
    """Retrieves and filters neighbours of query chunks from the database's train split.

    Args:
      database: ChunkTable of the retrieval database (its train split).
      searcher: searcher over the same chunk ids (a TFSearcher, or a CandidateTable for a
        "bm25" database); None when only `gather` is used (precomputed neighbours).
      num_neighbours: k.
      overfetch: candidates fetched per query = k * overfetch (capped at the database size).
      exclude_same_document: drop candidates from the querying chunk's document.
      exclude_doc_ids: doc ids whose chunks are never returned (evaluation).
    """

    def __init__(self, database: ChunkTable, searcher: TFSearcher | CandidateTable | None, *,
                 num_neighbours: int, overfetch: int, exclude_same_document: bool,
                 exclude_doc_ids: Collection[int] | None = None):
        self.database = database
        self.searcher = searcher
        self.num_neighbours = int(num_neighbours)
        self.num_candidates = min(self.num_neighbours * max(1, int(overfetch)),
                                  database.num_chunks)
        if isinstance(searcher, CandidateTable):
            # The table holds K per chunk: filters see at most those (k itself may exceed K;
            # the missing neighbours are then -1).
            self.num_candidates = min(self.num_candidates, searcher.num_candidates)
        self.exclude_same_document = bool(exclude_same_document)
        excluded = np.unique(np.asarray(list(exclude_doc_ids or ()), np.int64))
        self._excluded = tf.constant(excluded, tf.int64) if excluded.size else None

    @property
    def settings(self) -> dict:
        """What determines the neighbour ids (recorded beside precomputed neighbours)."""
        excluded = [] if self._excluded is None else self._excluded.numpy().tolist()
        return {"num_neighbours": self.num_neighbours, "num_candidates": self.num_candidates,
                "exclude_same_document": self.exclude_same_document,
                "exclude_doc_ids": excluded}

    def _is_excluded(self, doc_ids: tf.Tensor) -> tf.Tensor:
        """doc ids int64 [...] -> bool [...]: in the excluded set (sorted search, no hashing)."""
        ex = self._excluded
        flat = tf.reshape(doc_ids, [-1])
        pos = tf.searchsorted(ex, flat, side="left")
        hit = tf.gather(ex, tf.minimum(pos, tf.size(ex, out_type=pos.dtype) - 1)) == flat
        return tf.reshape(hit, tf.shape(doc_ids))

    def _filter(self, candidate_ids: tf.Tensor, query_doc_ids: tf.Tensor,
                query_valid: tf.Tensor) -> tf.Tensor:
        """Candidates int64 [Q, K >= k] (distance order) -> ids int64 [Q, k], -1 = none."""
        valid = (candidate_ids >= 0) & query_valid[:, None]
        candidate_docs = self.database.gather_doc_ids(candidate_ids)
        if self.exclude_same_document:
            valid &= candidate_docs != query_doc_ids[:, None]
        if self._excluded is not None:
            valid &= ~self._is_excluded(candidate_docs)
        # Survivors first, each group in distance order: a stable sort on (dropped, rank).
        rank = tf.range(tf.shape(candidate_ids)[1], dtype=tf.int32)[None, :]
        order_key = tf.where(valid, rank, rank + tf.shape(candidate_ids)[1])
        _, order = tf.math.top_k(-order_key, k=self.num_neighbours, sorted=True)
        chosen = tf.gather(candidate_ids, order, batch_dims=1)
        chosen_valid = tf.gather(valid, order, batch_dims=1)
        return tf.where(chosen_valid, chosen, tf.constant(-1, tf.int64))

    def filter_candidates(self, candidate_ids: tf.Tensor, query_doc_ids: tf.Tensor,
                          query_valid: tf.Tensor) -> tf.Tensor:
        """Candidates int64 [Q, K'] (distance order) -> neighbour ids int64 [Q, k], -1 = none."""
        if self.num_neighbours > self.num_candidates:  # k > K: pad the candidates with -1
            pad = self.num_neighbours - self.num_candidates
            candidate_ids = tf.pad(candidate_ids, [[0, 0], [0, pad]], constant_values=-1)
        return self._filter(candidate_ids, query_doc_ids, query_valid)

    def search(self, queries: tf.Tensor, query_doc_ids: tf.Tensor,
               query_valid: tf.Tensor) -> tf.Tensor:
        """queries float32 [Q, d], doc ids int64 [Q], valid bool [Q] -> ids int64 [Q, k]."""
        if isinstance(self.searcher, CandidateTable):
            raise TypeError("a bm25 database is queried by chunk (query_chunks), not by key")
        candidate_ids, _ = self.searcher.search_tf(queries, self.num_candidates)
        return self.filter_candidates(tf.cast(candidate_ids, tf.int64),
                                      tf.cast(query_doc_ids, tf.int64), query_valid)

    def query_chunks(self, split: ChunkTable, chunk_ids: tf.Tensor, query_doc_ids: tf.Tensor,
                     query_valid: tf.Tensor) -> tf.Tensor:
        """Neighbours of chunks of `split`: chunk ids int64 [Q] (-1 = none), their doc ids
        int64 [Q], valid bool [Q] -> neighbour ids int64 [Q, k] (train chunk ids, -1 = none).

        The query is the chunk's key (ScaNN) or its row of BM25 candidates (CandidateTable).
        """
        if isinstance(self.searcher, CandidateTable):
            candidates = split.gather_candidates(chunk_ids, self.num_candidates)
            return self.filter_candidates(candidates, tf.cast(query_doc_ids, tf.int64),
                                          query_valid)
        return self.search(split.gather_keys(chunk_ids), query_doc_ids, query_valid)

    def gather(self, neighbour_ids: tf.Tensor) -> tf.Tensor:
        """neighbour ids int64 [..., k] -> tokens int32 [..., k, 2m]: chunk ; continuation.

        The continuation is the next chunk only when it is in the same document, else zeros
        (never a chunk of another document); a missing neighbour (-1) is all zeros.
        """
        chunk = self.database.gather_tokens(neighbour_ids)
        continuation = self.database.gather_tokens(self.database.continuation_ids(neighbour_ids))
        return tf.concat([chunk, continuation], axis=-1)


def add_neighbours(batch: dict[str, tf.Tensor], retriever: NeighbourRetriever,
                   split: ChunkTable | None, precomputed: tf.Variable | None) -> dict:
    """Adds neighbour_ids int64 [B, L, k] and neighbours int32 [B, L, k, 2m] to a batch.

    Inline: the B * L chunks query the database in one call (their keys go to the ScaNN
    searcher, or their BM25 candidate rows are gathered). Precomputed:
    the neighbour ids of each split chunk are read from `precomputed` int64 [N, k].
    """
    chunk_ids = batch["chunk_ids"]  # [B, L]
    shape = tf.shape(chunk_ids)
    flat_ids = tf.reshape(chunk_ids, [-1])
    if precomputed is not None:
        rows = tf.gather(precomputed, tf.maximum(flat_ids, 0))
        ids = tf.where(flat_ids[:, None] >= 0, rows, tf.constant(-1, tf.int64))
    else:
        ids = retriever.query_chunks(split, flat_ids, tf.reshape(batch["doc_ids"], [-1]),
                                     flat_ids >= 0)
    k = retriever.num_neighbours
    ids = tf.reshape(ids, tf.concat([shape, [k]], axis=0))
    out = dict(batch)
    out["neighbour_ids"] = ids
    out["neighbours"] = retriever.gather(ids)
    return out
