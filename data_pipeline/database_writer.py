"""Writes a retrieval database directory (see data_pipeline/database.py for the layout).

`DatabaseWriter` writes into `<db>.partial/` and `publish` renames it into place after
checking it with `RetrievalDatabase.open`. The build (data_pipeline/build.py) streams large
arrays into the same layout and records them here; tests write small databases with
`write_split`. Both are re-exported by data_pipeline.database.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from data_pipeline.database import (
    DOCUMENTS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    RETRIEVERS,
    TOKENIZER_FILE,
    DocumentTable,
    RetrievalDatabase,
    partial_path,
    shard_dir_name,
    write_json_atomic,
)
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer


class DatabaseWriter:
    """Writes a database into `<path>.partial/` and renames it to `<path>` in `finish()`.

    Small databases (tests): `write_split` each split's arrays, `write_documents`, optionally
    `build_index`, then `finish()`. The build streams large arrays into `split_dir(name)`
    itself and calls `record_split`.

    Args:
      path: the final database directory.
      chunk_len: m.
      tokenizer_path: a SentencePiece `.model` (copied in as tokenizer.model).
      embedder_name, embed_dim: what made the keys.
      corpus: {"kind", "description"} for the manifest.
      resume: keep what an earlier `<path>.partial/` holds (the build resumes); otherwise
        start from an empty one.
      retriever: "bert" (keys + ScaNN shards) or "bm25" (candidate tables + BM25 index; set
        `bm25_info` before the manifest is written).
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
    ):
        if retriever not in RETRIEVERS:
            raise ValueError(f"DatabaseWriter: retriever={retriever!r}, expected one of "
                             f"{RETRIEVERS}")
        self.path = Path(path)
        self.retriever = retriever
        self.bm25_info: dict | None = None  # {"num_candidates": K, ...} for retriever "bm25"
        self.partial = partial_path(self.path)
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.chunk_len = int(chunk_len)
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
        """Write one split from in-memory arrays: tokens [N, m], doc_ids [N], keys [N, dim]."""
        tokens = np.asarray(tokens, dtype=np.int32)
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        n = tokens.shape[0]
        if tokens.shape != (n, self.chunk_len) or doc_ids.shape != (n,):
            raise ValueError(f"write_split({split!r}): tokens {tokens.shape} / doc_ids "
                             f"{doc_ids.shape} do not match [N, {self.chunk_len}] / [N]")
        d = self.split_dir(split)
        np.save(d / "tokens.npy", tokens)
        np.save(d / "doc_ids.npy", doc_ids)
        if keys is not None:
            keys = np.asarray(keys, dtype=np.float32)
            if keys.shape != (n, self.embedder["dim"]):
                raise ValueError(f"write_split({split!r}): keys {keys.shape}, expected "
                                 f"[{n}, {self.embedder['dim']}]")
            np.save(d / "keys.npy", keys)
        self.record_split(split, num_chunks=n, has_keys=keys is not None)

    def record_split(self, split: str, *, num_chunks: int, has_keys: bool,
                     num_documents: int | None = None, num_tokens: int | None = None,
                     num_bytes: int | None = None, has_bm25_candidates: bool = False) -> None:
        """Enter a split whose arrays are already in `split_dir(split)`; counts not given are
        computed in `finish()` from documents.jsonl."""
        self._splits[split] = {"num_chunks": int(num_chunks), "has_keys": bool(has_keys),
                               "num_documents": num_documents, "num_tokens": num_tokens,
                               "num_bytes": num_bytes}
        if has_bm25_candidates:
            self._splits[split]["has_bm25_candidates"] = True

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
        if searcher is not None:
            target = self.partial / rel
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            searcher.save(target)
        self._shards.append({"first_chunk": int(first_chunk), "num_chunks": int(num_chunks),
                             "dir": rel})
        return self.partial / rel

    def build_index(self, shard_chunks: int, index_cfg=None) -> None:
        """Build ScaNN shards over the train keys already written (small databases).

        Args:
          shard_chunks: train chunks per shard.
          index_cfg: a config `index` section (default: the base config's).
        """
        from data_pipeline.index import IndexParams, build_shard

        if index_cfg is None:
            from retro_jax.configs.base import get_base_config

            index_cfg = get_base_config().index
        keys = np.load(self.partial / "train" / "keys.npy", mmap_mode="r")
        n = keys.shape[0]
        for first in range(0, n, shard_chunks):
            count = min(shard_chunks, n - first)
            shard_params = IndexParams.from_config(index_cfg, count)
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
        if self.retriever == "bm25":
            if not self.bm25_info or "num_candidates" not in self.bm25_info:
                raise ValueError("DatabaseWriter: retriever 'bm25' needs bm25_info "
                                 "{'num_candidates': K, ...} before the manifest is written")
            manifest["bm25"] = self.bm25_info
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
