"""Tiny real retrieval databases for tests (any engineer's tests may import this).

    from tests._db_fixtures import make_tiny_database
    db = make_tiny_database(tmp_path)                 # ~2-5 s, hash-trigram keys
    db = make_tiny_database(tmp_path, embedder="real")  # frozen all-MiniLM-L6-v2 keys

The database goes through the real build (retro_jax.build_db.build_run_database): SentencePiece
training, chunking, keys, ScaNN shards, recall check, manifest. Documents are generated from a
shared pool of sentences, so chunks of different documents repeat each other and retrieval
has real neighbours to find. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.database import RetrievalDatabase
from retro_jax.build_db import build_run_database

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "to", "sa", "vi", "de", "po", "li", "an", "er",
              "os", "un", "ta", "be", "ko", "fi", "ga")


@dataclass(frozen=True)
class FakeDocument:
    """Same fields as data_pipeline.corpora.Document."""

    id: str
    title: str
    text: str
    source: str


def _word_pool(rng: random.Random, size: int) -> list[str]:
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def generated_documents(num_docs: int, *, seed: int = 0, split: str = "train",
                        min_sentences: int = 3, max_sentences: int = 14) -> list[FakeDocument]:
    """`num_docs` documents drawn from one sentence pool (shared by every split for a seed),
    some lines code-like, one sentence per line."""
    pool_rng = random.Random(seed)
    words = _word_pool(pool_rng, 300)
    sentences = []
    for i in range(60):
        n = pool_rng.randint(6, 16)
        sentence = " ".join(pool_rng.choice(words) for _ in range(n))
        if i % 5 == 0:
            sentence = f"def {pool_rng.choice(words)}(x, y={i}):  # {sentence}"
        sentences.append(sentence.capitalize() if i % 5 else sentence)
    rng = random.Random(f"{seed}/{split}")
    docs = []
    for i in range(num_docs):
        lines = [rng.choice(sentences) for _ in range(rng.randint(min_sentences, max_sentences))]
        docs.append(FakeDocument(id=f"{split}/{i:05d}", title=f"{split} document {i}",
                                 text="\n".join(lines) + "\n", source="generated"))
    return docs


class ListCorpus:
    """A Corpus over in-memory documents per split (the data_pipeline.corpora interface)."""

    def __init__(self, splits: Mapping[str, list], description: str = "generated documents"):
        self._splits = {name: list(docs) for name, docs in splits.items()}
        self.description = description

    def documents(self, split: str) -> Iterator:
        return iter(self._splits.get(split, []))


def tiny_corpus(num_docs: int = 24, *, seed: int = 0, eval_docs: int = 4) -> ListCorpus:
    return ListCorpus({
        "train": generated_documents(num_docs, seed=seed, split="train"),
        "validation": generated_documents(eval_docs, seed=seed, split="validation"),
        "test": generated_documents(eval_docs, seed=seed, split="test"),
    })


class HashEmbedder:
    """Deterministic stand-in for ChunkEmbedder: hashed character-trigram counts, averaged.

    Texts sharing much of their text get nearby keys, which is all a retrieval test needs.
    crc32 (not Python's salted hash) keeps keys identical across processes.
    """

    def __init__(self, dim: int = 32, name: str | None = None):
        self.dim = dim
        self.name = name or f"hash-trigram-{dim}"

    def embed(self, texts, *, progress: bool = False) -> np.ndarray:
        keys = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            data = text.encode("utf-8")
            for i in range(max(0, len(data) - 2)):
                keys[row, zlib.crc32(data[i:i + 3]) % self.dim] += 1.0
            keys[row] /= max(1, len(data) - 2)
        return keys


_REAL_EMBEDDERS: dict[tuple, Any] = {}


def real_embedder(batch_size: int = 32, max_wordpieces: int = 64):
    """The default frozen BERT (cached per process: loading + compiling takes seconds)."""
    key = (batch_size, max_wordpieces)
    if key not in _REAL_EMBEDDERS:
        from data_pipeline.retrieval.embed import ChunkEmbedder, default_embedder_path

        _REAL_EMBEDDERS[key] = ChunkEmbedder(default_embedder_path(), batch_size=batch_size,
                                             max_wordpieces=max_wordpieces,
                                             name="all-MiniLM-L6-v2")
    return _REAL_EMBEDDERS[key]


# The database tests' sizes on top of retro_jax/configs/small.py's "tiny" model: 16-token
# chunks (a few sentences), a 320-piece tokenizer, small shards and recall samples.
TINY_DATABASE = {
    "corpus.kind": "jsonl", "corpus.validation_percent": 20.0, "corpus.test_percent": 20.0,
    "tokenizer.vocab_size": 320, "tokenizer.train_sample_bytes": 200_000,
    "model.vocab_size": 320, "database.chunk_len": 16, "database.shard_chunks": 512,
    "embedder.batch_size": 32, "embedder.max_wordpieces": 64, "index.recall_sample": 64,
    "index.brute_force_below": 1000, "data.seq_len": 64, "eval.stride": 64,
}


def tiny_config(**overrides: Any):
    """A validated config for tiny databases (and tiny models over them); overrides as
    {"database.chunk_len": 8, ...}."""
    from retro_jax.configs import get_base_config, validate_config
    from retro_jax.configs.small import shrink

    return validate_config(shrink(get_base_config(), "tiny", {**TINY_DATABASE, **overrides}))


def make_tiny_database(
    tmp_path: str | Path,
    *,
    num_docs: int | None = None,
    eval_docs: int | None = None,
    seed: int = 0,
    embedder: Any = "hash",
    name: str = "db",
    config_overrides: Mapping[str, Any] | None = None,
    key_block_chunks: int | None = None,
) -> RetrievalDatabase:
    """Build a tiny real database under `tmp_path/name` and return it opened.

    Args:
      num_docs / eval_docs: generated train / validation and test documents (default 24 / 4
        with the hash embedder, about 840 train chunks; 6 / 2 with the real one, about 200,
        because frozen BERT on a CPU keys ~20-50 chunks/s).
      seed: the documents' seed.
      embedder: "hash" (HashEmbedder, dim 32, fast), "real" (all-MiniLM-L6-v2, dim 384),
        "auto" (real when the weights are installed, else hash), or an embedder object
        (.name, .dim, .embed(texts)).
      config_overrides: dotted config keys, e.g. {"database.chunk_len": 8}.
    """
    if embedder == "auto":
        try:
            from data_pipeline.retrieval.embed import default_embedder_path

            default_embedder_path()
            embedder = "real"
        except Exception:  # noqa: BLE001 (any failure: fall back to the stand-in)
            embedder = "hash"
    if not isinstance(embedder, str):
        emb = embedder
    else:
        emb = real_embedder() if embedder == "real" else HashEmbedder()
    small = embedder == "real"
    num_docs = num_docs if num_docs is not None else (6 if small else 24)
    eval_docs = eval_docs if eval_docs is not None else (2 if small else 4)
    config = tiny_config(**dict(config_overrides or {}))
    return build_run_database(config, Path(tmp_path) / name, corpus=tiny_corpus(
        num_docs, seed=seed, eval_docs=eval_docs), embedder=emb, block_rows=key_block_chunks)


def write_jsonl_corpus(path: Path, docs) -> Path:
    """Write documents as a JSONL corpus file (text + title), for corpus.kind = "jsonl"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text, "title": doc.title}) + "\n")
    return path
