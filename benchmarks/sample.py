"""Sampling speed: tokens/s with the KV cache and without it (full forward every token).

    .venv/bin/python benchmarks/sample.py [--quick] [--tokens 512] [--config experiments/demo.py]

The model is the experiment's (default: the CPU demo, d 256 x 4 layers, CCA at 2 and 4,
m 64, vocab 4096) with random weights (speed does not depend on them). The prompt is one
chunk of m random tokens; `--tokens` are generated greedily (EOS ignored), with retrieval at
every completed chunk from a stand-in retriever (k random neighbours of 2m tokens, no
database): the figures are the model's decoding cost, re-encoding of neighbours included;
keying a chunk with the frozen BERT and searching ScaNN add a fixed cost per m tokens
(`--with-embedder` measures the BERT part). Both modes compile before timing (one warm-up
generation of a chunk). Prints one JSON object per mode, then a summary with the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class RandomRetriever:
    """k neighbours of random tokens per chunk (deterministic in the chunk's tokens)."""

    def __init__(self, k: int, m: int, vocab: int):
        self.num_neighbours, self.m, self.vocab = k, m, vocab

    def __call__(self, chunk_tokens):
        rng = np.random.default_rng(int(np.sum(chunk_tokens)))
        ids = np.arange(self.num_neighbours, dtype=np.int64)
        return ids, rng.integers(4, self.vocab, (self.num_neighbours, 2 * self.m), np.int32)


def run_mode(model, prompt, *, tokens: int, max_len: int, k: int, use_cache: bool) -> dict:
    import jax

    from retro_jax.sample.decode import CachedDecoder, UncachedDecoder
    from retro_jax.sample.generate import generate

    cfg = model.cfg
    retriever = RandomRetriever(k, cfg.chunk_len, cfg.vocab_size) if cfg.retrieval else None
    cls = CachedDecoder if use_cache else UncachedDecoder
    decoder = cls(model, batch=1, max_len=max_len, num_neighbours=k)
    # Warm-up: compiles every program the timed run uses (plain and retrieval steps).
    t0 = time.perf_counter()
    generate(model, prompt, max_tokens=cfg.chunk_len + 1, max_len=max_len, retriever=retriever,
             decoder=decoder, stop_at_eos=False)
    compile_s = time.perf_counter() - t0
    result = generate(model, prompt, max_tokens=tokens, max_len=max_len, retriever=retriever,
                      decoder=decoder, stop_at_eos=False)
    t = result.timings
    return {
        "benchmark": "sample", "mode": "cached" if use_cache else "uncached",
        "backend": jax.default_backend(), "generated_tokens": int(len(result.generated)),
        "prompt_tokens": int(result.prompt_len), "max_len": max_len, "num_neighbours": k,
        "tokens_per_second": round(t["tokens_per_second"], 2),
        "ms_per_token": round(1000 * t["decode_seconds"] / max(1, len(result.generated)), 3),
        "prefill_seconds": round(t["prefill_seconds"], 3),
        "warmup_seconds": round(compile_s, 2),
        "retrievals": int(len(result.neighbour_ids)),
        "tokens": result.tokens,
    }


def embedder_cost(m: int) -> dict:
    """Seconds to key one chunk of text with the frozen BERT (batch of one, warm)."""
    import jax
    from jax.sharding import Mesh

    from data_pipeline.retrieval.embed import ChunkEmbedder, default_embedder_path

    emb = ChunkEmbedder(default_embedder_path(), batch_size=1, max_wordpieces=128,
                        mesh=Mesh(np.array(jax.local_devices()[:1]), ("data",)))
    text = " ".join(["retrieval"] * m)
    emb.embed([text])
    t0 = time.perf_counter()
    for _ in range(5):
        emb.embed([text])
    return {"benchmark": "sample", "mode": "embed_one_chunk",
            "seconds_per_chunk": round((time.perf_counter() - t0) / 5, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments" / "demo.py"),
                    help="experiment file whose model is timed")
    ap.add_argument("--tokens", type=int, default=512, help="tokens to generate")
    ap.add_argument("--quick", action="store_true", help="128 tokens")
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--with-embedder", action="store_true",
                    help="also time keying one chunk with the frozen BERT")
    ap.add_argument("--json-out", type=Path, default=None)
    args, overrides = ap.parse_known_args()
    overrides = [o[len("--config."):] for o in overrides if o.startswith("--config.")]
    tokens = 128 if args.quick else args.tokens

    from retro_jax.configs import load_config
    from retro_jax.models import RetroConfig
    from retro_jax.models.retro import init_model

    config = load_config(args.config, overrides)
    cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    m = cfg.chunk_len
    k = int(config.sample.num_neighbours)
    prompt = np.random.default_rng(0).integers(4, cfg.vocab_size, m).tolist()
    max_len = -(-(m + tokens) // m) * m
    model = init_model(cfg, seed=0)
    records = [run_mode(model, prompt, tokens=tokens, max_len=max_len, k=k, use_cache=True)]
    if not args.skip_uncached:
        records.append(run_mode(model, prompt, tokens=tokens, max_len=max_len, k=k,
                                use_cache=False))
    same = (len(records) == 2 and
            np.array_equal(records[0]["tokens"], records[1]["tokens"]))
    for r in records:
        r.pop("tokens")
        print(json.dumps(r))
    summary = {"benchmark": "sample", "mode": "summary", "config": args.config,
               "model": {"d_model": cfg.d_model, "num_layers": cfg.num_layers,
                         "cca_layers": list(cfg.cca_layers), "chunk_len": m,
                         "vocab_size": cfg.vocab_size, "dtype": str(cfg.compute_dtype)},
               "generated_tokens": tokens}
    if len(records) == 2:
        summary["speedup"] = round(records[0]["tokens_per_second"]
                                   / records[1]["tokens_per_second"], 2)
        summary["greedy_tokens_identical"] = bool(same)
    if args.with_embedder:
        records.append(embedder_cost(m))
        print(json.dumps(records[-1]))
    print(json.dumps(summary))
    if args.json_out:
        args.json_out.write_text("\n".join(json.dumps(r) for r in records + [summary]) + "\n")


if __name__ == "__main__":
    main()
