"""The retrieval database directory: its manifest, a reader that checks it, and a writer.

Layout (docs/ARCHITECTURE.md, "Retrieval database directory"):

    <db>/manifest.json          what is in the directory; checked on every open
    <db>/tokenizer.model        SentencePiece model (sha256 in the manifest)
    <db>/documents.jsonl        one row per document (doc_id, id, title, source, split, ...)
    <db>/<split>/tokens.npy     int32 [num_chunks, m], pad 0
    <db>/<split>/doc_ids.npy    int64 [num_chunks]
    <db>/<split>/keys.npy       float32 [num_chunks, dim]        (retriever "bert")
    <db>/index/shard_XXXXX/     ScaNN searcher over train chunks [first, first + num)
    <db>/<split>/bm25_candidates.npy  int64 [num_chunks, K]     (retriever "bm25")
    <db>/bm25/                  the BM25 index over the train chunks (data_pipeline/bm25.py)

`manifest["retriever"]` says which ("bert" when absent: databases written before BM25).
A "bm25" database has no keys and no ScaNN index: each chunk of every split has its top-K
BM25 candidates among the train chunks, computed at build time, and `manifest["bm25"]`
holds K (`num_candidates`) and the scoring parameters.

`RetrievalDatabase.open` reads the manifest and checks every file it names (present, the
right dtype and shape, not truncated) and the caller's expectations (chunk length,
tokenizer, embedder, retriever); any mismatch is a `DataError` that names the file and the
command to run. `DatabaseWriter` (data_pipeline/database_writer.py, re-exported here) writes
a database into `<db>.partial/` and renames it into place; the build (data_pipeline/build.py)
streams large arrays into the same layout, tests write small databases with `write_split`.

The manifest holds no timestamps, so two builds of the same inputs are byte-identical;
build timings go to `<db>/build_times.json`, which nothing checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import Tokenizer, file_sha256, load_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
DOCUMENTS_FILE = "documents.jsonl"
BUILD_TIMES_FILE = "build_times.json"
INDEX_DIR = "index"
SPLIT_NAMES = ("train", "validation", "test")
# array name -> (dtype, trailing shape key in the manifest: None | "chunk_len" | "dim")
ARRAYS = {
    "tokens": (np.int32, "chunk_len"),
    "doc_ids": (np.int64, None),
    "keys": (np.float32, "dim"),
    "bm25_candidates": (np.int64, "num_candidates"),
}
RETRIEVERS = ("bert", "bm25")


def partial_path(path: str | os.PathLike) -> Path:
    """Where a database at `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def shard_dir_name(shard_index: int) -> str:
    return f"{INDEX_DIR}/shard_{shard_index:05d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON via a temp file and rename (no torn files)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class SplitArrays(NamedTuple):
    """Memory-mapped arrays of one split. keys is None when the split has no keys."""

    tokens: np.ndarray  # int32 [N, m]
    doc_ids: np.ndarray  # int64 [N]
    keys: np.ndarray | None  # float32 [N, dim]


class DocumentTable(Mapping):
    """doc_id -> row dict (doc_id, id, title, source, split, first_chunk, num_chunks,
    num_tokens, num_bytes, num_words), read from documents.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self._rows: dict[int, dict] = {}
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self._rows[int(row["doc_id"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{line_no}: malformed document row ({e}); "
                                    "rebuild the database with --force") from e

    def __getitem__(self, doc_id: int) -> dict:
        return self._rows[int(doc_id)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, split: str | None = None) -> Iterator[dict]:
        """Rows in file order (= chunk order within a split), optionally of one split."""
        return (r for r in self._rows.values() if split is None or r["split"] == split)


def _fix_hint(path: Path) -> str:
    return (f"rebuild it: retro-jax build-db --config <experiment> --workdir <workdir> --force "
            f"(database {path})")


class RetrievalDatabase:
    """A complete, checked database directory. Open with `RetrievalDatabase.open(path)`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.chunk_len: int = int(manifest["chunk_len"])
        self.embed_dim: int = int(manifest["embedder"]["dim"])
        self.retriever: str = str(manifest.get("retriever", "bert"))
        # K of the bm25 candidate tables (None for a "bert" database).
        bm25 = manifest.get("bm25") or {}
        self.num_candidates: int | None = (int(bm25["num_candidates"])
                                           if "num_candidates" in bm25 else None)
        self._splits: dict[str, SplitArrays] = {}
        self._candidates: dict[str, np.ndarray] = {}
        self._searcher = None
        self._bm25_index = None

    # ------------------------------------------------------------------ open + checks
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expect_chunk_len: int | None = None,
        expect_tokenizer_sha256: str | None = None,
        expect_embedder: str | tuple[str, int] | Mapping | None = None,
        expect_retriever: str | None = None,
    ) -> RetrievalDatabase:
        """Open the database at `path` and check it; DataError on any mismatch.

        Args:
          expect_chunk_len: the caller's m (config database.chunk_len).
          expect_tokenizer_sha256: sha256 of the tokenizer the caller uses.
          expect_embedder: embedder name, (name, dim) or {"name", "dim"} the caller uses.
          expect_retriever: "bert" or "bm25" (config database.retriever).
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            partial = partial_path(path)
            why = (f"an interrupted build left {partial}; rerun retro-jax build-db to resume it"
                   if partial.exists() else "build it with retro-jax build-db --config "
                   "<experiment> --workdir <workdir>")
            raise DataError(f"no retrieval database at {path} ({manifest_path} is missing): "
                            f"{why}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON ({e}); {_fix_hint(path)}") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                            f"this code reads {FORMAT_VERSION}; {_fix_hint(path)}")
        if manifest.get("complete") is not True:
            raise DataError(f"{manifest_path}: the database is not complete; {_fix_hint(path)}")
        db = cls(path, manifest)
        db.check_retriever(expect_retriever)
        db._check_expectations(expect_chunk_len, expect_tokenizer_sha256, expect_embedder)
        db._check_files()
        return db

    def check_retriever(self, expected: str | None) -> None:
        """DataError unless the database was built for retriever `expected` (None: any)."""
        if expected is None or expected == self.retriever:
            return
        raise DataError(
            f"{self.path / MANIFEST}: the database was built for retriever {self.retriever!r} "
            f"(manifest \"retriever\"), the config has database.retriever={expected!r}; set "
            f"database.retriever={self.retriever!r} to use this database, or rebuild it for "
            f"{expected!r}: {_fix_hint(self.path)} (or point database.path at another "
            "directory)")

    def _check_expectations(self, chunk_len, tokenizer_sha256, embedder) -> None:
        where = self.path / MANIFEST
        if chunk_len is not None and int(chunk_len) != self.chunk_len:
            raise DataError(f"{where}: chunk_len is {self.chunk_len} but the config has "
                            f"database.chunk_len={chunk_len}; use a database built with that "
                            f"chunk length or {_fix_hint(self.path)}")
        found_sha = self.manifest["tokenizer"]["sha256"]
        if tokenizer_sha256 is not None and tokenizer_sha256 != found_sha:
            raise DataError(f"{where}: the database was tokenized with tokenizer sha256 "
                            f"{found_sha[:12]}..., the caller uses {tokenizer_sha256[:12]}...; "
                            f"use the database's tokenizer.model or {_fix_hint(self.path)}")
        if embedder is not None and self.retriever == "bert":
            if isinstance(embedder, str):
                name, dim = embedder, None
            elif isinstance(embedder, Mapping):
                name, dim = embedder.get("name"), embedder.get("dim")
            else:
                name, dim = embedder
            found = self.manifest["embedder"]
            if name is not None and name != found["name"]:
                raise DataError(f"{where}: keys were made by embedder {found['name']!r}, the "
                                f"config has embedder.name={name!r}; {_fix_hint(self.path)}")
            if dim is not None and int(dim) != int(found["dim"]):
                raise DataError(f"{where}: keys have dim {found['dim']}, the embedder gives "
                                f"{dim}; {_fix_hint(self.path)}")

    def _check_files(self) -> None:
        tok = self.manifest["tokenizer"]
        tok_path = self.path / tok["file"]
        if not tok_path.is_file():
            raise DataError(f"{tok_path} is missing; {_fix_hint(self.path)}")
        if file_sha256(tok_path) != tok["sha256"]:
            raise DataError(f"{tok_path}: sha256 differs from the manifest's (the file was "
                            f"replaced or is corrupt); {_fix_hint(self.path)}")
        if not (self.path / DOCUMENTS_FILE).is_file():
            raise DataError(f"{self.path / DOCUMENTS_FILE} is missing; {_fix_hint(self.path)}")
        for split in self.manifest["splits"]:
            self._load_split(split)
        if self.retriever == "bm25":
            from data_pipeline.bm25 import BM25_DIR

            if not (self.path / BM25_DIR).is_dir():
                raise DataError(f"BM25 index {self.path / BM25_DIR} is missing; "
                                f"{_fix_hint(self.path)}")
        for shard in self.manifest.get("shards", []):
            shard_path = self.path / shard["dir"]
            if not shard_path.is_dir() or not any(shard_path.iterdir()):
                raise DataError(f"index shard {shard_path} is missing or empty; "
                                f"{_fix_hint(self.path)}")

    def _load_array(self, split: str, name: str, num_chunks: int) -> np.ndarray:
        dtype, trailing = ARRAYS[name]
        file = self.path / split / f"{name}.npy"
        shape: tuple[int, ...] = (num_chunks,)
        if trailing == "chunk_len":
            shape += (self.chunk_len,)
        elif trailing == "dim":
            shape += (self.embed_dim,)
        elif trailing == "num_candidates":
            shape += (int(self.num_candidates or 0),)
        if not file.is_file():
            raise DataError(f"{file} is missing (expected {np.dtype(dtype).name} {list(shape)}); "
                            f"{_fix_hint(self.path)}")
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{file} is truncated or corrupt ({e}); expected "
                            f"{np.dtype(dtype).name} {list(shape)}; {_fix_hint(self.path)}") from e
        if array.dtype != dtype or array.shape != shape:
            raise DataError(f"{file}: found {array.dtype} {list(array.shape)}, the manifest "
                            f"says {np.dtype(dtype).name} {list(shape)}; {_fix_hint(self.path)}")
        return array

    def _load_split(self, split: str) -> SplitArrays:
        if split not in self._splits:
            info = self.manifest["splits"][split]
            n = int(info["num_chunks"])
            tokens = self._load_array(split, "tokens", n)
            doc_ids = self._load_array(split, "doc_ids", n)
            keys = self._load_array(split, "keys", n) if info.get("has_keys", True) else None
            if info.get("has_bm25_candidates", False):
                self._candidates[split] = self._load_array(split, "bm25_candidates", n)
            self._splits[split] = SplitArrays(tokens=tokens, doc_ids=doc_ids, keys=keys)
        return self._splits[split]

    # ------------------------------------------------------------------ access
    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def split(self, name: str) -> SplitArrays:
        """Memory-mapped arrays of split `name` (train, validation, test)."""
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.path / MANIFEST}: the database has no split {name!r} "
                            f"(it has {', '.join(self.splits)}); add it to "
                            "database.eval_splits and rebuild with --force")
        return self._load_split(name)

    def candidates(self, name: str) -> np.ndarray | None:
        """Memory-mapped BM25 candidates of split `name`: int64 [N, K], each chunk's top-K
        train chunk ids (outside its own document) in score order, -1 = none; None when the
        split has none (a "bert" database)."""
        self.split(name)
        return self._candidates.get(name)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.manifest["tokenizer"]["file"])

    @cached_property
    def documents(self) -> DocumentTable:
        return DocumentTable(self.path / DOCUMENTS_FILE)

    def neighbour_tokens(self, chunk_ids: np.ndarray, split: str = "train") -> np.ndarray:
        """Tokens of chunks followed by their continuations.

        Args:
          chunk_ids: int64 [...] chunk ids of `split`; -1 means "no chunk".
        Returns:
          int32 [..., 2m]: chunk i's tokens, then chunk i+1's tokens when chunk i+1 belongs to
          the same document, else zeros (continuations never cross documents); all zeros
          where the id is -1.
        """
        arrays = self.split(split)
        ids = np.asarray(chunk_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        n, m = arrays.tokens.shape
        if flat.size and (flat.max(initial=-1) >= n or flat.min(initial=0) < -1):
            raise DataError(f"neighbour_tokens: chunk ids outside [-1, {n}) for split {split!r} "
                            f"of {self.path}")
        out = np.zeros((flat.size, 2 * m), dtype=np.int32)
        valid = flat >= 0
        rows = flat[valid]
        if rows.size:
            # Sorted reads are sequential on the memory map; put results back in order.
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            chunk = np.empty((rows.size, m), dtype=np.int32)
            chunk[order] = arrays.tokens[sorted_rows]
            nxt = np.minimum(sorted_rows + 1, n - 1)
            same_doc = (sorted_rows + 1 < n) & (arrays.doc_ids[nxt] == arrays.doc_ids[sorted_rows])
            cont = np.zeros((rows.size, m), dtype=np.int32)
            cont_sorted = np.where(same_doc[:, None], arrays.tokens[nxt], 0)
            cont[order] = cont_sorted
            out[valid, :m] = chunk
            out[valid, m:] = cont
        return out.reshape(ids.shape + (2 * m,))

    def bm25_index(self):
        """The BM25 index over the train chunks (data_pipeline.bm25.Bm25Index; loaded once)
        of a "bm25" database: live queries by text (sampling)."""
        if self.retriever != "bm25":
            raise DataError(f"{self.path / MANIFEST}: retriever {self.retriever!r} has no BM25 "
                            "index; search it by key with db.searcher()")
        if self._bm25_index is None:
            from data_pipeline.bm25 import BM25_DIR, Bm25Index

            self._bm25_index = Bm25Index.load(self.path / BM25_DIR, mmap=True)
        return self._bm25_index

    def searcher(self):
        """A ShardedSearcher over the train split's index shards (loaded once, cached)."""
        if self.retriever != "bert":
            raise DataError(f"{self.path / MANIFEST}: a {self.retriever!r} database has no "
                            "ScaNN index: its neighbours are the per-split candidate tables "
                            "(<split>/bm25_candidates.npy; the input pipeline reads them) and "
                            "db.bm25_index() for text queries")
        if self._searcher is None:
            from data_pipeline.index import ShardedSearcher, ShardSearcher

            shards = self.manifest.get("shards", [])
            if not shards:
                raise DataError(f"{self.path / MANIFEST}: the database has no index shards; "
                                f"{_fix_hint(self.path)}")
            self._searcher = ShardedSearcher(
                [ShardSearcher.load(self.path / s["dir"], s["first_chunk"]) for s in shards])
        return self._searcher

    def __repr__(self) -> str:
        sizes = {s: v["num_chunks"] for s, v in self.manifest["splits"].items()}
        return f"RetrievalDatabase({str(self.path)!r}, m={self.chunk_len}, chunks={sizes})"


def __getattr__(name: str):
    # The writer lives in data_pipeline/database_writer.py (it imports this module, so it is
    # loaded lazily here); `from data_pipeline.database import DatabaseWriter` keeps working.
    if name in ("DatabaseWriter", "publish"):
        from data_pipeline import database_writer

        return getattr(database_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
