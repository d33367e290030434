"""The retrieval database: one directory, one manifest, memory-mapped arrays.

    db = build_database(path, corpus=open_corpus(...), retriever=make_retriever("bert", ...),
                        tokenizer=TokenizerSettings(...), chunking=ChunkSettings(...),
                        runner=LocalRunner() | BeamRunner(options))   # the same bytes
    db = RetrievalDatabase.open(path, expect_chunk_len=64, retriever=...)   # checked
    db.split("train").tokens / .doc_ids / .queries ; db.neighbour_tokens(ids) ; db.documents
    db.verify()                                                  # sha256s against the manifest

Modules: layout (file names, sharded layout, manifest version), reader (RetrievalDatabase,
DocumentTable), writer (DatabaseWriter, publish), build (the stages, in order), chunking
(the chunk stages: read corpus sources, plan doc ids and caps, write chunk shards), synthetic
(small databases from generated documents, for tests and benchmarks).
"""

from data_pipeline.database.build import (
    ChunkSettings,
    DedupSettings,
    TokenizerSettings,
    build_database,
)
from data_pipeline.database.layout import (
    BUILD_TIMES_FILE,
    DOCUMENTS_FILE,
    MANIFEST,
    TOKENIZER_FILE,
    partial_path,
)
from data_pipeline.database.reader import DocumentTable, RetrievalDatabase, SplitArrays
from data_pipeline.database.writer import DatabaseWriter, publish

__all__ = [
    "BUILD_TIMES_FILE", "DOCUMENTS_FILE", "MANIFEST", "TOKENIZER_FILE", "ChunkSettings",
    "DatabaseWriter", "DedupSettings", "DocumentTable", "RetrievalDatabase", "SplitArrays",
    "TokenizerSettings", "build_database", "partial_path", "publish",
]
