"""Small retrieval databases for the input pipeline tests (no BERT: clustered random keys).

Documents are random token runs ending with EOS, chunked with 0-padding to the chunk end.
Keys: each document sits near one of a few cluster centres and its chunks near the document's
own centre, so a chunk's nearest keys are its own document's chunks (what the same-document
filter must drop), then other documents of its cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.database import DatabaseWriter, RetrievalDatabase
from data_pipeline.index import IndexParams, build_shard
from data_pipeline.tokenizer import EOS_ID, train_tokenizer

CHUNK_LEN = 8
DIM = 16
VOCAB = 300


def tiny_tokenizer(directory: Path, *, variant: int = 0) -> Path:
    """A SentencePiece model trained on a few lines (variant changes the text, so the sha)."""
    rng = np.random.default_rng(variant)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 6))) for _ in range(200)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    path = directory / f"tok{variant}.model"
    train_tokenizer(lines, path, vocab_size=VOCAB, sample_bytes=1_000_000)
    return path


def make_split(rng: np.random.Generator, *, num_docs: int, first_doc_id: int, chunk_len: int,
               centres: np.ndarray, max_chunks: int = 9):
    """tokens int32 [N, m], doc_ids int64 [N], keys float32 [N, d], document rows."""
    tokens, doc_ids, keys, rows = [], [], [], []
    first_chunk = 0
    for i in range(num_docs):
        doc_id = first_doc_id + i
        num_tokens = int(rng.integers(1, max_chunks * chunk_len))
        # Some documents end exactly on a chunk boundary (EOS is the chunk's last token).
        if i % 4 == 0:
            num_tokens = (num_tokens // chunk_len + 1) * chunk_len - 1
        ids = np.concatenate([rng.integers(4, VOCAB, size=num_tokens), [EOS_ID]])
        num_chunks = -(-ids.size // chunk_len)
        padded = np.zeros(num_chunks * chunk_len, np.int32)
        padded[:ids.size] = ids
        tokens.append(padded.reshape(num_chunks, chunk_len))
        doc_ids.append(np.full(num_chunks, doc_id, np.int64))
        centre = centres[i % len(centres)] + rng.normal(scale=1.0, size=centres.shape[1])
        keys.append(centre + rng.normal(scale=0.3, size=(num_chunks, centres.shape[1])))
        rows.append({"doc_id": doc_id, "id": f"doc{doc_id}", "title": f"Doc {doc_id}",
                     "source": "synthetic", "first_chunk": first_chunk, "num_chunks": num_chunks,
                     "num_tokens": int(ids.size), "num_bytes": int(ids.size) * 4,
                     "num_words": int(ids.size)})
        first_chunk += num_chunks
    return (np.concatenate(tokens), np.concatenate(doc_ids),
            np.concatenate(keys).astype(np.float32), rows)


def write_database(path: Path, tokenizer_path: Path, *, chunk_len: int = CHUNK_LEN,
                   num_train_docs: int = 60, num_eval_docs: int = 12, shard_chunks: int = 128,
                   eval_keys: bool = True, seed: int = 0) -> RetrievalDatabase:
    """A database with train (indexed in several brute-force shards) and validation splits."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(6, DIM))
    writer = DatabaseWriter(path, chunk_len=chunk_len, tokenizer_path=tokenizer_path,
                            embedder_name="synthetic", embed_dim=DIM,
                            corpus={"kind": "synthetic", "description": "tests"})
    all_rows = []
    first_doc = 0
    for split, num_docs, with_keys in (("train", num_train_docs, True),
                                       ("validation", num_eval_docs, eval_keys)):
        tokens, doc_ids, keys, rows = make_split(rng, num_docs=num_docs, first_doc_id=first_doc,
                                                 chunk_len=chunk_len, centres=centres)
        writer.write_split(split, tokens, doc_ids, keys if with_keys else None)
        all_rows += [dict(r, split=split) for r in rows]
        first_doc += num_docs
    writer.write_documents(all_rows)
    # Shards built here rather than with writer.build_index, whose shards all start at 0.
    train_keys = np.load(writer.partial / "train" / "keys.npy")
    for first in range(0, len(train_keys), shard_chunks):
        shard_keys = train_keys[first:first + shard_chunks]
        params = IndexParams.for_size(len(shard_keys), brute_force_below=1_000_000)
        writer.add_shard(first, len(shard_keys),
                         build_shard(shard_keys, params, first_chunk=first))
    return writer.finish()


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
                         query_doc: int, k: int, overfetch: int,
                         exclude_same_document: bool = True, excluded=()) -> np.ndarray:
    """Brute-force numpy: the first k of the k*overfetch nearest that pass the filters."""
    dists = ((db_keys - query[None, :]) ** 2).sum(axis=1)
    order = np.argsort(dists, kind="stable")[:min(k * overfetch, len(db_keys))]
    keep = [int(i) for i in order
            if not (exclude_same_document and db_doc_ids[i] == query_doc)
            and db_doc_ids[i] not in set(excluded)][:k]
    return np.array(keep + [-1] * (k - len(keep)), np.int64)
