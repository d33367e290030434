"""Building a retrieval database: corpus -> tokenizer -> chunks -> the retriever's files
(frozen-BERT keys + ScaNN shards, or BM25 index + candidates: data_pipeline/retrieval), then
the manifest. `retro-jax build-db` (retro_jax/build_db.py) maps a config onto these arguments.

The database is written into `<db>.partial/` and renamed into place at the end. Every unit
of work leaves a done-marker in `<db>.partial/.build/` holding the fingerprint of its inputs
and the sha256 of its outputs (data_pipeline/resumable.py):

    tokenizer.json                 the tokenizer (trained or copied)
    chunks_<split>.json            tokens.npy, doc_ids.npy and the split's document rows
    ...                            the retriever's units (key blocks, index shards, BM25)

A rerun (after a crash or `kill -9`) skips every unit whose marker matches its inputs and
outputs and redoes the rest, so the result is byte-identical to an uninterrupted build.
Changing a setting redoes the stage it feeds and everything downstream (the fingerprints
chain). The manifest holds no timestamps; stage timings go to `build_times.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from data_pipeline.database.layout import (
    BUILD_TIMES_FILE,
    DOCUMENTS_FILE,
    MANIFEST,
    TOKENIZER_FILE,
    partial_path,
)
from data_pipeline.database.reader import RetrievalDatabase
from data_pipeline.database.writer import DatabaseWriter, publish
from data_pipeline.errors import DataError
from data_pipeline.fileio import file_sha256, write_json_atomic
from data_pipeline.progress import progress
from data_pipeline.resumable import KILL_ENV, STATE_DIR, Markers, event, fingerprint
from data_pipeline.retrieval import BuildInputs, Retriever, retriever_class, retriever_kinds
from data_pipeline.text import Tokenizer, chunk_split, load_tokenizer, train_tokenizer

__all__ = ["KILL_ENV", "STATE_DIR", "ChunkSettings", "DedupSettings", "TokenizerSettings",
           "build_database"]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """The tokenizer stage (a config's `tokenizer` section): copy `model_path`, or train a
    SentencePiece model of `vocab_size` on `train_sample_bytes` of train text."""

    model_path: str = ""
    vocab_size: int = 128_000
    train_sample_bytes: int = 200_000_000
    model_type: str = "unigram"


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """The chunk stage (a config's `database` section).

    chunk_len: m. max_chunks: cap on train chunks (-1 = all; the train split is cut exactly).
    max_eval_chunks: cap on each evaluation split (whole documents; -1 = max_chunks).
    max_document_chunks: keep each train document's first N chunks (-1 = all).
    fraction: keep this share of train documents (by id hash: database-size ablations).
    eval_splits: splits chunked besides train (keyed, never searched).
    """

    chunk_len: int = 64
    max_chunks: int = -1
    max_eval_chunks: int = -1
    max_document_chunks: int = -1
    fraction: float = 1.0
    eval_splits: tuple[str, ...] = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    """Drop train documents whose `ngram`-gram Jaccard to an evaluation document is at
    least `threshold` (MinHash-LSH with `num_perm` permutations; paper section 2.1)."""

    threshold: float = 0.8
    ngram: int = 13
    num_perm: int = 128


def _dedup_filter(dedup: DedupSettings | None, corpus) -> Callable[[str], bool] | None:
    """A callable(text) -> bool, True for train texts that near-duplicate an evaluation
    document, or None when dedup is off. The MinHash index is built on the first call, so a
    resumed build whose train chunks are done does not build it."""
    if dedup is None:
        return None
    built = []

    def is_near_duplicate(text: str) -> bool:
        if not built:
            from data_pipeline.text import NearDuplicateFilter

            index = NearDuplicateFilter(threshold=dedup.threshold, ngram=dedup.ngram,
                                        num_perm=dedup.num_perm)
            bar = progress(None, "dedup index (eval docs)", "doc")
            for split in ("validation", "test"):
                for doc in corpus.documents(split):
                    index.add(doc.text)
                    bar.update(1)
            bar.close()
            built.append(index)
        return built[0].is_near_duplicate(text)

    return is_near_duplicate


# ---------------------------------------------------------------------------- stages
def _stage_tokenizer(settings: TokenizerSettings, corpus, corpus_fp: Any, partial: Path,
                     markers: Markers) -> Tokenizer:
    source_sha = file_sha256(settings.model_path) if settings.model_path else None
    inputs = fingerprint({"corpus": corpus_fp, "tokenizer": dataclasses.asdict(settings),
                          "source_sha256": source_sha})
    target = partial / TOKENIZER_FILE
    marker = markers.get("tokenizer", inputs)
    if marker and target.is_file() and file_sha256(target) == marker["sha256"]:
        return load_tokenizer(target)
    if settings.model_path:
        shutil.copyfile(settings.model_path, target)
        tokenizer = load_tokenizer(target)
    else:
        log.info("training a %d-piece SentencePiece %s tokenizer on %.1f MB of train text",
                 settings.vocab_size, settings.model_type, settings.train_sample_bytes / 1e6)
        tokenizer = train_tokenizer((d.text for d in corpus.documents("train")), target,
                                    vocab_size=settings.vocab_size,
                                    model_type=settings.model_type,
                                    sample_bytes=settings.train_sample_bytes)
    markers.put("tokenizer", inputs, sha256=tokenizer.sha256)
    return tokenizer


def _stage_chunks(settings: ChunkSettings, corpus, corpus_fp: Any, tokenizer: Tokenizer,
                  split: str, first_doc_id: int, partial: Path, markers: Markers, drop,
                  dedup: DedupSettings | None) -> dict:
    is_train = split == "train"
    max_chunks = settings.max_chunks
    if not is_train and settings.max_eval_chunks >= 0:
        max_chunks = settings.max_eval_chunks
    inputs = fingerprint({"corpus": corpus_fp, "tokenizer": tokenizer.sha256,
                          "chunk_len": settings.chunk_len, "max_chunks": max_chunks,
                          "fraction": settings.fraction if is_train else 1.0,
                          "first_doc_id": first_doc_id,
                          "max_document_chunks": settings.max_document_chunks if is_train else -1,
                          "dedup": dataclasses.asdict(dedup) if is_train and dedup else None})
    directory = partial / split
    rows_path = markers.root / f"documents_{split}.jsonl"
    files = {"tokens": directory / "tokens.npy", "doc_ids": directory / "doc_ids.npy",
             "documents": rows_path}
    marker = markers.get(f"chunks_{split}", inputs)
    if marker and all(f.is_file() and file_sha256(f) == marker["sha256"][k]
                      for k, f in files.items()):
        return marker
    bar = progress(None, f"chunk {split}", "doc")
    try:
        stats = chunk_split(
            corpus.documents(split), tokenizer, directory, rows_path, split=split,
            chunk_len=settings.chunk_len, first_doc_id=first_doc_id,
            max_chunks=max_chunks, truncate_last=is_train,
            fraction=settings.fraction if is_train else 1.0,
            drop=drop if is_train else None, progress=bar,
            max_document_chunks=settings.max_document_chunks if is_train else -1)
    finally:
        bar.close()
    if is_train and stats.num_chunks == 0:
        raise DataError(f"the train split of {getattr(corpus, 'description', 'the corpus')} "
                        "produced no chunks; check corpus.path / corpus.kind (and "
                        "database.fraction)")
    return markers.put(f"chunks_{split}", inputs, stats=stats.to_dict(),
                       sha256={k: file_sha256(f) for k, f in files.items()})


def _remove_other_retrievers_files(partial: Path, retriever: Retriever, splits) -> None:
    """Files an earlier attempt with another retriever left in `<db>.partial/`."""
    for kind in retriever_kinds():
        if kind == retriever.kind:
            continue
        for rel in retriever_class(kind).owned_paths(splits):
            path = partial / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


# ---------------------------------------------------------------------------- build
def build_database(
    db_path: str | os.PathLike,
    *,
    corpus,
    retriever: Retriever,
    tokenizer: TokenizerSettings = TokenizerSettings(),
    chunking: ChunkSettings = ChunkSettings(),
    dedup: DedupSettings | None = None,
    corpus_settings: Mapping[str, Any] | None = None,
    corpus_kind: str = "",
    corpus_path: str = "",
    force: bool = False,
) -> RetrievalDatabase:
    """Build (or resume building) a retrieval database at `db_path`.

    Args:
      db_path: the database directory.
      corpus: a Corpus (data_pipeline.corpora.open_corpus(...)): documents(split),
        description.
      retriever: what keys and searches the chunks (data_pipeline.retrieval.make_retriever).
      tokenizer, chunking, dedup: the stages' settings (dedup None = off).
      corpus_settings: what the corpus was opened with (a config's `corpus` section); part of
        the stages' fingerprints, so another corpus redoes them.
      corpus_kind, corpus_path: recorded in the manifest's corpus section beside the
        description (what runs on this database check they read).
      force: rebuild even if a complete database exists there (a partial build resumes).
    Returns:
      the opened, checked database.
    """
    db_path = Path(db_path)
    if db_path.exists() and not force:
        log.info("database %s exists; pass --force to rebuild it", db_path)
        return RetrievalDatabase.open(db_path, expect_chunk_len=chunking.chunk_len,
                                      retriever=retriever)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = round(times.get(stage, 0.0) + now - clock, 3)
        clock = now

    partial = partial_path(db_path)
    if (partial / MANIFEST).is_file() and not (partial / STATE_DIR).exists():
        log.info("%s holds a finished build that was not renamed; finishing it", partial)
        db = publish(db_path, overwrite=True)
        _print_summary(db, {})
        return db
    partial.mkdir(parents=True, exist_ok=True)
    markers = Markers(partial)
    corpus_fp = dict(corpus_settings or {"description": getattr(corpus, "description", "")})

    tok = _stage_tokenizer(tokenizer, corpus, corpus_fp, partial, markers)
    lap("tokenizer")

    drop = _dedup_filter(dedup, corpus)
    splits = ["train", *[s for s in chunking.eval_splits if s != "train"]]
    chunk_markers, next_doc_id = {}, 0
    for split in splits:
        chunk_markers[split] = _stage_chunks(chunking, corpus, corpus_fp, tok, split,
                                             next_doc_id, partial, markers, drop, dedup)
        next_doc_id = chunk_markers[split]["stats"]["next_doc_id"]
    lap("chunks")

    _remove_other_retrievers_files(partial, retriever, splits)
    files = retriever.build(BuildInputs(
        directory=partial, splits=tuple(splits), tokenizer=tok,
        chunk_sha256={s: chunk_markers[s]["sha256"] for s in splits}, markers=markers, lap=lap))

    writer = DatabaseWriter(db_path, chunk_len=chunking.chunk_len,
                            tokenizer_path=partial / TOKENIZER_FILE,
                            embedder_name="", embed_dim=0,
                            corpus={"kind": corpus_kind, "path": corpus_path,
                                    "description": getattr(corpus, "description", "")},
                            resume=True, retriever=retriever.kind)
    writer.apply(files)
    for stale in ("validation", "test"):  # left by an earlier attempt with other eval_splits
        if stale not in splits and (partial / stale).exists():
            shutil.rmtree(partial / stale)
    with open(partial / DOCUMENTS_FILE, "wb") as out:
        for split in splits:
            with open(markers.root / f"documents_{split}.jsonl", "rb") as rows:
                shutil.copyfileobj(rows, out)
    for split in splits:
        stats = chunk_markers[split]["stats"]
        writer.record_split(split, num_chunks=stats["num_chunks"],
                            num_documents=stats["num_documents"], num_tokens=stats["num_tokens"],
                            num_bytes=stats["num_bytes"], **files.split_flags)
    train_stats = chunk_markers["train"]["stats"]
    writer.dedup_info = {"removed": train_stats["skipped_dedup"],
                         "threshold": dedup.threshold if dedup else None}
    lap("finalize")
    write_json_atomic(partial / BUILD_TIMES_FILE, times)
    writer.write_manifest()
    # From here <db>.partial is a complete database; a crash before the rename is finished by
    # the rerun (see the top of this function).
    shutil.rmtree(markers.root)
    event("finalize/markers_removed")
    db = publish(db_path, overwrite=True)
    _print_summary(db, times)
    return db


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _print_summary(db: RetrievalDatabase, times: dict[str, float]) -> None:
    m = db.manifest
    lines = [f"retrieval database {db.path} (retriever {db.retriever_kind})"]
    for split, info in m["splits"].items():
        lines.append(f"  {split:<10} {info['num_chunks']:>10,} chunks  "
                     f"{info['num_documents']:>8,} documents  {info['num_tokens']:>12,} tokens")
    lines.append("  " + db.retriever_class.describe(m))
    lines.append("  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    lines.append(f"  size       {_dir_bytes(db.path) / 1e6:.1f} MB")
    print("\n".join(lines), flush=True)

