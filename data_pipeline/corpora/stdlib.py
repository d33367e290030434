"""The embedded default corpus: this interpreter's standard library, offline, everywhere.

Documents, in this order:
- every `.py` file below `sysconfig.get_paths()["stdlib"]`, sorted by relative path; id and
  title = the relative posix path, source "stdlib";
- every documentation topic of `pydoc_data.topics` (the text `help("TOPIC")` shows), sorted
  by name; id "pydoc:<topic>", title = the topic name, source "pydoc".

Left out, as not being library text: `site-packages`/`dist-packages` (third-party code),
`__pycache__`, `lib-dynload`, the `config-*` build directory, the machine-specific
`_sysconfigdata_*.py`, `pydoc_data/` itself (its topics.py is the topics, already
documents), and inside test trees (`test/`, `tests/`, `*_test/`) the fixture directories
named `*data`, `*data<N>`, `encoded_modules`, `cjkencodings`: deliberately broken, non-UTF-8
or generated inputs. The test suites themselves are kept: they are ordinary Python.

Split by sha256 of the title, 98/1/1 with the default percents. Non-UTF-8 files (the
stdlib keeps a few on purpose, e.g. test_source_encoding.py) and empty files (empty
`__init__.py`) are skipped and counted in `stats`.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.corpora.base import Corpus, Document, file_groups
from data_pipeline.corpora.files import read_text_file, walk_files
from data_pipeline.corpora.split import check_split_percents, hash_split
from data_pipeline.errors import DataError

SOURCE_FILES = "stdlib"
SOURCE_TOPICS = "pydoc"
TOPICS_SOURCE = "pydoc_topics"  # the source (in `sources`) of the topics

_PRUNED_DIRS = {"__pycache__", "site-packages", "dist-packages", "lib-dynload", "pydoc_data"}
_TEST_DIRS = re.compile(r"^(test|tests|\w+_test)$")
_TEST_FIXTURE_DIRS = re.compile(r"^(\w*data\d*|encoded_modules|cjkencodings)$")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _prune(rel_dir: str) -> bool:
    parts = rel_dir.split("/")
    name = parts[-1]
    if name in _PRUNED_DIRS or name.startswith("config-"):
        return True
    in_test_tree = any(_TEST_DIRS.match(p) for p in parts[:-1])
    return in_test_tree and bool(_TEST_FIXTURE_DIRS.match(name))


def _keep(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".py") and not name.startswith("_sysconfigdata_")


def stdlib_files(root: Path | None = None) -> list[str]:
    """The relative paths of the stdlib sources the corpus reads, sorted."""
    return walk_files(root or stdlib_root(), keep=_keep, prune_dir=_prune)


def pydoc_topics() -> dict[str, str]:
    from pydoc_data import topics

    return topics.topics


class StdlibCorpus(Corpus):
    kind = "stdlib"

    def __init__(self, *, validation_percent: float = 1.0, test_percent: float = 1.0,
                 max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        check_split_percents(validation_percent, test_percent)
        self.root = stdlib_root()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: this interpreter's standard library directory "
                            "(sysconfig 'stdlib') is missing; fix: use a full Python install, "
                            "or another corpus.kind")
        self.validation_percent = validation_percent
        self.test_percent = test_percent
        self.files = stdlib_files(self.root)

    @property
    def description(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return (f"stdlib: Python {version} standard library sources at {self.root} "
                f"({len(self.files)} .py files) + pydoc_data.topics; split by sha256 of title: "
                f"validation {self.validation_percent}%, test {self.test_percent}%")

    def _in_split(self, title: str, split: str) -> bool:
        return hash_split(title, self.validation_percent, self.test_percent) == split

    def sources(self, split: str) -> list[str]:
        """Runs of FILES_PER_SOURCE files, then the pydoc topics."""
        return [*file_groups(self.files), TOPICS_SOURCE]

    def _iter_split(self, split: str) -> Iterator[Document]:
        for source in self.sources(split):
            yield from self._iter_source(split, source)

    def _iter_source(self, split: str, source: str) -> Iterator[Document]:
        if source == TOPICS_SOURCE:
            yield from self._topics(split)
            return
        for rel in file_groups(self.files)[source]:
            if self._in_split(rel, split):  # decided before reading: a pass reads its files
                text = read_text_file(self.root / rel, rel, split, self.stats)
                if text is not None:
                    yield Document(rel, rel, text, SOURCE_FILES)

    def _topics(self, split: str) -> Iterator[Document]:
        topics = pydoc_topics()
        for name in sorted(topics):
            if self._in_split(name, split):
                if topics[name].strip():
                    yield Document(f"pydoc:{name}", name, topics[name], SOURCE_TOPICS)
                else:
                    self.stats.skip(split, "empty", f"pydoc_data.topics[{name!r}]")
