"""The Retriever interface: how a database's chunks are keyed at build time and how chunks
and texts find their neighbours at read time. One implementation per kind, registered by
name; a database's manifest names its kind, a config's `database.retriever` names the kind to
build.

    retriever = make_retriever("bert", embedder=EmbedderSettings(...), index={...})
    sections = retriever.build(BuildInputs(...))      # writes its files, returns manifest fields
    search = retriever.in_graph_search(db)            # TF op: query rows -> candidate chunk ids
    ids = retriever.text_search(db)(texts, k)         # live queries (sampling)

What every kind provides:
- build: its files in the database directory (keys + ScaNN shards; a BM25 index + candidate
  tables), resumable unit by unit with `data_pipeline.resumable`, and its manifest sections;
- the query of a chunk: a row of a per-split array (`query_array`: frozen-BERT keys, or the
  chunk's BM25 candidate ids), gathered in the tf.data graph;
- `in_graph_search`: candidate chunk ids for those rows with TensorFlow ops only (ScaNN's TF
  op, or a slice of the candidate row), in best-first order, so the input pipeline's filters
  (same document, excluded documents) and neighbour gather are the same for every kind;
- `text_search`: neighbours of arbitrary text (a chunk generated while sampling).

A third retriever (a trained dual encoder, say) is a new module with a `Retriever` subclass
passed to `register`; nothing else changes.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.resumable import Markers

DEFAULT_KIND = "bert"  # a manifest without "retriever" was built with frozen-BERT keys


class Decoder(Protocol):
    """What the retrievers need of the tokenizer: token ids -> text."""

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """What the database build hands a retriever once the chunk arrays are written.

    Attributes:
      directory: the database being written (`<db>.partial/`): split arrays are
        `<directory>/<split>/tokens.npy` int32 [N, m] and `doc_ids.npy` int64 [N].
      splits: split names, "train" first (the train split is what is searched).
      tokenizer: decodes chunk tokens to text (what keys are made from).
      chunk_sha256: split -> {"tokens": sha256, "doc_ids": sha256} of its chunk arrays (the
        fingerprints that chain the retriever's units of work to the chunks).
      markers: done-markers of the build (resume unit by unit).
      lap: called with a stage name when that stage is done (the build's stage timings).
    """

    directory: Path
    splits: tuple[str, ...]
    tokenizer: Decoder
    chunk_sha256: Mapping[str, Mapping[str, str]]
    markers: Markers
    lap: Callable[[str], None] = lambda stage: None

    def tokens(self, split: str) -> np.ndarray:
        return np.load(self.directory / split / "tokens.npy", mmap_mode="r")

    def doc_ids(self, split: str) -> np.ndarray:
        return np.load(self.directory / split / "doc_ids.npy", mmap_mode="r")

    def texts(self, tokens: np.ndarray) -> list[str]:
        """Detokenized chunk texts of token rows [n, m] (padding dropped)."""
        return [self.tokenizer.decode(row) for row in np.asarray(tokens)]


@dataclasses.dataclass(frozen=True)
class RetrieverFiles:
    """What a build wrote, for the manifest.

    manifest: top-level manifest sections (e.g. "embedder", "shards", "index", "bm25").
    split_flags: fields added to every split's manifest entry (e.g. {"has_keys": True}).
    """

    manifest: dict[str, Any]
    split_flags: dict[str, Any]


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
        """Paths relative to the database that this kind writes (a build of another kind
        removes them from a reused `<db>.partial/`)."""

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
