"""The Pile (Gao et al. 2020): JSONL records {"text": ..., "meta": {"pile_set_name": ...}}.

`corpus.path` is a directory or a single `*.jsonl` / `*.jsonl.zst` file. Splits:
- the Pile's own layout when the directory has it: `train/` (or `train.jsonl[.zst]`),
  `val/` or `validation/` (or `val.jsonl.zst`, `validation.jsonl.zst`) and `test/` (or
  `test.jsonl.zst`); all three must be there;
- otherwise every JSONL file below the path, split by sha256 of the document id
  (`corpus.validation_percent` / `corpus.test_percent`).
A document's id is "<file relative to the path>:<line>", also its title; its source is
`meta.pile_set_name` (the subset bits-per-byte is reported by).

Bad records are skipped and counted (not UTF-8, not JSON, no text field, empty text); a
truncated `.zst` is a DataError (see files.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.corpora import stats as reasons
from data_pipeline.corpora.base import Corpus, Document
from data_pipeline.corpora.files import (
    existing_path,
    is_jsonl,
    iter_lines,
    jsonl_files,
    parse_json_line,
    record_text,
    walk_files,
)
from data_pipeline.corpora.split import check_split_percents, hash_split
from data_pipeline.errors import DataError

# Directory / file stems that hold each split in the Pile's own layout.
SPLIT_NAMES = {"train": ("train",), "validation": ("val", "validation", "valid"),
               "test": ("test",)}
UNKNOWN_SUBSET = "unknown"


def _split_layout(root: Path) -> dict[str, list[str]] | None:
    """split -> files (relative to root) when `root` has the Pile's split layout, else None."""
    found: dict[str, list[str]] = {}
    for split, stems in SPLIT_NAMES.items():
        for stem in stems:
            if (root / stem).is_dir():
                files = walk_files(root / stem, keep=is_jsonl)
                if not files:
                    raise DataError(f"{root / stem}: split directory without *.jsonl or "
                                    "*.jsonl.zst files; fix: add the files or remove it")
                found.setdefault(split, []).extend(f"{stem}/{f}" for f in files)
            for suffix in (".jsonl", ".jsonl.zst"):
                if (root / (stem + suffix)).is_file():
                    found.setdefault(split, []).append(stem + suffix)
    if not found:
        return None
    missing = [s for s in SPLIT_NAMES if s not in found]
    if missing:
        expected = "; ".join(f"{s}: {' or '.join(n + '/' for n in SPLIT_NAMES[s])} or "
                             f"{SPLIT_NAMES[s][0]}.jsonl.zst" for s in missing)
        raise DataError(f"{root}: has the Pile's split layout for {sorted(found)} but no "
                        f"{', '.join(missing)} split (expected {expected}); fix: add the "
                        "missing split, or move all files into one directory to split by hash")
    in_splits = {f for files in found.values() for f in files}
    stray = [f for f in walk_files(root, keep=is_jsonl) if f not in in_splits]
    if stray:
        raise DataError(f"{root}: has the Pile's split layout, but {stray[:5]} belong to no "
                        "split and would be ignored; fix: move them into train/, val/ or test/")
    return found


class PileCorpus(Corpus):
    kind = "pile"

    def __init__(self, path: str, *, text_field: str = "text", validation_percent: float = 1.0,
                 test_percent: float = 1.0, max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        check_split_percents(validation_percent, test_percent)
        self.path = existing_path(path, self.kind)
        self.text_field = text_field
        self.validation_percent = validation_percent
        self.test_percent = test_percent
        if self.path.is_file():
            self.root = self.path.parent
            self.split_files = None
            self.files = [self.path.name]
        else:
            self.root = self.path
            self.split_files = _split_layout(self.root)
            self.files = [] if self.split_files else jsonl_files(self.root, self.kind)

    @property
    def description(self) -> str:
        rule = ("splits from train/, val/, test/" if self.split_files else
                f"split by sha256 of id: validation {self.validation_percent}%, "
                f"test {self.test_percent}%")
        return f"pile at {self.path} (text field {self.text_field!r}); {rule}"

    def sources(self, split: str) -> list[str]:
        """One source per file (of the split's directory, or of the whole corpus)."""
        return list(self.split_files[split] if self.split_files else self.files)

    def _iter_split(self, split: str) -> Iterator[Document]:
        for rel in self.sources(split):
            yield from self._iter_source(split, rel)

    def _iter_source(self, split: str, rel: str) -> Iterator[Document]:
        return self._read_file(rel, split, hashed=not self.split_files)

    def _read_file(self, rel: str, split: str, *, hashed: bool) -> Iterator[Document]:
        stats = self.stats
        for line_no, raw in iter_lines(self.root / rel):
            doc_id = f"{rel}:{line_no}"
            # The id alone decides the split, so other splits' lines are not even parsed.
            if hashed and hash_split(doc_id, self.validation_percent, self.test_percent) != split:
                continue
            record = parse_json_line(raw, split, rel, line_no, stats)
            if record is None:
                continue
            text = record_text(record, self.text_field, split, rel, line_no, stats)
            if text is None:
                continue
            meta = record.get("meta")
            subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
            if not isinstance(subset, str) or not subset:
                stats.note(split, reasons.MISSING_SUBSET)
                subset = UNKNOWN_SUBSET
            yield Document(doc_id, doc_id, text, subset)
