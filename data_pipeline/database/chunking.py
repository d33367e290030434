"""The chunk stages of the database build: corpus sources -> chunked documents -> a plan ->
chunk shards. Each is a set of units (data_pipeline/resumable.py) that the build's runner
executes in this process or on Apache Beam workers.

    read    one unit per source of every split (a corpus file or a run of files:
            `Corpus.sources`): documents filtered (empty text, database.fraction, near-
            duplicates of evaluation documents), tokenized with the build's tokenizer
            (`encode(text) + [EOS]`), cut into chunks (database.max_document_chunks), into
            `.build/chunks/<split>/source_XXXXX/` (tokens.npy, doc_ids.npy = the document's
            number within the source, documents.jsonl = one line per document read);
    plan    per split, in the driver: the sources' documents in corpus order get their global
            doc ids and first chunks by a prefix sum over the sources, so the ids do not
            depend on how many workers read the sources or in which order they finish; the
            caps apply here (corpus.max_documents over the split, database.max_chunks cutting
            the train split exactly, max_eval_chunks keeping whole documents); writes the
            split's document rows and `plan.json` (which chunks of which source go where);
    shards  one unit per shard of `shard_chunks` chunks of every split: `tokens-XXXXX.npy` and
            `doc_ids-XXXXX.npy` copied from the staged sources the shard overlaps. A shard's
            bytes depend only on the chunks it holds.

On one machine the sources are read in order and reading stops at a cap; on Beam every source
is read in parallel (a cap then costs a full read of the corpus).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.database.layout import array_file
from data_pipeline.errors import DataError
from data_pipeline.resumable import STATE_DIR, Stage, Unit, fingerprint, output_sha256
from data_pipeline.shards import shard_ranges, temporary_path, write_npy_atomic
from data_pipeline.text import ChunkFileWriter, byte_count, chunk_token_ids, keep_fraction
from data_pipeline.text.counting import word_count
from data_pipeline.text.tokenizer import EOS_ID

log = logging.getLogger("data_pipeline.build")
CHUNKS_DIR = f"{STATE_DIR}/chunks"
DEDUP_DIR = f"{STATE_DIR}/dedup_filter"
TOKENIZE_BATCH = 64  # documents per encode_batch call


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How one split is chunked (from ChunkSettings; train and evaluation splits differ).

    max_documents: the corpus' cap over the split when it is read by sources (-1: none, or
    the corpus applies it itself).
    """

    split: str
    chunk_len: int
    max_chunks: int = -1
    truncate_last: bool = False
    fraction: float = 1.0
    max_document_chunks: int = -1
    dedup: bool = False
    max_documents: int = -1


def corpus_sources(corpus, split: str) -> list[str | None]:
    """The sources of a split (None: a corpus without `sources`, read whole)."""
    if hasattr(corpus, "sources") and hasattr(corpus, "source_documents"):
        return list(corpus.sources(split))
    return [None]


def corpus_cap(corpus) -> int:
    """max_documents the plan applies (corpora read by sources are read uncapped)."""
    if hasattr(corpus, "sources") and hasattr(corpus, "source_documents"):
        return int(getattr(corpus, "max_documents", -1))
    return -1


