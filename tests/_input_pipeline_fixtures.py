"""Small retrieval databases for the input pipeline tests (data_pipeline.database.synthetic:
random tokens, clustered keys, no BERT), and numpy references of what the pipeline computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.database import RetrievalDatabase
from data_pipeline.database.synthetic import synthetic_tokenizer, write_synthetic_database

CHUNK_LEN = 8
DIM = 16
VOCAB = 300


def tiny_tokenizer(directory: Path, *, variant: int = 0) -> Path:
    """A SentencePiece model trained on a few lines (variant changes the text, so the sha)."""
    return synthetic_tokenizer(directory / f"tok{variant}.model", vocab_size=VOCAB,
                               seed=variant).path


def document_lengths(rng: np.random.Generator, num_docs: int, chunk_len: int,
                     max_chunks: int = 9) -> list[int]:
    """Token counts (EOS included) of 1..max_chunks-chunk documents; every fourth ends
    exactly on a chunk boundary (EOS is the chunk's last token)."""
    lengths = []
    for i in range(num_docs):
        num_tokens = int(rng.integers(1, max_chunks * chunk_len))
        if i % 4 == 0:
            num_tokens = (num_tokens // chunk_len + 1) * chunk_len - 1
        lengths.append(num_tokens + 1)
    return lengths


def write_database(path: Path, tokenizer_path: Path, *, chunk_len: int = CHUNK_LEN,
                   num_train_docs: int = 60, num_eval_docs: int = 12, shard_chunks: int = 128,
                   eval_keys: bool = True, seed: int = 0) -> RetrievalDatabase:
    """A database with train (indexed in several brute-force shards) and validation splits."""
    rng = np.random.default_rng(seed)
    documents = {"train": document_lengths(rng, num_train_docs, chunk_len),
                 "validation": document_lengths(rng, num_eval_docs, chunk_len)}
    return write_synthetic_database(
        path, tokenizer_path, documents=documents, chunk_len=chunk_len, dim=DIM,
        shard_chunks=shard_chunks, seed=seed,
        splits_with_keys=("train", "validation") if eval_keys else ("train",))


# ---------------------------------------------------------------- numpy references
def reference_targets(tokens: np.ndarray, doc_ids: np.ndarray, chunk_ids: np.ndarray
                      ) -> np.ndarray:
    """targets int32 [n] of one example from split arrays, by walking the token stream."""
    m = tokens.shape[1]
    flat_tok, flat_doc = [], []
    for c in chunk_ids:
        flat_tok += list(tokens[c]) if c >= 0 else [0] * m
        flat_doc += [doc_ids[c] if c >= 0 else -1] * m
    real = [c for c in chunk_ids if c >= 0]
    after = real[-1] + 1
    if len(real) == len(chunk_ids) and after < len(doc_ids) and doc_ids[after] == doc_ids[real[-1]]:
        flat_tok.append(tokens[after][0])
        flat_doc.append(doc_ids[after])
    else:
        flat_tok.append(0)
        flat_doc.append(-2)
    n = len(chunk_ids) * m
    return np.array([flat_tok[t + 1] if flat_doc[t] == flat_doc[t + 1] and flat_doc[t] >= 0
                     else 0 for t in range(n)], np.int32)


def reference_neighbours(db_keys: np.ndarray, db_doc_ids: np.ndarray, query: np.ndarray,
                         query_docs, k: int, overfetch: int,
                         exclude_same_document: bool = True, excluded=()) -> np.ndarray:
    """Brute-force numpy: the first k of the k*overfetch nearest that pass the filters.

    query_docs: the query's document, or the documents of its training sequence."""
    own = {int(d) for d in np.atleast_1d(query_docs)}
    dists = ((db_keys - query[None, :]) ** 2).sum(axis=1)
    order = np.argsort(dists, kind="stable")[:min(k * overfetch, len(db_keys))]
    keep = [int(i) for i in order
            if not (exclude_same_document and int(db_doc_ids[i]) in own)
            and db_doc_ids[i] not in set(excluded)][:k]
    return np.array(keep + [-1] * (k - len(keep)), np.int64)
