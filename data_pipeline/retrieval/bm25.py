"""The "bm25" retriever: BM25 over chunk text (bm25s) in place of frozen-BERT keys + ScaNN.

Files (relative to the database):
    bm25/                         the bm25s index over the train chunks' detokenized text
                                  (data_pipeline/retrieval/bm25_index.py; live text queries)
    <split>/bm25_candidates-XXXXX.npy   int64 [n_i, K] per chunk shard of every split: each
                                  chunk's K best train chunks by BM25 score outside its own
                                  document (-1 where fewer match), queried with the chunk's
                                  own text, in score order (ties by chunk id)

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

Stages (data_pipeline/resumable.py), run by the build's runner: the index is one unit in the
driver (bm25s holds it in memory), saved into a temporary directory and renamed; the
candidates are one unit per chunk shard (on Beam, spread over the workers, each loading the
index once, memory-mapped), written block by block. Units chain: the candidates' inputs
include the index directory's sha256, whose inputs include the train tokens' sha256s, so
changing the corpus or tokenizer redoes both.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.resumable import (
    Stage,
    Unit,
    event,
    fingerprint,
    output_sha256,
    staging_dir,
    write_blocked_rows,
)
from data_pipeline.retrieval.base import (
    BuildInputs,
    Retriever,
    RetrieverFiles,
    TextSearch,
    register,
)
from data_pipeline.retrieval.bm25_index import PARAMS, Bm25Index, bm25s_version
from data_pipeline.shards import open_rows, shard_file, temporary_path

BM25_DIR = "bm25"
QUERY_ARRAY = "bm25_candidates"  # <split>/bm25_candidates-XXXXX.npy
DEFAULT_BLOCK_ROWS = 4096


class _CandidateSlice:
    """`InGraphSearch` of a bm25 database: the query row already holds the candidates."""

    def __init__(self, num_candidates: int):
        self.max_candidates = int(num_candidates)

    def candidates_tf(self, query_rows, k: int):
        return query_rows[:, :k]


class Bm25IndexStage(Stage):
    """The BM25 index over every train chunk: one unit, in the driver (bm25s holds the whole
    index in memory)."""

    name = "bm25 index"
    in_driver = True

    def __init__(self, tokenizer_file: str):
        self.tokenizer_file = tokenizer_file

    def run(self, unit: Unit, root: Path) -> dict:
        from data_pipeline.text.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(root) / self.tokenizer_file)
        shards = unit.args["shards"]
        tokens = open_rows([Path(root) / s["file"] for s in shards],
                           [s["num_chunks"] for s in shards], np.int32,
                           (int(unit.args["chunk_len"]),))
        index = Bm25Index.build([tokenizer.decode(row) for row in tokens])
        target = Path(root) / unit.outputs[0]
        tmp = temporary_path(target)
        index.save(tmp)
        event("bm25/index/built")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        event("bm25/index/saved")
        return {}


class Bm25CandidateStage(Stage):
    """Each chunk shard's candidate table, block by block."""

    name = "bm25 candidates"

    def __init__(self, num_candidates: int, block_rows: int, tokenizer_file: str,
                 train_doc_ids: list[dict]):
        self.num_candidates, self.block_rows = int(num_candidates), int(block_rows)
        self.tokenizer_file, self.train_doc_ids = tokenizer_file, train_doc_ids
        self._loaded: dict[str, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_loaded": {}}

    def setup(self, root: Path) -> None:
        from data_pipeline.text.tokenizer import load_tokenizer

        if not self._loaded:
            shards = self.train_doc_ids
            doc_ids = open_rows([Path(root) / s["file"] for s in shards],
                                [s["num_chunks"] for s in shards], np.int64, ())
            self._loaded = {"tokenizer": load_tokenizer(Path(root) / self.tokenizer_file),
                            "index": Bm25Index.load(Path(root) / BM25_DIR, mmap=True),
                            "train_doc_ids": np.asarray(doc_ids)}

    def run(self, unit: Unit, root: Path) -> dict:
        args = unit.args
        tokens = np.load(Path(root) / args["tokens"], mmap_mode="r")
        doc_ids = np.load(Path(root) / args["doc_ids"], mmap_mode="r")
        tokenizer, index = self._loaded["tokenizer"], self._loaded["index"]

        def compute(first: int, count: int) -> np.ndarray:
            rows = slice(first, first + count)
            texts = [tokenizer.decode(row) for row in np.asarray(tokens[rows])]
            return index.top_k(texts, self.num_candidates,
                               query_doc_ids=np.asarray(doc_ids[rows]),
                               chunk_doc_ids=self._loaded["train_doc_ids"])

        write_blocked_rows(Path(root) / unit.outputs[0], num_rows=int(args["count"]),
                           row_shape=(self.num_candidates,), dtype=np.int64,
                           block_rows=self.block_rows, staging=staging_dir(root, unit),
                           event_prefix=unit.name, compute=compute)
        return {}


@dataclasses.dataclass(frozen=True)
class _TablePart:
    """`SearchPart` of a bm25 database: its candidate table (the query rows themselves)."""

    key: tuple = ("bm25",)

    def load(self, db: Any) -> _TableSearch:
        return _TableSearch()


class _TableSearch:
    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate rows [Q, K] -> their first k (-1 padded) with their ranks as distances."""
        rows = np.asarray(rows, np.int64)
        ids = np.full((rows.shape[0], k), -1, np.int64)
        ids[:, :min(k, rows.shape[1])] = rows[:, :k]
        dists = np.where(ids >= 0, np.arange(k, dtype=np.float32)[None, :], np.inf)
        return ids, dists.astype(np.float32)


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
        directory, runner = Path(inputs.directory), inputs.runner
        train = inputs.shards("train")
        index_unit = Unit(
            name="bm25/index",
            inputs=fingerprint({"tokens": [inputs.chunk_sha256("train", i)["tokens"]
                                           for i in range(len(train))],
                                "params": PARAMS, "bm25s": bm25s_version()}),
            outputs=(BM25_DIR,),
            args={"shards": [{"file": s["files"]["tokens"]["file"],
                              "num_chunks": int(s["num_chunks"])} for s in train],
                  "chunk_len": int(inputs.tokens("train").shape[1])},
            size=sum(int(s["num_chunks"]) for s in train))
        index_marker = runner.run(Bm25IndexStage(inputs.tokenizer_file), [index_unit],
                                  directory)[index_unit.name]
        index_sha = output_sha256(index_marker, BM25_DIR)
        # The train doc ids decide which candidates are the query's own document.
        train_docs = fingerprint([inputs.chunk_sha256("train", i)["doc_ids"]
                                  for i in range(len(train))])
        units = {split: [Unit(
            name=f"bm25/{split}/shard_{i:05d}",
            inputs=fingerprint({"chunks": inputs.chunk_sha256(split, i), "train": train_docs,
                                "index": index_sha, "k": self.num_candidates,
                                "block_rows": self.block_rows, "excludes": "own document"}),
            outputs=(f"{split}/{shard_file(QUERY_ARRAY, i)}",),
            args={"tokens": shard["files"]["tokens"]["file"],
                  "doc_ids": shard["files"]["doc_ids"]["file"], "count": int(shard["num_chunks"])},
            size=int(shard["num_chunks"])) for i, shard in enumerate(inputs.shards(split))]
            for split in inputs.splits}
        stage = Bm25CandidateStage(self.num_candidates, self.block_rows, inputs.tokenizer_file,
                                   [{"file": s["files"]["doc_ids"]["file"],
                                     "num_chunks": int(s["num_chunks"])} for s in train])
        markers = runner.run(stage, [u for us in units.values() for u in us], directory)
        inputs.lap("bm25")
        return RetrieverFiles(
            manifest={"embedder": {"name": "bm25", "dim": 0},
                      "bm25": {"num_candidates": self.num_candidates, "dir": BM25_DIR,
                               "sha256": index_sha,
                               "candidates_file": f"<split>/{QUERY_ARRAY}-XXXXX.npy",
                               "params": dict(PARAMS), "bm25s_version": bm25s_version()}},
            split_flags={"has_keys": False, "has_bm25_candidates": True},
            shard_files={split: [{QUERY_ARRAY: {"file": u.outputs[0], "sha256": output_sha256(
                markers[u.name], u.outputs[0])}} for u in us] for split, us in units.items()})

    @classmethod
    def owned_paths(cls, splits: Sequence[str]) -> list[str]:
        return [BM25_DIR, *(f"{split}/{QUERY_ARRAY}-*.npy" for split in splits)]

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
        return _CandidateSlice(self.candidate_limit(db.manifest))

    @classmethod
    def candidate_limit(cls, manifest: Mapping) -> int:
        return int(manifest["bm25"]["num_candidates"])

    def search_parts(self, db: Any) -> list[_TablePart]:
        return [_TablePart()]

    def text_search(self, db: Any) -> TextSearch:
        index = db.cached("bm25", lambda: Bm25Index.load(db.path / BM25_DIR, mmap=True))

        def search(texts: Sequence[str], k: int) -> np.ndarray:
            # Score order, ties by chunk id, -1 where fewer chunks share a word.
            return index.top_k(list(texts), k)

        return search
