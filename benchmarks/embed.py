"""Chunk-key throughput: our Flax BERT (ChunkEmbedder) vs sentence-transformers on PyTorch.

    .venv/bin/python benchmarks/embed.py [--quick] [--chunks 512] [--batch-size 64]
                                         [--rounds 1] [--dtype float32] [--no-reference]
                                         [--host-devices N]

Both sides key the same chunks on the same machine, one after the other (ours, then the
reference, `--rounds` times): ~48-whitespace-word pieces of the Python standard library's
.py files, sampled with a fixed seed. The reference is all-MiniLM-L6-v2 through
sentence-transformers (PyTorch CPU) with its Normalize module removed, run as a subprocess
in ~/.cache/bert-ref-venv (created by `bash benchmarks/setup_reference_venv.sh`).

Throughput is steady state: model loading, compilation (ours) and a warm-up batch (the
reference) are timed apart. Besides wall-clock chunks/s each side reports CPU seconds per
chunk (all threads), a steadier figure when other processes share the cores.
Prints JSON lines: one per side per round, then a summary with the ratio ours/reference
and the largest difference between the two sides' keys.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REF_VENV = Path(os.environ.get("REF_VENV", Path.home() / ".cache" / "bert-ref-venv"))
WORDS_PER_CHUNK = 48

# Runs inside the reference venv: argv = model_dir, chunks.json, keys.npy, batch_size, max_len.
_REFERENCE_CODE = r"""
import json, sys, time
import numpy as np, torch, sentence_transformers
from sentence_transformers import SentenceTransformer
model_dir, chunks_path, keys_path, batch_size, max_len = sys.argv[1:6]
texts = json.load(open(chunks_path))
start = time.perf_counter()
model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
model.max_seq_length = int(max_len)
assert type(model[-1]).__name__ == "Normalize", [type(m).__name__ for m in model]
del model[-1]  # our keys are the mean-pooled outputs before normalisation
load_s = time.perf_counter() - start
start = time.perf_counter()
model.encode(texts[: int(batch_size)], batch_size=int(batch_size))
warmup_s = time.perf_counter() - start
wall, cpu = time.perf_counter(), time.process_time()
keys = model.encode(texts, batch_size=int(batch_size), convert_to_numpy=True,
                    normalize_embeddings=False, show_progress_bar=False)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
np.save(keys_path, keys.astype(np.float32))
print(json.dumps(dict(seconds=wall, cpu_seconds=cpu, load_s=load_s, warmup_s=warmup_s,
                      threads=torch.get_num_threads(), torch=torch.__version__,
                      sentence_transformers=sentence_transformers.__version__)))
"""


def stdlib_chunks(count: int, seed: int = 0) -> list[str]:
    """`count` pieces of 48 whitespace-separated words from random stdlib .py files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    rng = random.Random(seed)
    rng.shuffle(files)
    pieces: list[str] = []
    for path in files:
        words = path.read_text(encoding="utf-8", errors="replace").split()
        pieces += [
            " ".join(words[i : i + WORDS_PER_CHUNK])
            for i in range(0, len(words) - WORDS_PER_CHUNK + 1, WORDS_PER_CHUNK)
        ]
        if len(pieces) >= 4 * count:
            break
    return rng.sample(pieces, min(count, len(pieces)))


