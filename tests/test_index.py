"""data_pipeline/retrieval/scann: ScaNN TF-op shards, exact merge, persistence, tf.data, recall
floor (ties among duplicate keys count as correct)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.retrieval.scann import (
    IndexParams,
    ShardedSearcher,
    ShardSearcher,
    build_shard,
    check_recall,
    exact_search,
    measure_recall,
    noisy_queries,
    recall_at_k,
)

K = 10


def clustered_keys(rng: np.random.Generator, n: int, dim: int, per_centre: int = 100,
                   noise: float = 1.0) -> np.ndarray:
    """Unit vectors around n / per_centre random centres (like real embeddings: clustered)."""
    centres = rng.standard_normal((max(1, n // per_centre), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)]
    x += rng.standard_normal((n, dim)).astype(np.float32) * np.float32(noise / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_params(**changes) -> IndexParams:
    return IndexParams.for_size(1, num_neighbours=K, **changes)


@pytest.fixture(scope="module")
def small_keys() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((3000, 16)).astype(np.float32),
            rng.standard_normal((64, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def tree_shard() -> tuple[ShardSearcher, np.ndarray, np.ndarray]:
    """A partitioned + AH shard over 30k clustered 64-d keys, and held-out queries."""
    rng = np.random.default_rng(1)
    keys = clustered_keys(rng, 30_000, 64)
    queries = noisy_queries(keys, 300, noise=0.3, seed=2)
    params = IndexParams.for_size(len(keys), num_neighbours=K, brute_force_below=20_000)
    assert not params.brute_force and params.num_leaves == 173
    return build_shard(keys, params, first_chunk=1000), keys, queries


def test_params_scale_with_shard_size():
    cfg = {"num_neighbours": 10, "brute_force_below": 20_000, "num_leaves": -1,
           "num_leaves_to_search": -1, "training_sample_size": 250_000, "dims_per_block": 2,
           "anisotropic_quantization_threshold": 0.2, "reorder_k": -1, "recall_floor": 0.9,
           "recall_sample": 1000}
    assert IndexParams.for_size(5_000, **cfg).brute_force
    small, big = IndexParams.for_size(100_000, **cfg), IndexParams.for_size(4_000_000, **cfg)
    assert (small.num_leaves, big.num_leaves) == (316, 2000)
    assert (small.num_leaves_to_search, big.num_leaves_to_search) == (54, 135)  # 3 sqrt(leaves)
    assert small.num_leaves_to_search < big.num_leaves_to_search < big.num_leaves
    assert big.num_leaves_to_search / big.num_leaves < small.num_leaves_to_search / small.num_leaves
    assert small.reorder_k == big.reorder_k >= 10 * cfg["num_neighbours"]
    fixed = IndexParams.for_size(100_000, **{**cfg, "num_leaves": 50, "reorder_k": 33})
    assert (fixed.num_leaves, fixed.reorder_k) == (50, 33)
    assert IndexParams.from_json(big.to_json()) == big
    # Anisotropic quantization off: 0 (or nan, or None from older files) reads as 0.0.
    plain = IndexParams.for_size(100_000, **{**cfg, "anisotropic_quantization_threshold": 0.0})
    assert plain.anisotropic_quantization_threshold == 0.0
    assert IndexParams.from_json({**plain.to_json(),
                                  "anisotropic_quantization_threshold": None}) == plain


def test_brute_force_equals_exact_and_returns_squared_l2(small_keys):
    keys, queries = small_keys
    shard = build_shard(keys, brute_params())
    ids, dists = shard.search(queries, K)
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == (64, K)
    np.testing.assert_array_equal(ids, exact_search(keys, queries, K))
    true_d = ((queries[:, None, :] - keys[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, true_d, rtol=1e-4, atol=1e-4)
    assert (np.diff(dists, axis=1) >= 0).all()  # smaller = closer, nearest first
    with pytest.raises(ValueError, match=r"queries must be float32 \[Q, 16\]"):
        shard.search(queries[:, :8], K)


def test_partitioned_ah_recall(tree_shard):
    shard, keys, queries = tree_shard
    recall = measure_recall(shard, keys, queries, k=K)
    assert recall >= 0.9, recall
    ids, dists = shard.search(queries, K)
    assert ids.min() >= 1000 and ids.max() < 1000 + len(keys)  # global ids
    # After exact re-ordering the distances are the float32 squared L2, not AH estimates.
    true_d = ((queries[:, None, :] - keys[ids - 1000]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, true_d, rtol=1e-3, atol=1e-3)


def test_sharded_merge_equals_single_index(small_keys, tmp_path):
    keys, queries = small_keys
    whole_ids, whole_d = build_shard(keys, brute_params()).search(queries, K)
    np.save(tmp_path / "keys.npy", keys)
    on_disk = np.load(tmp_path / "keys.npy", mmap_mode="r")  # shards built from memmap slices
    bounds = [0, 700, 1900, len(keys)]
    shards = [build_shard(on_disk[a:b], brute_params(), first_chunk=a)
              for a, b in zip(bounds, bounds[1:])]
    sharded = ShardedSearcher(shards[::-1])  # order of the list does not matter
    ids, dists = sharded.search(queries, K)
    np.testing.assert_array_equal(ids, whole_ids)
    np.testing.assert_allclose(dists, whole_d, rtol=1e-5, atol=1e-5)
    assert (sharded.first_chunk, sharded.num_chunks) == (0, len(keys))


def test_save_load_identical(tree_shard, tmp_path):
    shard, keys, queries = tree_shard
    before = shard.search(queries, K)
    shard.save(tmp_path / "shard_00000")
    loaded = ShardSearcher.load(tmp_path / "shard_00000", first_chunk=1000)
    assert (loaded.num_chunks, loaded.dim, loaded.params) == (len(keys), 64, shard.params)
    after = loaded.search(queries, K)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    with pytest.raises(DataError, match="first_chunk 1000 but the manifest says 0"):
        ShardSearcher.load(tmp_path / "shard_00000", first_chunk=0)
    with pytest.raises(DataError, match="missing shard.json"):
        ShardSearcher.load(tmp_path / "nothing_here", first_chunk=0)


# A small tree + AH shard, built the same way in this process and in fresh ones.
_TREE_SHARD_CODE = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from data_pipeline.retrieval.scann import IndexParams, build_shard
from tests.test_index import clustered_keys
keys = clustered_keys(np.random.default_rng(5), 4000, 16, per_centre=40)
params = IndexParams.for_size(len(keys), num_neighbours=10, brute_force_below=1000)
build_shard(keys, params, first_chunk=123).save(sys.argv[1])
"""


