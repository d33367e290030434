"""Building a retrieval database: corpus -> tokenizer -> chunks -> the retriever's files
(frozen-BERT keys + ScaNN shards, or BM25 index + candidates: data_pipeline/retrieval), then
the manifest. `retro-jax build-db` (retro_jax/build_db.py) maps a config onto these arguments.

Every stage but the first is a set of independent units (data_pipeline/resumable.py) run by
the `runner` given: `LocalRunner()` (this process, the default) or
`data_pipeline.beam_runner.BeamRunner(options)` (an Apache Beam pipeline per stage: DirectRunner
on one machine, or Dataflow, Flink, Spark). The stages, in order:

    tokenizer      one step in the driver: SentencePiece trained on a sample of train text,
                   or a model copied in
    dedup filter   one step in the driver: MinHash signatures of the evaluation documents
    chunks         read the corpus sources, plan (doc ids, caps), write chunk shards
                   (data_pipeline/database/chunking.py)
    retriever      its stages (keys, index, recall; or BM25 index, candidates)
    finalize       documents.jsonl, the manifest with every file's sha256, then the rename

The database is written into `<db>.partial/` and renamed into place at the end. Every unit
leaves a done-marker in `<db>.partial/.build/done/` with the fingerprint of its inputs and the
sha256 of its outputs; a rerun (after a crash, `kill -9`, or a failed Beam job) skips the
units that are done and redoes the rest, so the result is byte-identical to an uninterrupted
build, whichever runner ran which stage. Changing a setting redoes the stage it feeds and
everything downstream (the fingerprints chain). The manifest holds no timestamps; stage
timings go to `build_times.json`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_pipeline.database.chunking import (
    DEDUP_DIR,
    ChunkShardStage,
    PlanStage,
    ReadSourceStage,
    SplitRule,
    corpus_cap,
    corpus_sources,
    plan_unit,
    read_units,
    shard_units,
)
from data_pipeline.database.layout import (
    BUILD_TIMES_FILE,
    DEFAULT_SHARD_CHUNKS,
    DOCUMENTS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILE,
    partial_path,
)
from data_pipeline.database.reader import RetrievalDatabase
from data_pipeline.database.writer import DatabaseWriter, publish
from data_pipeline.errors import DataError
from data_pipeline.fileio import file_sha256, write_json_atomic
from data_pipeline.progress import progress
from data_pipeline.resumable import (
    KILL_ENV,
    STATE_DIR,
    LocalRunner,
    Markers,
    Stage,
    Unit,
    event,
    fingerprint,
    output_sha256,
)
from data_pipeline.retrieval import BuildInputs, Retriever, retriever_class, retriever_kinds
from data_pipeline.shards import remove_temporaries, temporary_path
from data_pipeline.text import Tokenizer, load_tokenizer, train_tokenizer

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
    shard_chunks: chunks per shard of every per-chunk array (and per index shard).
    """

    chunk_len: int = 64
    max_chunks: int = -1
    max_eval_chunks: int = -1
    max_document_chunks: int = -1
    fraction: float = 1.0
    eval_splits: tuple[str, ...] = ("validation", "test")
    shard_chunks: int = DEFAULT_SHARD_CHUNKS

    def rule(self, split: str, *, dedup: bool, max_documents: int) -> SplitRule:
        train = split == "train"
        max_chunks = self.max_chunks
        if not train and self.max_eval_chunks >= 0:
            max_chunks = self.max_eval_chunks
        return SplitRule(split=split, chunk_len=self.chunk_len, max_chunks=max_chunks,
                         truncate_last=train, fraction=self.fraction if train else 1.0,
                         max_document_chunks=self.max_document_chunks if train else -1,
                         dedup=train and dedup, max_documents=max_documents)


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    """Drop train documents whose `ngram`-gram Jaccard to an evaluation document is at
    least `threshold` (MinHash-LSH with `num_perm` permutations; paper section 2.1)."""

    threshold: float = 0.8
    ngram: int = 13
    num_perm: int = 128


# ---------------------------------------------------------------------------- driver steps
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


class DedupStage(Stage):
    """The MinHash signatures of the evaluation documents (validation and test), in the
    driver: read once, loaded by every worker that reads train sources."""

    name = "dedup filter"
    unit_label = "step"
    in_driver = True

    def __init__(self, corpus, settings: DedupSettings):
        self.corpus, self.settings = corpus, settings

    def run(self, unit: Unit, root: Path) -> dict:
        from data_pipeline.text import NearDuplicateFilter

        index = NearDuplicateFilter(threshold=self.settings.threshold,
                                    ngram=self.settings.ngram, num_perm=self.settings.num_perm)
        bar = progress(None, "dedup index (eval docs)", "doc")
        for split in ("validation", "test"):
            for doc in self.corpus.documents(split):
                index.add(doc.text)
                bar.update(1)
        bar.close()
        target = Path(root) / unit.outputs[0]
        tmp = temporary_path(target)
        index.save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return {"documents": len(index)}


