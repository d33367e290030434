"""One index shard: a ScaNN TF-op searcher over a contiguous range of chunk ids.

The TF-op searcher (not the pybind one) is used throughout: its search is a TensorFlow op, so
`search_tf` runs inside a `tf.data` map, in parallel, without taking the Python GIL. ScaNN's
"squared_l2" returns true squared L2 distances (smaller = closer, checked in tests/test_index.py);
after exact re-ordering they are the float32 distances to the keys, not the quantized estimates.

Builds and saved shards are deterministic: the same keys and parameters give the same bytes in
any process (k-means++ seeding, see `build_shard`; state files, see `state.py`), so a resumed
database build is checked against a clean one by checksums.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from scann.scann_ops.py import scann_ops

from data_pipeline.errors import DataError
from data_pipeline.retrieval.scann.params import IndexParams, scann_quantization_threshold
from data_pipeline.retrieval.scann.state import read_state, write_state

META_FILE = "shard.json"
# 1: a TF SavedModel (bytes differed between identical builds); 2: state files (state.py).
FORMAT_VERSION = 2


def build_shard(keys: np.ndarray, params: IndexParams, *, first_chunk: int = 0) -> ShardSearcher:
    """Builds the searcher over `keys` float32 [n, d] (a np.memmap slice is fine: one copy is made).

    Brute force (still the TF-op searcher) when `params.brute_force`; else a k-means tree of
    `num_leaves` partitions, asymmetric hashing (anisotropic when the params' threshold is
    > 0), and exact float32 re-ordering of the best `reorder_k` candidates. Returned ids are
    `first_chunk + row`.

    Deterministic: ScaNN's training samples and AH codebooks are seeded, but its random k-means
    initialisation walks an absl hash set, whose order changes from run to run (same centres,
    other leaf numbering); k-means++ initialisation draws from the seeded generator only.
    """
    if keys.ndim != 2 or keys.shape[0] < 1:
        raise DataError(f"index keys must be float32 [n >= 1, dim], found shape {keys.shape}")
    num_chunks, dim = keys.shape
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if not np.isfinite(keys).all():
        bad = int(np.flatnonzero(~np.isfinite(keys).all(axis=1))[0])
        raise DataError(f"index key of chunk {first_chunk + bad} is not finite (NaN/inf); "
                        "re-run the embedding stage of build-db")
    builder = scann_ops.builder(keys, params.num_neighbours, "squared_l2")
    if params.brute_force:
        builder = builder.score_brute_force()
    else:
        builder = (
            builder.tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.num_leaves_to_search,
                training_sample_size=params.training_sample_size,
                min_partition_size=min(50, max(1, num_chunks // (4 * params.num_leaves))),
                random_init=False,  # k-means++: deterministic (see the docstring)
            )
            .score_ah(
                params.dims_per_block,
                anisotropic_quantization_threshold=scann_quantization_threshold(
                    params.anisotropic_quantization_threshold),
                training_sample_size=params.training_sample_size,
            )
            .reorder(params.reorder_k)
        )
    searcher = builder.build()
    return ShardSearcher(searcher, first_chunk=first_chunk, num_chunks=num_chunks, dim=dim,
                         params=params)


def pad_topk(ids: tf.Tensor, dists: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads ids [Q, <=k] / dists [Q, <=k] to [Q, k] with -1 / +inf (fewer hits than k)."""
    missing = tf.maximum(k - tf.shape(ids)[1], 0)
    ids = tf.pad(ids, [[0, 0], [0, missing]], constant_values=-1)
    dists = tf.pad(dists, [[0, 0], [0, missing]], constant_values=math.inf)
    ids, dists = ids[:, :k], dists[:, :k]
    return tf.ensure_shape(ids, [None, k]), tf.ensure_shape(dists, [None, k])


def search_numpy(searcher, queries: np.ndarray, k: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """numpy in/out around `searcher.search_tf`, traced once per (k, dim), in query batches.

    queries float32 [Q, d] -> (ids int64 [Q, k], dists float32 [Q, k]).
    """
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be [Q, dim], found shape {queries.shape}")
    # Query-time knobs are baked into a trace: a changed knob gets a new trace.
    knobs = tuple(getattr(s, "knobs", None) for s in getattr(searcher, "shards", [searcher]))
    cache_key = (k, queries.shape[1], knobs)
    cache = searcher.__dict__.setdefault("_numpy_fns", {})
    fn = cache.get(cache_key)
    if fn is None:
        fn = tf.function(lambda q: searcher.search_tf(q, k)).get_concrete_function(
            tf.TensorSpec([None, queries.shape[1]], tf.float32))
        cache[cache_key] = fn
    ids = np.empty((len(queries), k), np.int64)
    dists = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), batch_size):
        batch_ids, batch_dists = fn(tf.constant(queries[start:start + batch_size]))
        ids[start:start + batch_size] = batch_ids.numpy()
        dists[start:start + batch_size] = batch_dists.numpy()
    return ids, dists


