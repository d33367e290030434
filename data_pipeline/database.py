"""The retrieval database directory: its manifest, a reader that checks it, and a writer.

Layout (docs/ARCHITECTURE.md, "Retrieval database directory"):

    <db>/manifest.json          what is in the directory; checked on every open
    <db>/tokenizer.model        SentencePiece model (sha256 in the manifest)
    <db>/documents.jsonl        one row per document (doc_id, id, title, source, split, ...)
    <db>/<split>/tokens.npy     int32 [num_chunks, m], pad 0
    <db>/<split>/doc_ids.npy    int64 [num_chunks]
    <db>/<split>/keys.npy       float32 [num_chunks, dim]
    <db>/index/shard_XXXXX/     ScaNN searcher over train chunks [first, first + num)

`RetrievalDatabase.open` reads the manifest and checks every file it names (present, the
right dtype and shape, not truncated) and the caller's expectations (chunk length,
tokenizer, embedder); any mismatch is a `DataError` that names the file and the command to
run. `DatabaseWriter` writes a database into `<db>.partial/` and renames it into place; the
build (data_pipeline/build.py) streams large arrays into the same layout, tests write small
databases with `write_split`.

The manifest holds no timestamps, so two builds of the same inputs are byte-identical;
build timings go to `<db>/build_times.json`, which nothing checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
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
}


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
        self._splits: dict[str, SplitArrays] = {}
        self._searcher = None

    # ------------------------------------------------------------------ open + checks
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expect_chunk_len: int | None = None,
        expect_tokenizer_sha256: str | None = None,
        expect_embedder: str | tuple[str, int] | Mapping | None = None,
    ) -> RetrievalDatabase:
        """Open the database at `path` and check it; DataError on any mismatch.

        Args:
          expect_chunk_len: the caller's m (config database.chunk_len).
          expect_tokenizer_sha256: sha256 of the tokenizer the caller uses.
          expect_embedder: embedder name, (name, dim) or {"name", "dim"} the caller uses.
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
        db._check_expectations(expect_chunk_len, expect_tokenizer_sha256, expect_embedder)
        db._check_files()
        return db

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
        if embedder is not None:
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

    def searcher(self):
        """A ShardedSearcher over the train split's index shards (loaded once, cached)."""
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


# ---------------------------------------------------------------------- writer
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
    ):
        self.path = Path(path)
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
                     num_bytes: int | None = None) -> None:
        """Enter a split whose arrays are already in `split_dir(split)`; counts not given are
        computed in `finish()` from documents.jsonl."""
        self._splits[split] = {"num_chunks": int(num_chunks), "has_keys": bool(has_keys),
                               "num_documents": num_documents, "num_tokens": num_tokens,
                               "num_bytes": num_bytes}

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
        return {
            "format_version": FORMAT_VERSION,
            "chunk_len": self.chunk_len,
            "tokenizer": self.tokenizer_info,
            "embedder": self.embedder,
            "splits": splits,
            "shards": list(self._shards),
            "index": self.index_info,
            "corpus": self.corpus,
            "dedup": self.dedup_info,
            "complete": True,
        }

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