def _file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


def test_tree_shard_bytes_identical_across_processes(tmp_path):
    """Resumed builds are checked by checksums: the same keys and params must give the same
    shard bytes in any process (ScaNN's random k-means init would not: see build_shard)."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _TREE_SHARD_CODE, str(tmp_path / name),
                               str(repo)], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    keys = clustered_keys(np.random.default_rng(5), 4000, 16, per_centre=40)
    params = IndexParams.for_size(len(keys), num_neighbours=K, brute_force_below=1000)
    assert not params.brute_force and params.num_leaves == 63
    shard = build_shard(keys, params, first_chunk=123)
    again = build_shard(keys, params, first_chunk=123)  # same process, second build
    shard.save(tmp_path / "here")
    again.save(tmp_path / "again")
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    want = _file_digests(tmp_path / "here")
    assert {"shard.json", "dataset.npy", "hashed_dataset.npy", "datapoint_to_token.npy",
            "serialized_partitioner.binpb", "ah_codebook.binpb"} <= set(want)
    for name in ("again", "a", "b"):
        assert _file_digests(tmp_path / name) == want, name
    # The saved bytes come back as the same searcher.
    queries = noisy_queries(keys, 40, noise=0.3, seed=6)
    loaded = ShardSearcher.load(tmp_path / "a", first_chunk=123)
    for got, expected in zip(loaded.search(queries, K), shard.search(queries, K)):
        np.testing.assert_array_equal(got, expected)


def test_brute_force_shard_round_trip_and_damage_is_refused(small_keys, tmp_path):
    keys, queries = small_keys
    shard = build_shard(keys, brute_params(), first_chunk=5)
    shard.save(tmp_path / "bf")
    meta = json.loads((tmp_path / "bf" / "shard.json").read_text())
    # Fields ScaNN leaves empty for brute force are listed as absent, not written.
    assert meta["state"]["serialized_partitioner"] is None and "saved_at" not in meta
    loaded = ShardSearcher.load(tmp_path / "bf", first_chunk=5)
    for got, expected in zip(loaded.search(queries, K), shard.search(queries, K)):
        np.testing.assert_array_equal(got, expected)
    # A truncated state file, then an old-format shard, each get a clear DataError.
    dataset = tmp_path / "bf" / "dataset.npy"
    dataset.write_bytes(dataset.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"dataset\.npy should have .* bytes.*truncated"):
        ShardSearcher.load(tmp_path / "bf", first_chunk=5)
    (tmp_path / "bf" / "shard.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(DataError, match="format_version 1, expected 2.*rebuild"):
        ShardSearcher.load(tmp_path / "bf", first_chunk=5)


def test_search_inside_parallel_tf_data_map(small_keys):
    keys, queries = small_keys
    sharded = ShardedSearcher([build_shard(keys[:1500], brute_params()),
                               build_shard(keys[1500:], brute_params(), first_chunk=1500)])
    dataset = (tf.data.Dataset.from_tensor_slices(queries).batch(8)
               .map(lambda q: sharded.search_tf(q, K), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True))
    got = [(ids.numpy(), d.numpy()) for ids, d in dataset]
    ids = np.concatenate([g[0] for g in got])
    assert ids.dtype == np.int64 and got[0][1].dtype == np.float32
    np.testing.assert_array_equal(ids, exact_search(keys, queries, K))


def test_k_larger_than_shard_pads(small_keys):
    keys, queries = small_keys
    tiny = build_shard(keys[:4], brute_params(), first_chunk=10)
    ids, dists = tiny.search(queries[:3], K)
    assert ids.shape == (3, K)
    assert (ids[:, 4:] == -1).all() and np.isinf(dists[:, 4:]).all()
    assert sorted(ids[0, :4]) == [10, 11, 12, 13]
    # Across shards: 4 + 3 keys for k = 10 -> 7 real ids, then padding.
    other = build_shard(keys[4:7], brute_params(), first_chunk=14)
    ids, dists = ShardedSearcher([tiny, other]).search(queries[:3], K)
    assert sorted(ids[0, :7]) == list(range(10, 17)) and (ids[:, 7:] == -1).all()
    np.testing.assert_array_equal(ids[:, :7], exact_search(keys[:7], queries[:3], 7) + 10)


def test_recall_floor_failure_names_the_knob():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((5000, 32)).astype(np.float32)  # no structure: hard for ANN
    params = IndexParams.for_size(len(keys), num_neighbours=K, brute_force_below=1000,
                                  num_leaves=100, num_leaves_to_search=1, reorder_k=10)
    shard = build_shard(keys, params)
    recall = measure_recall(shard, keys, rng.standard_normal((100, 32)).astype(np.float32))
    assert recall < 0.5
    with pytest.raises(DataError, match=r"num_leaves_to_search \(e\.g\. 2\).*reorder_k"):
        check_recall(recall, params, where="shard_00000")
    # The same shard passes once more leaves are searched (a query-time knob, no rebuild).
    shard.leaves_to_search, shard.reorder_k = 100, 200
    check_recall(measure_recall(shard, keys, rng.standard_normal((50, 32)).astype(np.float32)),
                 params)


def test_recall_at_k_counts_set_overlap():
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    approx = np.array([[3, 2, 9], [5, 4, 7]])
    assert recall_at_k(approx, exact) == pytest.approx(4 / 5)


class _FixedSearcher:
    """Returns the ids it was given (a stand-in for an index that picked other duplicates)."""

    first_chunk = 0

    def __init__(self, ids):
        self.ids = np.asarray(ids, np.int64)

    def search(self, queries, k):
        return self.ids[:, :k], None


def test_recall_counts_ties_among_duplicate_keys():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((20, 8)).astype(np.float32)
    keys = np.concatenate([base, base, base])  # every key three times (boilerplate chunks)
    queries = base[:5] + 0.01 * rng.standard_normal((5, 8)).astype(np.float32)
    # Brute force (exact) may return any copy: a tie is a right answer, so recall is 1.0.
    shard = build_shard(keys, brute_params())
    assert measure_recall(shard, keys, queries, k=K) == 1.0
    # Another copy of each exact neighbour: still all correct.
    exact = exact_search(keys, queries, K)
    copies = (exact + 20) % 60  # key i and key i+20 (mod 60) are the same row of `base`
    assert measure_recall(_FixedSearcher(copies), keys, queries, k=K) == 1.0
    # A farther key is not a tie; repeating one id counts it once.
    wrong = exact.copy()
    wrong[:, -1] = 19  # base[19] is far from queries 0..4
    far = measure_recall(_FixedSearcher(wrong), keys, queries, k=K)
    assert 1 - 5 / (5 * K) - 1e-9 <= far < 1.0
    repeated = np.repeat(exact[:, :1], K, axis=1)
    assert measure_recall(_FixedSearcher(repeated), keys, queries, k=K) == pytest.approx(1 / K)


def test_recall_of_a_database_smaller_than_k():
    keys = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    shard = build_shard(keys, brute_params())
    assert measure_recall(shard, keys, keys + 0.1, k=10) == 1.0
