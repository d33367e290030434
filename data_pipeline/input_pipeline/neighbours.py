"""In-graph neighbours: the retriever's candidate search, document filters, token gather.

Everything here is TensorFlow ops, so it runs inside a parallel tf.data map without the
Python GIL. The search runs on a whole batch at once (B * L queries per call), which is where
ScaNN is efficient.

Where candidates come from (`NeighbourRetriever.query_chunks`): the query chunk's row of its
split's query array (`ChunkTable.queries`) goes to the database's `InGraphSearch`
(data_pipeline/retrieval): frozen-BERT keys to ScaNN's TF op ("bert"), or a slice of the
chunk's BM25 candidate row computed at build time ("bm25", whose `max_candidates` is the
table's width).

Filter semantics (shared by training, precompute and evaluation, one function: `select`):
  fetch K = min(k * overfetch, database size, [bm25] table width) candidates in distance (or
  score) order; drop a candidate when its document is one the query comes from
  (exclude_same_document: in training every document of the chunk's sequence, elsewhere the
  chunk's own) or is in `exclude_doc_ids` (evaluation); keep the first k survivors in that
  order; -1 where fewer than k survive.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import tensorflow as tf

from data_pipeline.input_pipeline.tables import ChunkTable
from data_pipeline.retrieval import InGraphSearch


class NeighbourRetriever:
    """Retrieves and filters neighbours of query chunks from the database's train split.

    Args:
      database: ChunkTable of the retrieval database (its train split).
      search: the database's candidate search over the same chunk ids
        (`RetrievalDatabase.in_graph_search()`); None when only `select` and `gather` are used
        (precomputed neighbours).
      num_neighbours: k.
      overfetch: candidates fetched per query = k * overfetch (capped at the database size).
      exclude_same_document: drop candidates from the documents the query comes from: in
        training every document of the query chunk's sequence (a packed sequence holds
        several; the model is trained to predict all of them), else the chunk's own.
      exclude_doc_ids: doc ids whose chunks are never returned (evaluation).
    """

    def __init__(self, database: ChunkTable, search: InGraphSearch | None, *,
                 num_neighbours: int, overfetch: int, exclude_same_document: bool,
                 exclude_doc_ids: Collection[int] | None = None):
        self.database = database
        self.search_op = search
        self.num_neighbours = int(num_neighbours)
        self.num_candidates = min(self.num_neighbours * max(1, int(overfetch)),
                                  database.num_chunks)
        limit = getattr(search, "max_candidates", None)
        if limit is not None:
            # E.g. a BM25 table holds K per chunk: filters see at most those (k itself may
            # exceed K; the missing neighbours are then -1).
            self.num_candidates = min(self.num_candidates, int(limit))
        self.exclude_same_document = bool(exclude_same_document)
        excluded = np.unique(np.asarray(list(exclude_doc_ids or ()), np.int64))
        self._excluded = tf.constant(excluded, tf.int64) if excluded.size else None

    @property
    def settings(self) -> dict:
        """What determines stored candidates (recorded beside precomputed neighbours)."""
        excluded = [] if self._excluded is None else self._excluded.numpy().tolist()
        return {"num_candidates": self.num_candidates,
                "exclude_same_document": self.exclude_same_document,
                "exclude_doc_ids": excluded}

    def _is_excluded(self, doc_ids: tf.Tensor) -> tf.Tensor:
        """doc ids int64 [...] -> bool [...]: in the excluded set (sorted search, no hashing)."""
        ex = self._excluded
        flat = tf.reshape(doc_ids, [-1])
        pos = tf.searchsorted(ex, flat, side="left")
        hit = tf.gather(ex, tf.minimum(pos, tf.size(ex, out_type=pos.dtype) - 1)) == flat
        return tf.reshape(hit, tf.shape(doc_ids))

    def candidates(self, queries: tf.Tensor) -> tf.Tensor:
        """Query rows [Q, ...] (the form of the split's query array) -> the K best candidate
        train chunk ids int64 [Q, K], best first, -1 where fewer (no filter yet)."""
        return tf.cast(self.search_op.candidates_tf(queries, self.num_candidates), tf.int64)

    def select(self, candidate_ids: tf.Tensor, context_docs: tf.Tensor | None,
               query_valid: tf.Tensor, keep: int | None = None) -> tf.Tensor:
        """The first `keep` (default k) candidates that pass the filters, best first.

        Args:
          candidate_ids: int64 [Q, K'] best first, -1 = none.
          context_docs: int64 [Q, E]: the documents each query comes from (-1 = none), dropped
            when `exclude_same_document`; None = no such filter.
          query_valid: bool [Q]; an invalid query gets no neighbours.
        Returns:
          int64 [Q, keep], -1 where fewer survive.
        """
        keep = self.num_neighbours if keep is None else int(keep)
        if candidate_ids.shape[1] is not None and candidate_ids.shape[1] < keep:
            candidate_ids = tf.pad(candidate_ids, [[0, 0], [0, keep - candidate_ids.shape[1]]],
                                   constant_values=-1)
        valid = (candidate_ids >= 0) & query_valid[:, None]
        candidate_docs = self.database.gather_doc_ids(candidate_ids)  # [Q, K]
        if self.exclude_same_document and context_docs is not None:
            context = tf.cast(context_docs, tf.int64)
            same = tf.reduce_any((candidate_docs[:, :, None] == context[:, None, :])
                                 & (context[:, None, :] >= 0), axis=-1)
            valid &= ~same
        if self._excluded is not None:
            valid &= ~self._is_excluded(candidate_docs)
        # Survivors first, each group in candidate order: a stable sort on (dropped, rank).
        rank = tf.range(tf.shape(candidate_ids)[1], dtype=tf.int32)[None, :]
        order_key = tf.where(valid, rank, rank + tf.shape(candidate_ids)[1])
        _, order = tf.math.top_k(-order_key, k=keep, sorted=True)
        chosen = tf.gather(candidate_ids, order, batch_dims=1)
        chosen_valid = tf.gather(valid, order, batch_dims=1)
        return tf.where(chosen_valid, chosen, tf.constant(-1, tf.int64))

    def search(self, queries: tf.Tensor, context_docs: tf.Tensor | None,
               query_valid: tf.Tensor) -> tf.Tensor:
        """Query rows [Q, ...] -> neighbour ids int64 [Q, k] (train chunk ids, -1 = none)."""
        return self.select(self.candidates(queries), context_docs, query_valid)

    def query_chunks(self, split: ChunkTable, chunk_ids: tf.Tensor,
                     context_docs: tf.Tensor | None, query_valid: tf.Tensor) -> tf.Tensor:
        """Neighbours of chunks of `split`: chunk ids int64 [Q] (-1 = none) -> neighbour ids
        int64 [Q, k]. The query of a chunk is its row of the split's query array;
        `context_docs` [Q, E] as in `select`."""
        return self.search(split.gather_queries(chunk_ids), context_docs,
                           query_valid & (chunk_ids >= 0))

    def gather(self, neighbour_ids: tf.Tensor) -> tf.Tensor:
        """neighbour ids int64 [..., k] -> tokens int32 [..., k, 2m]: chunk ; continuation.

        The continuation is the next chunk only when it is in the same document, else zeros
        (never a chunk of another document); a missing neighbour (-1) is all zeros.
        """
        chunk = self.database.gather_tokens(neighbour_ids)
        continuation = self.database.gather_tokens(self.database.continuation_ids(neighbour_ids))
        return tf.concat([chunk, continuation], axis=-1)


def sequence_documents(doc_ids: tf.Tensor) -> tf.Tensor:
    """doc ids int64 [B, L] -> [B * L, L]: for every chunk, the documents of its sequence."""
    shape = tf.shape(doc_ids)
    return tf.reshape(tf.repeat(doc_ids[:, None, :], shape[1], axis=1), [-1, shape[1]])


def add_neighbours(batch: dict[str, tf.Tensor], retriever: NeighbourRetriever,
                   split: ChunkTable | None, precomputed: tf.Variable | None) -> dict:
    """Adds neighbour_ids int64 [B, L, k] and neighbours int32 [B, L, k, 2m] to a batch.

    The B * L chunks query the database in one call: inline, their query rows go to the
    retriever's search; precomputed, their candidate rows are read from `precomputed` int64
    [N, K] (`precompute.py`). Either way the candidates then pass the same filter: no
    neighbour comes from a document of the chunk's own sequence (with a packed sequence, that
    is every document it holds, whose later chunks the model is trained to predict).
    """
    chunk_ids = batch["chunk_ids"]  # [B, L]
    shape = tf.shape(chunk_ids)
    flat_ids = tf.reshape(chunk_ids, [-1])
    valid = flat_ids >= 0
    if precomputed is not None:
        candidates = tf.gather(precomputed, tf.maximum(flat_ids, 0))
    else:
        candidates = retriever.candidates(split.gather_queries(flat_ids))
    ids = retriever.select(candidates, sequence_documents(batch["doc_ids"]), valid)
    k = retriever.num_neighbours
    ids = tf.reshape(ids, tf.concat([shape, [k]], axis=0))
    out = dict(batch)
    out["neighbour_ids"] = ids
    out["neighbours"] = retriever.gather(ids)
    return out
