"""Neighbours written once to sharded TFRecord files, and read back.

What is stored: the candidate ids of every chunk of a split, int64 [N, K] (K = k * overfetch),
already filtered by what depends on the chunk alone (its own document, excluded documents).
They do not depend on the sequence the chunk lands in, so one file set serves every seed,
packing, sequence length and host count; the pipeline applies the sequence's document filter
and keeps the first k, then gathers the neighbour tokens exactly as inline retrieval does,
which makes the two modes yield identical batches. Storage is 8K bytes per chunk (64 B at
k=2, overfetch 4) instead of the key (1.5 KB at d=384): a host that reads precomputed
neighbours loads no keys and no searcher.

Layout of `out_dir`:
    manifest.json                     settings, database fingerprint, files, complete: true
    neighbours-XXXXX-of-YYYYY.tfrecord  tf.train.Example records {first_chunk: int64,
                                      candidate_ids: int64 [rows * K]}, rows <= block size
Written into `<out_dir>.partial` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.input_pipeline.checks import tokenizer_sha256
from data_pipeline.input_pipeline.neighbours import NeighbourRetriever
from data_pipeline.input_pipeline.tables import ChunkTable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def database_fingerprint(db: Any, num_db_chunks: int) -> dict:
    """What the stored ids are valid for: the database's chunk ids and its retriever's files
    (every manifest section but the per-split counts, corpus and dedup information)."""
    manifest = getattr(db, "manifest", None) or {}
    fingerprint = {"chunk_len": int(db.chunk_len), "tokenizer_sha256": tokenizer_sha256(db),
                   "num_train_chunks": int(num_db_chunks)}
    skip = {"splits", "corpus", "dedup", "complete", "format_version", "tokenizer", "chunk_len"}
    fingerprint.update({key: value for key, value in manifest.items() if key not in skip})
    return fingerprint


def write_precomputed(out_dir: str | os.PathLike, *, split: str, candidate_blocks,
                      num_chunks: int, settings: dict, fingerprint: dict, block_rows: int,
                      num_files: int) -> Path:
    """Write blocks (first_chunk, ids int64 [rows, K]) in chunk order as TFRecord shards."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    num_blocks = -(-num_chunks // block_rows)
    num_files = max(1, min(num_files, num_blocks))
    names = [f"neighbours-{i:05d}-of-{num_files:05d}.tfrecord" for i in range(num_files)]
    writers = [tf.io.TFRecordWriter(str(partial / name)) for name in names]
    try:
        for block_index, (first, ids) in enumerate(candidate_blocks):
            example = tf.train.Example(features=tf.train.Features(feature={
                "first_chunk": tf.train.Feature(int64_list=tf.train.Int64List(value=[first])),
                "candidate_ids": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=np.asarray(ids).reshape(-1))),
            }))
            # Contiguous runs of blocks per file, so files can be read in order.
            writers[block_index * num_files // num_blocks].write(example.SerializeToString())
    finally:
        for w in writers:
            w.close()
    manifest = {"format_version": FORMAT_VERSION, "split": split, "num_chunks": int(num_chunks),
                "settings": settings, "database": fingerprint, "files": names,
                "block_rows": int(block_rows), "complete": True}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def compute_blocks(retriever: NeighbourRetriever, split: ChunkTable, block_rows: int):
    """Yields (first_chunk, candidate ids int64 [rows, K]) over the split, in chunk order: each
    chunk's K candidates that pass the filters of the chunk alone (its own document, the
    excluded documents), best first, -1 padded. The pipeline filters them again with the
    documents of the sequence the chunk lands in, exactly as inline retrieval does."""
    def search(ids):
        candidates = retriever.candidates(split.gather_queries(ids))
        return retriever.select(candidates, split.gather_doc_ids(ids)[:, None],
                                tf.ones(tf.shape(ids), tf.bool), keep=retriever.num_candidates)

    search = tf.function(search, input_signature=[tf.TensorSpec([None], tf.int64)])
    for first in range(0, split.num_chunks, block_rows):
        yield first, search(tf.range(first, min(first + block_rows, split.num_chunks),
                                     dtype=tf.int64)).numpy()


def read_precomputed(out_dir: str | os.PathLike, *, split: str, num_chunks: int, settings: dict,
                     fingerprint: dict) -> np.ndarray:
    """candidate ids int64 [num_chunks, K]; DataError when the files do not match the request."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    rerun = ("rerun data_pipeline.input_pipeline.precompute_neighbours(db, "
             f"{split!r}, {str(out_dir)!r}, ...) with the same settings as the dataset")
    if not manifest_path.is_file():
        raise DataError(f"no precomputed neighbours at {out_dir} ({manifest_path} is missing); "
                        f"{rerun}")
    manifest = json.loads(manifest_path.read_text())
    found = {"format_version": manifest.get("format_version"), "split": manifest.get("split"),
             "num_chunks": manifest.get("num_chunks"), "settings": manifest.get("settings"),
             "database": manifest.get("database")}
    wanted = {"format_version": FORMAT_VERSION, "split": split, "num_chunks": num_chunks,
              "settings": settings, "database": json.loads(json.dumps(fingerprint))}
    for key, value in wanted.items():
        if found[key] != value:
            raise DataError(f"{manifest_path}: {key} is {found[key]!r}, the dataset needs "
                            f"{value!r}; {rerun}")
    k = int(settings["num_candidates"])
    ids = np.full((num_chunks, k), -2, np.int64)
    files = [str(out_dir / name) for name in manifest["files"]]
    spec = {"first_chunk": tf.io.FixedLenFeature([1], tf.int64),
            "candidate_ids": tf.io.VarLenFeature(tf.int64)}
    for record in tf.data.TFRecordDataset(files):
        parsed = tf.io.parse_single_example(record, spec)
        first = int(parsed["first_chunk"][0])
        block = tf.sparse.to_dense(parsed["candidate_ids"]).numpy().reshape(-1, k)
        ids[first:first + block.shape[0]] = block
    if (ids == -2).any():
        raise DataError(f"{out_dir}: the TFRecord files cover only part of split {split!r} "
                        f"({int((ids == -2).any(axis=1).sum())} of {num_chunks} chunks "
                        f"missing: truncated files?); {rerun}")
    return ids
