"""`open_corpus(config.corpus)`: the reader for `corpus.kind`; `corpus_statistics`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from data_pipeline.corpora.base import SPLITS, Corpus
from data_pipeline.errors import DataError

KINDS = ("stdlib", "wikitext103", "pile", "textdir", "jsonl", "tfds")

# The defaults of retro_jax/configs/base.py `corpus`, for callers passing a partial mapping.
_DEFAULTS: dict[str, Any] = dict(
    kind="stdlib", path="", text_field="text", title_field="", wikitext_variant="raw",
    tfds_name="", tfds_data_dir="", validation_percent=1.0, test_percent=1.0, max_documents=-1)


def _values(corpus_cfg: Any) -> dict[str, Any]:
    """The corpus keys of a ConfigDict (config.corpus), a mapping or an object with attributes."""
    if hasattr(corpus_cfg, "to_dict"):
        given = dict(corpus_cfg.to_dict())
    elif isinstance(corpus_cfg, Mapping):
        given = dict(corpus_cfg)
    else:
        given = {k: getattr(corpus_cfg, k) for k in _DEFAULTS if hasattr(corpus_cfg, k)}
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise DataError(f"unknown corpus config key(s) {unknown}: expected keys of "
                        f"config.corpus {sorted(_DEFAULTS)}")
    return {**_DEFAULTS, **given}


def open_corpus(corpus_cfg: Any) -> Corpus:
    """The corpus `corpus_cfg` (= config.corpus) describes; layout errors raise DataError now.

    Opening checks what can be checked without reading the documents (the path exists, the
    split files are there, a directory is not empty, a TFDS dataset is prepared), so a bad
    path fails before any long stage starts.
    """
    v = _values(corpus_cfg)
    kind = v["kind"]
    common = dict(max_documents=int(v["max_documents"]))
    percents = dict(validation_percent=float(v["validation_percent"]),
                    test_percent=float(v["test_percent"]))
    if kind == "stdlib":
        from data_pipeline.corpora.stdlib import StdlibCorpus
        return StdlibCorpus(**percents, **common)
    if kind == "wikitext103":
        from data_pipeline.corpora.wikitext import WikitextCorpus
        return WikitextCorpus(v["path"], v["wikitext_variant"], **common)
    if kind == "pile":
        from data_pipeline.corpora.pile import PileCorpus
        return PileCorpus(v["path"], text_field=v["text_field"], **percents, **common)
    if kind == "textdir":
        from data_pipeline.corpora.textdir import TextDirCorpus
        return TextDirCorpus(v["path"], **percents, **common)
    if kind == "jsonl":
        from data_pipeline.corpora.jsonl import JsonlCorpus
        return JsonlCorpus(v["path"], text_field=v["text_field"], title_field=v["title_field"],
                           **percents, **common)
    if kind == "tfds":
        from data_pipeline.corpora.tfds_corpus import TfdsCorpus
        return TfdsCorpus(v["tfds_name"], data_dir=v["tfds_data_dir"],
                          text_field=v["text_field"], title_field=v["title_field"],
                          **percents, **common)
    raise DataError(f"corpus.kind={kind!r}: expected one of {', '.join(KINDS)}; "
                    "fix: --config.corpus.kind=stdlib")


def corpus_statistics(corpus_cfg: Any) -> dict[str, Any]:
    """Documents and UTF-8 bytes per split, with skips, from one streaming pass per split.

    Returns {"kind", "description", "splits": {split: {"documents", "bytes", "skipped"}},
    "skipped_examples": {split: {reason: [locations]}}, "seconds"}; JSON-serialisable.
    """
    start = time.perf_counter()
    corpus = open_corpus(corpus_cfg)
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