def run_ours(embedder, chunks: list[str]) -> tuple[dict, np.ndarray]:
    compile_s = embedder.precompile(chunks)
    wall, cpu = time.perf_counter(), time.process_time()
    keys = embedder.embed(chunks, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(seconds=wall, cpu_seconds=cpu, compile_s=compile_s), keys


def run_reference(model_dir: Path, chunks: list[str], batch_size: int, max_len: int):
    with tempfile.TemporaryDirectory() as tmp:
        chunks_path, keys_path = Path(tmp) / "chunks.json", Path(tmp) / "keys.npy"
        chunks_path.write_text(json.dumps(chunks))
        args = [str(model_dir), str(chunks_path), str(keys_path), str(batch_size), str(max_len)]
        done = subprocess.run(
            [str(REF_VENV / "bin" / "python"), "-c", _REFERENCE_CODE, *args],
            capture_output=True, text=True, check=False,
        )
        if done.returncode:
            sys.exit(f"reference run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), np.load(keys_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 chunks")
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-wordpieces", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--host-devices", type=int, default=0,
        help="N > 0: N single-threaded XLA CPU devices (data parallel) instead of one "
        "multi-threaded device; sets XLA_FLAGS before JAX starts",
    )
    args = parser.parse_args()
    count = 128 if args.quick else args.chunks
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.host_devices}"
            + " --xla_cpu_multi_thread_eigen=false"
        )
    from data_pipeline.retrieval.embed import ChunkEmbedder, default_embedder_path
    from data_pipeline.retrieval.embed.bert import forward_flops
    from retro_jax.train.metrics import measure_cpu_matmul_flops

    if not args.no_reference and not (REF_VENV / "bin" / "python").is_file():
        sys.exit(
            f"no reference venv at {REF_VENV}: create it with "
            "`bash benchmarks/setup_reference_venv.sh` (PyTorch CPU + sentence-transformers), "
            "or pass --no-reference"
        )
    chunks = stdlib_chunks(count)
    model_dir = default_embedder_path()
    start = time.perf_counter()
    embedder = ChunkEmbedder(
        model_dir, batch_size=args.batch_size, max_wordpieces=args.max_wordpieces,
        dtype=args.dtype,
    )
    load_s = time.perf_counter() - start
    lengths = np.array([len(t) for t in embedder.tokenizer.encode(chunks)])
    # The same model FLOPs for both sides (the texts' real WordPieces; padding is overhead).
    model_flops = sum(forward_flops(embedder.config, int(n)) for n in lengths)
    padded = sum(rows * length for _, rows, length in embedder.plan(lengths))
    common = dict(bench="embed", chunks=len(chunks), batch_size=args.batch_size,
                  wordpieces_mean=round(float(lengths.mean()), 1),
                  truncated=int((lengths >= args.max_wordpieces).sum()), cores=os.cpu_count())

    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "reference": []}  # chunks per CPU-second
    keys: dict[str, np.ndarray] = {}
    for round_index in range(args.rounds):
        figures, keys["ours"] = run_ours(embedder, chunks)
        rates["ours"].append(len(chunks) / figures["seconds"])
        cpu_rates["ours"].append(len(chunks) / figures["cpu_seconds"])
        print(json.dumps(dict(
            common, side="ours", round=round_index, dtype=args.dtype, load_s=round(load_s, 2),
            padding_overhead=round(padded / lengths.sum() - 1, 3),
            devices=embedder.data_parallelism, **_rounded(figures),
            chunks_per_s=round(rates["ours"][-1], 2),
        )), flush=True)
        if args.no_reference:
            continue
        figures, keys["reference"] = run_reference(
            model_dir, chunks, args.batch_size, args.max_wordpieces
        )
        rates["reference"].append(len(chunks) / figures["seconds"])
        cpu_rates["reference"].append(len(chunks) / figures["cpu_seconds"])
        print(json.dumps(dict(
            common, side="reference", round=round_index, **_rounded(figures),
            chunks_per_s=round(rates["reference"][-1], 2),
        )), flush=True)

    summary = dict(common, side="summary", rounds=args.rounds, dtype=args.dtype,
                   ours_chunks_per_s=round(statistics.median(rates["ours"]), 2))
    if rates["reference"]:
        ours, reference = keys["ours"], keys["reference"]
        cosine = (ours * reference).sum(1) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
        )
        summary.update(
            reference_chunks_per_s=round(statistics.median(rates["reference"]), 2),
            ratio=round(summary["ours_chunks_per_s"] / statistics.median(rates["reference"]), 2),
            goal_ratio=1.5,
            # Chunks per CPU-second, all threads: steadier than wall time on a shared machine.
            ours_chunks_per_cpu_s=round(statistics.median(cpu_rates["ours"]), 2),
            reference_chunks_per_cpu_s=round(statistics.median(cpu_rates["reference"]), 2),
            cpu_ratio=round(
                statistics.median(cpu_rates["ours"]) / statistics.median(cpu_rates["reference"]), 2
            ),
            max_abs_diff=float(np.abs(ours - reference).max()),
            **goal_bound(model_flops / len(chunks), rates, measure_cpu_matmul_flops(2048) / 1e9,
                         encoder_matmul_gflops(embedder.config,
                                               args.batch_size * round(float(lengths.mean())))),
            min_cosine=float(cosine.min()),
        )
    print(json.dumps(summary), flush=True)


def encoder_matmul_gflops(cfg, rows: int) -> float:
    """What XLA's fp32 matmuls reach on the encoder's own shapes ([rows, D] x [D, 3D] for Q,
    K, V; [D, D] output; [D, F] and [F, D] feed-forward), weighted by their FLOPs: the rate
    the whole encoder could reach if everything else were free."""
    from retro_jax.train.metrics import measure_cpu_matmul_flops

    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = ((d, 3 * d), (d, d), (d, f), (f, d))  # (inner, output) per matmul of a layer
    flops = [2.0 * rows * inner * out for inner, out in shapes]
    seconds = sum(fl / measure_cpu_matmul_flops(inner, rows=rows, cols=out)
                  for fl, (inner, out) in zip(flops, shapes))
    return sum(flops) / seconds / 1e9


def goal_bound(per_chunk: float, rates: dict[str, list[float]], peak_gflops: float,
               encoder_gflops: float) -> dict:
    """Model GFLOP/s of each side, and what the 1.5x goal asks of this machine: the model
    GFLOP/s 1.5x the reference's rate would take, against the fp32 matmul peak measured here
    (XLA, 2048 x 2048) and against XLA's matmuls on the encoder's own shapes."""
    ours = statistics.median(rates["ours"]) * per_chunk / 1e9
    reference = statistics.median(rates["reference"]) * per_chunk / 1e9
    return dict(model_gflop_per_chunk=round(per_chunk / 1e9, 3),
                ours_model_gflops=round(ours, 1), reference_model_gflops=round(reference, 1),
                goal_needs_model_gflops=round(1.5 * reference, 1),
                matmul_peak_gflops=round(peak_gflops, 1),
                encoder_matmul_gflops=round(encoder_gflops, 1),
                goal_needs_share_of_peak=round(1.5 * reference / peak_gflops, 2))


def _rounded(figures: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


if __name__ == "__main__":
    main()