def _stage_chunks(chunking: ChunkSettings, dedup: DedupSettings | None, corpus, corpus_fp: Any,
                  tokenizer: Tokenizer, splits: list[str], partial: Path,
                  runner) -> dict[str, dict]:
    """Read, plan and shard every split; returns split -> {"stats", "shards"}."""
    dedup_sha = None
    if dedup is not None:
        unit = Unit(name="dedup", inputs=fingerprint({"corpus": corpus_fp,
                                                      "dedup": dataclasses.asdict(dedup)}),
                    outputs=(DEDUP_DIR,))
        marker = LocalRunner().run(DedupStage(corpus, dedup), [unit], partial)[unit.name]
        dedup_sha = output_sha256(marker, DEDUP_DIR)
    reader = ReadSourceStage(corpus, TOKENIZER_FILE, DEDUP_DIR if dedup is not None else None)
    cap = corpus_cap(corpus)
    rules = {split: chunking.rule(split, dedup=dedup is not None, max_documents=cap)
             for split in splits}
    sources = {split: corpus_sources(corpus, split) for split in splits}

    def units_of(split, chosen, first_index=0, stop_docs=-1, stop_chunks=-1):
        return read_units(corpus, rules[split], corpus_fp, tokenizer.sha256, dedup_sha,
                          sources=chosen, first_index=first_index, stop_docs=stop_docs,
                          stop_chunks=stop_chunks)

    read: dict[str, tuple[list[Unit], dict]] = {}
    if runner.parallel:
        # Every source of every split at once; the caps are applied by the plan.
        units = {split: units_of(split, sources[split]) for split in splits}
        markers = runner.run(reader, [u for us in units.values() for u in us], partial)
        read = {split: (units[split], markers) for split in splits}
    else:
        # In corpus order, each source told how much of the cap is left, so reading stops
        # at the cap (a small database from a large corpus reads only what it keeps).
        for split in splits:
            rule, done_units, markers = rules[split], [], {}
            docs = chunks = 0
            for index, source in enumerate(sources[split]):
                if 0 <= rule.max_documents <= docs or 0 <= rule.max_chunks <= chunks:
                    break
                stop_docs = rule.max_documents - docs if rule.max_documents >= 0 else -1
                stop_chunks = rule.max_chunks - chunks if rule.max_chunks >= 0 else -1
                unit = units_of(split, [source], index, stop_docs, stop_chunks)[0]
                marker = runner.run(reader, [unit], partial)[unit.name]
                markers[unit.name] = marker
                done_units.append(unit)
                docs += marker["documents"]
                chunks += marker["chunks"]
            read[split] = (done_units, markers)

    planner, out, next_doc_id = PlanStage(TOKENIZER_FILE), {}, 0
    shards_todo: list[Unit] = []
    plans = {}
    for split in splits:
        source_units, markers = read[split]
        unit = plan_unit(rules[split], next_doc_id, source_units, markers)
        marker = runner.run(planner, [unit], partial)[unit.name]
        plan = json.loads((partial / unit.outputs[0]).read_text())
        plans[split] = (unit, marker, plan)
        next_doc_id = plan["stats"]["next_doc_id"]
        if split == "train" and plan["stats"]["num_chunks"] == 0:
            raise DataError(f"the train split of {getattr(corpus, 'description', 'the corpus')}"
                            " produced no chunks; check corpus.path / corpus.kind (and "
                            "database.fraction)")
        units = shard_units(plan, output_sha256(marker, unit.outputs[0]), split,
                            chunking.chunk_len, chunking.shard_chunks)
        shards_todo.extend(units)
        out[split] = {"stats": plan["stats"], "units": units,
                      "documents": unit.outputs[1]}
    shard_markers = runner.run(ChunkShardStage(), shards_todo, partial)
    for split in splits:
        out[split]["shards"] = [
            {"first_chunk": u.args["first"], "num_chunks": u.args["count"],
             "files": {name: {"file": rel, "sha256": output_sha256(shard_markers[u.name], rel)}
                       for name, rel in zip(("tokens", "doc_ids"), u.outputs)}}
            for u in out[split]["units"]]
    return out


def _remove_other_retrievers_files(partial: Path, retriever: Retriever, splits) -> None:
    """Files an earlier attempt with another retriever left in `<db>.partial/`."""
    for kind in retriever_kinds():
        if kind == retriever.kind:
            continue
        for pattern in retriever_class(kind).owned_paths(splits):
            for found in glob.glob(str(partial / pattern)):
                path = Path(found)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()


