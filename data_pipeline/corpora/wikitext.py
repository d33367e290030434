"""WikiText-103 (Merity et al. 2016): one document per Wikipedia article.

Expects a directory with `wiki.{train,valid,test}.{raw|tokens}` (as unpacked from
wikitext-103-raw-v1.zip / wikitext-103-v1.zip); `corpus.wikitext_variant` picks the
extension. An article starts at a level-1 heading line ` = Title = `; ` = = Section = = `
lines are inside articles. Article text is kept byte-for-byte as in the file, heading line
and newlines included, and the blank line(s) before the first heading belong to the first
article, so the word counts of all articles add up to the word count of the file.

An undecodable line is a `DataError` rather than a skip: the official files are UTF-8, so
such a line means a damaged file, and dropping an article would change the word count
that word-level perplexity divides by.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.corpora.base import Corpus, Document
from data_pipeline.corpora.files import existing_path
from data_pipeline.errors import DataError

SPLIT_FILE_NAMES = {"train": "train", "validation": "valid", "test": "test"}
SOURCE = "wikitext103"

# " = Title = " but not " = = Section = = ". The title may itself contain " = ".
_ARTICLE_HEADING = re.compile(r"^ = (?!= )(.+?) = $")


def article_title(line: str) -> str | None:
    """The title if `line` (without its newline) is a level-1 article heading, else None."""
    match = _ARTICLE_HEADING.match(line)
    return match.group(1) if match else None


class WikitextCorpus(Corpus):
    kind = "wikitext103"

    def __init__(self, path: str, variant: str = "raw", *, max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        if variant not in ("raw", "tokens"):
            raise DataError(f"corpus.wikitext_variant={variant!r}: expected 'raw' or 'tokens'")
        self.root = existing_path(path, self.kind)
        self.variant = variant
        if not self.root.is_dir():
            raise DataError(f"{self.root} is a file: corpus.kind='wikitext103' needs the "
                            "directory holding wiki.train/valid/test files; fix: "
                            f"--config.corpus.path={self.root.parent}")
        self.files = {split: self.root / f"wiki.{name}.{variant}"
                      for split, name in SPLIT_FILE_NAMES.items()}
        missing = [p.name for p in self.files.values() if not p.is_file()]
        if missing:
            present = sorted(p.name for p in self.root.iterdir())[:12]
            hint = ""
            for sub in ("wikitext-103-raw", "wikitext-103"):
                if (self.root / sub).is_dir():
                    hint = f"; the files may be in {self.root / sub}"
            other = "tokens" if variant == "raw" else "raw"
            raise DataError(
                f"{self.root}: missing WikiText-103 split file(s) {', '.join(missing)} "
                f"(corpus.wikitext_variant={variant!r}); found {present}{hint}; fix: unpack "
                f"wikitext-103{'-raw' if variant == 'raw' else ''}-v1.zip there, or set "
                f"--config.corpus.wikitext_variant={other} if you have the .{other} files")
        for split, file in self.files.items():
            if file.stat().st_size == 0:
                raise DataError(f"{file}: empty {split} file; fix: unpack it again")

    @property
    def description(self) -> str:
        return (f"wikitext103 ({self.variant}) at {self.root}: one document per ' = Title = ' "
                "article, splits from wiki.{train,valid,test} files")

    def _decoded_lines(self, file: Path) -> Iterator[tuple[int, str]]:
        with open(file, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{file}:{line_no}: not UTF-8 ({e}); the WikiText-103 files are UTF-8, "
                        "so the file is damaged; fix: unpack it again from the zip") from e

    def _iter_split(self, split: str) -> Iterator[Document]:
        file = self.files[split]
        title: str | None = None
        start_line = 0
        lines: list[str] = []  # the current article (or the preamble before the first one)
        for line_no, line in self._decoded_lines(file):
            heading = article_title(line.rstrip("\r\n"))
            if heading is not None:
                if title is not None:
                    yield Document(f"{file.name}:{start_line}", title, "".join(lines), SOURCE)
                    lines = []
                title, start_line = heading, line_no
            lines.append(line)
        if title is None:
            raise DataError(f"{file}: no article heading (a line ' = Title = ') found; is this "
                            "a WikiText-103 file? fix: point --config.corpus.path at the "
                            "unpacked wikitext-103 directory")
        yield Document(f"{file.name}:{start_line}", title, "".join(lines), SOURCE)
