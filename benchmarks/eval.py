#!/usr/bin/env python
"""Evaluation benchmark: tokens/s with retrieval on (k=10) vs off, and where the time goes.

JSON lines, one object per figure set:
  kind=database   the synthetic database: train chunks (indexed), eval documents and chunks
  kind=eval       mode=off | on: `evaluate()` end to end (tf.data windows, inline ScaNN
                  retrieval for on, model forward, per-document sums): scored tokens/s after
                  the first (compiling) batch, seconds
  kind=breakdown  the pieces of RETRO[ON] alone: pipeline_windows_per_s (make_eval_windows
                  with k=10: keys, search, filters, neighbour gather, nothing else),
                  model_on_tokens_per_s (the forward with the neighbours already in memory,
                  first MODEL_BATCHES batches), model_off_tokens_per_s
  kind=flops      the forward FLOPs of RETRO[ON] at k=10 over RETRO[OFF], for this model and
                  the paper's 172M and 7.5B shapes (n=2048): the encoder + CCA share that no
                  retrieval implementation can remove
  kind=summary    on_over_off = time(on) / time(off) - 1 end to end (retrieval + encoder + CCA);
                  retrieval_wait_overhead: time the forward waited for windows with k=10
                  (search + gather overlap the forward) over the OFF evaluation time;
                  retrieval_serial_overhead: the k=10 pipeline alone over the OFF evaluation
                  time (an upper bound with no overlap; goal <= 0.25); model_compute_overhead:
                  the forward with k=10 neighbours over the forward without

Shape: n=512, m=64 (L=8), k=10 neighbours of 2m=128 tokens, batch 8 windows, stride n; the
small model of retro_jax/configs/small.py at twice its width (d 256, 4 layers, CCA at 2 and 4,
encoder 2 x 256) and a 4k vocabulary, fp32, on
this machine's CPUs. Database: 50k train chunks (--quick: 10k) of random tokens with clustered
384-dim keys, indexed by data_pipeline.retrieval.scann (ScaNN tree + AH above 20k keys, else brute
force); evaluation split: 32 documents of 8-24 chunks (--quick: 6).

    .venv/bin/python benchmarks/eval.py --quick
    .venv/bin/python benchmarks/eval.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SEQ_LEN, CHUNK_LEN, K, BATCH = 512, 64, 10, 8
MODEL_BATCHES = 4  # batches timed for the model-only breakdown
DIM, VOCAB = 384, 4096


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def synthetic_database(path: Path, train_chunks: int, eval_docs: int, seed: int = 0):
    """Train chunks with clustered keys (one index shard, the base config's index settings)
    and `eval_docs` validation documents of 8-25 chunks (data_pipeline.database.synthetic)."""
    from data_pipeline.database.synthetic import (
        document_lengths,
        synthetic_tokenizer,
        write_synthetic_database,
    )
    from data_pipeline.retrieval.scann import IndexParams
    from retro_jax.configs.base import get_base_config

    rng = np.random.default_rng(seed)
    documents = {"train": document_lengths(rng, total_chunks=train_chunks, chunk_len=CHUNK_LEN),
                 "validation": [(int(c) - 1) * CHUNK_LEN + CHUNK_LEN // 2 + 1
                                for c in rng.integers(8, 25, size=eval_docs)]}
    index_settings = get_base_config().index.to_dict()
    start = time.perf_counter()
    db = write_synthetic_database(
        path, synthetic_tokenizer(path.parent / "bench_tok.model"), documents=documents,
        chunk_len=CHUNK_LEN, dim=DIM, num_clusters=500, index_settings=index_settings,
        seed=seed)
    index_s = time.perf_counter() - start
    params = IndexParams.for_size(train_chunks, **index_settings)
    emit({"kind": "database", "train_chunks": train_chunks, "eval_documents": eval_docs,
          "eval_chunks": int(db.split("validation").tokens.shape[0]), "dim": DIM,
          "index": "brute force" if params.brute_force else
          f"tree {params.num_leaves} leaves / {params.num_leaves_to_search} searched, AH, "
          f"reorder {params.reorder_k}", "write_and_index_s": round(index_s, 1)})
    return db


def demo_model():
    from flax import nnx

    from retro_jax.configs import get_base_config
    from retro_jax.configs.small import shrink
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro

    # The "small" size of :runlocal and the demo (4 layers, CCA at 2 and 4, a 2-layer
    # encoder) at twice its width and a 4k vocabulary.
    config = shrink(get_base_config(), "small", {
        "model.vocab_size": VOCAB, "database.chunk_len": CHUNK_LEN,
        "model.d_model": 256, "model.head_dim": 64, "model.ffw_dim": 1024,
        "model.encoder_width": 256, "model.encoder_head_dim": 64, "model.encoder_ffw_dim": 1024})
    cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    return Retro(cfg, rngs=nnx.Rngs(0))


def _paper_cfg(size: str):
    """The paper's model at `size` (Table 2), CCA every 3rd layer from 6 (from 9 past 15)."""
    from retro_jax.configs import PAPER_SIZES, default_cca_layers
    from retro_jax.models.config import RetroConfig

    return RetroConfig(vocab_size=128_000, chunk_len=CHUNK_LEN, encoder_heads=14,
                       cca_layers=default_cca_layers(PAPER_SIZES[size]["num_layers"]),
                       **PAPER_SIZES[size])


def flops_ratio(cfg, seq_len: int, k: int) -> float:
    """Forward FLOPs per token of RETRO[ON] with k neighbours over the decoder alone
    (retro_jax.train.metrics' count: the ratio of training FLOPs is the forward ratio)."""
    import dataclasses

    from retro_jax.train.metrics import model_flops_per_token

    on = model_flops_per_token(cfg, seq_len=seq_len, num_neighbours=k, chunk_len=CHUNK_LEN)
    off = model_flops_per_token(dataclasses.replace(cfg, cca_layers=()), seq_len=seq_len,
                                num_neighbours=0, chunk_len=CHUNK_LEN)
    return on / off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k train chunks, 6 documents")
    args = parser.parse_args()
    import jax

    from data_pipeline.input_pipeline import make_eval_windows
    from retro_jax.evaluate.evaluator import evaluate
    from retro_jax.evaluate.scoring import make_scorer

    train_chunks, eval_docs = (10_000, 6) if args.quick else (50_000, 32)
    with tempfile.TemporaryDirectory() as tmp:
        db = synthetic_database(Path(tmp) / "db", train_chunks, eval_docs)
        model = demo_model()
        common = dict(seq_len=SEQ_LEN, stride=SEQ_LEN, batch_size=BATCH, progress=False)
        results = {}
        for mode, k in (("off", 0), ("on", K)):
            # Compile on one document first, so the timed pass only measures steady state.
            evaluate(model, db, "validation", num_neighbours=k, max_documents=1, **common)
            result = evaluate(model, db, "validation", num_neighbours=k, **common)
            results[mode] = result.timing
        for mode, timing in results.items():
            emit({"kind": "eval", "mode": mode, "k": K if mode == "on" else 0,
                  "tokens_per_s": round(timing["tokens_per_second"], 1),
                  "scored_tokens": timing["scored_tokens"], "windows": timing["windows"],
                  "seconds": round(timing["seconds"], 2),
                  "input_wait_s": round(timing["input_wait_seconds"], 2),
                  "model_s": round(timing["model_seconds"], 2),
                  "device": jax.devices()[0].platform})

        # The pieces: the pipeline alone, then the forward on batches already in memory.
        ds = make_eval_windows(db, "validation", SEQ_LEN, SEQ_LEN, batch_size=BATCH,
                               num_neighbours=K)
        list(ds.take(1).as_numpy_iterator())
        start = time.perf_counter()
        batches = list(ds.as_numpy_iterator())
        pipeline_s = time.perf_counter() - start
        batches = batches[:MODEL_BATCHES]
        scorer = make_scorer(model)
        tokens = sum(int(b["score_mask"].sum()) for b in batches)
        model_s = {}
        for name, use in (("on", True), ("off", False)):
            b0 = batches[0]
            scorer(b0["inputs"], b0["neighbours"] if use else None, b0["targets"])  # compile
            start = time.perf_counter()
            for b in batches:
                scorer(b["inputs"], b["neighbours"] if use else None, b["targets"])
            model_s[name] = time.perf_counter() - start
        emit({"kind": "breakdown", "windows": results["on"]["windows"],
              "pipeline_windows_per_s": round(results["on"]["windows"] / pipeline_s, 1),
              "pipeline_s": round(pipeline_s, 2),
              "model_on_tokens_per_s": round(tokens / model_s["on"], 1),
              "model_off_tokens_per_s": round(tokens / model_s["off"], 1)})
        for label, cfg, n in (("demo (this run)", model.cfg, SEQ_LEN),
                              ("paper 172M", _paper_cfg("172M"), 2048),
                              ("paper 7.5B", _paper_cfg("7.5B"), 2048)):
            emit({"kind": "flops", "model": label, "seq_len": n, "k": K,
                  "on_over_off": round(flops_ratio(cfg, n, K), 2)})
        time_on = 1.0 / results["on"]["tokens_per_second"]
        time_off = 1.0 / results["off"]["tokens_per_second"]
        off_steady_s = results["off"]["input_wait_seconds"] + results["off"]["model_seconds"]
        emit({"kind": "summary",
              # End to end, RETRO[ON] vs RETRO[OFF]: retrieval plus the encoder + CCA compute.
              "on_over_off": round(time_on / time_off - 1.0, 3),
              # The model waiting for the tf.data windows (search + gather run in parallel
              # with the forward, prefetched): what retrieval adds to evaluation time.
              "retrieval_wait_overhead": round(
                  (results["on"]["input_wait_seconds"] - results["off"]["input_wait_seconds"])
                  / off_steady_s, 3),
              # Upper bound with no overlap: the k=10 pipeline alone over the OFF evaluation.
              "retrieval_serial_overhead": round(pipeline_s / off_steady_s, 3),
              "model_compute_overhead": round(model_s["on"] / model_s["off"] - 1.0, 3),
              "goal": "retrieval (search + neighbour gather) adds <= 25%",
              "met": bool(pipeline_s / off_steady_s <= 0.25)})


if __name__ == "__main__":
    main()
