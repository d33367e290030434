"""Retrieval: one `Retriever` interface, chosen once from a database's manifest or a config's
`database.retriever`, with two implementations:

    bert   frozen BERT (Flax, retrieval/embed/) mean-pooled chunk keys, searched by L2 in
           sharded ScaNN indexes (retrieval/scann/): the paper's retriever
    bm25   BM25 over chunk text (bm25s, retrieval/bm25_index.py), candidates computed at
           build time

    retriever = make_retriever(config.database.retriever, embedder=..., index=...)
    kind = retriever_class(manifest_kind(manifest))

See data_pipeline/retrieval/base.py for what an implementation provides. The built-in kinds
register themselves when this package is imported (below).
"""

from data_pipeline.retrieval.base import (
    DEFAULT_KIND,
    BuildInputs,
    InGraphSearch,
    Retriever,
    RetrieverFiles,
    make_retriever,
    manifest_kind,
    register,
    retriever_class,
    retriever_kinds,
)
from data_pipeline.retrieval.bert import BertRetriever, EmbedderSettings
from data_pipeline.retrieval.bm25 import Bm25Retriever

__all__ = [
    "DEFAULT_KIND", "BertRetriever", "Bm25Retriever", "BuildInputs", "EmbedderSettings",
    "InGraphSearch", "Retriever", "RetrieverFiles", "make_retriever", "manifest_kind",
    "register", "retriever_class", "retriever_kinds",
]
