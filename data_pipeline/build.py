"""`retro-jax build-db`: corpus -> tokenizer -> chunks -> frozen-BERT keys -> ScaNN shards
(database.retriever "bert"), or -> BM25 index + per-split BM25 candidates ("bm25",
data_pipeline/build_bm25.py).

The database is written into `<db>.partial/` and renamed into place at the end. Every unit
of work leaves a done-marker in `<db>.partial/.build/` holding the fingerprint of its inputs
and the sha256 of its outputs:

    tokenizer.json                 the tokenizer (trained or copied)
    chunks_<split>.json            tokens.npy, doc_ids.npy and the split's document rows
    keys_<split>/block_XXXXX.json  one block of key rows in <split>/keys.npy
    shard_XXXXX.json               one index shard directory
    bm25_index.json                the BM25 index directory (retriever "bm25")
    bm25_<split>/block_XXXXX.json  one block of rows in <split>/bm25_candidates.npy

A rerun (after a crash or `kill -9`) skips every unit whose marker matches its inputs and
outputs and redoes the rest, so the result is byte-identical to an uninterrupted build (the
machinery is data_pipeline/build_state.py). Changing a config key redoes the stage it feeds
and everything downstream (the fingerprints chain: keys include the tokens' sha256, shards
the keys' block sha256s). The manifest holds no timestamps; stage timings go to
`build_times.json`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from data_pipeline import chunks as chunking
from data_pipeline.build_bm25 import build_bm25, remove_other_retriever_files
from data_pipeline.build_state import (
    KILL_ENV,
    STATE_DIR,
    Markers,
    dir_sha256,
    event,
    progress,
    write_row_blocks,
)
from data_pipeline.build_state import fingerprint as _sha
from data_pipeline.database import (
    BUILD_TIMES_FILE,
    DOCUMENTS_FILE,
    MANIFEST,
    TOKENIZER_FILE,
    DatabaseWriter,
    RetrievalDatabase,
    partial_path,
    publish,
    shard_dir_name,
    write_json_atomic,
)
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import Tokenizer, file_sha256, load_tokenizer, train_tokenizer

__all__ = ["KILL_ENV", "STATE_DIR", "build_database", "run_build_db"]
log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...  # float32 [N, dim]


def _open_corpus(corpus_cfg):
    from data_pipeline.corpora import open_corpus

    return open_corpus(corpus_cfg)


def _make_embedder(embedder_cfg) -> Embedder:
    from data_pipeline.embed import ChunkEmbedder, default_embedder_path

    path = embedder_cfg.path or default_embedder_path()
    return ChunkEmbedder(path, batch_size=embedder_cfg.batch_size,
                         max_wordpieces=embedder_cfg.max_wordpieces, dtype=embedder_cfg.dtype,
                         name=embedder_cfg.name)


def _dedup_filter(config, corpus):
    """A callable(text) -> bool, True for train texts that near-duplicate an evaluation
    document (data_pipeline.dedup, MinHash-LSH over the validation and test documents), or
    None when dedup is off. The MinHash index is built on the first call, so a resumed build
    whose train chunks are done does not build it."""
    db_cfg = config.database
    if not db_cfg.dedup_against_eval:
        return None
    built = []

    def is_near_duplicate(text: str) -> bool:
        if not built:
            from data_pipeline.dedup import NearDuplicateFilter

            index = NearDuplicateFilter(threshold=db_cfg.dedup_threshold,
                                        ngram=db_cfg.dedup_ngram, num_perm=db_cfg.dedup_num_perm)
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
def _stage_tokenizer(config, corpus, partial: Path, markers: Markers) -> Tokenizer:
    tok_cfg = config.tokenizer
    source_sha = file_sha256(tok_cfg.model_path) if tok_cfg.model_path else None
    inputs = _sha({"corpus": config.corpus.to_dict(), "tokenizer": tok_cfg.to_dict(),
                   "source_sha256": source_sha})
    target = partial / TOKENIZER_FILE
    marker = markers.get("tokenizer", inputs)
    if marker and target.is_file() and file_sha256(target) == marker["sha256"]:
        return load_tokenizer(target)
    if tok_cfg.model_path:
        shutil.copyfile(tok_cfg.model_path, target)
        tokenizer = load_tokenizer(target)
    else:
        log.info("training a %d-piece SentencePiece %s tokenizer on %.1f MB of train text",
                 tok_cfg.vocab_size, tok_cfg.model_type, tok_cfg.train_sample_bytes / 1e6)
        tokenizer = train_tokenizer((d.text for d in corpus.documents("train")), target,
                                    vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
                                    sample_bytes=tok_cfg.train_sample_bytes)
    markers.put("tokenizer", inputs, sha256=tokenizer.sha256)
    return tokenizer


def _stage_chunks(config, corpus, tokenizer: Tokenizer, split: str, first_doc_id: int,
                  partial: Path, markers: Markers, drop) -> dict:
    db_cfg = config.database
    is_train = split == "train"
    max_chunks = db_cfg.max_chunks
    if not is_train and db_cfg.max_eval_chunks >= 0:
        max_chunks = db_cfg.max_eval_chunks
    inputs = _sha({"corpus": config.corpus.to_dict(), "tokenizer": tokenizer.sha256,
                   "chunk_len": db_cfg.chunk_len, "max_chunks": max_chunks,
                   "fraction": db_cfg.fraction if is_train else 1.0, "first_doc_id": first_doc_id,
                   "max_document_chunks": db_cfg.max_document_chunks if is_train else -1,
                   "dedup": [db_cfg.dedup_against_eval, db_cfg.dedup_threshold,
                             db_cfg.dedup_ngram, db_cfg.dedup_num_perm] if is_train else None})
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
        stats = chunking.chunk_split(
            corpus.documents(split), tokenizer, directory, rows_path, split=split,
            chunk_len=db_cfg.chunk_len, first_doc_id=first_doc_id,
            max_chunks=max_chunks, truncate_last=is_train,
            fraction=db_cfg.fraction if is_train else 1.0,
            drop=drop if is_train else None, progress=bar,
            max_document_chunks=db_cfg.max_document_chunks if is_train else -1)
    finally:
        bar.close()
    if is_train and stats.num_chunks == 0:
        raise DataError(f"the train split of corpus {config.corpus.kind!r} "
                        f"({config.corpus.path or 'built-in'}) produced no chunks; check "
                        "corpus.path / corpus.kind (and database.fraction)")
    return markers.put(f"chunks_{split}", inputs, stats=stats.to_dict(),
                       sha256={k: file_sha256(f) for k, f in files.items()})


def _stage_keys(tokenizer: Tokenizer, embedder: Embedder, split: str, tokens_sha: str,
                embedder_inputs: dict, block_chunks: int, partial: Path,
                markers: Markers) -> str:
    """Embed a split's chunks into <split>/keys.npy block by block. Returns the keys'
    fingerprint (sha256 over the block checksums)."""
    tokens = np.load(partial / split / "tokens.npy", mmap_mode="r")
    # One bar for the stage: the embedder's own per-call bar is turned off.
    takes_progress = "progress" in inspect.signature(embedder.embed).parameters
    embed = (functools.partial(embedder.embed, progress=False) if takes_progress
             else embedder.embed)

    def compute(rows: slice) -> np.ndarray:
        return embed([tokenizer.decode(row) for row in np.asarray(tokens[rows])])

    inputs = _sha({"tokens": tokens_sha, "embedder": embedder_inputs, "dim": embedder.dim,
                   "block_chunks": block_chunks})
    return write_row_blocks(partial / split / "keys.npy",
                            shape=(int(tokens.shape[0]), embedder.dim), dtype=np.float32,
                            inputs=inputs, block_rows=block_chunks, markers=markers,
                            name=f"keys_{split}", event_prefix=f"keys/{split}",
                            compute=compute, desc=f"keys {split}")


def _stage_index(index_cfg, shard_chunks: int, keys_fingerprint: str, partial: Path,
                 markers: Markers) -> list[dict]:
    """Build one ScaNN searcher per `shard_chunks` contiguous train chunks."""
    from data_pipeline.index import IndexParams, build_shard

    keys = np.load(partial / "train" / "keys.npy", mmap_mode="r")
    n = keys.shape[0]
    shards = []
    starts = range(0, n, shard_chunks)
    bar = progress(n, "index", "chunk")
    for i, first in enumerate(starts):
        count = min(shard_chunks, n - first)
        rel = shard_dir_name(i)
        params = IndexParams.from_config(index_cfg, count)
        inputs = _sha({"keys": keys_fingerprint, "index": index_cfg.to_dict(), "first": first,
                       "count": count})
        target = partial / rel
        marker = markers.get(f"shard_{i:05d}", inputs)
        if not (marker and target.is_dir() and dir_sha256(target) == marker["sha256"]):
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            searcher = build_shard(keys[first:first + count], params, first_chunk=first)
            event(f"index/shard_{i:05d}/built")
            searcher.save(target)
            event(f"index/shard_{i:05d}/saved")
            marker = markers.put(f"shard_{i:05d}", inputs, sha256=dir_sha256(target),
                                 params=params.to_json())
        shards.append({"first_chunk": first, "num_chunks": count, "dir": rel,
                       "params": marker.get("params", {})})
        bar.update(count)
    bar.close()
    # Shards of an earlier attempt with another shard size would otherwise ship as orphans.
    wanted = {partial / s["dir"] for s in shards}
    for stale in (partial / "index").glob("shard_*"):
        if stale not in wanted:
            shutil.rmtree(stale)
    return shards


def _stage_recall(index_cfg, partial: Path, shards: list[dict], eval_splits) -> dict:
    """recall@10 of the sharded ScaNN search against exact search on held-out keys:
    validation (or test) keys when the database has them, else train keys plus noise."""
    from data_pipeline.index import (
        IndexParams,
        ShardedSearcher,
        ShardSearcher,
        check_recall,
        measure_recall,
        noisy_queries,
    )

    train_keys = np.load(partial / "train" / "keys.npy", mmap_mode="r")
    source = next((s for s in eval_splits
                   if np.load(partial / s / "keys.npy", mmap_mode="r").shape[0] > 0), None)
    if source is not None:
        held_out = np.load(partial / source / "keys.npy", mmap_mode="r")
        rng = np.random.default_rng(0)
        count = min(index_cfg.recall_sample, held_out.shape[0])
        rows = np.sort(rng.choice(held_out.shape[0], size=count, replace=False))
        queries = np.asarray(held_out[rows], dtype=np.float32)
    else:
        queries = noisy_queries(train_keys, index_cfg.recall_sample, seed=0)
        source = "train+noise"
    searcher = ShardedSearcher([ShardSearcher.load(partial / s["dir"], s["first_chunk"])
                                for s in shards])
    recall = float(measure_recall(searcher, train_keys, queries, k=10))
    # The largest shard's parameters name the knob to raise in the error message.
    largest = max(shards, key=lambda s: s["num_chunks"])
    check_recall(recall, IndexParams.from_config(index_cfg, largest["num_chunks"]),
                 where=f"index of {partial} ({len(queries)} {source} queries)")
    return {"recall_at_10": round(recall, 6), "recall_queries": int(len(queries)),
            "recall_query_source": source}


# ---------------------------------------------------------------------------- build
def build_database(
    config,
    db_path: str | os.PathLike,
    *,
    force: bool = False,
    corpus=None,
    embedder: Embedder | None = None,
    key_block_chunks: int | None = None,
) -> RetrievalDatabase:
    """Build (or resume building) the retrieval database of `config` at `db_path`.

    Args:
      config: a validated config (sections corpus, tokenizer, database, embedder, index).
      db_path: the database directory.
      force: rebuild even if a complete database exists there (a partial build resumes).
      corpus: a Corpus (default: data_pipeline.corpora.open_corpus(config.corpus)).
      embedder: anything with .name, .dim, .embed(texts) (default: ChunkEmbedder from
        config.embedder); unused (never loaded) for database.retriever "bm25".
      key_block_chunks: chunks per resumable block of keys or BM25 candidates (default: 16
        embedder batches, at least 1024; 4096 for BM25 candidates).
    Returns:
      the opened, checked database.
    """
    db_path = Path(db_path)
    db_cfg = config.database
    retriever = str(db_cfg.retriever)
    bert = retriever == "bert"
    if db_path.exists() and not force:
        log.info("database %s exists; pass --force to rebuild it", db_path)
        name = embedder.name if embedder is not None else config.embedder.name
        return RetrievalDatabase.open(db_path, expect_chunk_len=db_cfg.chunk_len,
                                      expect_embedder=name if bert else None,
                                      expect_retriever=retriever)
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
    corpus = corpus if corpus is not None else _open_corpus(config.corpus)
    partial.mkdir(parents=True, exist_ok=True)
    markers = Markers(partial)

    tokenizer = _stage_tokenizer(config, corpus, partial, markers)
    lap("tokenizer")

    drop = _dedup_filter(config, corpus)
    splits = ["train", *[s for s in db_cfg.eval_splits if s != "train"]]
    chunk_markers, next_doc_id = {}, 0
    for split in splits:
        chunk_markers[split] = _stage_chunks(config, corpus, tokenizer, split, next_doc_id,
                                             partial, markers, drop)
        next_doc_id = chunk_markers[split]["stats"]["next_doc_id"]
    lap("chunks")

    remove_other_retriever_files(partial, retriever, splits)
    shards: list[dict] = []
    bm25_info = recall = None
    if bert:
        embedder = embedder if embedder is not None else _make_embedder(config.embedder)
        block = key_block_chunks or max(1024, 16 * config.embedder.batch_size)
        emb_inputs = {"name": embedder.name, **config.embedder.to_dict()}
        keys_fp = {}
        for split in splits:
            keys_fp[split] = _stage_keys(tokenizer, embedder, split,
                                         chunk_markers[split]["sha256"]["tokens"], emb_inputs,
                                         block, partial, markers)
        lap("keys")
        shards = _stage_index(config.index, db_cfg.shard_chunks, keys_fp["train"], partial,
                              markers)
        lap("index")
        # Below index.recall_floor this raises; the partial build keeps its keys, so a rerun
        # with more index.num_leaves_to_search rebuilds only the index.
        recall = _stage_recall(config.index, partial, shards,
                               [s for s in splits if s != "train"])
        lap("recall")
    else:
        bm25_info = build_bm25(
            tokenizer, splits, {s: chunk_markers[s]["sha256"] for s in splits},
            num_candidates=int(config.index.num_neighbours),
            block_rows=key_block_chunks or 4096, partial=partial, markers=markers)
        lap("bm25")

    writer = DatabaseWriter(db_path, chunk_len=db_cfg.chunk_len,
                            tokenizer_path=partial / TOKENIZER_FILE,
                            embedder_name=embedder.name if bert else "bm25",
                            embed_dim=embedder.dim if bert else 0,
                            corpus={"kind": config.corpus.kind,
                                    "description": getattr(corpus, "description", "")},
                            resume=True, retriever=retriever)
    for stale in ("validation", "test"):  # left by an earlier attempt with other eval_splits
        if stale not in splits and (partial / stale).exists():
            shutil.rmtree(partial / stale)
    with open(partial / DOCUMENTS_FILE, "wb") as out:
        for split in splits:
            with open(markers.root / f"documents_{split}.jsonl", "rb") as rows:
                shutil.copyfileobj(rows, out)
    for split in splits:
        stats = chunk_markers[split]["stats"]
        writer.record_split(split, num_chunks=stats["num_chunks"], has_keys=bert,
                            num_documents=stats["num_documents"], num_tokens=stats["num_tokens"],
                            num_bytes=stats["num_bytes"], has_bm25_candidates=not bert)
    for shard in shards:  # already saved under their directories
        writer.add_shard(shard["first_chunk"], shard["num_chunks"])
    if bert:
        writer.index_info = {"params": shards[0]["params"] if shards else {}, **recall}
    writer.bm25_info = bm25_info
    train_stats = chunk_markers["train"]["stats"]
    writer.dedup_info = {"removed": train_stats["skipped_dedup"],
                         "threshold": db_cfg.dedup_threshold if db_cfg.dedup_against_eval
                         else None}
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
    lines = [f"retrieval database {db.path}"]
    for split, info in m["splits"].items():
        lines.append(f"  {split:<10} {info['num_chunks']:>10,} chunks  "
                     f"{info['num_documents']:>8,} documents  {info['num_tokens']:>12,} tokens")
    if db.retriever == "bm25":
        lines.append(f"  bm25       top-{m['bm25']['num_candidates']} candidates per chunk "
                     f"(bm25s {m['bm25'].get('bm25s_version')})")
    else:
        recall = m["index"].get("recall_at_10")
        lines.append(f"  index      {len(m['shards'])} shard(s), recall@10 {recall} "
                     f"({m['index'].get('recall_query_source')})")
    lines.append("  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    lines.append(f"  size       {_dir_bytes(db.path) / 1e6:.1f} MB")
    print("\n".join(lines), flush=True)


def run_build_db(args) -> int:
    """CLI: `retro-jax build-db --config EXP --workdir W [--force]`."""
    from retro_jax.configs import config_from_args

    config = config_from_args(args)
    db_path = Path(config.database.path) if config.database.path else Path(args.workdir) / "db"
    build_database(config, db_path, force=bool(getattr(args, "force", False)))
    return 0
