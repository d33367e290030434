"""JSONL: one file or a directory of `*.jsonl` / `*.jsonl.zst`, one document per line.

The text is `record[corpus.text_field]`; the title is `record[corpus.title_field]` (a string
or integer) when that key is set (a record without it keeps its id as title, counted as a
note), else the id "<file relative to the path>:<line>". Split by sha256 of the title, so
records sharing a title stay in one split (`corpus.validation_percent` /
`corpus.test_percent`). The source is the file's relative path without its .jsonl[.zst]
suffix (one subset per file).

Bad lines are skipped and counted; a line that cannot be parsed has no title, so it is
attributed to the split its id hashes to (each bad line is counted once over the splits).
"""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.corpora import stats as reasons
from data_pipeline.corpora.base import Corpus, Document
from data_pipeline.corpora.files import (
    existing_path,
    is_jsonl,
    iter_lines,
    jsonl_files,
    parse_json_line,
    record_text,
)
from data_pipeline.corpora.split import check_split_percents, hash_split
from data_pipeline.errors import DataError


def _source_name(rel: str) -> str:
    for suffix in (".jsonl.zst", ".jsonl"):
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


class JsonlCorpus(Corpus):
    kind = "jsonl"

    def __init__(self, path: str, *, text_field: str = "text", title_field: str = "",
                 validation_percent: float = 1.0, test_percent: float = 1.0,
                 max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        check_split_percents(validation_percent, test_percent)
        if not text_field:
            raise DataError("corpus.text_field is empty; fix: --config.corpus.text_field=text")
        self.path = existing_path(path, self.kind)
        self.text_field = text_field
        self.title_field = title_field
        self.validation_percent = validation_percent
        self.test_percent = test_percent
        if self.path.is_file():
            if not is_jsonl(self.path.name):
                raise DataError(f"{self.path}: expected a .jsonl or .jsonl.zst file; fix: "
                                "rename it, or point --config.corpus.path at its directory")
            self.root, self.files = self.path.parent, [self.path.name]
        else:
            self.root, self.files = self.path, jsonl_files(self.path, self.kind)

    @property
    def description(self) -> str:
        title = f"title field {self.title_field!r}" if self.title_field else "title = file:line"
        return (f"jsonl at {self.path} (text field {self.text_field!r}, {title}); split by "
                f"sha256 of title: validation {self.validation_percent}%, "
                f"test {self.test_percent}%")

    def _split_of(self, key: str) -> str:
        return hash_split(key, self.validation_percent, self.test_percent)

    def sources(self, split: str) -> list[str]:
        """One source per file."""
        return list(self.files)

    def _iter_split(self, split: str) -> Iterator[Document]:
        for rel in self.files:
            yield from self._iter_source(split, rel)

    def _iter_source(self, split: str, rel: str) -> Iterator[Document]:
        stats = self.stats
        source = _source_name(rel)
        for line_no, raw in iter_lines(self.root / rel):
            doc_id = f"{rel}:{line_no}"
            id_split = self._split_of(doc_id)
            # Without a title field the id decides: other splits' lines are not parsed.
            if not self.title_field and id_split != split:
                continue
            # A line that does not parse is attributed to the split of its id.
            record = parse_json_line(raw, split, rel, line_no,
                                     stats if id_split == split else None)
            if record is None:
                continue
            title = doc_id
            if self.title_field:
                value = record.get(self.title_field)
                if isinstance(value, str | int) and not isinstance(value, bool) \
                        and str(value):
                    title = str(value)
                if self._split_of(title) != split:
                    continue
                if title == doc_id:
                    stats.note(split, reasons.MISSING_TITLE)
            text = record_text(record, self.text_field, split, rel, line_no, stats)
            if text is None:
                continue
            yield Document(doc_id, title, text, source)
