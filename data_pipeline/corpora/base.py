"""The corpus interface every reader implements: `Document`, `SPLITS`, `Corpus`.

A corpus streams documents one split at a time, lazily and in a deterministic order, so the
database build can read a corpus of any size in constant memory. Readers implement
`_iter_split`; the base class adds the `max_documents` cap and the per-split bookkeeping of
`ReadStats` (documents yielded, documents skipped and why).

Readers whose documents come from several files also name their `sources` (a file, or a run
of files): `source_documents(split, s)` for each source in turn yields exactly the documents of
`documents(split)` before the `max_documents` cap, so a parallel build reads the sources on
different workers and still numbers the documents in corpus order.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
from collections.abc import Iterator

from data_pipeline.corpora.stats import ReadStats
from data_pipeline.errors import DataError

SPLITS = ("train", "validation", "test")
WHOLE_SPLIT = "*"  # the one source of a reader that cannot be read in parts
# Files per source for readers of one document per file (textdir, stdlib).
FILES_PER_SOURCE = 256


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """One corpus document.

    id:     unique within the corpus (across all splits), stable across runs and machines,
            e.g. "wiki.train.raw:2", "train/00.jsonl.zst:17", "asyncio/events.py".
    title:  human-readable name used for attribution (article heading, relative path, ...).
    text:   the document's text, exactly as read (newlines kept).
    source: the subset it belongs to ("wikitext103", a Pile subset name, "stdlib", "pydoc", ...);
            evaluation reports bits-per-byte per source.
    """

    id: str
    title: str
    text: str
    source: str


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


class Corpus(abc.ABC):
    """A corpus opened by `open_corpus`: `documents(split)`, `description`, `stats`."""

    kind: str = ""

    def __init__(self, *, max_documents: int = -1) -> None:
        if max_documents < -1:
            raise DataError(
                f"corpus.max_documents={max_documents}: expected -1 (all documents) or a count "
                ">= 0; fix: --config.corpus.max_documents=-1")
        self.max_documents = max_documents
        self._stats = ReadStats()

    @property
    def stats(self) -> ReadStats:
        """Documents yielded and skipped (by reason, file, with examples), per split."""
        return self._stats

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line for the database manifest: kind, location, split rule."""

    def documents(self, split: str) -> Iterator[Document]:
        """The documents of `split` in a deterministic order, at most `max_documents` of them.

        Reading a split again restarts its statistics (they describe the latest pass).
        """
        check_split(split)
        return self._stream(split)

    def _stream(self, split: str) -> Iterator[Document]:
        self._stats.start_split(split)
        docs = self._iter_split(split)
        capped = self.max_documents >= 0
        if capped:
            # islice stops before pulling the next document, so nothing past the cap is read.
            docs = itertools.islice(docs, self.max_documents)
        count = 0
        for doc in docs:
            count += 1
            self._stats.count_document(split)
            yield doc
        # A pass stopped by the cap did not see the end of the split.
        self._stats.finish_split(split, complete=not (capped and count == self.max_documents))

    def sources(self, split: str) -> list[str]:
        """Names of the parts of `split` that can be read independently, in corpus order (the
        default: the whole split as one source)."""
        check_split(split)
        return [WHOLE_SPLIT]

    def source_documents(self, split: str, source: str) -> Iterator[Document]:
        """The documents of one source of `split`, in corpus order, without the
        `max_documents` cap (which counts over the whole split: the caller applies it)."""
        check_split(split)
        if source == WHOLE_SPLIT:
            return self._iter_split(split)
        if source not in self.sources(split):
            raise DataError(f"{self.kind} corpus: no source {source!r} in split {split!r}")
        return self._iter_source(split, source)

    def _iter_source(self, split: str, source: str) -> Iterator[Document]:
        """Documents of one source named by `sources` (readers with several sources)."""
        raise DataError(f"{type(self).__name__} reads {split!r} as one source, not {source!r}")

    @abc.abstractmethod
    def _iter_split(self, split: str) -> Iterator[Document]:
        """All documents of `split`, skips recorded in `self.stats` (split already checked)."""


def file_groups(files: list[str], size: int = FILES_PER_SOURCE) -> dict[str, list[str]]:
    """Sources of a one-document-per-file reader: runs of `size` files in order, named
    "files/00000", "files/00001", ..."""
    return {f"files/{i // size:05d}": files[i:i + size] for i in range(0, len(files), size)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
