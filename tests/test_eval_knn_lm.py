"""kNN-LM: the kNN distribution, the interpolation, the datastore and its search."""

import math

import numpy as np
import pytest

from retro_jax.evaluate.knn_lm import (
    Datastore,
    DatastoreSearcher,
    KnnLM,
    build_datastore,
    interpolate,
    knn_log_prob,
)


def test_knn_distribution_hand_computed():
    # Distances 0, ln 2, ln 4 at T = 1 -> weights 1, 1/2, 1/4 (normalised by 7/4).
    dists = np.array([[0.0, math.log(2), math.log(4)]])
    values = np.array([[5, 7, 5]])
    p5 = math.exp(knn_log_prob(dists, values, np.array([5]), 1.0)[0])
    p7 = math.exp(knn_log_prob(dists, values, np.array([7]), 1.0)[0])
    assert p5 == pytest.approx((1 + 0.25) / 1.75)
    assert p7 == pytest.approx(0.5 / 1.75)
    assert knn_log_prob(dists, values, np.array([9]), 1.0)[0] == -np.inf
    # Temperature 2 halves the log-weights: 1, 2^-1/2, 1/2.
    p7_t2 = math.exp(knn_log_prob(dists, values, np.array([7]), 2.0)[0])
    assert p7_t2 == pytest.approx(2 ** -0.5 / (1 + 2 ** -0.5 + 0.5))
    # Missing neighbours (inf distance, value -1) carry no weight; none at all -> p = 0.
    missing = knn_log_prob(np.array([[0.0, np.inf], [np.inf, np.inf]]),
                           np.array([[5, -1], [-1, -1]]), np.array([5, 5]), 1.0)
    assert missing[0] == pytest.approx(0.0) and missing[1] == -np.inf
    # Large distances do not underflow to nan.
    far = knn_log_prob(np.array([[1e4, 1e4 + math.log(3)]]), np.array([[1, 2]]),
                       np.array([1]), 1.0)
    assert math.exp(far[0]) == pytest.approx(0.75)


def test_interpolation_hand_computed():
    lm = np.log(np.array([0.5, 0.1]))
    knn = np.log(np.array([0.1, 0.0 + 1e-300]))
    out = np.exp(interpolate(lm, knn, 0.25))
    assert out == pytest.approx([0.25 * 0.1 + 0.75 * 0.5, 0.75 * 0.1])
    assert np.exp(interpolate(lm, np.array([-np.inf, -np.inf]), 0.25)) == pytest.approx(
        [0.375, 0.075])
    np.testing.assert_allclose(interpolate(lm, knn, 0.0), lm)
    np.testing.assert_allclose(interpolate(lm, knn, 1.0), knn)


def test_build_datastore_keeps_scored_real_targets_and_caps():
    def hidden_fn(inputs):  # the "hidden state" is the input token, twice
        return np.stack([inputs, 2 * inputs], axis=-1).astype(np.float32)

    batches = [
        {"inputs": np.array([[1, 2, 3, 4]]), "targets": np.array([[2, 3, 4, 0]]),
         "score_mask": np.array([[1, 1, 1, 1]])},
        {"inputs": np.array([[3, 4, 5, 6]]), "targets": np.array([[4, 5, 6, 7]]),
         "score_mask": np.array([[0, 0, 1, 1]])},
    ]
    store = build_datastore(hidden_fn, batches, max_entries=100)
    assert store.values.tolist() == [2, 3, 4, 6, 7]
    assert store.keys[:, 0].tolist() == [1, 2, 3, 5, 6]
    capped = build_datastore(hidden_fn, batches, max_entries=4)
    assert capped.values.tolist() == [2, 3, 4, 6]


def test_datastore_round_trip(tmp_path):
    store = Datastore(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([4, 5, 6], np.int32))
    store.save(tmp_path / "ds", meta={"model": "x"})
    loaded, meta = Datastore.load(tmp_path / "ds")
    np.testing.assert_array_equal(loaded.keys, store.keys)
    assert meta["entries"] == 3 and meta["model"] == "x"


@pytest.mark.parametrize("index", ["numpy", "scann-brute", "scann-tree"])
def test_searcher_exact_neighbours_and_knn_lm(index):
    from retro_jax.configs import get_base_config

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(600, 8)).astype(np.float32)
    values = (np.arange(600) % 7).astype(np.int32)
    index_settings = get_base_config().index.to_dict()
    index_settings["brute_force_below"] = 100 if index == "scann-tree" else 20_000
    searcher = DatastoreSearcher(Datastore(keys, values), index_settings=index_settings, k=4,
                                 use_scann=index != "numpy")
    assert searcher.kind == ("exact-numpy" if index == "numpy" else "scann")
    queries = keys[:5] + 1e-3
    ids, dists = searcher.search(queries, 4)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    brute = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, np.sort(brute, axis=1)[:, :4], rtol=1e-3, atol=1e-4)
    # With a tiny temperature p_kNN is one-hot on the nearest key's value.
    knn = KnnLM(searcher, k=4, temperature=1e-4, lam=0.5)
    lm = np.log(np.full(5, 0.2))
    out = np.exp(knn.log_probs(queries, lm, values[:5]))
    np.testing.assert_allclose(out, 0.5 * 1.0 + 0.5 * 0.2, rtol=1e-6)
    wrong = np.exp(knn.log_probs(queries, lm, (values[:5] + 1) % 7))
    assert np.all(wrong < 0.5 * 0.2 + 1e-6 + 0.5 * 1e-3)
