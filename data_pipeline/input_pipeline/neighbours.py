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

Token alignment (`align_max_shift` S > 0, `align_windows`): each neighbour's 2m-token window
starts up to S tokens before or after its chunk, where it best matches the querying chunk.
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
      align_max_shift: 0 = the paper's window [chunk ; continuation]; S > 0 = token-aligned
        windows (`align_windows`, `data.align_max_shift`), capped at m - 1.
    """

    def __init__(self, database: ChunkTable, search: InGraphSearch | None, *,
                 num_neighbours: int, overfetch: int, exclude_same_document: bool,
                 exclude_doc_ids: Collection[int] | None = None, align_max_shift: int = 0):
        self.database = database
        self.align_max_shift = max(0, min(int(align_max_shift), database.chunk_len - 1))
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

    def gather(self, neighbour_ids: tf.Tensor, query_tokens: tf.Tensor | None = None
               ) -> tf.Tensor:
        """neighbour ids int64 [..., k] -> tokens int32 [..., k, 2m]: chunk ; continuation.

        The continuation is the next chunk only when it is in the same document, else zeros
        (never a chunk of another document); a missing neighbour (-1) is all zeros. With
        `align_max_shift` > 0, the windows are aligned with the querying chunks'
        `query_tokens` int32 [..., m] (`align_windows`).
        """
        if self.align_max_shift > 0:
            if query_tokens is None:
                raise ValueError("aligned neighbours (align_max_shift > 0) need the querying "
                                 "chunks' tokens")
            stream = self.database.gather_stream(neighbour_ids, before=1, after=2)
            return align_windows(stream, query_tokens, self.database.chunk_len,
                                 self.align_max_shift)
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
    query_tokens = tf.reshape(batch["inputs"], tf.concat([shape, [-1]], axis=0))  # [B, L, m]
    out["neighbours"] = retriever.gather(ids, query_tokens)
    return out


def align_windows(stream: tf.Tensor, query_tokens: tf.Tensor, chunk_len: int,
                  max_shift: int) -> tf.Tensor:
    """Neighbour windows aligned token by token with the chunk that retrieved them.

    A neighbour chunk shares text with its querying chunk C_u at some token offset, rarely at
    the chunk boundary, so its continuation is usually not aligned with C_u+1 in CCA's
    relative-position frame (neighbour token j <-> offset j from the start of C_u). For each
    neighbour this picks the shift s in [-max_shift, max_shift] whose window
    doc[start + s : start + s + m] shares the most bigrams (two consecutive tokens at the same
    offsets) with C_u, ties to the smallest |s| and then the negative one (s = 0 when nothing
    matches: the paper's window), and returns doc[start + s : start + s + 2m] from the
    neighbour's own document (zeros outside it). Only C_u is read, the past of every position
    that attends to these neighbours, so causality is unchanged.

    Args:
      stream: int32 [..., k, 4m]: chunks j-1, j, j+1, j+2 of each neighbour j's document
        (`ChunkTable.gather_stream(ids, 1, 2)`).
      query_tokens: int32 [..., m]: the querying chunks C_u.
    Returns:
      int32 [..., k, 2m].
    """
    m = chunk_len
    shifts = tf.range(-max_shift, max_shift + 1)  # [D]
    positions = m + shifts[:, None] + tf.range(m)[None, :]  # [D, m]
    views = tf.gather(stream, positions, axis=-1)  # [..., k, D, m]
    query = query_tokens[..., None, None, :]  # [..., 1, 1, m]
    equal = tf.equal(views, query) & tf.not_equal(query, 0)
    bigrams = tf.reduce_sum(tf.cast(equal[..., 1:] & equal[..., :-1], tf.int32), axis=-1)
    rank = bigrams * (4 * m) - 2 * tf.abs(shifts) - tf.cast(shifts > 0, tf.int32)  # [..., k, D]
    start = m + tf.gather(shifts, tf.argmax(rank, axis=-1, output_type=tf.int32))  # [..., k]
    window = start[..., None] + tf.range(2 * m)  # [..., k, 2m]
    return tf.gather(stream, window, batch_dims=len(stream.shape) - 1)