def _kept_bytes(tokenizer, kept_ids, full_bytes: int, share: float) -> int:
    """UTF-8 bytes of a truncated document's kept tokens (a proportional estimate when the
    tokenizer cannot decode)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return int(round(full_bytes * share))
    return byte_count(decode([int(t) for t in kept_ids if t > EOS_ID]))


# ---------------------------------------------------------------------------- read
class ReadSourceStage(Stage):
    """One corpus source of one split per unit, into a staging directory."""

    name = "chunks: read"
    unit_label = "source"

    def __init__(self, corpus, tokenizer_file: str, dedup_dir: str | None):
        self.corpus, self.tokenizer_file, self.dedup_dir = corpus, tokenizer_file, dedup_dir
        self._loaded: dict[str, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_loaded": {}}

    def setup(self, root: Path) -> None:
        from data_pipeline.text import NearDuplicateFilter, load_tokenizer

        if not self._loaded:
            self._loaded["tokenizer"] = load_tokenizer(Path(root) / self.tokenizer_file)
            if self.dedup_dir and (Path(root) / self.dedup_dir).is_dir():
                self._loaded["dedup"] = NearDuplicateFilter.load(Path(root) / self.dedup_dir)

    def _documents(self, split: str, source: str | None):
        if source is None:
            return self.corpus.documents(split)
        return self.corpus.source_documents(split, source)

    def run(self, unit: Unit, root: Path) -> dict:
        args = unit.args
        rule = SplitRule(**args["rule"])
        tokenizer = self._loaded["tokenizer"]
        drop = self._loaded.get("dedup") if rule.dedup else None
        stop_docs, stop_chunks = int(args["stop_docs"]), int(args["stop_chunks"])
        target = Path(root) / unit.outputs[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(target)
        writer = ChunkFileWriter(tmp, rule.chunk_len)
        m = rule.chunk_len
        read = kept = chunks = 0
        complete = True
        docs = iter(self._documents(rule.split, args["source"]))
        with open(tmp / "documents.jsonl", "w", encoding="utf-8") as rows:
            while True:
                if 0 <= stop_docs <= read or 0 <= stop_chunks <= chunks:
                    complete = next(docs, None) is None
                    break
                room = TOKENIZE_BATCH if stop_docs < 0 else min(TOKENIZE_BATCH, stop_docs - read)
                batch = [doc for _, doc in zip(range(room), docs)]
                if not batch:
                    break
                read += len(batch)
                lines: list[dict | None] = []
                todo = []
                for doc in batch:
                    if not doc.text.strip():
                        lines.append({"skip": "empty"})
                    elif not keep_fraction(doc.id, rule.fraction):
                        lines.append({"skip": "fraction"})
                    elif drop is not None and drop.is_near_duplicate(doc.text):
                        lines.append({"skip": "dedup"})
                    else:
                        lines.append(None)
                        todo.append(doc)
                encoded = iter(tokenizer.encode_batch([d.text for d in todo]))
                for doc, line in zip(batch, lines):
                    if line is None:
                        ids = list(next(encoded)) + [EOS_ID]
                        doc_chunks = chunk_token_ids(ids, m)
                        num_tokens, num_bytes = len(ids), byte_count(doc.text)
                        keep = len(doc_chunks)
                        if rule.max_document_chunks >= 0:
                            keep = min(keep, rule.max_document_chunks)
                        truncated = keep < len(doc_chunks)
                        if truncated:
                            doc_chunks = doc_chunks[:keep]
                            num_tokens = min(num_tokens, keep * m)
                            num_bytes = _kept_bytes(tokenizer, ids[:num_tokens], num_bytes,
                                                    num_tokens / len(ids))
                        line = {"id": doc.id, "title": doc.title, "source": doc.source,
                                "num_chunks": int(len(doc_chunks)), "num_tokens": num_tokens,
                                "num_bytes": num_bytes, "num_words": word_count(doc.text),
                                "truncated": truncated}
                        writer.add(doc_chunks, kept)
                        kept += 1
                        chunks += len(doc_chunks)
                    rows.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
        writer.close()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("%s: read %s %s: %d documents, %d kept, %d chunks%s", self.name, rule.split,
                 args["source"] or "(whole split)", read, kept, chunks,
                 "" if complete else " (stopped at the cap)")
        return {"documents": read, "kept": kept, "chunks": chunks, "complete": complete}


def read_units(corpus, rule: SplitRule, corpus_fp: Any, tokenizer_sha: str,
               dedup_sha: str | None, *, sources: Sequence[str | None],
               first_index: int = 0, stop_docs: int = -1, stop_chunks: int = -1) -> list[Unit]:
    """Read units of `sources` (numbered from `first_index`) of one split; `stop_docs` /
    `stop_chunks` let the last of them stop early (one machine, under a cap)."""
    units = []
    for index, source in enumerate(sources, start=first_index):
        rel = f"{CHUNKS_DIR}/{rule.split}/source_{index:05d}"
        units.append(Unit(
            name=f"chunks/{rule.split}/source_{index:05d}",
            inputs=fingerprint({"corpus": corpus_fp, "source": source, "index": index,
                                "rule": dataclasses.asdict(rule), "tokenizer": tokenizer_sha,
                                "dedup": dedup_sha if rule.dedup else None,
                                "stop": [stop_docs, stop_chunks]}),
            outputs=(rel,),
            args={"source": source, "rule": dataclasses.asdict(rule), "stop_docs": stop_docs,
                  "stop_chunks": stop_chunks}))
    return units


# ---------------------------------------------------------------------------- plan
class PlanStage(Stage):
    """One split per unit, in the driver: global doc ids, chunk offsets, caps."""

    name = "chunks: plan"
    unit_label = "split"
    in_driver = True

    def __init__(self, tokenizer_file: str):
        self.tokenizer_file = tokenizer_file

    def run(self, unit: Unit, root: Path) -> dict:
        from data_pipeline.text import load_tokenizer

        root = Path(root)
        tokenizer = load_tokenizer(root / self.tokenizer_file)
        rule = SplitRule(**unit.args["rule"])
        m = rule.chunk_len
        next_doc_id = first_doc_id = int(unit.args["first_doc_id"])
        stats = {"num_chunks": 0, "num_documents": 0, "num_tokens": 0, "num_bytes": 0,
                 "skipped_empty": 0, "skipped_fraction": 0, "skipped_dedup": 0,
                 "truncated_documents": 0}
        pieces, read, done = [], 0, False
        plan_path, rows_path = (root / rel for rel in unit.outputs)
        rows_tmp = temporary_path(rows_path)
        with open(rows_tmp, "w", encoding="utf-8") as out:
            for source in unit.args["sources"]:
                if done:
                    break
                directory = root / source["dir"]
                staged = None
                source_first_chunk, source_first_doc = stats["num_chunks"], next_doc_id
                row_in_source = taken = 0
                with open(directory / "documents.jsonl", encoding="utf-8") as lines:
                    for line in lines:
                        if 0 <= rule.max_documents <= read:
                            done = True
                            break
                        read += 1
                        doc = json.loads(line)
                        if "skip" in doc:
                            stats[f"skipped_{doc['skip']}"] += 1
                            continue
                        keep, num_tokens, num_bytes = (doc["num_chunks"], doc["num_tokens"],
                                                       doc["num_bytes"])
                        truncated = doc["truncated"]
                        if (rule.max_chunks >= 0 and rule.truncate_last
                                and stats["num_chunks"] + keep > rule.max_chunks):
                            keep = rule.max_chunks - stats["num_chunks"]
                        if keep < doc["num_chunks"]:
                            if staged is None:
                                staged = np.load(directory / "tokens.npy", mmap_mode="r")
                            num_tokens = min(num_tokens, keep * m)
                            kept_ids = np.asarray(
                                staged[row_in_source:row_in_source + keep]).reshape(-1)
                            num_bytes = _kept_bytes(tokenizer, kept_ids[:num_tokens], num_bytes,
                                                    num_tokens / max(1, doc["num_tokens"]))
                            truncated = True
                        row = {"doc_id": next_doc_id, "id": doc["id"], "title": doc["title"],
                               "source": doc["source"], "split": rule.split,
                               "first_chunk": stats["num_chunks"], "num_chunks": int(keep),
                               "num_tokens": num_tokens, "num_bytes": num_bytes,
                               "num_words": doc["num_words"]}
                        out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
                        stats["truncated_documents"] += int(truncated)
                        next_doc_id += 1
                        stats["num_documents"] += 1
                        stats["num_chunks"] += keep
                        stats["num_tokens"] += num_tokens
                        stats["num_bytes"] += num_bytes
                        row_in_source += doc["num_chunks"]
                        taken += keep
                        if 0 <= rule.max_chunks <= stats["num_chunks"]:
                            done = True
                            break
                done = done or 0 <= rule.max_documents <= read
                if not done and not source["complete"]:
                    raise DataError(f"{directory}: the source was read only in part, but the "
                                    f"{rule.split} split needs more of it; remove "
                                    f"{root / CHUNKS_DIR} and rerun build-db")
                if taken:
                    pieces.append({"dir": source["dir"], "first_chunk": source_first_chunk,
                                   "num_chunks": taken, "first_doc_id": source_first_doc})
        os.replace(rows_tmp, rows_path)
        stats["next_doc_id"] = next_doc_id
        plan = {"split": rule.split, "first_doc_id": first_doc_id, "pieces": pieces,
                "stats": stats}
        tmp = temporary_path(plan_path)
        tmp.write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, plan_path)
        return {"stats": stats}


def plan_unit(rule: SplitRule, first_doc_id: int, source_units: Sequence[Unit],
              source_markers: Mapping[str, dict]) -> Unit:
    sources = [{"dir": u.outputs[0], "complete": bool(source_markers[u.name]["complete"]),
                "sha256": output_sha256(source_markers[u.name], u.outputs[0])}
               for u in source_units]
    return Unit(name=f"chunks/{rule.split}/plan",
                inputs=fingerprint({"rule": dataclasses.asdict(rule), "sources": sources,
                                    "first_doc_id": first_doc_id}),
                outputs=(f"{CHUNKS_DIR}/{rule.split}/plan.json",
                         f"{STATE_DIR}/documents_{rule.split}.jsonl"),
                args={"rule": dataclasses.asdict(rule), "first_doc_id": first_doc_id,
                      "sources": sources})


# ---------------------------------------------------------------------------- shards
class ChunkShardStage(Stage):
    """One shard of one split per unit: tokens-XXXXX.npy and doc_ids-XXXXX.npy."""

    name = "chunks: shards"

    def run(self, unit: Unit, root: Path) -> dict:
        root = Path(root)
        args = unit.args
        count, m = int(args["count"]), int(args["chunk_len"])
        tokens = np.zeros((count, m), np.int32)
        doc_ids = np.full((count,), -1, np.int64)
        for piece in args["pieces"]:
            directory = root / piece["dir"]
            src = slice(piece["src_first"], piece["src_first"] + piece["count"])
            dst = slice(piece["dst_first"], piece["dst_first"] + piece["count"])
            tokens[dst] = np.load(directory / "tokens.npy", mmap_mode="r")[src]
            doc_ids[dst] = (np.load(directory / "doc_ids.npy", mmap_mode="r")[src]
                            + piece["first_doc_id"])
        if (doc_ids < 0).any():
            raise RuntimeError(f"{unit.name}: the plan does not cover the shard")
        write_npy_atomic(root / unit.outputs[0], tokens)
        write_npy_atomic(root / unit.outputs[1], doc_ids)
        return {}


def shard_units(plan: Mapping, plan_sha: str, split: str, chunk_len: int,
                shard_chunks: int) -> list[Unit]:
    """The shard units of a split from its plan."""
    units = []
    for i, (first, count) in enumerate(shard_ranges(plan["stats"]["num_chunks"], shard_chunks)):
        pieces = []
        for piece in plan["pieces"]:
            lo = max(first, piece["first_chunk"])
            hi = min(first + count, piece["first_chunk"] + piece["num_chunks"])
            if lo < hi:
                pieces.append({"dir": piece["dir"], "src_first": lo - piece["first_chunk"],
                               "dst_first": lo - first, "count": hi - lo,
                               "first_doc_id": piece["first_doc_id"]})
        units.append(Unit(
            name=f"chunks/{split}/shard_{i:05d}",
            inputs=fingerprint({"plan": plan_sha, "first": first, "count": count,
                                "chunk_len": chunk_len}),
            outputs=(array_file(split, "tokens", i), array_file(split, "doc_ids", i)),
            args={"count": count, "chunk_len": chunk_len, "pieces": pieces, "first": first},
            size=count))
    return units
