#!/usr/bin/env python
"""Retrieval benchmark: our ScaNN TF-op index beside faiss HNSW and IVF-PQ (+ exact re-ranking).

JSON lines, one object per figure set:
  kind=data       where the keys come from (real chunk keys, + noise to scale up, or synthetic)
  kind=sweep      one ScaNN tuning point (leaves_to_search, reorder_k) on the tuning queries
  kind=final      impl=scann-default (our config defaults), scann-tuned, faiss-* (from the peer
                  venv): recall@10 vs exact search, queries/s (one batch of --nq queries),
                  build_s, bytes_per_chunk
  kind=scaling    ScaNN at 100k / 1M / 5M clustered synthetic keys: qps, build_s, peak RSS
  kind=scaling_sweep  with --scale-sweep: the same built index at other leaves_to_search
                  (f x sqrt(num_leaves)) and reorder_k: recall@10, us/query, share scanned
  kind=scaling_fit  exponent of the cost per query in N (goal: <= 0.5, i.e. sqrt(N))

Keys: --keys PATH (float32 [N, d] .npy), else benchmarks/.cache/keys.npy when it exists, else
clustered synthetic unit vectors of dim 384 (said in the kind=data line). Real keys fewer than
--n are topped up with noisy copies of themselves. Queries are held out: never in the database.

faiss runs in the peer's virtualenv (benchmarks/peer/setup_venv.sh, $PEER_VENV, default
benchmarks/.cache/peer-venv) as `$PEER_VENV/bin/python benchmarks/retrieval.py --faiss-worker DIR`
on the same .npy files and ground truth, tuned to the same recall target, 2 threads.

    .venv/bin/python benchmarks/retrieval.py --quick          # 100k, scaling at 100k only
    .venv/bin/python benchmarks/retrieval.py                  # 200k, scaling at 100k, 1M, 5M
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KEYS = REPO / "benchmarks" / ".cache" / "keys.npy"
PEER_VENV = Path(os.environ.get("PEER_VENV", Path(__file__).resolve().parent / ".cache"
                                / "peer-venv"))
K = 10
RECALL_QUERIES = 1000  # scaling points: exact answers for this many of the --nq queries


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def clustered(rng: np.random.Generator, n: int, dim: int, *, per_centre: int = 200,
              noise: float = 0.75, centres: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors around n / per_centre random centres (the peer's --data clustered mixture)."""
    if centres is None:
        centres = rng.standard_normal((max(1, n // per_centre), dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 250_000):
        m = min(250_000, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(noise / math.sqrt(dim))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found[:, :K], truth[:, :K]))
    return hits / truth[:, :K].size


# ------------------------------------------------------------------------------- data
def make_data(args, rng) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """-> (description, database [n, d], benchmark queries [nq, d], tuning queries [nt, d])."""
    held = args.nq + args.ntune
    path = Path(args.keys) if args.keys else (DEFAULT_KEYS if DEFAULT_KEYS.exists() else None)
    if path is None:
        x = clustered(rng, args.n + held, args.dim)
        info = dict(source="synthetic", note="no real chunk keys found (benchmarks/.cache/keys.npy"
                    " or --keys): clustered synthetic unit vectors, peer's mixture",
                    dim=args.dim)
        return info, x[:args.n], x[args.n:args.n + args.nq], x[args.n + args.nq:]
    real = np.load(path, mmap_mode="r", allow_pickle=False).astype(np.float32)
    order = rng.permutation(len(real))
    queries, base = real[order[:held]], real[order[held:]]
    info = dict(source=str(path), real_keys=len(base), dim=real.shape[1])
    if len(base) < args.n:  # top up with noisy copies: same distribution, more points
        spread = float(np.sqrt(((base - base.mean(0)) ** 2).mean()))
        extra = base[rng.integers(0, len(base), args.n - len(base))]
        extra += rng.standard_normal(extra.shape, dtype=np.float32) * np.float32(0.1 * spread)
        base = np.concatenate([base, extra])
        info.update(noisy_copies=len(extra), noise_std=round(0.1 * spread, 5))
    return info, base, queries[:args.nq], queries[args.nq:]


# ------------------------------------------------------------------------------- ScaNN side
def scann_searcher_qps(shard, queries: np.ndarray, repeats: int = 3) -> tuple[float, np.ndarray]:
    shard.search(queries[:16], K)  # trace once
    best, ids = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids, _ = shard.search(queries, K)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, ids


def tf_data_qps(shard, queries: np.ndarray, batch: int = 256) -> float:
    """Queries/s through a parallel tf.data map (how the input pipeline calls the index)."""
    import tensorflow as tf
    ds = (tf.data.Dataset.from_tensor_slices(queries).batch(batch)
          .map(lambda q: shard.search_tf(q, K), num_parallel_calls=tf.data.AUTOTUNE))
    for _ in ds.take(1):
        pass
    t0 = time.perf_counter()
    for _ in ds:
        pass
    return len(queries) / (time.perf_counter() - t0)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_scann(args, xb, xq, xt, gt_q, gt_t, workdir: Path) -> None:
    from data_pipeline.retrieval.scann import IndexParams, build_shard
    from retro_jax.configs.base import get_base_config

    params = IndexParams.for_size(len(xb), **get_base_config().index.to_dict())
    t0 = time.perf_counter()
    shard = build_shard(xb, params)
    build_s = time.perf_counter() - t0
    shard_dir = shard.save(workdir / "scann_shard")
    bytes_per_chunk = dir_bytes(shard_dir) / len(xb)
    common = dict(build_s=round(build_s, 2), bytes_per_chunk=round(bytes_per_chunk, 1),
                  n=len(xb), dim=xb.shape[1], nq=len(xq), k=K)

    qps, ids = scann_searcher_qps(shard, xq)
    emit(dict(impl="scann-default", kind="final", recall_at_10=round(recall(ids, gt_q), 4),
              qps=round(qps, 1), qps_tf_data=round(tf_data_qps(shard, xq), 1),
              index_params=dict(num_leaves=params.num_leaves,
                                leaves_to_search=params.num_leaves_to_search,
                                reorder_k=params.reorder_k, dims_per_block=params.dims_per_block),
              **common))

    # Query-time sweep (no rebuild): the fastest setting that reaches the target on tuning
    # queries, then measured once on the benchmark queries.
    leaves = sorted({min(params.num_leaves, max(1, round(params.num_leaves_to_search * f)))
                     for f in (0.15, 0.3, 0.5, 0.75, 1, 1.5, 2, 3)})
    best = None
    for lts in leaves:
        for reorder in (50, 70, 100, 150):
            shard.leaves_to_search, shard.reorder_k = lts, reorder
            qps_t, ids_t = scann_searcher_qps(shard, xt, repeats=2)
            r = recall(ids_t, gt_t)
            emit(dict(impl="scann", kind="sweep", leaves_to_search=lts, reorder_k=reorder,
                      recall_at_10=round(r, 4), qps=round(qps_t, 1), tuning_queries=len(xt)))
            if r >= args.target and (best is None or qps_t > best[2]):
                best = (lts, reorder, qps_t)
            if r >= args.target:
                break  # larger reorder_k only costs more at this leaves_to_search
    if best is None:
        emit(dict(impl="scann-tuned", kind="final", target_reached=False, **common))
        return
    shard.leaves_to_search, shard.reorder_k = best[0], best[1]
    qps, ids = scann_searcher_qps(shard, xq)
    r = recall(ids, gt_q)
    emit(dict(impl="scann-tuned", kind="final", recall_at_10=round(r, 4), qps=round(qps, 1),
              target_reached=r >= args.target,
              index_params=dict(num_leaves=params.num_leaves, leaves_to_search=best[0],
                                reorder_k=best[1]), **common))


# ------------------------------------------------------------------------------- faiss side
def faiss_worker(data_dir: Path, target: float, threads: int) -> None:
    """Runs in the peer venv: HNSW and IVF-PQ(+refine) tuned to `target` on the tuning queries."""
    import faiss

    faiss.omp_set_num_threads(threads)
    load = lambda name: np.load(data_dir / f"{name}.npy", allow_pickle=False)  # noqa: E731
    xb, xq, xt, gt_q, gt_t = (load(n) for n in ("xb", "xq", "xt", "gt_q", "gt_t"))
    n, d = xb.shape
    common = dict(n=n, dim=d, nq=len(xq), k=K, threads=threads, faiss_version=faiss.__version__)

    def search_time(index, q):
        t0 = time.perf_counter()
        _, ids = index.search(q, K)
        return time.perf_counter() - t0, ids

    def tune(impl, index, settings, apply, build_s, extra):
        chosen = None
        for st in settings:
            apply(st)
            s, ids = search_time(index, xt)
            r = recall(ids, gt_t)
            emit(dict(impl=impl, kind="sweep", recall_at_10=round(r, 4), qps=round(len(xt) / s, 1),
                      index_params=st, tuning_queries=len(xt)))
            if chosen is None or r > chosen[1] or r >= target:
                chosen = (st, r)
            if r >= target:
                break
        apply(chosen[0])
        s = min(search_time(index, xq)[0] for _ in range(2))
        ids = search_time(index, xq)[1]
        r = recall(ids, gt_q)
        emit(dict(impl=impl, kind="final", recall_at_10=round(r, 4), qps=round(len(xq) / s, 1),
                  target_reached=r >= target, build_s=round(build_s, 2), index_params=chosen[0],
                  **extra, **common))

    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, 32)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(xb)
    build_s = time.perf_counter() - t0
    nbytes = len(faiss.serialize_index(hnsw))

    def set_ef(st, index=hnsw):
        index.hnsw.efSearch = st["efSearch"]
    tune("faiss-hnswflat", hnsw, [dict(efSearch=e) for e in (16, 32, 64, 128, 256, 512, 1024)],
         set_ef, build_s, dict(bytes_per_chunk=round(nbytes / n, 1)))
    del hnsw

    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    pq_m = max(m for m in (8, 16, 24, 32, 48, 64) if d % m == 0 and m <= d // 4)
    t0 = time.perf_counter()
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, pq_m, 8)
    rng = np.random.default_rng(0)
    ivfpq.train(xb[rng.choice(n, min(n, 40 * nlist), replace=False)])
    ivfpq.add(xb)
    refine = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(xb))
    build_s = time.perf_counter() - t0
    nbytes = len(faiss.serialize_index(ivfpq)) + xb.nbytes

    def set_refine(st):
        ivfpq.nprobe, refine.k_factor = st["nprobe"], st["k_factor"]
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    tune("faiss-ivfpq-refine", refine,
         [dict(nprobe=p, k_factor=f) for p in probes for f in (4, 16, 64)], set_refine, build_s,
         dict(bytes_per_chunk=round(nbytes / n, 1), nlist=nlist, pq_m=pq_m))
    emit(dict(impl="faiss-summary", kind="summary", peak_rss_mib=peak_rss_mib(), **common))


