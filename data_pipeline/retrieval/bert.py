"""The "bert" retriever: frozen-BERT chunk keys searched by L2 in sharded ScaNN indexes
(the paper's retriever).

Files (relative to the database):
    <split>/keys-XXXXX.npy  float32 [n_i, dim]  the keys of chunk shard i of every split
    index/shard_XXXXX/      one ScaNN searcher over train shard i (the same chunks)

Build stages, each a set of independent units (data_pipeline/resumable.py) that the build's
runner executes in this process or on Apache Beam workers:
    keys    one unit per chunk shard of every split: chunks decoded to text and embedded in
            blocks of `key_block_chunks` (a finished block survives a kill), assembled into
            the shard's keys file; the embedder is loaded once per worker (`setup`) and uses
            that worker's local devices;
    index   one unit per train shard: a ScaNN searcher (IndexParams scaled to its size), then
            the shard's part of recall@10 on held-out queries (validation or test keys when
            there are any, else train keys plus noise);
    recall  in the driver: the parts merged as the sharded search merges (`merged_recall`);
            below `index.recall_floor` the build stops with the knob to raise, and a rerun
            with more `index.num_leaves_to_search` rebuilds only the index.
A chunk's query at read time is its key; `in_graph_search` is ScaNN's TF op over the shards
(exact merge of the per-shard top-k); `search_parts` hands the shards out one by one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.resumable import (
    STATE_DIR,
    Stage,
    Unit,
    completed,
    event,
    fingerprint,
    output_sha256,
    record,
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
from data_pipeline.shards import (
    DEFAULT_SHARD_ROWS,
    shard_file,
    temporary_path,
    write_npy_atomic,
)

KEYS = "keys"  # the query array: <split>/keys-XXXXX.npy
INDEX_DIR = "index"
RECALL_DIR = f"{STATE_DIR}/recall"  # recall parts and queries (build state, removed at the end)
RECALL_K = 10
DEFAULT_SHARD_CHUNKS = DEFAULT_SHARD_ROWS
_HINT = ("rebuild it: retro-jax build-db --config <experiment> --workdir <workdir> --force "
         "(database {path})")


class Embedder(Protocol):
    """What the key stage needs: a name (recorded in the manifest), the key width, and
    `embed(texts) -> float32 [N, dim]` in input order (ChunkEmbedder, or a test stand-in)."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EmbedderSettings:
    """How to make the frozen-BERT embedder (the keys of a config's `embedder` section).

    name: recorded in the database manifest (a database is searched only with its own
      embedder's keys); path: a Hugging Face BERT directory, "" = the default
      all-MiniLM-L6-v2 (`data_pipeline.retrieval.embed.default_embedder_path()`);
    batch_size, max_wordpieces, dtype: as `ChunkEmbedder` takes them.
    """

    name: str = "all-MiniLM-L6-v2"
    path: str = ""
    batch_size: int = 64
    max_wordpieces: int = 256
    dtype: str = "float32"

    def create(self, *, batch_size: int | None = None, mesh=None):
        """A ChunkEmbedder (weights loaded, nothing compiled yet) on this process's local
        devices (or `mesh`)."""
        from data_pipeline.retrieval.embed import ChunkEmbedder, default_embedder_path

        return ChunkEmbedder(self.path or default_embedder_path(),
                             batch_size=batch_size or self.batch_size,
                             max_wordpieces=self.max_wordpieces, dtype=self.dtype,
                             name=self.name, mesh=mesh)

    def dim(self) -> int:
        """The key width (BERT's hidden size), read from config.json without loading the
        weights (the driver of a Beam build never loads the model)."""
        from data_pipeline.retrieval.embed import default_embedder_path

        config = Path(self.path or default_embedder_path()) / "config.json"
        try:
            return int(json.loads(config.read_text())["hidden_size"])
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{config}: cannot read the embedder's hidden_size ({e}); "
                            "embedder.path must be a Hugging Face BERT directory") from e


