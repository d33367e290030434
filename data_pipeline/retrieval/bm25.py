"""The "bm25" retriever: BM25 over chunk text (bm25s) in place of frozen-BERT keys + ScaNN.

Files (relative to the database):
    bm25/                         the bm25s index over the train chunks' detokenized text
                                  (data_pipeline/retrieval/bm25_index.py; live text queries)
    <split>/bm25_candidates.npy   int64 [num_chunks, K] for every split: each chunk's K best
                                  train chunks by BM25 score outside its own document (-1
                                  where fewer match), queried with the chunk's own text, in
                                  score order (ties by chunk id)

bm25s is Python and cannot run in the tf.data graph, so candidates are computed once per split
at build time; a chunk's query at read time is its row of the candidate table, and
`in_graph_search` slices it (a `tf.gather` in the pipeline, then the same filters as after a
ScaNN search).

Why outside its own document: a train chunk's best BM25 matches are itself and the rest of
its document (on the runlocal stdlib database, 88% of the raw top-10 were same-document and
75% of training neighbours came out missing after the pipeline's same-document filter), and
that filter always runs for training and evaluation. Evaluation chunks' documents are never
in the train split, so for them this changes nothing. The pipeline still applies its filters
(same document again, excluded documents) to these rows; only `exclude_same_document=False`
on the train split cannot bring same-document chunks back.

K = the index settings' `num_neighbours` (config `index.num_neighbours`, default 10),
recorded in the manifest as bm25.num_candidates. k * overfetch candidates beyond K are never
seen: raise index.num_neighbours for more (a candidate is 8 bytes per chunk on disk and in
host memory).

Resumable like the key stage: the index is saved into a temporary directory and renamed,
candidates are written block by block with a done-marker each (data_pipeline/resumable.py).
Markers chain: the candidates' inputs include the index directory's sha256, which includes
the train tokens' sha256, so changing the corpus or tokenizer redoes both.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.fileio import dir_sha256
from data_pipeline.progress import progress
from data_pipeline.resumable import event, fingerprint, write_row_blocks
from data_pipeline.retrieval.base import (
    BuildInputs,
    Retriever,
    RetrieverFiles,
    TextSearch,
    register,
)
from data_pipeline.retrieval.bm25_index import PARAMS, Bm25Index, bm25s_version

BM25_DIR = "bm25"
CANDIDATES_FILE = "bm25_candidates.npy"
QUERY_ARRAY = "bm25_candidates"
DEFAULT_BLOCK_ROWS = 4096


class _CandidateSlice:
    """`InGraphSearch` of a bm25 database: the query row already holds the candidates."""

    def __init__(self, num_candidates: int):
        self.max_candidates = int(num_candidates)

    def candidates_tf(self, query_rows, k: int):
        return query_rows[:, :k]


@register
class Bm25Retriever(Retriever):
    """BM25 candidates computed at build time.

    Args:
      num_candidates: K, candidates kept per chunk.
      block_rows: chunks per resumable block of candidates.
    """

    kind = "bm25"
    query_array = QUERY_ARRAY

    def __init__(self, num_candidates: int = 10, *, block_rows: int = DEFAULT_BLOCK_ROWS):
        self.num_candidates = int(num_candidates)
        self.block_rows = int(block_rows)

    @classmethod
    def from_settings(cls, *, index: Mapping[str, Any] | None = None,
                      block_rows: int | None = None, **_: Any) -> Bm25Retriever:
        return cls(int((index or {}).get("num_neighbours", 10)),
                   block_rows=block_rows or DEFAULT_BLOCK_ROWS)

    # ------------------------------------------------------------------ build
    def build(self, inputs: BuildInputs) -> RetrieverFiles:
        chunk_shas = inputs.chunk_sha256
        index_fp = self._stage_index(inputs)
        for split in inputs.splits:
            # The train doc ids decide which candidates are the query's own document.
            chunks_fp = fingerprint({"split": chunk_shas[split], "train": chunk_shas["train"]})
            self._stage_candidates(inputs, split, chunks_fp, index_fp)
        inputs.lap("bm25")
        return RetrieverFiles(
            manifest={"embedder": {"name": "bm25", "dim": 0},
                      "bm25": {"num_candidates": self.num_candidates, "dir": BM25_DIR,
                               "candidates_file": CANDIDATES_FILE, "params": dict(PARAMS),
                               "bm25s_version": bm25s_version()}},
            split_flags={"has_keys": False, "has_bm25_candidates": True})

    @classmethod
    def owned_paths(cls, splits: Sequence[str]) -> list[str]:
        return [BM25_DIR, *(f"{split}/{CANDIDATES_FILE}" for split in splits)]

    def _stage_index(self, inputs: BuildInputs) -> str:
        """Build and save the BM25 index over the train chunks; returns its fingerprint."""
        unit = fingerprint({"tokens": inputs.chunk_sha256["train"]["tokens"], "params": PARAMS,
                            "bm25s": bm25s_version()})
        target = inputs.directory / BM25_DIR
        marker = inputs.markers.get("bm25_index", unit)
        if marker and target.is_dir() and dir_sha256(target) == marker["sha256"]:
            return fingerprint([unit, marker["sha256"]])
        tokens = inputs.tokens("train")
        bar = progress(int(tokens.shape[0]), "bm25 index", "chunk")
        index = Bm25Index.build(inputs.texts(tokens))
        bar.update(int(tokens.shape[0]))
        bar.close()
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        index.save(tmp)
        event("bm25/index/built")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        sha = dir_sha256(target)
        inputs.markers.put("bm25_index", unit, sha256=sha)
        event("bm25/index/saved")
        return fingerprint([unit, sha])

    def _stage_candidates(self, inputs: BuildInputs, split: str, chunks_fp: str,
                          index_fp: str) -> str:
        """Write <split>/bm25_candidates.npy block by block; returns its fingerprint."""
        tokens = inputs.tokens(split)
        doc_ids = inputs.doc_ids(split)
        train_doc_ids = np.asarray(inputs.doc_ids("train"))
        loaded: list[Bm25Index] = []  # loaded on the first block to compute (not when all done)

        def compute(rows: slice) -> np.ndarray:
            if not loaded:
                loaded.append(Bm25Index.load(inputs.directory / BM25_DIR))
            return loaded[0].top_k(inputs.texts(tokens[rows]), self.num_candidates,
                                   query_doc_ids=np.asarray(doc_ids[rows]),
                                   chunk_doc_ids=train_doc_ids)

        unit = fingerprint({"chunks": chunks_fp, "index": index_fp, "k": self.num_candidates,
                            "block_rows": self.block_rows, "excludes": "own document"})
        return write_row_blocks(inputs.directory / split / CANDIDATES_FILE,
                                shape=(int(tokens.shape[0]), self.num_candidates),
                                dtype=np.int64, inputs=unit, block_rows=self.block_rows,
                                markers=inputs.markers, name=f"bm25_{split}",
                                event_prefix=f"bm25/{split}", compute=compute,
                                desc=f"bm25 candidates {split}")

    # ------------------------------------------------------------------ read
    @classmethod
    def query_array_spec(cls, manifest: Mapping) -> tuple[np.dtype, int]:
        return np.dtype(np.int64), int(manifest["bm25"]["num_candidates"])

    @classmethod
    def has_queries(cls, split_entry: Mapping) -> bool:
        return bool(split_entry.get("has_bm25_candidates", False))

    @classmethod
    def check_files(cls, path: Path, manifest: Mapping) -> None:
        if not (path / BM25_DIR).is_dir():
            raise DataError(f"BM25 index {path / BM25_DIR} is missing; rebuild it: retro-jax "
                            "build-db --config <experiment> --workdir <workdir> --force "
                            f"(database {path})")

    @classmethod
    def describe(cls, manifest: Mapping) -> str:
        bm25 = manifest["bm25"]
        return (f"bm25       top-{bm25['num_candidates']} candidates per chunk "
                f"(bm25s {bm25.get('bm25s_version')})")

    def check_database(self, path: Path, manifest: Mapping) -> None:
        """Any BM25 database serves (K and the scoring parameters are in its manifest)."""

    def in_graph_search(self, db: Any) -> _CandidateSlice:
        return _CandidateSlice(db.manifest["bm25"]["num_candidates"])

    def text_search(self, db: Any) -> TextSearch:
        index = db.cached("bm25", lambda: Bm25Index.load(db.path / BM25_DIR, mmap=True))

        def search(texts: Sequence[str], k: int) -> np.ndarray:
            # Score order, ties by chunk id, -1 where fewer chunks share a word.
            return index.top_k(list(texts), k)

        return search
