"""The corpus interface every reader implements: `Document`, `SPLITS`, `Corpus`.

A corpus streams documents one split at a time, lazily and in a deterministic order, so the
database build can read a corpus of any size in constant memory. Readers implement
`_iter_split`; the base class adds the `max_documents` cap and the per-split bookkeeping of
`ReadStats` (documents yielded, documents skipped and why).
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
from collections.abc import Iterator

from data_pipeline.corpora.stats import ReadStats
from data_pipeline.errors import DataError

SPLITS = ("train", "validation", "test")


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

    @abc.abstractmethod
    def _iter_split(self, split: str) -> Iterator[Document]:
        """All documents of `split`, skips recorded in `self.stats` (split already checked)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
