"""`open_corpus(kind, ...)`: the reader for a corpus kind; `corpus_statistics`."""

from __future__ import annotations

import time
from typing import Any

from data_pipeline.corpora.base import SPLITS, Corpus
from data_pipeline.errors import DataError

KINDS = ("stdlib", "wikitext103", "pile", "textdir", "jsonl", "tfds")


def open_corpus(kind: str = "stdlib", *, path: str = "", text_field: str = "text",
                title_field: str = "", wikitext_variant: str = "raw", tfds_name: str = "",
                tfds_data_dir: str = "", validation_percent: float = 1.0,
                test_percent: float = 1.0, max_documents: int = -1) -> Corpus:
    """The corpus of reader `kind`; layout errors raise DataError now.

    Opening checks what can be checked without reading the documents (the path exists, the
    split files are there, a directory is not empty, a TFDS dataset is prepared), so a bad
    path fails before any long stage starts. The arguments are the keys of a config's
    `corpus` section (`open_corpus(**config.corpus)`): path (file or directory; unused for
    stdlib), text_field / title_field (jsonl, pile, tfds), wikitext_variant ("raw" or
    "tokens"), tfds_name / tfds_data_dir, validation_percent / test_percent (the hash split
    of corpora without split files), max_documents (per split, -1 = all).
    """
    common = dict(max_documents=int(max_documents))
    percents = dict(validation_percent=float(validation_percent),
                    test_percent=float(test_percent))
    if kind == "stdlib":
        from data_pipeline.corpora.stdlib import StdlibCorpus
        return StdlibCorpus(**percents, **common)
    if kind == "wikitext103":
        from data_pipeline.corpora.wikitext import WikitextCorpus
        return WikitextCorpus(path, wikitext_variant, **common)
    if kind == "pile":
        from data_pipeline.corpora.pile import PileCorpus
        return PileCorpus(path, text_field=text_field, **percents, **common)
    if kind == "textdir":
        from data_pipeline.corpora.textdir import TextDirCorpus
        return TextDirCorpus(path, **percents, **common)
    if kind == "jsonl":
        from data_pipeline.corpora.jsonl import JsonlCorpus
        return JsonlCorpus(path, text_field=text_field, title_field=title_field,
                           **percents, **common)
    if kind == "tfds":
        from data_pipeline.corpora.tfds_corpus import TfdsCorpus
        return TfdsCorpus(tfds_name, data_dir=tfds_data_dir, text_field=text_field,
                          title_field=title_field, **percents, **common)
    raise DataError(f"corpus.kind={kind!r}: expected one of {', '.join(KINDS)}; "
                    "fix: --config.corpus.kind=stdlib")


def corpus_statistics(**corpus_args: Any) -> dict[str, Any]:
    """Documents and UTF-8 bytes per split, with skips, from one streaming pass per split.

    Returns {"kind", "description", "splits": {split: {"documents", "bytes", "skipped"}},
    "skipped_examples": {split: {reason: [locations]}}, "seconds"}; JSON-serialisable.
    """
    start = time.perf_counter()
    corpus = open_corpus(**corpus_args)
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        documents = num_bytes = 0
        for doc in corpus.documents(split):
            documents += 1
            num_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
        splits[split] = {"documents": documents, "bytes": num_bytes,
                         "skipped": corpus.stats.skipped_by_reason(split)}
    return {
        "kind": corpus.kind,
        "description": corpus.description,
        "splits": splits,
        "skipped_examples": {s: {r: corpus.stats.examples(r, s)
                                 for r in corpus.stats.skipped_by_reason(s)} for s in SPLITS},
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_statistics(statistics: dict[str, Any]) -> str:
    """`corpus_statistics(...)` as a few human-readable lines (what `make demo` prints)."""
    lines = [f"corpus: {statistics['description']}"]
    for split, s in statistics["splits"].items():
        skipped = ", ".join(f"{r} {n}" for r, n in s["skipped"].items()) or "none"
        lines.append(f"  {split:<10} {s['documents']:>8,} documents {s['bytes']:>14,} bytes"
                     f"   skipped: {skipped}")
    return "\n".join(lines)
