"""Corpus readers: documents {id, title, text, source}, streamed one split at a time.

    corpus = open_corpus(**config.corpus)        # DataError now if the path/layout is wrong
    for doc in corpus.documents("train"):        # lazy, deterministic order
        ...
    print(corpus.stats.summary())                # what was skipped, why, where

Readers (config.corpus.kind): stdlib (the embedded default), wikitext103, pile, textdir,
jsonl, tfds; one module each. Corpora without split files are split by sha256 of the
document title (split.py).
"""

from data_pipeline.corpora.base import SPLITS, Corpus, Document
from data_pipeline.corpora.factory import corpus_statistics, format_statistics, open_corpus
from data_pipeline.corpora.split import hash_split
from data_pipeline.corpora.stats import ReadStats

__all__ = [
    "SPLITS", "Corpus", "Document", "ReadStats", "corpus_statistics", "format_statistics",
    "hash_split", "open_corpus",
]