def _remove_stale_files(partial: Path, splits, shard_tables) -> None:
    """Files an earlier attempt left in `<db>.partial/`: splits no longer built, shards past
    the end (another shard size), and files a killed writer had not yet renamed into place."""
    for stale in ("validation", "test"):
        if stale not in splits and (partial / stale).exists():
            shutil.rmtree(partial / stale)
    for split in splits:
        wanted = {name for table in shard_tables[split] for name in
                  (Path(f["file"]).name for f in table["files"].values())}
        for path in (partial / split).glob("*.npy"):
            if path.name not in wanted:
                path.unlink()
    remove_temporaries(partial)


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
    runner=None,
) -> RetrievalDatabase:
    """Build (or resume building) a retrieval database at `db_path`.

    Args:
      db_path: the database directory.
      corpus: a Corpus (data_pipeline.corpora.open_corpus(...)): documents(split),
        description, and (for a parallel read) sources(split) / source_documents(split, s).
      retriever: what keys and searches the chunks (data_pipeline.retrieval.make_retriever).
      tokenizer, chunking, dedup: the stages' settings (dedup None = off).
      corpus_settings: what the corpus was opened with (a config's `corpus` section); part of
        the stages' fingerprints, so another corpus redoes them.
      corpus_kind, corpus_path: recorded in the manifest's corpus section beside the
        description (what runs on this database check they read).
      force: rebuild even if a complete database exists there (a partial build resumes).
      runner: runs the stages' units: LocalRunner() (default) or a BeamRunner; the database
        is the same byte for byte either way.
    Returns:
      the opened, checked database.
    """
    db_path = Path(db_path)
    runner = runner if runner is not None else LocalRunner()
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
    if (partial / MANIFEST).is_file() and not (partial / STATE_DIR).exists() and \
            json.loads((partial / MANIFEST).read_text()).get("format_version") != FORMAT_VERSION:
        log.info("%s holds a finished build of another format version; starting over", partial)
        shutil.rmtree(partial)
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

    splits = ["train", *[s for s in chunking.eval_splits if s != "train"]]
    chunks = _stage_chunks(chunking, dedup, corpus, corpus_fp, tok, splits, partial, runner)
    lap("chunks")

    _remove_other_retrievers_files(partial, retriever, splits)
    files = retriever.build(BuildInputs(
        directory=partial, splits=tuple(splits), tokenizer=tok,
        chunk_shards={s: chunks[s]["shards"] for s in splits}, runner=runner,
        tokenizer_file=TOKENIZER_FILE, lap=lap))

    writer = DatabaseWriter(db_path, chunk_len=chunking.chunk_len,
                            tokenizer_path=partial / TOKENIZER_FILE,
                            embedder_name="", embed_dim=0,
                            corpus={"kind": corpus_kind, "path": corpus_path,
                                    "description": getattr(corpus, "description", "")},
                            resume=True, retriever=retriever.kind,
                            shard_chunks=chunking.shard_chunks)
    writer.apply(files)
    tables = {}
    for split in splits:
        table = [dict(shard, files={**shard["files"], **extra}) for shard, extra in
                 zip(chunks[split]["shards"], files.shard_files.get(split, [{}] * len(
                     chunks[split]["shards"])))]
        tables[split] = table
        stats = chunks[split]["stats"]
        writer.record_split(split, num_chunks=stats["num_chunks"], shards=table,
                            num_documents=stats["num_documents"], num_tokens=stats["num_tokens"],
                            num_bytes=stats["num_bytes"], **files.split_flags)
    _remove_stale_files(partial, splits, tables)
    with open(partial / DOCUMENTS_FILE, "wb") as out:
        for split in splits:
            with open(partial / chunks[split]["documents"], "rb") as rows:
                shutil.copyfileobj(rows, out)
    train_stats = chunks["train"]["stats"]
    writer.dedup_info = {"removed": train_stats["skipped_dedup"],
                         "threshold": dedup.threshold if dedup else None}
    lap("finalize")
    write_json_atomic(partial / BUILD_TIMES_FILE, times)
    writer.write_manifest()
    # From here <db>.partial is a complete database; a crash before the rename is finished by
    # the rerun (see the top of this function).
    shutil.rmtree(partial / STATE_DIR)
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
                     f"{info['num_documents']:>8,} documents  {info['num_tokens']:>12,} tokens"
                     f"  {len(info.get('shards', []))} shard(s)")
    lines.append("  " + db.retriever_class.describe(m))
    lines.append("  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    lines.append(f"  size       {_dir_bytes(db.path) / 1e6:.1f} MB")
    print("\n".join(lines), flush=True)
