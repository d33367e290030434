"""Chunk arrays as TF variables, and the batched example builder (inputs / targets).

Memory. The pipeline gathers tokens, doc ids and query rows by chunk id inside the tf.data
graph, so the arrays live in host memory as `tf.Variable`s (not graph constants: a constant
is copied into the dataset's graph, which is serialised for tf.data's optimisations and hits
the 2 GiB protobuf limit). Cost per chunk at m=64, d=384: tokens 256 B, doc id 8 B, query row
1536 B for a frozen-BERT key (80 B for a row of 10 BM25 candidate ids); query rows are only
loaded for the split whose sequences are read, and not at all with precomputed neighbours.
A CPU demo (thousands of chunks) or a 1M-chunk shard (~1.8 GB) fits easily; the paper's
28B-chunk database does not fit one host: there each host serves neighbours for its shard
only (precomputed neighbours, so no keys are loaded, and neighbour tokens from a
memory-mapped or remote token store), which this module does not implement.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _variable(array: np.ndarray, name: str) -> tf.Variable:
    # On the host CPU: tf.data runs there, and a GPU TF build would otherwise place it on GPU.
    with tf.device("/CPU:0"):
        return tf.Variable(np.ascontiguousarray(array), trainable=False, name=name)


class ChunkTable:
    """One split's chunk arrays in host memory.

    Attributes:
      tokens: tf.Variable int32 [N, m].
      doc_ids: tf.Variable int64 [N].
      queries: tf.Variable [N, ...]: each chunk's query row for the database's retriever
        (frozen-BERT keys float32 [N, d], or BM25 candidate ids int64 [N, K]), or None when
        not needed.
    """

    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray,
                 queries: np.ndarray | None = None, *, name: str = "split"):
        self.num_chunks = int(tokens.shape[0])
        self.chunk_len = int(tokens.shape[1])
        self.tokens = _variable(np.asarray(tokens, np.int32), f"{name}_tokens")
        self.doc_ids = _variable(np.asarray(doc_ids, np.int64), f"{name}_doc_ids")
        self.queries = None if queries is None else _variable(np.asarray(queries),
                                                              f"{name}_queries")

    def gather_tokens(self, chunk_ids: tf.Tensor) -> tf.Tensor:
        """chunk ids int64 [...] (-1 = none) -> int32 [..., m], zeros for -1."""
        valid = chunk_ids >= 0
        rows = tf.gather(self.tokens, tf.maximum(chunk_ids, 0))
        return rows * tf.cast(valid, tf.int32)[..., None]

    def gather_doc_ids(self, chunk_ids: tf.Tensor) -> tf.Tensor:
        """chunk ids int64 [...] -> doc ids int64 [...], -1 where the chunk id is -1."""
        return tf.where(chunk_ids >= 0, tf.gather(self.doc_ids, tf.maximum(chunk_ids, 0)),
                        tf.constant(-1, tf.int64))

    def gather_queries(self, chunk_ids: tf.Tensor) -> tf.Tensor:
        """chunk ids int64 [Q] -> their query rows [Q, ...] (row 0's for -1: callers mark
        those queries invalid)."""
        return tf.gather(self.queries, tf.maximum(chunk_ids, 0))

    def gather_stream(self, chunk_ids: tf.Tensor, before: int, after: int) -> tf.Tensor:
        """chunk ids int64 [...] -> int32 [..., (before + 1 + after) * m]: the tokens of chunks
        id - before .. id + after, zeros for those outside the chunk's document (or the split)
        and everywhere for id -1. The chunk's own tokens start at offset before * m."""
        own_doc = self.gather_doc_ids(chunk_ids)
        parts = []
        for offset in range(-before, after + 1):
            other = chunk_ids + offset
            inside = (chunk_ids >= 0) & (other >= 0) & (other < self.num_chunks)
            other = tf.where(inside, other, tf.constant(-1, tf.int64))
            inside &= self.gather_doc_ids(other) == own_doc
            parts.append(self.gather_tokens(tf.where(inside, other, tf.constant(-1, tf.int64))))
        return tf.concat(parts, axis=-1)

    def continuation_ids(self, chunk_ids: tf.Tensor) -> tf.Tensor:
        """chunk ids int64 [...] -> id of the next chunk of the same document, else -1."""
        nxt = chunk_ids + 1
        in_range = (chunk_ids >= 0) & (nxt < self.num_chunks)
        nxt_safe = tf.where(in_range, nxt, 0)
        same_doc = tf.gather(self.doc_ids, nxt_safe) == self.gather_doc_ids(chunk_ids)
        return tf.where(in_range & same_doc, nxt, tf.constant(-1, tf.int64))


def build_examples(table: ChunkTable, first_chunk: tf.Tensor, num_chunks: tf.Tensor,
                   chunks_per_example: int) -> dict[str, tf.Tensor]:
    """Batched examples from chunk runs.

    Args:
      first_chunk, num_chunks: int64 [B].
    Returns:
      chunk_ids int64 [B, L] (-1 = padding chunk), doc_ids int64 [B, L] (-1 for padding),
      inputs int32 [B, n], targets int32 [B, n]: targets[t] = inputs[t + 1] when tokens t and
      t + 1 belong to the same document, else 0 (masked). The last position looks at the
      chunk after the example (its first token when it continues the same document). Since a
      document is `tokens + [EOS]` padded with 0 to the chunk end, EOS is predicted and
      nothing after it is (padding and the next document's first token are targets 0).
    """
    L, m = chunks_per_example, table.chunk_len
    offsets = tf.range(L, dtype=tf.int64)
    valid = offsets[None, :] < num_chunks[:, None]
    chunk_ids = tf.where(valid, first_chunk[:, None] + offsets[None, :], tf.constant(-1, tf.int64))
    tokens = table.gather_tokens(chunk_ids)  # [B, L, m]
    doc_ids = table.gather_doc_ids(chunk_ids)  # [B, L]
    last = first_chunk + num_chunks - 1
    after = table.continuation_ids(last)  # [B]: next chunk of the last chunk's document
    after_first_token = table.gather_tokens(after)[:, 0]  # [B]; 0 when after == -1

    batch = tf.shape(first_chunk)[0]
    inputs = tf.reshape(tokens, [batch, L * m])
    # A padded example's "after" is the chunk after its last real chunk, which sits inside the
    # sequence: the padding chunk's token 0 there is 0 anyway, and the real chunk's last
    # position sees a padding doc id (-1) next, so its target is 0.
    next_token = tf.concat([inputs[:, 1:], tf.zeros([batch, 1], tf.int32)], axis=1)
    pos_doc = tf.repeat(doc_ids, m, axis=1)  # [B, n]
    next_doc = tf.concat([pos_doc[:, 1:], tf.fill([batch, 1], tf.constant(-1, tf.int64))], axis=1)
    targets = tf.where((pos_doc == next_doc) & (pos_doc >= 0), next_token, 0)
    full = num_chunks == L
    last_target = tf.where(full, after_first_token, 0)
    targets = tf.concat([targets[:, :-1], last_target[:, None]], axis=1)
    return {"inputs": inputs, "targets": targets, "doc_ids": doc_ids, "chunk_ids": chunk_ids}
