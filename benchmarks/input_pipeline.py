#!/usr/bin/env python
"""Input pipeline benchmark: examples/s and neighbour queries/s beside a train step's appetite.

JSON lines, one object per figure set:
  kind=database   the synthetic database: chunks, dim, index kind, build seconds
  kind=pipeline   mode=inline | precomputed | off: examples/s, neighbour queries/s (chunks
                  searched per second; each over-fetches k * overfetch candidates), batches
  kind=train_step the cpu-small RETRO train step (if retro_jax.models imports): step seconds,
                  examples/s it consumes
  kind=summary    pipeline examples/s over train-step examples/s (goal >= 3)

Shape "cpu-small": n=512, m=64 (L=8), k=2, overfetch 4, batch 8, packed sequences. The
database: 200k chunks (--quick: 50k) of random tokens in ~1k documents, 384-dim keys
clustered around 1,000 centres (documents near a centre, chunks near their document), indexed
with the real index code (data_pipeline.retrieval.scann: ScaNN tree + AH + re-ordering above
20k keys, one shard). The train step: the demo model (d 256, 4 layers, CCA at 2 and 4,
encoder 2 x 256) at a 32k vocabulary, AdamW, fp32, on this machine's CPUs.

    .venv/bin/python benchmarks/input_pipeline.py --quick
    .venv/bin/python benchmarks/input_pipeline.py
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

SEQ_LEN, CHUNK_LEN, K, OVERFETCH, BATCH = 512, 64, 2, 4, 8
DIM, VOCAB = 384, 32_000


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def synthetic_database(path: Path, num_chunks: int, seed: int = 0):
    """A database of `num_chunks` train chunks with clustered keys, one index shard scaled
    with the base config's index settings (data_pipeline.database.synthetic)."""
    from data_pipeline.database.synthetic import (
        document_lengths,
        synthetic_tokenizer,
        write_synthetic_database,
    )
    from data_pipeline.retrieval.scann import IndexParams
    from retro_jax.configs.base import get_base_config

    rng = np.random.default_rng(seed)
    lengths = document_lengths(rng, total_chunks=num_chunks, chunk_len=CHUNK_LEN)
    index_settings = get_base_config().index.to_dict()
    start = time.perf_counter()
    db = write_synthetic_database(
        path, synthetic_tokenizer(path.parent / "bench_tok.model"), documents={"train": lengths},
        chunk_len=CHUNK_LEN, dim=DIM, num_clusters=1000, index_settings=index_settings,
        seed=seed)
    build_s = time.perf_counter() - start
    params = IndexParams.for_size(num_chunks, **index_settings)
    emit({"kind": "database", "chunks": num_chunks, "documents": len(lengths), "dim": DIM,
          "index": "brute force" if params.brute_force else
          f"tree {params.num_leaves} leaves / {params.num_leaves_to_search} searched, AH, "
          f"reorder {params.reorder_k}", "write_and_index_s": round(build_s, 1)})
    return db


def time_dataset(ds, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """(batches per second, batches timed) over about `seconds` after a warm-up."""
    it = ds.as_numpy_iterator()
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        count += 1
    return count / (time.perf_counter() - start), count


def bench_pipeline(db, work: Path, seconds: float, precompute: bool) -> dict[str, float]:
    from data_pipeline.input_pipeline import make_dataset, precompute_neighbours

    L = SEQ_LEN // CHUNK_LEN
    common = dict(seq_len=SEQ_LEN, batch_size=BATCH, overfetch=OVERFETCH, seed=0)
    modes = {"inline": dict(num_neighbours=K), "off": dict(num_neighbours=0)}
    if precompute:
        start = time.perf_counter()
        out = precompute_neighbours(db, "train", work / "neighbours", num_neighbours=K,
                                    overfetch=OVERFETCH)
        emit({"kind": "precompute", "chunks": db.split("train").tokens.shape[0],
              "seconds": round(time.perf_counter() - start, 1),
              "queries_per_s": round(db.split("train").tokens.shape[0]
                                     / (time.perf_counter() - start))})
        modes["precomputed"] = dict(num_neighbours=K, precomputed_dir=out)
    rates = {}
    for mode, kwargs in modes.items():
        per_s, count = time_dataset(make_dataset(db, "train", **common, **kwargs), seconds)
        rates[mode] = per_s * BATCH
        emit({"kind": "pipeline", "mode": mode, "examples_per_s": round(per_s * BATCH, 1),
              "neighbour_queries_per_s": round(per_s * BATCH * L) if kwargs["num_neighbours"]
              else 0, "candidates_per_query": K * OVERFETCH if mode == "inline" else 0,
              "batches_timed": count, "seq_len": SEQ_LEN, "batch": BATCH, "k": K})
    return rates


def bench_train_step(steps: int) -> float | None:
    """Seconds per cpu-small train step, or None when retro_jax.models is not usable."""
    try:
        import jax
        import optax
        from flax import nnx

        from retro_jax.models.config import RetroConfig
        from retro_jax.models.loss import cross_entropy
        from retro_jax.models.retro import Retro
    except ImportError as e:
        emit({"kind": "train_step", "skipped": f"retro_jax.models not importable: {e}"})
        return None
    from experiments.demo import get_config

    cfg = get_config()
    cfg.model.vocab_size = VOCAB
    model = Retro(RetroConfig.from_config(cfg.model, CHUNK_LEN), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, inputs, targets, neighbours):
        def loss_fn(model):
            nll, count = cross_entropy(model(inputs, neighbours), targets)
            return nll / count.clip(1)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    L = SEQ_LEN // CHUNK_LEN
    inputs = rng.integers(4, VOCAB, size=(BATCH, SEQ_LEN), dtype=np.int32)
    neighbours = rng.integers(4, VOCAB, size=(BATCH, L, K, 2 * CHUNK_LEN), dtype=np.int32)
    jax.block_until_ready(step(model, optimizer, inputs, inputs, neighbours))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(model, optimizer, inputs, inputs, neighbours)
    jax.block_until_ready(loss)
    seconds = (time.perf_counter() - start) / steps
    emit({"kind": "train_step", "model": "experiments/demo.py model, vocab 32000, fp32",
          "seconds_per_step": round(seconds, 3),
          "examples_per_s_consumed": round(BATCH / seconds, 2), "steps_timed": steps,
          "devices": len(jax.devices()), "backend": jax.default_backend()})
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k chunks, shorter timings")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="timing per mode")
    parser.add_argument("--no-train-step", action="store_true")
    args = parser.parse_args(argv)
    num_chunks = args.chunks or (50_000 if args.quick else 200_000)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    emit({"kind": "host", "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = synthetic_database(work / "db", num_chunks)
        rates = bench_pipeline(db, work, seconds, precompute=True)
        step_s = None if args.no_train_step else bench_train_step(2 if args.quick else 3)
    summary = {"kind": "summary", "pipeline_examples_per_s": round(rates["inline"], 1)}
    if step_s is not None:
        consumed = BATCH / step_s
        summary.update(train_step_examples_per_s=round(consumed, 2),
                       headroom=round(rates["inline"] / consumed, 1), goal=3.0,
                       ok=bool(rates["inline"] >= 3 * consumed))
    else:
        summary["train_step"] = "not measured (retro_jax.models not importable)"
    emit(summary)


if __name__ == "__main__":
    main()
