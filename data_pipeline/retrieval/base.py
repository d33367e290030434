"""The Retriever interface: how a database's chunks are keyed at build time and how chunks
and texts find their neighbours at read time. One implementation per kind, registered by
name; a database's manifest names its kind, a config's `database.retriever` names the kind to
build.

    retriever = make_retriever("bert", embedder=EmbedderSettings(...), index={...})
    sections = retriever.build(BuildInputs(...))      # writes its files, returns manifest fields
    search = retriever.in_graph_search(db)            # TF op: query rows -> candidate chunk ids
    parts = retriever.search_parts(db)                # the same search, fanned out (precompute)
    ids = retriever.text_search(db)(texts, k)         # live queries (sampling)

What every kind provides:
- build: its files in the database directory (keys + ScaNN shards; a BM25 index + candidate
  tables) as stages of independent units (`data_pipeline.resumable.Stage`), run by the
  runner the build was given (one process, or Apache Beam: the stages do not know which),
  and its manifest sections; per-chunk arrays are sharded like the chunk arrays;
- the query of a chunk: a row of a per-split array (`query_array`: frozen-BERT keys, or the
  chunk's BM25 candidate ids), gathered in the tf.data graph;
- `in_graph_search`: candidate chunk ids for those rows with TensorFlow ops only (ScaNN's TF
  op, or a slice of the candidate row), in best-first order, so the input pipeline's filters
  (same document, excluded documents) and neighbour gather are the same for every kind;
- `search_parts`: the in-graph search cut into independently loadable parts (one per ScaNN
  shard) whose results, merged by distance, are the in-graph search's: precomputed neighbours
  fan a query block out over the parts (on Beam workers that each hold one index shard);
- `text_search`: neighbours of arbitrary text (a chunk generated while sampling).

A third retriever (a trained dual encoder, say) is a new module with a `Retriever` subclass
passed to `register`; nothing else changes.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.resumable import fingerprint
from data_pipeline.shards import open_rows

DEFAULT_KIND = "bert"  # a manifest without "retriever" was built with frozen-BERT keys


class Decoder(Protocol):
    """What the retrievers need of the tokenizer: token ids -> text."""

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """What the database build hands a retriever once the chunk arrays are written.

    Attributes:
      directory: the database being written (`<db>.partial/`).
      splits: split names, "train" first (the train split is what is searched).
      tokenizer: decodes chunk tokens to text (what keys are made from), in the driver.
      tokenizer_file: the tokenizer model relative to `directory` (workers load it).
      chunk_shards: split -> its shard table [{first_chunk, num_chunks, files: {"tokens":
        {file, sha256}, "doc_ids": {...}}}] (files relative to `directory`): a retriever's
        per-chunk arrays are cut the same way, and index shard i covers train shard i.
      runner: runs the retriever's stages (`data_pipeline.resumable.LocalRunner` or
        `data_pipeline.beam_runner.BeamRunner`): `runner.run(stage, units, directory)`.
      lap: called with a stage name when that stage is done (the build's stage timings).
    """

    directory: Path
    splits: tuple[str, ...]
    tokenizer: Decoder
    chunk_shards: Mapping[str, Sequence[Mapping]]
    runner: Any
    tokenizer_file: str = "tokenizer.model"
    lap: Callable[[str], None] = lambda stage: None

    def shards(self, split: str) -> list[Mapping]:
        return list(self.chunk_shards[split])

    def chunk_sha256(self, split: str, shard: int) -> dict[str, str]:
        """{"tokens": sha256, "doc_ids": sha256} of one chunk shard."""
        files = self.chunk_shards[split][shard]["files"]
        return {name: entry["sha256"] for name, entry in files.items()}

    def split_fingerprint(self, split: str) -> str:
        """Fingerprint of a split's chunk arrays (every shard's checksums)."""
        return fingerprint([self.chunk_sha256(split, i)
                            for i in range(len(self.chunk_shards[split]))])

    def _array(self, split: str, name: str, dtype, row_shape: tuple[int, ...]):
        shards = self.chunk_shards[split]
        return open_rows([self.directory / s["files"][name]["file"] for s in shards],
                         [int(s["num_chunks"]) for s in shards], dtype, row_shape)

    def tokens(self, split: str):
        """int32 [N, m] chunk tokens of a split (memory-mapped shards)."""
        shards = self.chunk_shards[split]
        if not shards:
            return np.zeros((0, 0), np.int32)
        first = np.load(self.directory / shards[0]["files"]["tokens"]["file"], mmap_mode="r")
        return self._array(split, "tokens", np.int32, (int(first.shape[1]),))

    def doc_ids(self, split: str):
        """int64 [N] document ids of a split's chunks."""
        return self._array(split, "doc_ids", np.int64, ())

    def texts(self, tokens: np.ndarray) -> list[str]:
        """Detokenized chunk texts of token rows [n, m] (padding dropped)."""
        return [self.tokenizer.decode(row) for row in np.asarray(tokens)]