def shard_dir_name(shard_index: int) -> str:
    return f"{INDEX_DIR}/shard_{shard_index:05d}"


class _ScannSearch:
    """`InGraphSearch` over a database's ScaNN shards."""

    max_candidates = None

    def __init__(self, searcher):
        self.searcher = searcher

    def candidates_tf(self, query_rows, k: int):
        return self.searcher.search_tf(query_rows, k)[0]


@dataclasses.dataclass(frozen=True)
class _IndexShardPart:
    """`SearchPart`: one ScaNN shard of a database."""

    key: tuple
    dir: str
    first_chunk: int

    def load(self, db: Any):
        from data_pipeline.retrieval.scann import ShardSearcher

        return ShardSearcher.load(Path(db.path) / self.dir, self.first_chunk)


# ---------------------------------------------------------------------------- build stages
def _embed_fn(embedder):
    """embedder.embed without its own progress bar (the stage has one)."""
    if "progress" in inspect.signature(embedder.embed).parameters:
        return functools.partial(embedder.embed, progress=False)
    return embedder.embed


class KeyStage(Stage):
    """Keys of one chunk shard per unit, embedded block by block."""

    name = "keys"

    def __init__(self, settings: EmbedderSettings | None, embedder: Embedder | None, *,
                 block_rows: int, tokenizer_file: str):
        self.settings, self.embedder = settings, embedder
        self.block_rows, self.tokenizer_file = int(block_rows), tokenizer_file
        self._loaded: dict[str, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_loaded": {}}

    def setup(self, root: Path) -> None:
        from data_pipeline.text.tokenizer import load_tokenizer

        if not self._loaded:
            embedder = self.embedder if self.embedder is not None else self.settings.create()
            self._loaded = {"tokenizer": load_tokenizer(Path(root) / self.tokenizer_file),
                            "embed": _embed_fn(embedder)}

    def run(self, unit: Unit, root: Path) -> dict:
        args = unit.args
        tokens = np.load(Path(root) / args["tokens"], mmap_mode="r")
        tokenizer, embed = self._loaded["tokenizer"], self._loaded["embed"]

        def compute(first: int, count: int) -> np.ndarray:
            return embed([tokenizer.decode(row) for row in np.asarray(tokens[first:first + count])])

        write_blocked_rows(Path(root) / unit.outputs[0], num_rows=int(args["count"]),
                           row_shape=(int(args["dim"]),), dtype=np.float32,
                           block_rows=self.block_rows,
                           staging=staging_dir(root, unit),
                           event_prefix=unit.name, compute=compute)
        return {}


class IndexStage(Stage):
    """Per train shard: its ScaNN searcher (reused when an earlier run built it from the same
    keys and settings), then its part of recall@10 on the held-out queries (one stage, so a
    worker loads TensorFlow and ScaNN once for both)."""

    name = "index"

    def __init__(self, index_settings: Mapping[str, Any]):
        self.index_settings = dict(index_settings)

    def run(self, unit: Unit, root: Path) -> dict:
        from data_pipeline.retrieval.scann import (
            IndexParams,
            ShardSearcher,
            build_shard,
            shard_recall_part,
        )

        root = Path(root)
        args = unit.args
        keys = np.load(root / args["keys"], mmap_mode="r")
        params = IndexParams.for_size(int(args["count"]), **self.index_settings)
        index_unit = Unit(name=f"{unit.name}/searcher", inputs=args["index_inputs"],
                          outputs=(unit.outputs[0],))
        if completed(index_unit, root) is None:
            searcher = build_shard(keys, params, first_chunk=int(args["first"]))
            event(f"{unit.name}/built")
            target = root / unit.outputs[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(target)
            searcher.save(tmp)
            event(f"{unit.name}/saved")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            record(index_unit, root, {})
        searcher = ShardSearcher.load(root / unit.outputs[0], int(args["first"]))
        queries = np.load(root / args["queries"], allow_pickle=False)
        part = shard_recall_part(searcher, keys, queries, k=RECALL_K)
        target = root / unit.outputs[1]
        tmp = temporary_path(target)
        with open(tmp, "wb") as f:
            np.savez(f, **part)
        os.replace(tmp, target)
        return {"params": params.to_json()}


@register
class BertRetriever(Retriever):
    """Frozen-BERT keys + sharded ScaNN.

    Args:
      embedder: EmbedderSettings, or an embedder object (`Embedder`) to use as it is (it is
        pickled to Beam workers).
      index: index settings (a config's `index` section: IndexParams fields; -1 = scaled).
      key_block_chunks: chunks per resumable block of keys (default: 16 embedder batches,
        at least 1024).
    The index has one shard per chunk shard of the train split (`database.shard_chunks`).
    """

    kind = "bert"
    query_array = KEYS
    portable_queries = True

    def __init__(self, embedder: EmbedderSettings | Embedder | None = None, *,
                 index: Mapping[str, Any] | None = None,
                 key_block_chunks: int | None = None, **_: Any):
        self.embedder_settings = embedder if isinstance(embedder, EmbedderSettings) else None
        self._given_embedder = None if isinstance(embedder, EmbedderSettings) else embedder
        self._embedder = self._given_embedder
        if embedder is None:
            self.embedder_settings = EmbedderSettings()
        self.index_settings = dict(index or {})
        batch = self.embedder_settings.batch_size if self.embedder_settings else 64
        self.key_block_chunks = int(key_block_chunks or max(1024, 16 * batch))

    @classmethod
    def from_settings(cls, *, embedder: EmbedderSettings | Embedder | None = None,
                      index: Mapping[str, Any] | None = None,
                      block_rows: int | None = None, **_: Any) -> BertRetriever:
        return cls(embedder, index=index, key_block_chunks=block_rows)

    @property
    def embedder_name(self) -> str:
        return self._embedder.name if self._embedder is not None else self.embedder_settings.name

    @property
    def embedder_dim(self) -> int:
        if self._embedder is not None:
            return int(self._embedder.dim)
        return self.embedder_settings.dim()

    def embedder(self, **create_args: Any) -> Embedder:
        """The embedder (created from the settings on first use)."""
        if self._embedder is None:
            self._embedder = self.embedder_settings.create(**create_args)
        return self._embedder

    # ------------------------------------------------------------------ build
    def build(self, inputs: BuildInputs) -> RetrieverFiles:
        directory, runner = Path(inputs.directory), inputs.runner
        name, dim = self.embedder_name, self.embedder_dim
        settings = (dict(vars(self.embedder_settings)) if self.embedder_settings is not None
                    else {})
        embedder_fp = {"name": name, **settings, "dim": dim, "block_chunks": self.key_block_chunks}
        key_units = {
            split: [Unit(name=f"keys/{split}/shard_{i:05d}",
                         inputs=fingerprint({"tokens": inputs.chunk_sha256(split, i)["tokens"],
                                             "embedder": embedder_fp}),
                         outputs=(f"{split}/{shard_file(KEYS, i)}",),
                         args={"tokens": shard["files"]["tokens"]["file"],
                               "count": int(shard["num_chunks"]), "dim": dim},
                         size=int(shard["num_chunks"]))
                    for i, shard in enumerate(inputs.shards(split))]
            for split in inputs.splits}
        stage = KeyStage(self.embedder_settings if self._given_embedder is None else None,
                         self._given_embedder, block_rows=self.key_block_chunks,
                         tokenizer_file=inputs.tokenizer_file)
        key_markers = runner.run(stage, [u for units in key_units.values() for u in units],
                                 directory)
        key_files = {split: [{KEYS: {"file": u.outputs[0],
                                     "sha256": output_sha256(key_markers[u.name], u.outputs[0])}}
                             for u in units] for split, units in key_units.items()}
        inputs.lap("keys")

        queries, source = self._recall_queries(inputs, key_files)
        queries_rel = f"{RECALL_DIR}/queries.npy"
        write_npy_atomic(directory / queries_rel, queries)
        queries_fp = hashlib.sha256(np.ascontiguousarray(queries).tobytes()).hexdigest()
        index_units = []
        for i, shard in enumerate(inputs.shards("train")):
            keys = key_files["train"][i][KEYS]
            index_inputs = fingerprint({"keys": keys["sha256"], "index": self.index_settings,
                                        "first": int(shard["first_chunk"]),
                                        "count": int(shard["num_chunks"])})
            index_units.append(Unit(
                name=f"index/shard_{i:05d}",
                inputs=fingerprint({"index": index_inputs, "queries": queries_fp,
                                    "k": RECALL_K}),
                outputs=(shard_dir_name(i), f"{RECALL_DIR}/shard_{i:05d}.npz"),
                args={"keys": keys["file"], "first": int(shard["first_chunk"]),
                      "count": int(shard["num_chunks"]), "index_inputs": index_inputs,
                      "queries": queries_rel},
                size=int(shard["num_chunks"])))
        index_markers = runner.run(IndexStage(self.index_settings), index_units, directory)
        shards = [{"first_chunk": u.args["first"], "num_chunks": u.args["count"],
                   "dir": u.outputs[0], "sha256": output_sha256(index_markers[u.name],
                                                                u.outputs[0])}
                  for u in index_units]
        # Shards of an earlier attempt with another shard size would otherwise ship as orphans.
        wanted = {directory / s["dir"] for s in shards}
        for stale in (directory / INDEX_DIR).glob("shard_*"):
            if stale not in wanted:
                shutil.rmtree(stale)
        inputs.lap("index")

        recall = self._recall(directory, index_units, shards, queries, source)
        inputs.lap("recall")
        params = index_markers[index_units[0].name]["params"] if index_units else {}
        return RetrieverFiles(
            manifest={"embedder": {"name": str(name), "dim": int(dim)}, "shards": shards,
                      "index": {"params": params, **recall}},
            split_flags={"has_keys": True}, shard_files=key_files)

    @classmethod
    def owned_paths(cls, splits: Sequence[str]) -> list[str]:
        return [INDEX_DIR, *(f"{split}/{KEYS}-*.npy" for split in splits)]

    def _recall_queries(self, inputs: BuildInputs, key_files: dict) -> tuple[np.ndarray, str]:
        """Held-out queries: a sample of the first evaluation split with keys, else noisy
        train keys (deterministic)."""
        from data_pipeline.retrieval.scann import IndexParams, noisy_queries
        from data_pipeline.shards import open_rows

        def keys_of(split):
            files = key_files[split]
            return open_rows([inputs.directory / f[KEYS]["file"] for f in files],
                             [int(s["num_chunks"]) for s in inputs.shards(split)], np.float32,
                             (self.embedder_dim,))

        recall_sample = int(IndexParams.for_size(1, **self.index_settings).recall_sample)
        source = next((s for s in inputs.splits if s != "train"
                       and sum(int(x["num_chunks"]) for x in inputs.shards(s)) > 0), None)
        if source is not None:
            held_out = keys_of(source)
            rng = np.random.default_rng(0)
            count = min(recall_sample, held_out.shape[0])
            rows = np.sort(rng.choice(held_out.shape[0], size=count, replace=False))
            return np.asarray(held_out[rows], dtype=np.float32), source
        return noisy_queries(keys_of("train"), recall_sample, seed=0), "train+noise"

    def _recall(self, directory: Path, units: list[Unit], shards: list[dict],
                queries: np.ndarray, source: str) -> dict:
        """recall@10 of the sharded search against exact search on held-out keys, merged here
        from the index units' parts."""
        from data_pipeline.retrieval.scann import IndexParams, check_recall, merged_recall

        def parts():
            for unit in units:
                with np.load(directory / unit.outputs[1], allow_pickle=False) as part:
                    yield {key: part[key] for key in part.files}

        recall = merged_recall(parts(), queries, k=RECALL_K)
        # The largest shard's parameters name the knob to raise in the error message.
        largest = max(shards, key=lambda s: s["num_chunks"])
        check_recall(recall, IndexParams.for_size(largest["num_chunks"], **self.index_settings),
                     where=f"index of {directory} ({len(queries)} {source} queries)")
        return {"recall_at_10": round(recall, 6), "recall_queries": int(len(queries)),
                "recall_query_source": source}

    # ------------------------------------------------------------------ read
    @classmethod
    def query_array_spec(cls, manifest: Mapping) -> tuple[np.dtype, int]:
        return np.dtype(np.float32), int(manifest["embedder"]["dim"])

    @classmethod
    def has_queries(cls, split_entry: Mapping) -> bool:
        return bool(split_entry.get("has_keys", True))

    @classmethod
    def check_files(cls, path: Path, manifest: Mapping) -> None:
        for shard in manifest.get("shards", []):
            shard_path = path / shard["dir"]
            if not shard_path.is_dir() or not any(shard_path.iterdir()):
                raise DataError(f"index shard {shard_path} is missing or empty; "
                                + _HINT.format(path=path))

    @classmethod
    def describe(cls, manifest: Mapping) -> str:
        index = manifest["index"]
        return (f"index      {len(manifest['shards'])} ScaNN shard(s) over "
                f"{manifest['embedder']['name']} keys, recall@10 {index.get('recall_at_10')} "
                f"({index.get('recall_query_source')})")

    def check_database(self, path: Path, manifest: Mapping) -> None:
        found = manifest["embedder"]
        if self.embedder_name != found["name"]:
            raise DataError(f"{path / 'manifest.json'}: keys were made by embedder "
                            f"{found['name']!r}, the config has embedder.name="
                            f"{self.embedder_name!r}; " + _HINT.format(path=path))
        dim = getattr(self._embedder, "dim", None)
        if dim is not None and int(dim) != int(found["dim"]):
            raise DataError(f"{path / 'manifest.json'}: keys have dim {found['dim']}, the "
                            f"embedder gives {dim}; " + _HINT.format(path=path))

    def in_graph_search(self, db: Any) -> _ScannSearch:
        return _ScannSearch(db.cached("scann", lambda: load_searcher(db.path,
                                                                      db.manifest["shards"])))

    def search_parts(self, db: Any) -> list[_IndexShardPart]:
        return [_IndexShardPart(key=("index", i), dir=s["dir"], first_chunk=int(s["first_chunk"]))
                for i, s in enumerate(db.manifest["shards"])]

    def text_search(self, db: Any) -> TextSearch:
        searcher = self.in_graph_search(db).searcher
        if self._embedder is None:
            # Live queries come one chunk at a time: a batch of one on one local device.
            import jax
            from jax.sharding import Mesh

            self._embedder = self.embedder_settings.create(
                batch_size=1, mesh=Mesh(np.array(jax.local_devices()[:1]), ("data",)))
        embedder = self._embedder

        def search(texts: Sequence[str], k: int) -> np.ndarray:
            keys = np.asarray(embedder.embed(list(texts)), np.float32)  # [Q, dim]
            return np.asarray(searcher.search(keys, k)[0], np.int64)

        return search


def load_searcher(directory: Path, shards: Sequence[Mapping]):
    """A ShardedSearcher over the shards of a manifest's (or a build's) shard table."""
    from data_pipeline.retrieval.scann import ShardedSearcher, ShardSearcher

    if not shards:
        raise DataError(f"{Path(directory) / 'manifest.json'}: the database has no index "
                        "shards; " + _HINT.format(path=directory))
    return ShardedSearcher([ShardSearcher.load(Path(directory) / s["dir"], s["first_chunk"])
                            for s in shards])
