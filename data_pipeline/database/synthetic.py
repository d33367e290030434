"""Synthetic retrieval databases: random tokens and clustered keys, written in the real layout
(no corpus, no BERT), for tests and benchmarks of everything downstream of the database.

    tok = synthetic_tokenizer(tmp / "tok.model")
    db = write_synthetic_database(tmp / "db", tok, documents={"train": [50, 130, ...],
                                  "validation": [...]}, chunk_len=8, dim=16)

A document of n tokens is n-1 random ids in [4, vocab) followed by EOS, cut into chunks of m
tokens, the last padded with 0 (so a length that is a multiple of m ends exactly on a chunk
boundary). Keys are clustered: each document sits near one of `num_clusters` centres and its
chunks near the document's own point, so a chunk's nearest keys are its own document's chunks
(what the same-document filter drops), then other documents of its cluster. The train split
is indexed in brute-force ScaNN shards of `shard_chunks` chunks (or as `index_settings` say).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.database.reader import RetrievalDatabase
from data_pipeline.database.writer import DatabaseWriter
from data_pipeline.text.tokenizer import EOS_ID, Tokenizer, train_tokenizer

CLUSTER_SCALE = 4.0  # spread of the cluster centres
DOCUMENT_SPREAD = 1.0  # a document's point around its cluster centre
CHUNK_SPREAD = 0.3  # a chunk's key around its document's point


def synthetic_tokenizer(path: str | os.PathLike, *, vocab_size: int = 300,
                        seed: int = 0) -> Tokenizer:
    """A SentencePiece model trained on a few generated lines (`seed` changes the text, so
    the model and its sha256)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 6))) for _ in range(200)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    return train_tokenizer(lines, Path(path), vocab_size=vocab_size, sample_bytes=1_000_000)


def document_lengths(rng: np.random.Generator, *, total_chunks: int, chunk_len: int,
                     min_chunks: int = 1, max_chunks: int = 400) -> list[int]:
    """Token counts (EOS included) of documents of `min_chunks`..`max_chunks` chunks that add
    up to exactly `total_chunks` chunks, each ending half-way into its last chunk."""
    sizes: list[int] = []
    while sum(sizes) < total_chunks:
        sizes.append(int(rng.integers(min_chunks, max_chunks + 1)))
    sizes[-1] -= sum(sizes) - total_chunks
    return [(c - 1) * chunk_len + chunk_len // 2 + 1 for c in sizes if c > 0]


def write_synthetic_database(
    path: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike,
    *,
    documents: Mapping[str, Sequence[int]],
    chunk_len: int = 64,
    dim: int = 16,
    num_clusters: int = 6,
    shard_chunks: int | None = None,
    index_settings: Mapping[str, Any] | None = None,
    splits_with_keys: Sequence[str] | None = None,
    seed: int = 0,
) -> RetrievalDatabase:
    """Write and open a "bert"-kind database of random documents with clustered keys.

    Args:
      tokenizer: the tokenizer model recorded in the database (token ids are random; only
        its vocabulary size bounds them).
      documents: split -> token count of each document (EOS included), e.g. from
        `document_lengths`; "train" is required.
      shard_chunks: train chunks per index shard (default: one shard).
      index_settings: IndexParams fields for the shards (default: brute force).
      splits_with_keys: splits that get keys (default: all).
    """
    path = Path(path)
    tokenizer_path = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    vocab_size = (tokenizer.vocab_size if isinstance(tokenizer, Tokenizer)
                  else Tokenizer(tokenizer_path).vocab_size)
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=CLUSTER_SCALE, size=(num_clusters, dim))
    writer = DatabaseWriter(path, chunk_len=chunk_len, tokenizer_path=tokenizer_path,
                            embedder_name="synthetic", embed_dim=dim,
                            corpus={"kind": "synthetic", "description": "synthetic"})
    rows: list[dict] = []
    first_doc = 0
    for split, lengths in documents.items():
        tokens, doc_ids, keys = [], [], []
        first_chunk = 0
        for i, num_tokens in enumerate(int(n) for n in lengths):
            doc_id = first_doc + i
            ids = np.concatenate([rng.integers(4, vocab_size, size=num_tokens - 1), [EOS_ID]])
            num_chunks = -(-num_tokens // chunk_len)
            padded = np.zeros(num_chunks * chunk_len, np.int32)
            padded[:num_tokens] = ids
            tokens.append(padded.reshape(num_chunks, chunk_len))
            doc_ids.append(np.full(num_chunks, doc_id, np.int64))
            point = centres[rng.integers(len(centres))] + rng.normal(scale=DOCUMENT_SPREAD,
                                                                    size=dim)
            keys.append(point + rng.normal(scale=CHUNK_SPREAD, size=(num_chunks, dim)))
            rows.append({"doc_id": doc_id, "id": f"{split}/{i}", "title": f"{split} {i}",
                         "source": "synthetic", "split": split, "first_chunk": first_chunk,
                         "num_chunks": num_chunks, "num_tokens": num_tokens,
                         "num_bytes": 4 * num_tokens, "num_words": num_tokens})
            first_chunk += num_chunks
        with_keys = splits_with_keys is None or split in splits_with_keys
        writer.write_split(split, np.concatenate(tokens), np.concatenate(doc_ids),
                           np.concatenate(keys).astype(np.float32) if with_keys else None)
        first_doc += len(lengths)
    writer.write_documents(rows)
    num_train = int(sum(-(-int(n) // chunk_len) for n in documents["train"]))
    settings = dict(index_settings or {"brute_force_below": 2**62})
    writer.build_index(shard_chunks or num_train, settings)
    return writer.finish()
