"""The "bert" retriever: frozen-BERT chunk keys searched by L2 in sharded ScaNN indexes
(the paper's retriever).

Files (relative to the database):
    <split>/keys.npy        float32 [num_chunks, dim]  the key of every chunk of every split
    index/shard_XXXXX/      one ScaNN searcher per `shard_chunks` contiguous train chunks

Build stages (each resumable, data_pipeline/resumable.py):
    keys    chunks decoded to text, embedded block by block (`key_block_chunks` per block);
    index   one shard per `shard_chunks` train chunks (IndexParams scaled to its size);
    recall  recall@10 of the sharded search against exact search on held-out keys
            (validation or test keys when there are any, else train keys plus noise); below
            `index.recall_floor` the build stops with the knob to raise, and a rerun with more
            `index.num_leaves_to_search` rebuilds only the index.
A chunk's query at read time is its key; `in_graph_search` is ScaNN's TF op over the shards
(exact merge of the per-shard top-k).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

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

KEYS_FILE = "keys.npy"
INDEX_DIR = "index"
DEFAULT_SHARD_CHUNKS = 4_000_000
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
        """A ChunkEmbedder (weights loaded, nothing compiled yet)."""
        from data_pipeline.retrieval.embed import ChunkEmbedder, default_embedder_path

        return ChunkEmbedder(self.path or default_embedder_path(),
                             batch_size=batch_size or self.batch_size,
                             max_wordpieces=self.max_wordpieces, dtype=self.dtype,
                             name=self.name, mesh=mesh)


def shard_dir_name(shard_index: int) -> str:
    return f"{INDEX_DIR}/shard_{shard_index:05d}"


class _ScannSearch:
    """`InGraphSearch` over a database's ScaNN shards."""

    max_candidates = None

    def __init__(self, searcher):
        self.searcher = searcher

    def candidates_tf(self, query_rows, k: int):
        return self.searcher.search_tf(query_rows, k)[0]


