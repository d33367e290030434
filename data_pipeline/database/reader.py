"""Reading a retrieval database: `RetrievalDatabase.open` checks the directory against its
manifest and the caller's expectations, then serves memory-mapped split arrays, the document
table and neighbour tokens.

The layout is in data_pipeline/database/layout.py: every per-chunk array of a split is a set
of `.npy` shards listed in the manifest; the retriever named by the manifest
(data_pipeline/retrieval) adds its own files: a per-split query array (`keys-XXXXX.npy` or
`bm25_candidates-XXXXX.npy` shards) and search structures. Opening checks every listed file's
header (dtype, shape, size) without reading or mapping its data; `verify()` also compares
every file's sha256 with the manifest's. Arrays are memory-mapped shard by shard when first
read. Any mismatch is a `DataError` that names the file and the command to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.database.layout import (
    CHUNK_ARRAYS,
    DOCUMENTS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    partial_path,
    rebuild_hint,
)
from data_pipeline.errors import DataError
from data_pipeline.fileio import dir_sha256, file_sha256
from data_pipeline.retrieval import Retriever, manifest_kind, retriever_class
from data_pipeline.shards import npy_header, open_rows
from data_pipeline.text.tokenizer import Tokenizer, load_tokenizer


class SplitArrays(NamedTuple):
    """Memory-mapped arrays of one split.

    queries: each chunk's query row for the database's retriever (`Retriever.query_array`:
    float32 [N, dim] keys, or int64 [N, K] BM25 candidates); None when the split has none.
    Each is a np.memmap when the split is one shard, else a `data_pipeline.shards.
    ShardedArray` (indexes like an array; `np.asarray` reads it whole).
    """

    tokens: np.ndarray  # int32 [N, m]
    doc_ids: np.ndarray  # int64 [N]
    queries: np.ndarray | None


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


class RetrievalDatabase:
    """A complete, checked database directory. Open with `RetrievalDatabase.open(path)`.

    Attributes:
      path, manifest, chunk_len (m), embed_dim (key width; 0 without keys),
      retriever_kind: the manifest's retriever ("bert", "bm25", ...);
      retriever_class: its `Retriever` subclass (query array, search).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.chunk_len: int = int(manifest["chunk_len"])
        self.embed_dim: int = int(manifest["embedder"]["dim"])
        self.retriever_kind: str = manifest_kind(manifest)
        self.retriever_class: type[Retriever] = retriever_class(
            self.retriever_kind, where=f"{path / MANIFEST}: retriever")
        self._splits: dict[str, SplitArrays] = {}
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ open + checks
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expect_chunk_len: int | None = None,
        expect_tokenizer_sha256: str | None = None,
        retriever: Retriever | str | None = None,
    ) -> RetrievalDatabase:
        """Open the database at `path` and check it; DataError on any mismatch.

        Args:
          expect_chunk_len: the caller's m (config database.chunk_len).
          expect_tokenizer_sha256: sha256 of the tokenizer the caller uses.
          retriever: the caller's retriever kind (config database.retriever), or a Retriever
            (kind and settings: the database must also be made with its embedder).
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
            raise DataError(f"{manifest_path} is not valid JSON ({e}); {rebuild_hint(path)}") from e
        if manifest.get("format_version") == 1:
            raise DataError(f"{manifest_path}: the database is in the single-file layout of "
                            "format_version 1 (<split>/tokens.npy, doc_ids.npy, keys.npy); "
                            f"this version reads the sharded layout (format_version "
                            f"{FORMAT_VERSION}, <split>/tokens-00000.npy, ... with checksums "
                            f"in the manifest): {rebuild_hint(path)}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                            f"this code reads {FORMAT_VERSION}; {rebuild_hint(path)}")
        if manifest.get("complete") is not True:
            raise DataError(f"{manifest_path}: the database is not complete; {rebuild_hint(path)}")
        db = cls(path, manifest)
        if retriever is not None:
            db.check_retriever(retriever)
        db.check_expectations(expect_chunk_len, expect_tokenizer_sha256)
        db._check_files()
        return db

    def check_retriever(self, retriever: Retriever | str) -> None:
        """DataError unless the database was built by a retriever of this kind (a name), or of
        `retriever`'s kind and settings (the same embedder, for frozen-BERT keys)."""
        kind = retriever if isinstance(retriever, str) else retriever.kind
        if kind != self.retriever_kind:
            raise DataError(
                f"{self.path / MANIFEST}: the database was built for retriever "
                f"{self.retriever_kind!r} (manifest \"retriever\"), the config has "
                f"database.retriever={kind!r}; set "
                f"database.retriever={self.retriever_kind!r} to use this database, or rebuild it "
                f"for {kind!r}: {rebuild_hint(self.path)} (or point database.path at "
                "another directory)")
        if not isinstance(retriever, str):
            retriever.check_database(self.path, self.manifest)

    def check_expectations(self, chunk_len: int | None = None,
                           tokenizer_sha256: str | None = None) -> None:
        """DataError unless the database has chunk length `chunk_len` (config
        database.chunk_len) and was tokenized with `tokenizer_sha256` (None: not checked)."""
        where = self.path / MANIFEST
        if chunk_len is not None and int(chunk_len) != self.chunk_len:
            raise DataError(f"{where}: chunk_len is {self.chunk_len} but the config has "
                            f"database.chunk_len={chunk_len}; use a database built with that "
                            f"chunk length or {rebuild_hint(self.path)}")
        found_sha = self.manifest["tokenizer"]["sha256"]
        if tokenizer_sha256 is not None and tokenizer_sha256 != found_sha:
            raise DataError(f"{where}: the database was tokenized with tokenizer sha256 "
                            f"{found_sha[:12]}..., the caller uses {tokenizer_sha256[:12]}...; "
                            f"use the database's tokenizer.model or {rebuild_hint(self.path)}")

    def _check_files(self) -> None:
        tok = self.manifest["tokenizer"]
        tok_path = self.path / tok["file"]
        if not tok_path.is_file():
            raise DataError(f"{tok_path} is missing; {rebuild_hint(self.path)}")
        if file_sha256(tok_path) != tok["sha256"]:
            raise DataError(f"{tok_path}: sha256 differs from the manifest's (the file was "
                            f"replaced or is corrupt); {rebuild_hint(self.path)}")
        if not (self.path / DOCUMENTS_FILE).is_file():
            raise DataError(f"{self.path / DOCUMENTS_FILE} is missing; {rebuild_hint(self.path)}")
        for split in self.manifest["splits"]:
            self._check_split_files(split)
        self.retriever_class.check_files(self.path, self.manifest)

    def _array_specs(self, split: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, row shape) of the per-chunk arrays a split has."""
        specs = {name: (np.dtype(dtype), (self.chunk_len,) if per_token else ())
                 for name, (dtype, per_token) in CHUNK_ARRAYS.items()}
        if self.retriever_class.has_queries(self.manifest["splits"][split]):
            dtype, width = self.retriever_class.query_array_spec(self.manifest)
            specs[self.retriever_class.query_array] = (np.dtype(dtype), (int(width),))
        return specs

    def _split_shards(self, split: str) -> list[dict]:
        info = self.manifest["splits"][split]
        where = f"{self.path / MANIFEST}: splits.{split}"
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise DataError(f"{where} has no shard list; {rebuild_hint(self.path)}")
        n = int(info["num_chunks"])
        first = 0
        for i, shard in enumerate(shards):
            if int(shard["first_chunk"]) != first:
                raise DataError(f"{where}.shards[{i}] starts at chunk {shard['first_chunk']}, "
                                f"expected {first} (shards must tile the split); "
                                f"{rebuild_hint(self.path)}")
            first += int(shard["num_chunks"])
        if first != n:
            raise DataError(f"{where}: num_chunks is {n} but its shards hold {first} chunks; "
                            f"{rebuild_hint(self.path)}")
        return shards

    def _check_array_file(self, rel: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        file = self.path / rel
        expected = f"{dtype.name} {list(shape)}"
        if not file.is_file():
            raise DataError(f"{file} is missing (expected {expected}); "
                            f"{rebuild_hint(self.path)}")
        try:
            found_shape, found_dtype, _ = npy_header(file)
        except (ValueError, OSError) as e:
            raise DataError(f"{file} is truncated or corrupt ({e}); expected {expected}; "
                            f"{rebuild_hint(self.path)}") from e
        if found_dtype != dtype or found_shape != shape:
            raise DataError(f"{file}: found {found_dtype} {list(found_shape)}, the manifest "
                            f"says {expected}; {rebuild_hint(self.path)}")

    def _check_split_files(self, split: str) -> None:
        specs = self._array_specs(split)
        for i, shard in enumerate(self._split_shards(split)):
            files = shard.get("files", {})
            for name, (dtype, row_shape) in specs.items():
                if name not in files:
                    raise DataError(f"{self.path / MANIFEST}: splits.{split}.shards[{i}] lists "
                                    f"no {name} file; {rebuild_hint(self.path)}")
                self._check_array_file(files[name]["file"], dtype,
                                       (int(shard["num_chunks"]), *row_shape))

    def _open_array(self, split: str, name: str) -> np.ndarray:
        dtype, row_shape = self._array_specs(split)[name]
        shards = self._split_shards(split)
        return open_rows([self.path / s["files"][name]["file"] for s in shards],
                         [int(s["num_chunks"]) for s in shards], dtype, row_shape)

    def _load_split(self, split: str) -> SplitArrays:
        if split not in self._splits:
            specs = self._array_specs(split)
            arrays = {name: self._open_array(split, name) for name in CHUNK_ARRAYS}
            query = self.retriever_class.query_array
            queries = self._open_array(split, query) if query in specs else None
            self._splits[split] = SplitArrays(queries=queries, **arrays)
        return self._splits[split]

    def files(self) -> dict[str, str]:
        """Every file and index directory the manifest lists: relative path -> sha256."""
        out = {self.manifest["tokenizer"]["file"]: self.manifest["tokenizer"]["sha256"]}
        for info in self.manifest["splits"].values():
            for shard in info.get("shards", []):
                for entry in shard.get("files", {}).values():
                    out[entry["file"]] = entry["sha256"]
        for shard in self.manifest.get("shards", []):
            if "sha256" in shard:
                out[shard["dir"]] = shard["sha256"]
        return out

    def verify(self) -> None:
        """Compare the sha256 of every listed file (and index shard directory) with the
        manifest's; DataError naming the files that differ. Reads every byte."""
        bad = []
        for rel, sha in self.files().items():
            path = self.path / rel
            found = dir_sha256(path) if path.is_dir() else (
                file_sha256(path) if path.is_file() else None)
            if found != sha:
                bad.append(rel)
        if bad:
            raise DataError(f"{self.path}: {len(bad)} file(s) differ from the manifest's "
                            f"sha256 ({', '.join(bad[:5])}); {rebuild_hint(self.path)}")

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

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.manifest["tokenizer"]["file"])

    @cached_property
    def documents(self) -> DocumentTable:
        return DocumentTable(self.path / DOCUMENTS_FILE)

    def cached(self, name: str, load: Callable[[], Any]) -> Any:
        """`load()` once per database object (a retriever's searcher or index)."""
        if name not in self._cache:
            self._cache[name] = load()
        return self._cache[name]

    def in_graph_search(self):
        """The candidate search of the database's retriever over its train split: query rows
        (of `split(name).queries`) -> candidate chunk ids, with TensorFlow ops only."""
        return self.cached("in_graph_search",
                           lambda: self.retriever_class.from_settings().in_graph_search(self))

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

    def __repr__(self) -> str:
        sizes = {s: v["num_chunks"] for s, v in self.manifest["splits"].items()}
        return (f"RetrievalDatabase({str(self.path)!r}, m={self.chunk_len}, "
                f"retriever={self.retriever_kind!r}, chunks={sizes})")
