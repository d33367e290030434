"""The retrieval database directory: file names, the manifest's version, and where a database
is written before it is published.

    <db>/manifest.json                what is in the directory, with every file's sha256
    <db>/tokenizer.model              SentencePiece model (sha256 in the manifest)
    <db>/documents.jsonl              one row per document (doc_id, id, title, source, ...)
    <db>/<split>/tokens-XXXXX.npy     int32 [n_i, m], pad 0     } shard i: chunks
    <db>/<split>/doc_ids-XXXXX.npy    int64 [n_i]               } [i * S, i * S + n_i)
    <db>/build_times.json             stage timings (outside the manifest: nothing checks it)
    ... plus the retriever's files (data_pipeline/retrieval): a per-chunk query array sharded
        like the chunks (keys-XXXXX.npy or bm25_candidates-XXXXX.npy) and search structures
        (ScaNN shard i over train shard i, or a BM25 index)

Every per-chunk array of a split is cut into shards of S = `shard_chunks` rows (the manifest's
`shard_chunks`), the same cut for every array, so shard i of each array covers the same
chunks: a worker writes one shard of each array, and a reader memory-maps only the shards it
touches. The manifest lists each split's shards with their files and sha256s:

    "splits": {"train": {"num_chunks", "num_documents", "num_tokens", "num_bytes", ...,
               "shards": [{"first_chunk", "num_chunks",
                           "files": {"tokens": {"file", "sha256"}, "doc_ids": {...}, ...}}]}}

The manifest holds no timestamps, so two builds of the same inputs are byte-identical.
Format 1 (one tokens.npy / doc_ids.npy / keys.npy per split) is refused with the rebuild
command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.shards import DEFAULT_SHARD_ROWS, shard_file

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
DOCUMENTS_FILE = "documents.jsonl"
BUILD_TIMES_FILE = "build_times.json"
SPLIT_NAMES = ("train", "validation", "test")
# The arrays every split has: name -> (dtype, has a trailing chunk_len axis).
CHUNK_ARRAYS = {"tokens": (np.int32, True), "doc_ids": (np.int64, False)}
DEFAULT_SHARD_CHUNKS = DEFAULT_SHARD_ROWS


def array_file(split: str, name: str, shard: int) -> str:
    """Path (relative to the database) of shard `shard` of array `name` of `split`."""
    return f"{split}/{shard_file(name, shard)}"


def partial_path(path: str | os.PathLike) -> Path:
    """Where a database at `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def rebuild_hint(path: str | os.PathLike) -> str:
    """The fix named by every error about a damaged or mismatched database."""
    return (f"rebuild it: retro-jax build-db --config <experiment> --workdir <workdir> --force "
            f"(database {path})")