@register
class BertRetriever(Retriever):
    """Frozen-BERT keys + sharded ScaNN.

    Args:
      embedder: EmbedderSettings, or an embedder object (`Embedder`) to use as it is.
      index: index settings (a config's `index` section: IndexParams fields; -1 = scaled).
      shard_chunks: train chunks per index shard.
      key_block_chunks: chunks per resumable block of keys (default: 16 embedder batches,
        at least 1024).
    """

    kind = "bert"
    query_array = "keys"
    portable_queries = True

    def __init__(self, embedder: EmbedderSettings | Embedder | None = None, *,
                 index: Mapping[str, Any] | None = None,
                 shard_chunks: int = DEFAULT_SHARD_CHUNKS,
                 key_block_chunks: int | None = None):
        self.embedder_settings = embedder if isinstance(embedder, EmbedderSettings) else None
        self._embedder = None if isinstance(embedder, EmbedderSettings) else embedder
        if embedder is None:
            self.embedder_settings = EmbedderSettings()
        self.index_settings = dict(index or {})
        self.shard_chunks = int(shard_chunks)
        batch = self.embedder_settings.batch_size if self.embedder_settings else 64
        self.key_block_chunks = int(key_block_chunks or max(1024, 16 * batch))

    @classmethod
    def from_settings(cls, *, embedder: EmbedderSettings | Embedder | None = None,
                      index: Mapping[str, Any] | None = None,
                      shard_chunks: int = DEFAULT_SHARD_CHUNKS,
                      block_rows: int | None = None, **_: Any) -> BertRetriever:
        return cls(embedder, index=index, shard_chunks=shard_chunks, key_block_chunks=block_rows)

    @property
    def embedder_name(self) -> str:
        return self._embedder.name if self._embedder is not None else self.embedder_settings.name

    def embedder(self, **create_args: Any) -> Embedder:
        """The embedder (created from the settings on first use)."""
        if self._embedder is None:
            self._embedder = self.embedder_settings.create(**create_args)
        return self._embedder

    # ------------------------------------------------------------------ build
    def build(self, inputs: BuildInputs) -> RetrieverFiles:
        embedder = self.embedder()
        keys_fp = {split: self._stage_keys(inputs, embedder, split) for split in inputs.splits}
        inputs.lap("keys")
        shards = self._stage_index(inputs, keys_fp["train"])
        inputs.lap("index")
        recall = self._stage_recall(inputs.directory, shards,
                                    [s for s in inputs.splits if s != "train"])
        inputs.lap("recall")
        return RetrieverFiles(
            manifest={"embedder": {"name": str(embedder.name), "dim": int(embedder.dim)},
                      "shards": [{"first_chunk": s["first_chunk"], "num_chunks": s["num_chunks"],
                                  "dir": s["dir"]} for s in shards],
                      "index": {"params": shards[0]["params"] if shards else {}, **recall}},
            split_flags={"has_keys": True})

    @classmethod
    def owned_paths(cls, splits: Sequence[str]) -> list[str]:
        return [INDEX_DIR, *(f"{split}/{KEYS_FILE}" for split in splits)]

    def _stage_keys(self, inputs: BuildInputs, embedder: Embedder, split: str) -> str:
        """Embed a split's chunks into <split>/keys.npy block by block; returns the keys'
        fingerprint (sha256 over the block checksums)."""
        tokens = inputs.tokens(split)
        # One bar for the stage: the embedder's own per-call bar is turned off.
        takes_progress = "progress" in inspect.signature(embedder.embed).parameters
        embed = (functools.partial(embedder.embed, progress=False) if takes_progress
                 else embedder.embed)

        def compute(rows: slice) -> np.ndarray:
            return embed(inputs.texts(tokens[rows]))

        settings = (dict(vars(self.embedder_settings)) if self.embedder_settings is not None
                    else {})
        block_inputs = fingerprint({"tokens": inputs.chunk_sha256[split]["tokens"],
                                    "embedder": {"name": embedder.name, **settings},
                                    "dim": embedder.dim, "block_chunks": self.key_block_chunks})
        return write_row_blocks(inputs.directory / split / KEYS_FILE,
                                shape=(int(tokens.shape[0]), embedder.dim), dtype=np.float32,
                                inputs=block_inputs, block_rows=self.key_block_chunks,
                                markers=inputs.markers, name=f"keys_{split}",
                                event_prefix=f"keys/{split}", compute=compute,
                                desc=f"keys {split}")

    def _stage_index(self, inputs: BuildInputs, keys_fingerprint: str) -> list[dict]:
        """One ScaNN searcher per `shard_chunks` contiguous train chunks."""
        from data_pipeline.retrieval.scann import IndexParams, build_shard

        directory, markers = inputs.directory, inputs.markers
        keys = np.load(directory / "train" / KEYS_FILE, mmap_mode="r")
        n = keys.shape[0]
        shards = []
        bar = progress(n, "index", "chunk")
        for i, first in enumerate(range(0, n, self.shard_chunks)):
            count = min(self.shard_chunks, n - first)
            rel = shard_dir_name(i)
            params = IndexParams.for_size(count, **self.index_settings)
            unit = fingerprint({"keys": keys_fingerprint, "index": self.index_settings,
                                "first": first, "count": count})
            target = directory / rel
            marker = markers.get(f"shard_{i:05d}", unit)
            if not (marker and target.is_dir() and dir_sha256(target) == marker["sha256"]):
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(exist_ok=True)
                searcher = build_shard(keys[first:first + count], params, first_chunk=first)
                event(f"index/shard_{i:05d}/built")
                searcher.save(target)
                event(f"index/shard_{i:05d}/saved")
                marker = markers.put(f"shard_{i:05d}", unit, sha256=dir_sha256(target),
                                     params=params.to_json())
            shards.append({"first_chunk": first, "num_chunks": count, "dir": rel,
                           "params": marker.get("params", {})})
            bar.update(count)
        bar.close()
        # Shards of an earlier attempt with another shard size would otherwise ship as orphans.
        wanted = {directory / s["dir"] for s in shards}
        for stale in (directory / INDEX_DIR).glob("shard_*"):
            if stale not in wanted:
                shutil.rmtree(stale)
        return shards

    def _stage_recall(self, directory: Path, shards: list[dict], eval_splits) -> dict:
        """recall@10 of the sharded search against exact search on held-out keys."""
        from data_pipeline.retrieval.scann import (
            IndexParams,
            check_recall,
            measure_recall,
            noisy_queries,
        )

        train_keys = np.load(directory / "train" / KEYS_FILE, mmap_mode="r")
        source = next((s for s in eval_splits
                       if np.load(directory / s / KEYS_FILE, mmap_mode="r").shape[0] > 0), None)
        recall_sample = int(IndexParams.for_size(1, **self.index_settings).recall_sample)
        if source is not None:
            held_out = np.load(directory / source / KEYS_FILE, mmap_mode="r")
            rng = np.random.default_rng(0)
            count = min(recall_sample, held_out.shape[0])
            rows = np.sort(rng.choice(held_out.shape[0], size=count, replace=False))
            queries = np.asarray(held_out[rows], dtype=np.float32)
        else:
            queries = noisy_queries(train_keys, recall_sample, seed=0)
            source = "train+noise"
        searcher = load_searcher(directory, shards)
        recall = float(measure_recall(searcher, train_keys, queries, k=10))
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
