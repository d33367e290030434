"""The tf.data input pipeline: sequences of whole chunks with their neighbours, retrieved inline.

    chunk arrays of a split ──► example table (packed | per document | eval windows)
      ──► positions (host stream, arithmetic: epoch, shuffle, host shard, resume)
      ──► .batch(B) ──► parallel map: inputs / targets, then the B*L chunks' query rows go
          to the database's retriever in one call (frozen-BERT keys to ScaNN's TF op, or
          rows of the BM25 candidate table), over-fetch k*overfetch, drop same-document /
          excluded neighbours, keep the first k, gather [neighbour ; continuation] tokens
      ──► prefetch ──► device_batches(): global jax.Arrays sharded over ('data', 'fsdp')

Every step is a TensorFlow op (no py_function), so the map runs in parallel without the GIL.
Modules (one concept each); this package's `__init__` assembles them and is the public
interface (docs/ARCHITECTURE.md, "data_pipeline/input_pipeline"):
  sequences   which chunks make each example (packed / per document / eval windows) and the
              arithmetic order of examples per host and epoch (shuffle, sharding, resume)
  tables      the chunk arrays as tf.Variables, the per-batch example builder (inputs/targets)
  neighbours  in-graph candidate search (the database's Retriever), the same-document /
              excluded-document filter, and the [neighbour ; continuation] token gather
  precompute  neighbours retrieved once (fanned out over the index shards, on one machine
              or on Apache Beam) into sharded .npy files, and read back
  checks      database / split / argument checks that fail before the first batch
  device      per-host numpy batches -> global sharded jax.Arrays, prefetched
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.input_pipeline import checks
from data_pipeline.input_pipeline.device import DEVICE_FIELDS, DeviceBatchIterator, device_batches
from data_pipeline.input_pipeline.neighbours import NeighbourRetriever, add_neighbours
from data_pipeline.input_pipeline.precompute import (
    DEFAULT_SHARD_ROWS,
    database_fingerprint,
    precompute_settings,
    read_precomputed,
    write_precomputed,
)
from data_pipeline.input_pipeline.sequences import (
    ExampleTable,
    eval_windows,
    example_index_tf,
    examples_per_host,
    training_examples,
)
from data_pipeline.input_pipeline.tables import ChunkTable, build_examples

__all__ = [
    "DEVICE_FIELDS", "DeviceBatchIterator", "device_batches", "eval_windows", "make_dataset",
    "make_eval_windows", "neighbour_windows", "precompute_neighbours", "retrieve_chunk_neighbours",
    "retrieve_neighbours",
]

RETRIEVAL_SPLIT = "train"  # the split that is indexed and searched
_MAX_POSITION = 2**62  # "forever" for repeated datasets

# Chunk tables (tf.Variables) per database object and split, so that several datasets and
# retrieve_neighbours calls on one database load its arrays once.
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _chunk_table(db: Any, split: str, *, with_queries: bool) -> ChunkTable:
    """The split's arrays as tf.Variables, cached per database; with the chunks' query rows
    (the retriever's `query_array`) when `with_queries`."""
    cache = _TABLES.setdefault(db, {})
    table = cache.get(split)
    if table is None or (with_queries and table.queries is None):
        tokens, doc_ids, queries = checks.split_arrays(db, split, need_queries=with_queries)
        table = ChunkTable(tokens, doc_ids, queries, name=split)
        cache[split] = table
    return table


def _retriever(db: Any, *, num_neighbours: int, overfetch: int, exclude_same_document: bool,
               exclude_doc_ids: Collection[int] | None, need_search: bool,
               align_max_shift: int = 0) -> NeighbourRetriever:
    database = _chunk_table(db, RETRIEVAL_SPLIT, with_queries=False)
    checks.check_neighbours(db=db, num_neighbours=num_neighbours,
                            num_db_chunks=database.num_chunks)
    return NeighbourRetriever(database, db.in_graph_search() if need_search else None,
                              num_neighbours=num_neighbours, overfetch=overfetch,
                              exclude_same_document=exclude_same_document,
                              exclude_doc_ids=exclude_doc_ids, align_max_shift=align_max_shift)


def _same_document_filter(requested: bool, db: Any, split_db: Any | None) -> bool:
    # Doc ids are unique within one database only: a split read from another database has
    # no documents in this one, and a coincident id must not drop a neighbour.
    return requested and (split_db is None or split_db is db)


def _variable(array: np.ndarray) -> tf.Variable:
    with tf.device("/CPU:0"):
        return tf.Variable(array, trainable=False)


def _assemble(positions: tf.data.Dataset, *, examples: ExampleTable, index_fn, split: ChunkTable,
              chunks_per_example: int, batch_size: int, drop_remainder: bool,
              retriever: NeighbourRetriever | None, precomputed: tf.Variable | None,
              with_score_mask: bool) -> tf.data.Dataset:
    first_chunk = _variable(examples.first_chunk)
    num_chunks = _variable(examples.num_chunks)
    score_from = _variable(examples.score_from)
    n = chunks_per_example * split.chunk_len

    def make_batch(position: tf.Tensor) -> dict[str, tf.Tensor]:
        index = index_fn(position)  # [B]
        batch = build_examples(split, tf.gather(first_chunk, index), tf.gather(num_chunks, index),
                               chunks_per_example)
        if with_score_mask:
            scored = tf.range(n, dtype=tf.int64)[None, :] >= tf.gather(score_from, index)[:, None]
            batch["score_mask"] = tf.cast(scored & (batch["targets"] != 0), tf.int32)
        if retriever is not None:
            batch = add_neighbours(batch, retriever, split, precomputed)
        return batch

    return (positions.batch(batch_size, drop_remainder=drop_remainder)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _load_precomputed(precomputed_dir, *, db, split, split_table: ChunkTable,
                      retriever: NeighbourRetriever) -> tf.Variable:
    ids = read_precomputed(precomputed_dir, split=split, num_chunks=split_table.num_chunks,
                           settings=retriever.settings,
                           fingerprint=database_fingerprint(db, retriever.database.num_chunks))
    return _variable(ids)


def make_dataset(db: Any, split: str, *, seq_len: int, batch_size: int, num_neighbours: int,
                 overfetch: int = 4, packing: str = "packed", seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 exclude_same_document: bool = True,
                 exclude_doc_ids: Collection[int] | None = None,
                 precomputed_dir: str | os.PathLike | None = None, split_db: Any | None = None,
                 expect_chunk_len: int | None = None,
                 expect_tokenizer_sha256: str | None = None,
                 drop_remainder: bool = True, align_max_shift: int = 0) -> tf.data.Dataset:
    """Training (or evaluation) batches of one host.

    Args:
      db: the retrieval database (RetrievalDatabase); its train split is searched.
      split: the split sequences are read from (of `split_db` when given, else of `db`).
      seq_len: n, a multiple of the chunk length m; L = n / m chunks per sequence.
      batch_size: this host's share of the global batch.
      num_neighbours: k; 0 = retrieval off (no neighbours / neighbour_ids keys).
      overfetch: candidates fetched per chunk = k * overfetch, before the filters.
      packing: "packed" (consecutive chunks across documents) or "document" (a sequence
        never spans two documents; short ones are padded).
      seed, shuffle: epoch e is permutation (seed, e) of the sequences; shuffle=False keeps
        split order.
      repeat: endless epochs (each reshuffled); False = one epoch.
      start_step: resume: the batches an uninterrupted run yields from this step on.
      process_index, process_count: host sharding (disjoint per host, union = the epoch).
      exclude_same_document: drop neighbours from the querying chunk's document (training).
      exclude_doc_ids: doc ids never returned as neighbours (evaluation).
      precomputed_dir: read neighbour ids written by `precompute_neighbours` (same settings).
      split_db: a separate database whose `split` is read (same chunk length and tokenizer);
        its doc ids mean nothing in `db`, so the same-document filter is off then.
      expect_chunk_len, expect_tokenizer_sha256: the caller's m and tokenizer, checked.
      drop_remainder: static batch shapes (the last partial batch of a one-epoch run dropped).
      align_max_shift: 0 = each neighbour's window is [chunk ; continuation] (the paper);
        S > 0 = shifted by up to S tokens to align with the querying chunk
        (neighbours.align_windows, `data.align_max_shift`).
    Returns:
      tf.data.Dataset of dicts (iterate with `.as_numpy_iterator()` or `device_batches`):
        inputs, targets  int32 [B, n]       targets 0 = masked (padding, document boundary)
        neighbours       int32 [B, L, k, 2m] neighbour chunk ; its continuation; zeros = none
        neighbour_ids    int64 [B, L, k]    train chunk ids, -1 = none
        doc_ids          int64 [B, L]       document of each chunk, -1 = padding chunk
        chunk_ids        int64 [B, L]       split chunk ids, -1 = padding chunk
    Raises:
      DataError: mismatched databases, a split shorter than one batch, k larger than the
        database, missing keys or precomputed files; before the first batch.
    """
    source = split_db if split_db is not None else db
    checks.check_database(db, expect_chunk_len=expect_chunk_len,
                          expect_tokenizer_sha256=expect_tokenizer_sha256, split_db=split_db)
    L = checks.check_sequence_args(seq_len=seq_len, chunk_len=db.chunk_len, batch_size=batch_size,
                                   num_neighbours=num_neighbours, overfetch=overfetch,
                                   packing=packing, process_index=process_index,
                                   process_count=process_count)
    inline = num_neighbours > 0 and precomputed_dir is None
    if inline:
        checks.check_split_db_retriever(db, split_db)
    split_table = _chunk_table(source, split, with_queries=inline)
    examples = training_examples(split_table.doc_ids.numpy(), L, packing)
    checks.check_split_size(db=source, split=split, num_chunks=split_table.num_chunks,
                            num_examples=len(examples), chunks_per_example=L,
                            batch_size=batch_size, process_count=process_count,
                            drop_remainder=drop_remainder)
    retriever = precomputed = None
    if num_neighbours > 0:
        retriever = _retriever(db, num_neighbours=num_neighbours, overfetch=overfetch,
                               exclude_same_document=_same_document_filter(
                                   exclude_same_document, db, split_db),
                               exclude_doc_ids=exclude_doc_ids, need_search=inline,
                               align_max_shift=align_max_shift)
        if precomputed_dir is not None:
            precomputed = _load_precomputed(precomputed_dir, db=db, split=split,
                                            split_table=split_table, retriever=retriever)
    per_host = examples_per_host(len(examples), process_count)
    start = int(start_step) * batch_size
    stop = _MAX_POSITION if repeat else per_host
    positions = tf.data.Dataset.range(min(start, stop), stop)

    def index_fn(position):
        return example_index_tf(position, num_examples=len(examples),
                                process_index=process_index, process_count=process_count,
                                seed=seed, shuffle=shuffle)

    return _assemble(positions, examples=examples, index_fn=index_fn, split=split_table,
                     chunks_per_example=L, batch_size=batch_size, drop_remainder=drop_remainder,
                     retriever=retriever, precomputed=precomputed, with_score_mask=False)


def make_eval_windows(db: Any, split: str, seq_len: int, stride: int,
                      doc_filter: Collection[int] | None = None, *, batch_size: int = 1,
                      num_neighbours: int = 0, overfetch: int = 4,
                      exclude_same_document: bool = True,
                      exclude_doc_ids: Collection[int] | None = None, split_db: Any | None = None,
                      process_index: int = 0, process_count: int = 1,
                      align_max_shift: int = 0) -> tf.data.Dataset:
    """Evaluation windows: every token of every document scored exactly once.

    Each document (of `doc_filter`, if given; its doc ids) is covered by windows of whole
    chunks starting every `stride` tokens (a multiple of m, at most n); window j scores only
    the positions no earlier window scored, i.e. all of the first window and the last
    `stride` positions of later ones, so with stride < n every scored token has at least
    n - stride tokens of context (except at the start of the document). A window never spans
    two documents; the last one is padded. Batches are padded to `batch_size` with empty
    windows (all zeros, score_mask 0) so every batch has the same shape, and every host gets
    the same number of batches (windows are dealt round robin over hosts).

    `align_max_shift` as in `make_dataset` (evaluate with the setting the model trained with).

    Returns:
      tf.data.Dataset of dicts with the keys of `make_dataset` plus
        score_mask int32 [B, n]: 1 where targets[t] is scored in this window (targets != 0).
    """
    source = split_db if split_db is not None else db
    checks.check_database(db, expect_chunk_len=None, expect_tokenizer_sha256=None,
                          split_db=split_db)
    L = checks.check_sequence_args(seq_len=seq_len, chunk_len=db.chunk_len, batch_size=batch_size,
                                   num_neighbours=num_neighbours, overfetch=overfetch,
                                   packing="document", process_index=process_index,
                                   process_count=process_count)
    if stride % db.chunk_len or not 0 < stride <= seq_len:
        raise DataError(f"eval.stride={stride} must be a multiple of the chunk length "
                               f"{db.chunk_len} in (0, data.seq_len={seq_len}]")
    if num_neighbours > 0:
        checks.check_split_db_retriever(db, split_db)
    split_table = _chunk_table(source, split, with_queries=num_neighbours > 0)
    windows = eval_windows(split_table.doc_ids.numpy(), L, db.chunk_len, stride, doc_filter)
    count = len(windows)
    # One empty window at index `count` pads hosts and the last batch.
    padded = ExampleTable(np.append(windows.first_chunk, 0), np.append(windows.num_chunks, 0),
                          np.append(windows.score_from, 0))
    per_host = -(-count // process_count)
    per_host = -(-per_host // batch_size) * batch_size
    retriever = None
    if num_neighbours > 0:
        retriever = _retriever(db, num_neighbours=num_neighbours, overfetch=overfetch,
                               exclude_same_document=_same_document_filter(
                                   exclude_same_document, db, split_db),
                               exclude_doc_ids=exclude_doc_ids, need_search=True,
                               align_max_shift=align_max_shift)

    def index_fn(position):
        window = position * process_count + process_index
        return tf.where(window < count, window, count)

    return _assemble(tf.data.Dataset.range(per_host), examples=padded, index_fn=index_fn,
                     split=split_table, chunks_per_example=L, batch_size=batch_size,
                     drop_remainder=True, retriever=retriever, precomputed=None,
                     with_score_mask=True)


def retrieve_neighbours(db: Any, queries: np.ndarray, query_doc_ids: np.ndarray, k: int,
                        overfetch: int = 4, exclude_doc_ids: Collection[int] | None = None, *,
                        exclude_same_document: bool = True,
                        batch_size: int = 4096) -> np.ndarray:
    """Neighbour chunk ids of arbitrary query rows, with the pipeline's filters.

    Args:
      queries: [Q, ...] rows in the form of the database's query array (frozen-BERT keys
        float32 [Q, d] for a "bert" database); query_doc_ids: int64 [Q] their documents
        (-1 = none).
    Returns:
      int64 [Q, k] train chunk ids in best-first order, -1 where fewer than k survive.
    """
    retriever = _retriever(db, num_neighbours=k, overfetch=overfetch,
                           exclude_same_document=exclude_same_document,
                           exclude_doc_ids=exclude_doc_ids, need_search=True)
    queries = np.asarray(queries)
    search = tf.function(
        lambda q, d: retriever.search(q, d[:, None], tf.ones(tf.shape(d), tf.bool)),
        input_signature=[tf.TensorSpec([None, *queries.shape[1:]], tf.as_dtype(queries.dtype)),
                         tf.TensorSpec([None], tf.int64)])
    query_doc_ids = np.asarray(query_doc_ids, np.int64)
    out = np.full((queries.shape[0], k), -1, np.int64)
    for first in range(0, queries.shape[0], batch_size):
        last = first + batch_size
        out[first:last] = search(queries[first:last], query_doc_ids[first:last]).numpy()
    return out


def neighbour_windows(db: Any, neighbour_ids: np.ndarray, query_tokens: np.ndarray,
                      align_max_shift: int) -> np.ndarray:
    """The tokens the pipeline feeds for given neighbours, outside a pipeline (sampling).

    Args:
      neighbour_ids: int64 [..., k] train chunk ids (-1 = none).
      query_tokens: int32 [..., m]: the chunk each row of neighbours was retrieved for.
      align_max_shift: as in `make_dataset`.
    Returns:
      int32 [..., k, 2m]: `db.neighbour_tokens(neighbour_ids)` for 0, else the aligned
      windows of `neighbours.align_windows` (the same function the pipeline runs).
    """
    if align_max_shift <= 0:
        return db.neighbour_tokens(neighbour_ids)
    retriever = _retriever(db, num_neighbours=int(np.shape(neighbour_ids)[-1]), overfetch=1,
                           exclude_same_document=False, exclude_doc_ids=None,
                           need_search=False, align_max_shift=align_max_shift)
    return retriever.gather(tf.constant(np.asarray(neighbour_ids, np.int64)),
                            tf.constant(np.asarray(query_tokens, np.int32))).numpy()


def retrieve_chunk_neighbours(db: Any, split: str, chunk_ids: np.ndarray, k: int,
                              overfetch: int = 4,
                              exclude_doc_ids: Collection[int] | None = None, *,
                              exclude_same_document: bool = True,
                              batch_size: int = 4096) -> np.ndarray:
    """Neighbour chunk ids of chunks of `split` of `db`, with the pipeline's filters (the
    same ids a batch holding those chunks gets), for either retriever.

    Args:
      chunk_ids: int64 [Q] chunk ids of `split` (-1 = none).
    Returns:
      int64 [Q, k] train chunk ids in distance (or BM25 score) order, -1 where fewer than k
      survive.
    """
    split_table = _chunk_table(db, split, with_queries=True)
    retriever = _retriever(db, num_neighbours=k, overfetch=overfetch,
                           exclude_same_document=exclude_same_document,
                           exclude_doc_ids=exclude_doc_ids, need_search=True)
    search = tf.function(
        lambda ids: retriever.query_chunks(split_table, ids,
                                           split_table.gather_doc_ids(ids)[:, None],
                                           ids >= 0),
        input_signature=[tf.TensorSpec([None], tf.int64)])
    chunk_ids = np.asarray(chunk_ids, np.int64)
    out = np.full((chunk_ids.shape[0], k), -1, np.int64)
    for first in range(0, chunk_ids.shape[0], batch_size):
        out[first:first + batch_size] = search(chunk_ids[first:first + batch_size]).numpy()
    return out


def precompute_neighbours(db: Any, split: str, out_dir: str | os.PathLike, *,
                          num_neighbours: int, overfetch: int = 4,
                          exclude_same_document: bool = True,
                          exclude_doc_ids: Collection[int] | None = None,
                          split_db: Any | None = None,
                          shard_rows: int = DEFAULT_SHARD_ROWS, runner: Any = None) -> Path:
    """Write the candidate neighbour ids of every chunk of `split` to sharded .npy files.

    `make_dataset(..., precomputed_dir=out_dir)` with the same k / overfetch / filters then
    yields exactly the batches of inline retrieval, for any seed, packing and sequence length.
    `runner`: LocalRunner() (default: this process) or a data_pipeline.beam_runner.BeamRunner
    (the query blocks fanned out over the index shards on Beam workers); the files are the
    same byte for byte.
    """
    checks.check_database(db, expect_chunk_len=None, expect_tokenizer_sha256=None,
                          split_db=split_db)
    if num_neighbours <= 0:
        raise DataError(f"precompute_neighbours: num_neighbours={num_neighbours}; "
                               "nothing to precompute with retrieval off")
    checks.check_split_db_retriever(db, split_db)
    source = split_db if split_db is not None else db
    checks.check_neighbours(db=db, num_neighbours=num_neighbours,
                            num_db_chunks=int(db.manifest["splits"]["train"]["num_chunks"]))
    checks.split_arrays(source, split, need_queries=True)
    settings = precompute_settings(db, num_neighbours=num_neighbours, overfetch=overfetch,
                                   exclude_same_document=_same_document_filter(
                                       exclude_same_document, db, split_db),
                                   exclude_doc_ids=exclude_doc_ids)
    return write_precomputed(db, split, out_dir, settings=settings,
                             split_db=None if split_db is db else split_db,
                             shard_rows=shard_rows, runner=runner)