def run_faiss(args, workdir: Path) -> list[dict]:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        emit(dict(impl="faiss", kind="skipped", reason=f"no peer venv at {PEER_VENV}: run "
                  "benchmarks/peer/setup_venv.sh"))
        return []
    cmd = [str(python), __file__, "--faiss-worker", str(workdir), "--target", str(args.target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.faiss_timeout)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for rec in records:
        emit(rec)
    if proc.returncode:
        emit(dict(impl="faiss", kind="error", returncode=proc.returncode,
                  stderr=proc.stderr[-2000:]))
    return records


# ------------------------------------------------------------------------------- scaling
SWEEP_LEAVES_FACTORS = (1.5, 2, 3, 4, 6)
SWEEP_REORDER_K = (100, 200, 400)


def scale_worker(n: int, dim: int, nq: int, *, sweep: bool = False,
                 overrides: dict | None = None,
                 leaves_factors: tuple[float, ...] = SWEEP_LEAVES_FACTORS,
                 reorders: tuple[int, ...] = SWEEP_REORDER_K) -> None:
    """One scaling point in its own process, so the peak RSS is this size's alone.

    With `sweep`, the built index is also measured at other query-time settings (leaves to
    search = f x sqrt(num_leaves), reorder_k): kind=scaling_sweep lines, no rebuild.
    `overrides`: config.index values to build with instead of the defaults.
    """
    from data_pipeline.retrieval.scann import IndexParams, build_shard, exact_search
    from retro_jax.configs.base import get_base_config

    rng = np.random.default_rng(n)
    x = clustered(rng, n + nq, dim)
    xb, xq = x[:n], x[n:]
    del x
    data_rss = peak_rss_mib()
    index_cfg = get_base_config().index
    for key, value in (overrides or {}).items():
        index_cfg[key] = value
    params = IndexParams.for_size(n, **index_cfg.to_dict())
    t0 = time.perf_counter()
    shard = build_shard(xb, params)
    build_s = time.perf_counter() - t0
    truth = exact_search(xb, xq[:RECALL_QUERIES], K)  # a subset bounds the exact-search time
    qps, ids = scann_searcher_qps(shard, xq)
    common = dict(n=n, dim=dim, nq=nq, recall_queries=RECALL_QUERIES, num_leaves=params.num_leaves,
                  anisotropic_quantization_threshold=params.to_json()[
                      "anisotropic_quantization_threshold"])
    emit(dict(kind="scaling", impl="scann-default", recall_at_10=round(recall(ids, truth), 4),
              qps=round(qps, 1), us_per_query=round(1e6 / qps, 1), build_s=round(build_s, 1),
              peak_rss_mib=peak_rss_mib(), data_rss_mib=data_rss, key_mib=round(xb.nbytes / 2**20),
              leaves_to_search=params.num_leaves_to_search, reorder_k=params.reorder_k,
              overrides=overrides or {}, **common))
    if not sweep:
        return
    root = math.sqrt(params.num_leaves)
    for factor in leaves_factors:
        for reorder in reorders:
            shard.leaves_to_search = min(params.num_leaves, math.ceil(factor * root))
            shard.reorder_k = reorder
            qps, ids = scann_searcher_qps(shard, xq, repeats=2)
            emit(dict(kind="scaling_sweep", impl="scann", leaves_factor=factor,
                      leaves_to_search=shard.leaves_to_search, reorder_k=reorder,
                      share_scanned=round(shard.leaves_to_search / params.num_leaves, 4),
                      recall_at_10=round(recall(ids, truth), 4), qps=round(qps, 1),
                      us_per_query=round(1e6 / qps, 1), **common))


def run_scaling(args) -> None:
    sizes = [100_000] if args.quick else [100_000, 1_000_000, 5_000_000]
    if args.scale_sizes:
        sizes = [int(float(v)) for v in args.scale_sizes.split(",")]
    points = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--scale-worker", str(n), "--scale-dim",
               str(args.scale_dim), "--nq", str(args.nq), "--index-overrides",
               args.index_overrides, "--sweep-leaves-factors", args.sweep_leaves_factors,
               "--sweep-reorder-k", args.sweep_reorder_k]
        cmd += ["--scale-sweep"] if args.scale_sweep else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not recs:
            emit(dict(kind="scaling", n=n, error=proc.stderr[-2000:]))
            break
        for rec in recs:
            emit(rec)
        points.append(next(r for r in recs if r["kind"] == "scaling"))
    if len(points) >= 2:
        logn = np.log([p["n"] for p in points])
        logc = np.log([p["us_per_query"] for p in points])
        slope = float(np.polyfit(logn, logc, 1)[0])
        emit(dict(kind="scaling_fit", cost_per_query_exponent=round(slope, 3),
                  no_faster_than_sqrt=slope <= 0.5, dim=args.scale_dim))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k keys; scaling at 100k only")
    ap.add_argument("--keys", default=None, help="float32 [N, d] .npy of real chunk keys")
    ap.add_argument("--n", type=int, default=None, help="database size (200k; --quick 100k)")
    ap.add_argument("--dim", type=int, default=384, help="synthetic key dim (default 384)")
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--ntune", type=int, default=500)
    ap.add_argument("--target", type=float, default=0.95, help="recall@10 to tune for")
    ap.add_argument("--scale-dim", type=int, default=64,
                    help="dim of the scaling keys (5M x 384 float32 would be 7.7 GB; default 64)")
    ap.add_argument("--scale-sizes", default="",
                    help="comma list of scaling sizes (default 100k,1M,5M; --quick 100k)")
    ap.add_argument("--scale-sweep", action="store_true",
                    help="also sweep leaves_to_search x reorder_k at each scaling size")
    ap.add_argument("--sweep-leaves-factors", default=",".join(map(str, SWEEP_LEAVES_FACTORS)),
                    help="--scale-sweep: leaves_to_search = factor x sqrt(num_leaves)")
    ap.add_argument("--sweep-reorder-k", default=",".join(map(str, SWEEP_REORDER_K)),
                    help="--scale-sweep: reorder_k values")
    ap.add_argument("--index-overrides", default="{}",
                    help='JSON config.index values for the scaling builds, e.g. '
                         '\'{"anisotropic_quantization_threshold": 0.2}\'')
    ap.add_argument("--skip", default="", help="comma list of parts to skip: scann,faiss,scaling")
    ap.add_argument("--faiss-timeout", type=int, default=1800)
    ap.add_argument("--faiss-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.faiss_worker:
        return faiss_worker(Path(args.faiss_worker), args.target, threads=2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    if args.scale_worker:
        return scale_worker(args.scale_worker, args.scale_dim, args.nq, sweep=args.scale_sweep,
                            overrides=json.loads(args.index_overrides),
                            leaves_factors=tuple(map(float, args.sweep_leaves_factors.split(","))),
                            reorders=tuple(map(int, args.sweep_reorder_k.split(","))))
    skip = set(filter(None, args.skip.split(",")))
    args.n = args.n or (100_000 if args.quick else 200_000)

    if {"scann", "faiss"} <= skip:
        return run_scaling(args)
    from data_pipeline.retrieval.scann import exact_search

    rng = np.random.default_rng(0)
    info, xb, xq, xt = make_data(args, rng)
    emit(dict(kind="data", n=len(xb), nq=len(xq), ntune=len(xt), **info))
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        workdir = Path(tmp)
        gt_q, gt_t = exact_search(xb, xq, K), exact_search(xb, xt, K)
        for name, arr in dict(xb=xb, xq=xq, xt=xt, gt_q=gt_q, gt_t=gt_t).items():
            np.save(workdir / f"{name}.npy", arr)
        if "scann" not in skip:
            run_scann(args, xb, xq, xt, gt_q, gt_t, workdir)
        if "faiss" not in skip:
            run_faiss(args, workdir)
    if "scaling" not in skip:
        run_scaling(args)


if __name__ == "__main__":
    main()
