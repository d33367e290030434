"""Which chunks make each example, and in which order each host reads the examples.

An example is a run of at most L = n / m consecutive chunks of one split, described by
`(first_chunk, num_chunks)`; positions past `num_chunks` are padding. Because examples are made
of whole chunks, the chunk grid of a sequence is the retrieval grid: chunk u of a sequence is
split chunk `first_chunk + u`, whose precomputed key is the query for its neighbours.

Order. The examples of one epoch are a permutation of the table, computed per position with
TF's `RandomIndexShuffle` op (`tf.random.experimental.index_shuffle`): a keyed bijection
position -> example, so no array is materialised and any position is reachable in O(1).
The hosts share one permutation per epoch: host p reads positions p, p + P, p + 2P, ... of
it (P = process_count), so the hosts' examples are disjoint and their union is the epoch (up
to `S mod P` examples dropped per epoch, a different set each epoch). Epoch e uses the seed
(seed, e): a new, deterministic shuffle per epoch. A host's stream position g maps to epoch
g // per_host and offset g % per_host, so resuming at step S starts at position
S * batch_size without replaying anything.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class ExampleTable:
    """Examples of a split as chunk runs.

    Attributes:
      first_chunk: int64 [S] split chunk id of each example's first chunk.
      num_chunks: int64 [S] real chunks in the example (1..L); the rest is padding.
      score_from: int64 [S] first position scored (eval windows); 0 for training examples.
    """

    first_chunk: np.ndarray
    num_chunks: np.ndarray
    score_from: np.ndarray

    def __len__(self) -> int:
        return int(self.first_chunk.shape[0])


def document_runs(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of equal doc ids: (first chunk [D], number of chunks [D]), int64."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(doc_ids[1:] != doc_ids[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [doc_ids.size]]))
    return starts.astype(np.int64), lengths.astype(np.int64)


def training_examples(doc_ids: np.ndarray, chunks_per_example: int, packing: str) -> ExampleTable:
    """The example table of a split.

    packing="packed": consecutive chunks across documents; the trailing partial run is dropped.
    packing="document": each document is cut into runs of L chunks, the last one shorter
      (padded in the batch), so no example spans two documents.
    """
    num_chunks_total = int(np.asarray(doc_ids).shape[0])
    L = chunks_per_example
    if packing == "packed":
        count = num_chunks_total // L
        first = np.arange(count, dtype=np.int64) * L
        lengths = np.full(count, L, np.int64)
    elif packing == "document":
        doc_first, doc_len = document_runs(doc_ids)
        pieces = -(-doc_len // L)  # ceil
        doc_of_piece = np.repeat(np.arange(doc_first.size), pieces)
        piece_in_doc = np.arange(doc_of_piece.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        first = doc_first[doc_of_piece] + piece_in_doc * L
        lengths = np.minimum(L, doc_len[doc_of_piece] - piece_in_doc * L)
    else:
        raise ValueError(f"packing must be 'packed' or 'document', got {packing!r}")
    return ExampleTable(first.astype(np.int64), lengths.astype(np.int64),
                        np.zeros(first.shape, np.int64))


def eval_windows(doc_ids: np.ndarray, chunks_per_example: int, chunk_len: int, stride: int,
                 doc_filter: Collection[int] | None = None) -> ExampleTable:
    """Sliding windows of whole chunks over each document, scoring every position once.

    Window j of a document starts at chunk j * (stride / m) and holds up to L chunks. It scores
    the input positions (each predicting the next token) that no earlier window scored: all
    of them for the first window, the last `stride` positions for the next ones (fewer at the
    document end). A document's last window is the first one that reaches its end. With
    stride == n the windows are disjoint; with stride < n each scored token sees n - stride
    or more tokens of context.
    """
    n = chunks_per_example * chunk_len
    if stride % chunk_len or not 0 < stride <= n:
        raise ValueError(f"eval stride must be a multiple of the chunk length {chunk_len} in "
                         f"(0, {n}], got {stride}")
    step = stride // chunk_len
    L = chunks_per_example
    doc_ids = np.asarray(doc_ids)
    doc_first, doc_len = document_runs(doc_ids)
    if doc_filter is not None:
        wanted = np.asarray(sorted(doc_filter), np.int64)
        keep = np.isin(doc_ids[doc_first], wanted)
        doc_first, doc_len = doc_first[keep], doc_len[keep]
    # Windows per document: starts 0, step, ... until start + L >= doc_len.
    windows = 1 + np.maximum(0, -(-(doc_len - L) // step))
    doc_of_window = np.repeat(np.arange(doc_first.size), windows)
    j = np.arange(doc_of_window.size) - np.repeat(np.cumsum(windows) - windows, windows)
    start = j * step
    first = doc_first[doc_of_window] + start
    lengths = np.minimum(L, doc_len[doc_of_window] - start)
    # Window j - 1 scored up to chunk (j - 1) * step + L; window j starts at j * step.
    score_from = np.where(j == 0, 0, (L - step) * chunk_len)
    return ExampleTable(first.astype(np.int64), lengths.astype(np.int64),
                        score_from.astype(np.int64))


def examples_per_host(num_examples: int, process_count: int) -> int:
    """Examples each host reads per epoch (the epoch's S mod P leftovers are dropped)."""
    return num_examples // process_count


def example_index_tf(position: tf.Tensor, *, num_examples: int, process_index: int,
                     process_count: int, seed: int, shuffle: bool) -> tf.Tensor:
    """Host stream positions int64 [...] -> example indices int64 [...] (pure TF, O(1) each)."""
    per_host = examples_per_host(num_examples, process_count)
    position = tf.cast(position, tf.int64)
    epoch = position // per_host
    in_epoch = (position % per_host) * process_count + process_index
    if not shuffle:
        return in_epoch
    # The op takes one 3-int seed per index: (seed, epoch, 0) makes a new permutation per epoch.
    seed_vec = tf.stack([tf.fill(tf.shape(epoch), tf.constant(seed, tf.int64)), epoch,
                         tf.zeros_like(epoch)], axis=-1)
    max_index = tf.fill(tf.shape(epoch), tf.constant(num_examples - 1, tf.int64))
    # The raw op: the public wrapper accepts only one seed for all indices.
    return tf.raw_ops.RandomIndexShuffle(index=in_epoch, seed=seed_vec, max_index=max_index,
                                         rounds=4)


def example_index_np(positions: np.ndarray, **kwargs) -> np.ndarray:
    """numpy view of `example_index_tf` (tests, precompute bookkeeping)."""
    return example_index_tf(tf.constant(np.asarray(positions, np.int64)), **kwargs).numpy()
