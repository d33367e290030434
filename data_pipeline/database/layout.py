"""The retrieval database directory: file names, the manifest's version, and where a database
is written before it is published.

    <db>/manifest.json          what is in the directory; checked on every open
    <db>/tokenizer.model        SentencePiece model (sha256 in the manifest)
    <db>/documents.jsonl        one row per document (doc_id, id, title, source, split, ...)
    <db>/<split>/tokens.npy     int32 [num_chunks, m], pad 0
    <db>/<split>/doc_ids.npy    int64 [num_chunks]
    <db>/build_times.json       stage timings (outside the manifest: nothing checks it)
    ... plus the retriever's files (data_pipeline/retrieval: keys + ScaNN shards, or a BM25
        index + candidate tables), named by the manifest's "retriever"

The manifest holds no timestamps, so two builds of the same inputs are byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
DOCUMENTS_FILE = "documents.jsonl"
BUILD_TIMES_FILE = "build_times.json"
SPLIT_NAMES = ("train", "validation", "test")
# The arrays every split has: name -> (dtype, has a trailing chunk_len axis).
CHUNK_ARRAYS = {"tokens": (np.int32, True), "doc_ids": (np.int64, False)}


def partial_path(path: str | os.PathLike) -> Path:
    """Where a database at `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def rebuild_hint(path: str | os.PathLike) -> str:
    """The fix named by every error about a damaged or mismatched database."""
    return (f"rebuild it: retro-jax build-db --config <experiment> --workdir <workdir> --force "
            f"(database {path})")
