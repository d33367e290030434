#!/usr/bin/env python
"""Database build benchmark: chunks/s of each stage of `build-db` and of
`precompute-neighbours`, in one process and on Apache Beam's DirectRunner with 1 and 2
worker processes. The ratio of the 2-worker to the 1-worker rate is the figure: how the
stages scale with workers on this machine (the Pile plan in docs/notes/pile_build_plan.md
multiplies per-worker rates measured this way).

JSON lines, one object per figure set:
  kind=corpus     documents, files (= sources read in parallel), bytes
  kind=stage      runner (local | beam-1 | beam-2), stage (chunks | keys | index |
                  neighbours | total), chunks, seconds, chunks_per_s
  kind=scaling    stage, beam-2 / beam-1 chunks/s, beam-1 / local chunks/s

The corpus: the first --docs documents of the embedded stdlib corpus (real code and prose,
offline), each cut to 8 chunks of 64 tokens (database.max_document_chunks), in 8 JSONL files;
5% of documents (by title hash) are the validation split, keyed too. Keys: the frozen BERT
(all-MiniLM-L6-v2, on each worker's CPU) or --embedder hash (the tests' trigram stand-in,
which measures the pipeline without the model). Shards of --shard-chunks chunks, so each
stage has several units to spread. Every Beam stage is one pipeline; its start-up (worker
processes, imports) is inside its seconds, which is what a small database pays.

    .venv/bin/python benchmarks/build_db.py --docs 400            # ~2,900 chunks, BERT keys
    .venv/bin/python benchmarks/build_db.py --docs 400 --embedder hash
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Beam's worker processes unpickle the stand-in embedder from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

FILES = 8


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def write_corpus(directory: Path, num_docs: int) -> dict:
    from data_pipeline.corpora import open_corpus

    directory.mkdir(parents=True, exist_ok=True)
    corpus = open_corpus("stdlib")
    lines: list[list[str]] = [[] for _ in range(FILES)]
    count = num_bytes = 0
    for doc in corpus.documents("train"):
        if count == num_docs:
            break
        lines[count % FILES].append(json.dumps({"text": doc.text, "title": doc.id}) + "\n")
        count += 1
        num_bytes += len(doc.text.encode())
    for i, part in enumerate(lines):
        (directory / f"part-{i}.jsonl").write_text("".join(part), encoding="utf-8")
    return {"documents": count, "files": FILES, "bytes": num_bytes}


def make_config(corpus: Path, tokenizer: str, shard_chunks: int, embedder: str):
    from retro_jax.configs import get_base_config, validate_config

    c = get_base_config()
    c.corpus.kind = "jsonl"
    c.corpus.path = str(corpus)
    c.corpus.title_field = "title"
    c.corpus.validation_percent = 5.0
    c.corpus.test_percent = 0.0
    c.tokenizer.vocab_size = 4096
    c.tokenizer.train_sample_bytes = 2_000_000
    c.tokenizer.model_path = tokenizer
    c.model.vocab_size = 4096
    c.database.chunk_len = 64
    c.database.max_document_chunks = 8
    c.database.eval_splits = ("validation",)
    c.database.shard_chunks = shard_chunks
    c.embedder.batch_size = 64
    c.embedder.max_wordpieces = 128
    c.index.recall_sample = 200
    c.data.num_neighbours = 2
    c.data.overfetch = 4
    return validate_config(c)


def make_embedder(kind: str):
    if kind == "hash":
        from tests._db_fixtures import HashEmbedder

        return HashEmbedder(dim=384)
    return None  # the configured frozen BERT (settings: each worker loads it in setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=400, help="stdlib documents in the corpus")
    parser.add_argument("--shard-chunks", type=int, default=500)
    parser.add_argument("--embedder", choices=("bert", "hash"), default="bert")
    parser.add_argument("--runners", default="local,beam-1,beam-2",
                        help="comma-separated: local, beam-N (DirectRunner, N processes)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()

    from data_pipeline.input_pipeline import precompute_neighbours
    from retro_jax.build_db import build_run_database, make_runner

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_build_db_"))
    corpus = work / "corpus"
    emit({"kind": "corpus", **write_corpus(corpus, args.docs)})
    # The tokenizer is trained once and copied into every build (it is a single step).
    first = make_config(corpus, "", args.shard_chunks, args.embedder)
    from data_pipeline.corpora import open_corpus
    from data_pipeline.text import train_tokenizer

    tok = train_tokenizer((d.text for d in open_corpus(**first.corpus.to_dict())
                           .documents("train")), work / "tokenizer.model",
                          vocab_size=4096, sample_bytes=2_000_000)
    config = make_config(corpus, str(tok.path), args.shard_chunks, args.embedder)
    rates: dict[tuple[str, str], float] = {}
    for name in args.runners.split(","):
        if name == "local":
            runner = make_runner("local")
        else:
            workers = int(name.split("-")[1])
            runner = make_runner("beam", f"--runner=DirectRunner --direct_num_workers={workers} "
                                         "--direct_running_mode=multi_processing")
        db_path = work / name / "db"
        shutil.rmtree(db_path.parent, ignore_errors=True)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the build's summary: not a JSON line
            db = build_run_database(config, db_path, embedder=make_embedder(args.embedder),
                                    runner=runner)
        total = time.perf_counter() - start
        times = json.loads((db.path / "build_times.json").read_text())
        splits = db.manifest["splits"]
        all_chunks = sum(s["num_chunks"] for s in splits.values())
        train = splits["train"]["num_chunks"]
        start = time.perf_counter()
        precompute_neighbours(db, "train", work / name / "neighbours", num_neighbours=2,
                              overfetch=4, shard_rows=args.shard_chunks, runner=runner)
        times["neighbours"] = time.perf_counter() - start
        counts = {"chunks": all_chunks, "keys": all_chunks, "index": train,
                  "neighbours": train, "total": all_chunks}
        times["total"] = total
        for stage, chunks in counts.items():
            seconds = times.get(stage, 0.0) + (times.get("recall", 0.0) if stage == "index"
                                              else 0.0)
            rate = chunks / seconds if seconds > 0 else float("inf")
            rates[(name, stage)] = rate
            emit({"kind": "stage", "runner": name, "stage": stage, "chunks": chunks,
                  "seconds": round(seconds, 2), "chunks_per_s": round(rate, 1),
                  "shards": len(splits["train"]["shards"]), "embedder": args.embedder})
    for stage in ("chunks", "keys", "index", "neighbours", "total"):
        out = {"kind": "scaling", "stage": stage}
        if ("beam-2", stage) in rates and ("beam-1", stage) in rates:
            out["beam2_over_beam1"] = round(rates[("beam-2", stage)] / rates[("beam-1", stage)], 2)
        if ("beam-1", stage) in rates and ("local", stage) in rates:
            out["beam1_over_local"] = round(rates[("beam-1", stage)] / rates[("local", stage)], 2)
        emit(out)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
