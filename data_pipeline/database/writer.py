"""Writes a retrieval database directory (layout: data_pipeline/database/layout.py).

`DatabaseWriter` writes into `<db>.partial/` and `publish` renames it into place after
checking it with `RetrievalDatabase.open`. The build (data_pipeline/database/build.py)
writes the array shards itself (in parallel) and records them here; small databases (tests,
benchmarks, data_pipeline/database/synthetic.py) are written with `write_split`, which cuts
the arrays into shards of `shard_chunks` rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from data_pipeline.database.layout import (
    DEFAULT_SHARD_CHUNKS,
    DOCUMENTS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILE,
    array_file,
    partial_path,
)
from data_pipeline.database.reader import DocumentTable, RetrievalDatabase
from data_pipeline.errors import DataError
from data_pipeline.fileio import dir_sha256, file_sha256, write_json_atomic
from data_pipeline.retrieval import RetrieverFiles, retriever_class
from data_pipeline.retrieval.bert import KEYS, shard_dir_name
from data_pipeline.shards import open_rows, shard_ranges, write_npy_atomic
from data_pipeline.text.tokenizer import load_tokenizer


class DatabaseWriter:
    """Writes a database into `<path>.partial/` and renames it to `<path>` in `finish()`.

    Small databases (tests): `write_split` each split's arrays, `write_documents`, optionally
    `build_index`, then `finish()`. The build writes the array shards itself and calls
    `record_split` with their table.

    Args:
      path: the final database directory.
      chunk_len: m.
      tokenizer_path: a SentencePiece `.model` (copied in as tokenizer.model).
      embedder_name, embed_dim: what made the keys.
      corpus: {"kind", "description"} for the manifest.
      resume: keep what an earlier `<path>.partial/` holds (the build resumes); otherwise
        start from an empty one.
      retriever: the retriever kind named in the manifest ("bert": keys + ScaNN shards;
        other kinds: `apply(files)` with what their build wrote before the manifest).
      shard_chunks: rows per array shard (`write_split`), recorded in the manifest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chunk_len: int,
        tokenizer_path: str | os.PathLike,
        embedder_name: str,
        embed_dim: int,
        corpus: Mapping | None = None,
        resume: bool = False,
        retriever: str = "bert",
        shard_chunks: int = DEFAULT_SHARD_CHUNKS,
    ):
        retriever_class(retriever, where="DatabaseWriter retriever")  # a known kind
        self.path = Path(path)
        self.retriever = retriever
        self.sections: dict = {}  # further manifest sections of the retriever (e.g. "bm25")
        self.partial = partial_path(self.path)
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.chunk_len = int(chunk_len)
        self.shard_chunks = int(shard_chunks)
        self.embedder = {"name": str(embedder_name), "dim": int(embed_dim)}
        self.corpus = dict(corpus or {"kind": "", "description": ""})
        self._splits: dict[str, dict] = {}
        self._shards: list[dict] = []
        self.index_info: dict = {"params": {}, "recall_at_10": None}
        self.dedup_info: dict = {"removed": 0, "threshold": None}
        dest = self.partial / TOKENIZER_FILE
        if Path(tokenizer_path).resolve() != dest.resolve():
            shutil.copyfile(tokenizer_path, dest)
        tok = load_tokenizer(dest)
        self.tokenizer_info = {"file": TOKENIZER_FILE, "sha256": tok.sha256,
                               "vocab_size": tok.vocab_size}

    def split_dir(self, split: str) -> Path:
        d = self.partial / split
        d.mkdir(exist_ok=True)
        return d

    def write_split(self, split: str, tokens: np.ndarray, doc_ids: np.ndarray,
                    keys: np.ndarray | None) -> None:
        """Write one split from in-memory arrays: tokens [N, m], doc_ids [N], keys [N, dim],
        in shards of `shard_chunks` rows."""
        tokens = np.asarray(tokens, dtype=np.int32)
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        n = tokens.shape[0]
        if tokens.shape != (n, self.chunk_len) or doc_ids.shape != (n,):
            raise ValueError(f"write_split({split!r}): tokens {tokens.shape} / doc_ids "
                             f"{doc_ids.shape} do not match [N, {self.chunk_len}] / [N]")
        arrays = {"tokens": tokens, "doc_ids": doc_ids}
        if keys is not None:
            keys = np.asarray(keys, dtype=np.float32)
            if keys.shape != (n, self.embedder["dim"]):
                raise ValueError(f"write_split({split!r}): keys {keys.shape}, expected "
                                 f"[{n}, {self.embedder['dim']}]")
            arrays[KEYS] = keys
        self.split_dir(split)
        shards = []
        for i, (first, count) in enumerate(shard_ranges(n, self.shard_chunks)):
            files = {}
            for name, array in arrays.items():
                rel = array_file(split, name, i)
                write_npy_atomic(self.partial / rel, array[first:first + count])
                files[name] = {"file": rel, "sha256": file_sha256(self.partial / rel)}
            shards.append({"first_chunk": first, "num_chunks": count, "files": files})
        self.record_split(split, num_chunks=n, shards=shards, has_keys=keys is not None)

    def record_split(self, split: str, *, num_chunks: int, shards: list[dict],
                     has_keys: bool = True, num_documents: int | None = None,
                     num_tokens: int | None = None, num_bytes: int | None = None,
                     **flags) -> None:
        """Enter a split whose array shards are written: `shards` = [{first_chunk,
        num_chunks, files: {array name: {file, sha256}}}]; counts not given are computed in
        `finish()` from documents.jsonl. `flags` (the retriever's
        `RetrieverFiles.split_flags`) go into the split's manifest entry."""
        self._splits[split] = {"num_chunks": int(num_chunks), "has_keys": bool(has_keys),
                               "num_documents": num_documents, "num_tokens": num_tokens,
                               "num_bytes": num_bytes, **flags, "shards": list(shards)}

    def apply(self, files: RetrieverFiles) -> None:
        """Take a retriever build's manifest sections (embedder, shards, index, bm25, ...)."""
        for key, value in files.manifest.items():
            if key == "embedder":
                self.embedder = dict(value)
            elif key == "shards":
                self._shards = list(value)
            elif key == "index":
                self.index_info = dict(value)
            else:
                self.sections[key] = value

    def write_documents(self, rows: Iterable[Mapping]) -> None:
        """Write documents.jsonl (rows as in DocumentTable)."""
        path = self.partial / DOCUMENTS_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), sort_keys=True, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    def add_shard(self, first_chunk: int, num_chunks: int, searcher=None) -> Path:
        """Enter index shard number len(shards) over train chunks [first, first + num);
        saves `searcher` (a ShardSearcher) there when given. Returns its directory."""
        rel = shard_dir_name(len(self._shards))
        target = self.partial / rel
        if searcher is not None:
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            searcher.save(target)
        entry = {"first_chunk": int(first_chunk), "num_chunks": int(num_chunks), "dir": rel}
        if target.is_dir():
            entry["sha256"] = dir_sha256(target)
        self._shards.append(entry)
        return target

    def build_index(self, shard_chunks: int, index_settings: Mapping | None = None) -> None:
        """Build ScaNN shards over the train keys already written (small databases).

        Args:
          shard_chunks: train chunks per shard.
          index_settings: IndexParams fields (a config's `index` section); default: theirs.
        """
        from data_pipeline.retrieval.scann import IndexParams, build_shard

        shards = self._splits["train"]["shards"]
        keys = open_rows([self.partial / s["files"][KEYS]["file"] for s in shards],
                         [s["num_chunks"] for s in shards], np.float32,
                         (self.embedder["dim"],))
        n = keys.shape[0]
        for first in range(0, n, shard_chunks):
            count = min(shard_chunks, n - first)
            shard_params = IndexParams.for_size(count, **dict(index_settings or {}))
            self.add_shard(first, count, build_shard(np.asarray(keys[first:first + count]),
                                                     shard_params, first_chunk=first))

    def manifest(self) -> dict:
        """The manifest as it will be written (split counts filled from documents.jsonl)."""
        splits = {name: dict(info) for name, info in self._splits.items()}
        docs_path = self.partial / DOCUMENTS_FILE
        if not docs_path.is_file():
            self.write_documents([])
        if any(v[k] is None for v in splits.values()
               for k in ("num_documents", "num_tokens", "num_bytes")):
            totals: dict[str, dict[str, int]] = {}
            for row in DocumentTable(docs_path).rows():
                t = totals.setdefault(row["split"], {"num_documents": 0, "num_tokens": 0,
                                                     "num_bytes": 0})
                t["num_documents"] += 1
                t["num_tokens"] += int(row.get("num_tokens", 0))
                t["num_bytes"] += int(row.get("num_bytes", 0))
            for name, info in splits.items():
                for key, value in totals.get(name, {"num_documents": 0, "num_tokens": 0,
                                                    "num_bytes": 0}).items():
                    if info[key] is None:
                        info[key] = value
        manifest = {
            "format_version": FORMAT_VERSION,
            "chunk_len": self.chunk_len,
            "shard_chunks": self.shard_chunks,
            "retriever": self.retriever,
            "tokenizer": self.tokenizer_info,
            "embedder": self.embedder,
            "splits": splits,
            "shards": list(self._shards),
            "index": self.index_info,
            "corpus": self.corpus,
            "dedup": self.dedup_info,
            "complete": True,
        }
        manifest.update(self.sections)
        return manifest

    def write_manifest(self) -> None:
        """Write `<path>.partial/manifest.json` (after every other file is in place)."""
        if "train" not in self._splits:
            raise ValueError("DatabaseWriter: no train split written")
        write_json_atomic(self.partial / MANIFEST, self.manifest())

    def finish(self, *, overwrite: bool = False) -> RetrievalDatabase:
        """Write the manifest, rename `<path>.partial` to `<path>`, open and check it.

        Args:
          overwrite: replace an existing database at `path` (else DataError).
        """
        self.write_manifest()
        return publish(self.path, overwrite=overwrite)


def publish(path: str | os.PathLike, *, overwrite: bool = False) -> RetrievalDatabase:
    """Rename a finished `<path>.partial` (manifest written) to `path`; open and check it."""
    path = Path(path)
    partial = partial_path(path)
    RetrievalDatabase.open(partial)  # check before replacing anything
    if path.exists():
        if not overwrite:
            raise DataError(f"{path} already exists; pass --force to rebuild it")
        shutil.rmtree(path)
    os.replace(partial, path)
    return RetrievalDatabase.open(path)