@dataclasses.dataclass(frozen=True)
class RetrieverFiles:
    """What a build wrote, for the manifest.

    manifest: top-level manifest sections (e.g. "embedder", "shards", "index", "bm25").
    split_flags: fields added to every split's manifest entry (e.g. {"has_keys": True}).
    shard_files: split -> per chunk shard, {array name: {file, sha256}} of the retriever's
      per-chunk arrays (e.g. "keys"), merged into the split's shard table.
    """

    manifest: dict[str, Any]
    split_flags: dict[str, Any]
    shard_files: dict[str, list[dict[str, dict[str, str]]]] = dataclasses.field(
        default_factory=dict)


class SearchPart(Protocol):
    """One independently loadable part of a database's candidate search (an index shard).

    key: hashable and stable, e.g. ("index", 3); parts are merged in the order
      `search_parts` lists them.
    load(db): an object whose `search(query_rows, k)` gives (candidate ids int64 [Q, k],
      distances float32 [Q, k]): best first, -1 / +inf where fewer.
    """

    key: Hashable

    def load(self, db: Any) -> Any: ...

class InGraphSearch(Protocol):
    """Candidate search inside the tf.data graph.

    max_candidates: most candidates a query can return (None: no limit but the database).
    candidates_tf(query_rows, k): query rows (as gathered from the split's `query_array`)
      -> candidate train chunk ids int64 [Q, k], best first, -1 where fewer.
    """

    max_candidates: int | None

    def candidates_tf(self, query_rows, k: int): ...


TextSearch = Callable[[Sequence[str], int], np.ndarray]  # texts, k -> ids int64 [Q, k]


class Retriever(abc.ABC):
    """One kind of retrieval (see the module docstring). Instances hold build and query
    settings; the database they read is passed to each read-side method."""

    kind: ClassVar[str]
    query_array: ClassVar[str]  # per-split array holding each chunk's query row
    # Whether a query row means the same in another database of this kind (so sequences of
    # one database can retrieve from another): keys of one embedder do, candidate ids do not.
    portable_queries: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, **settings: Any) -> Retriever:
        """An instance from keyword settings (ignoring keywords this kind does not use)."""

    # ------------------------------------------------------------------ build
    @abc.abstractmethod
    def build(self, inputs: BuildInputs) -> RetrieverFiles:
        """Write this retriever's files into `inputs.directory` (resumably)."""

    @classmethod
    @abc.abstractmethod
    def owned_paths(cls, splits: Sequence[str]) -> list[str]:
        """Glob patterns relative to the database of what this kind writes (a build of
        another kind removes them from a reused `<db>.partial/`)."""

    # ------------------------------------------------------------------ read
    @classmethod
    @abc.abstractmethod
    def query_array_spec(cls, manifest: Mapping) -> tuple[np.dtype, int]:
        """dtype and width of the rows of `query_array` in a database of this kind."""

    @classmethod
    @abc.abstractmethod
    def has_queries(cls, split_entry: Mapping) -> bool:
        """Whether a split (its manifest entry) has a `query_array`."""

    @classmethod
    @abc.abstractmethod
    def check_files(cls, path: Path, manifest: Mapping) -> None:
        """DataError when a file this kind needs (besides the split arrays) is missing."""

    @abc.abstractmethod
    def check_database(self, path: Path, manifest: Mapping) -> None:
        """DataError when the database's files were made with other settings than this
        retriever's (e.g. another embedder)."""

    @classmethod
    @abc.abstractmethod
    def describe(cls, manifest: Mapping) -> str:
        """One line for the build summary (e.g. shards and recall)."""

    @abc.abstractmethod
    def in_graph_search(self, db: Any) -> InGraphSearch:
        """The candidate search over `db`'s train split (cached by the caller)."""

    @classmethod
    def candidate_limit(cls, manifest: Mapping) -> int | None:
        """Most candidates the search can return per query (None: the database size); the
        `max_candidates` of `in_graph_search`, known without loading it."""
        return None

    @abc.abstractmethod
    def search_parts(self, db: Any) -> list[SearchPart]:
        """`in_graph_search` cut into parts: a query's K candidates are the K smallest
        distances over every part's top-K, ties going to the earlier part, then to the better
        rank within a part (exactly the in-graph search's merge)."""

    @abc.abstractmethod
    def text_search(self, db: Any) -> TextSearch:
        """Neighbour candidates of arbitrary texts in `db`'s train split."""


_REGISTRY: dict[str, type[Retriever]] = {}


def register(cls: type[Retriever]) -> type[Retriever]:
    """Class decorator: make `cls` available as `make_retriever(cls.kind, ...)`."""
    _REGISTRY[cls.kind] = cls
    return cls


def retriever_kinds() -> tuple[str, ...]:
    """The registered kinds, e.g. ("bert", "bm25")."""
    return tuple(sorted(_REGISTRY))


def retriever_class(kind: str, *, where: str = "database.retriever") -> type[Retriever]:
    """The class of `kind`; DataError naming the known kinds otherwise."""
    if kind not in _REGISTRY:
        raise DataError(f"{where}={kind!r}: unknown retriever; expected one of "
                        f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def make_retriever(kind: str, **settings: Any) -> Retriever:
    """A retriever of `kind` with its settings (see each class for the keywords it takes;
    keywords another kind needs are accepted and ignored, so one call site serves all)."""
    return retriever_class(kind).from_settings(**settings)


def manifest_kind(manifest: Mapping) -> str:
    return str(manifest.get("retriever", DEFAULT_KIND))