class ShardSearcher:
    """A ScaNN TF-op searcher over chunk ids [first_chunk, first_chunk + num_chunks).

    `leaves_to_search` and `reorder_k` are query-time knobs (ScaNN takes them per call), so they
    can be tuned on a built or loaded shard without rebuilding; they start at the params' values.
    """

    def __init__(self, searcher: scann_ops.ScannSearcher, *, first_chunk: int, num_chunks: int,
                 dim: int, params: IndexParams, parallel: bool = True):
        self._searcher = searcher
        self.first_chunk = int(first_chunk)
        self.num_chunks = int(num_chunks)
        self.dim = int(dim)
        self.params = params
        self.leaves_to_search = params.num_leaves_to_search
        self.reorder_k = params.reorder_k
        # search_batched_parallel splits a batch over ScaNN's thread pool: the fast path for
        # large batches; inside a parallel tf.data map either is fine (the op holds no GIL).
        self.parallel = parallel

    def __repr__(self) -> str:
        kind = "brute force" if self.params.brute_force else (
            f"tree {self.params.num_leaves} leaves, search {self.leaves_to_search}, "
            f"reorder {self.reorder_k}")
        return (f"ShardSearcher(chunks [{self.first_chunk}, {self.first_chunk + self.num_chunks}),"
                f" dim {self.dim}, {kind})")

    @property
    def knobs(self) -> tuple[int, int, bool]:
        return (self.leaves_to_search, self.reorder_k, self.parallel)

    def search_tf(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """queries float32 [Q, d] -> (global ids int64 [Q, k], squared L2 float32 [Q, k]).

        Pure TensorFlow: usable in a tf.function / tf.data map. Where the shard holds fewer than
        k keys (or the scanned leaves do), ids are -1 and distances +inf, after the real hits.
        """
        queries = tf.convert_to_tensor(queries, dtype=tf.float32)
        if queries.shape.rank != 2 or queries.shape[1] not in (None, self.dim):
            raise ValueError(f"queries must be float32 [Q, {self.dim}] for {self!r}, found shape "
                             f"{queries.shape} (keys of another embedder?)")
        k_shard = min(int(k), self.num_chunks)
        if self.params.brute_force:
            leaves, pre_reorder = None, None
        else:
            leaves, pre_reorder = self.leaves_to_search, max(self.reorder_k, k_shard)
        search = (self._searcher.search_batched_parallel if self.parallel
                  else self._searcher.search_batched)
        local_ids, dists = search(queries, final_num_neighbors=k_shard,
                                  pre_reorder_num_neighbors=pre_reorder,
                                  leaves_to_search=leaves)
        local_ids = tf.cast(local_ids, tf.int64)
        # ScaNN pads short result lists itself in some modes; keep only finite hits.
        valid = tf.math.is_finite(dists) & (local_ids >= 0)
        ids = tf.where(valid, local_ids + self.first_chunk, tf.constant(-1, tf.int64))
        dists = tf.where(valid, dists, tf.constant(math.inf, tf.float32))
        return pad_topk(ids, dists, int(k))

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 65_536
               ) -> tuple[np.ndarray, np.ndarray]:
        """numpy float32 [Q, d] -> (ids int64 [Q, k], dists float32 [Q, k])."""
        return search_numpy(self, queries, k, batch_size)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the searcher's state files + `shard.json` into `directory` (written aside,
        then renamed). The bytes depend only on the keys and parameters (no timestamps)."""
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = write_state(self._searcher, partial)
        meta = {
            "format_version": FORMAT_VERSION, "first_chunk": self.first_chunk,
            "num_chunks": self.num_chunks, "dim": self.dim, "params": self.params.to_json(),
            "state": state,
        }
        (partial / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, first_chunk: int | None = None) -> ShardSearcher:
        """Loads a shard written by `save`; `first_chunk` (from the manifest) must match its own."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DataError(f"index shard {directory}: missing {META_FILE} (interrupted build?); "
                            "re-run `retro-jax build-db` to rebuild it")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format_version {meta.get('format_version')}, expected "
                            f"{FORMAT_VERSION}; rebuild the index with this version "
                            "(`retro-jax build-db --force`)")
        if first_chunk is not None and int(first_chunk) != meta["first_chunk"]:
            raise DataError(f"{meta_path}: first_chunk {meta['first_chunk']} but the manifest says "
                            f"{first_chunk}; the shard table and the shard disagree: rebuild")
        searcher = read_state(directory, meta["state"], where=meta_path)
        return cls(searcher, first_chunk=meta["first_chunk"], num_chunks=meta["num_chunks"],
                   dim=meta["dim"], params=IndexParams.from_json(meta["params"]))
