"""A directory of text files: one document per file.

Every file below `corpus.path` (recursive, sorted by relative path; names starting with "."
left out) is a document whose id and title are its relative posix path and whose source is
"textdir". Split by sha256 of the title (`corpus.validation_percent` /
`corpus.test_percent`), decided before the file is read, so a pass reads only its own files.
Files that are not UTF-8 (binaries, other encodings) and files with no non-whitespace text
are skipped and counted in `stats`, never decoded with replacement characters.
"""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.corpora.base import Corpus, Document, file_groups
from data_pipeline.corpora.files import existing_path, read_text_file, walk_files
from data_pipeline.corpora.split import check_split_percents, hash_split
from data_pipeline.errors import DataError

SOURCE = "textdir"


class TextDirCorpus(Corpus):
    kind = "textdir"

    def __init__(self, path: str, *, validation_percent: float = 1.0, test_percent: float = 1.0,
                 max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        check_split_percents(validation_percent, test_percent)
        self.root = existing_path(path, self.kind)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is a file: corpus.kind='textdir' reads a directory of "
                            "text files; fix: --config.corpus.path=<its directory>, or "
                            "corpus.kind=jsonl for a JSONL file")
        self.validation_percent = validation_percent
        self.test_percent = test_percent
        self.files = walk_files(self.root)
        if not self.files:
            raise DataError(f"{self.root}: empty directory (no files below it; names starting "
                            "with '.' are ignored); fix: point --config.corpus.path at the "
                            "directory holding the text files")

    @property
    def description(self) -> str:
        return (f"textdir at {self.root} ({len(self.files)} files, one document each); split by "
                f"sha256 of relative path: validation {self.validation_percent}%, "
                f"test {self.test_percent}%")

    def sources(self, split: str) -> list[str]:
        """Runs of FILES_PER_SOURCE files."""
        return list(file_groups(self.files))

    def _iter_split(self, split: str) -> Iterator[Document]:
        for source in self.sources(split):
            yield from self._iter_source(split, source)

    def _iter_source(self, split: str, source: str) -> Iterator[Document]:
        for rel in file_groups(self.files)[source]:
            if hash_split(rel, self.validation_percent, self.test_percent) != split:
                continue
            text = read_text_file(self.root / rel, rel, split, self.stats)
            if text is not None:
                yield Document(rel, rel, text, SOURCE)
