"""The BM25 index of the "bm25" retriever (data_pipeline/retrieval/bm25.py), over bm25s.

    index = Bm25Index.build(texts_of_train_chunks)      # one BM25 "document" per chunk
    index.save(db / "bm25"); index = Bm25Index.load(db / "bm25")
    ids = index.top_k(query_texts, k)                   # int64 [Q, k], -1 where fewer

Words. A chunk's text is its detokenized tokens (the text BERT keys would be made from);
its words are bm25s's default split, lowercased: `(?u)\\b\\w\\w+\\b` (runs of two or more
word characters), no stemming and no stopword list. Code is the default corpus here and an
English stopword list would drop keywords such as `if`, `for`, `in`, `not`, `is`; BM25's
IDF already weighs down words that occur in most chunks.

Scores are bm25s's ("lucene" BM25, k1 = 1.5, b = 0.75), computed by bm25s itself, one query
at a time (numpy; not bm25s's retrieve, which picks a JAX top-k when JAX is installed).
`top_k` orders candidates by score (descending), ties by chunk id (ascending), so the order
is defined and byte-deterministic; a chunk that shares no word with the query (score 0) is
not a candidate (-1), so a query with no known word gets no neighbours. The build leaves out
the query chunk's own document (data_pipeline/retrieval/bm25.py says why).

Files (`Bm25Index.save`): bm25s's own format, no pickle (verified: arrays through
`np.save(allow_pickle=False)`, vocabulary and parameters as JSON):
    data.csc.index.npy, indices.csc.index.npy, indptr.csc.index.npy   the score matrix (CSC)
    vocab.index.json      word -> column, in first-occurrence order over the train chunks
    params.index.json     k1, b, method, num_docs, bm25s version
The vocabulary is built in first-occurrence order (not from a set), so two builds of the
same chunks write the same bytes in any process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
# What decides the scores; recorded in the manifest and in the build fingerprints.
PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene", "lower": True,
          "token_pattern": TOKEN_PATTERN, "stopwords": None, "stemmer": None}
_INDEX_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
                "vocab.index.json", "params.index.json")


def bm25s_version() -> str:
    from importlib.metadata import version

    return version("bm25s")


def _tokenize(texts: Sequence[str], *, return_ids: bool):
    import bm25s

    return bm25s.tokenize(list(texts), lower=PARAMS["lower"], token_pattern=TOKEN_PATTERN,
                          stopwords=None, stemmer=None, return_ids=return_ids,
                          show_progress=False)


def chunk_words(texts: Sequence[str]) -> list[list[str]]:
    """The BM25 words of each text (lowercased, 2+ word characters, order and repeats kept)."""
    return _tokenize(texts, return_ids=False)


def top_k_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """float [N] scores -> int64 [k]: ids by score descending, ties by id ascending; only
    positive scores; -1 where fewer than k."""
    out = np.full((k,), -1, np.int64)
    positive = np.flatnonzero(scores > 0)
    if positive.size == 0 or k == 0:
        return out
    if positive.size > k:
        values = scores[positive]
        kth = np.partition(values, values.size - k)[values.size - k]  # k-th largest
        above = positive[values > kth]
        ties = positive[values == kth][: k - above.size]  # lowest ids among the ties
        positive = np.concatenate([above, ties])
    order = np.lexsort((positive, -scores[positive]))
    out[: positive.size] = positive[order]
    return out


class Bm25Index:
    """A bm25s BM25 index whose documents are the train chunks (row i = chunk id i)."""

    def __init__(self, retriever):
        self._bm25 = retriever
        self.num_chunks = int(retriever.scores["num_docs"])

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25Index:
        """Index the texts of the train chunks, in chunk id order."""
        import bm25s

        retriever = bm25s.BM25(k1=PARAMS["k1"], b=PARAMS["b"], method=PARAMS["method"],
                               backend="numpy")
        # Token ids (not word lists): bm25s then keeps tokenize's first-occurrence vocabulary
        # instead of building one from a set, whose order changes with the hash seed.
        retriever.index(_tokenize(texts, return_ids=True), show_progress=False)
        return cls(retriever)

    def save(self, directory: str | os.PathLike) -> None:
        self._bm25.save(str(directory), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False) -> Bm25Index:
        """Load a saved index; DataError when a file is missing or unreadable."""
        import bm25s

        directory = Path(directory)
        missing = [name for name in _INDEX_FILES if not (directory / name).is_file()]
        if missing:
            raise DataError(f"BM25 index {directory} is missing {', '.join(missing)}; rebuild "
                            "the database: retro-jax build-db --config <experiment> "
                            "--workdir <workdir> --force")
        try:
            retriever = bm25s.BM25.load(str(directory), mmap=mmap, allow_pickle=False,
                                        show_progress=False, backend="numpy")
        except (ValueError, OSError) as e:
            raise DataError(f"BM25 index {directory} is unreadable ({e}); rebuild the database "
                            "with retro-jax build-db --force") from e
        return cls(retriever)

    def scores(self, words: list[str]) -> np.ndarray:
        """float32 [num_chunks]: bm25s's score of every chunk for a query's words."""
        ids = self._bm25.get_tokens_ids(words)  # words outside the vocabulary drop out
        if not ids:
            return np.zeros((self.num_chunks,), np.float32)
        return self._bm25.get_scores_from_ids(ids)

    def top_k(self, texts: Sequence[str], k: int, *, query_doc_ids: np.ndarray | None = None,
              chunk_doc_ids: np.ndarray | None = None) -> np.ndarray:
        """The k best chunks for each query text: int64 [Q, k], -1 where fewer match.

        With `query_doc_ids` int64 [Q] and `chunk_doc_ids` int64 [num_chunks] (the indexed
        chunks' documents), chunks of the query's own document are left out.
        """
        out = np.full((len(texts), k), -1, np.int64)
        for row, words in enumerate(chunk_words(texts)):
            scores = self.scores(words)
            if query_doc_ids is not None:
                scores = np.where(chunk_doc_ids == query_doc_ids[row], 0, scores)
            out[row] = top_k_from_scores(scores, k)
        return out
