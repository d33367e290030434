"""MinHash-LSH near-duplicate filter: hashing, Jaccard estimates, LSH banding, the filter."""

import numpy as np
import pytest

from data_pipeline.text.dedup import (
    NearDuplicateFilter,
    _lsh_params,
    estimated_jaccard,
    exact_jaccard,
    shingle_hashes,
    word_hashes,
)


def _words(rng, n, vocab=20_000):
    return [f"w{i}" for i in rng.integers(0, vocab, n)]


def test_word_hashes_split_on_whitespace_and_are_deterministic():
    h = word_hashes("the cat\n\tthe  dog ")
    assert h.shape == (4,)
    assert h[0] == h[2] and len(set(h.tolist())) == 3
    np.testing.assert_array_equal(h, word_hashes("the cat the dog"))
    assert word_hashes("").size == 0 and word_hashes(" \n\t").size == 0
    # Non-ASCII words hash by their UTF-8 bytes; prefixes differ from the word.
    assert len(set(word_hashes("café cafe caf é").tolist())) == 4


def test_shingles_count_and_short_documents():
    words = word_hashes(" ".join(f"w{i}" for i in range(20)))
    assert shingle_hashes(words, 13).shape == (8,)  # 20 - 13 + 1
    assert shingle_hashes(words[:5], 13).shape == (1,)  # shorter than n: one shingle
    assert shingle_hashes(words[:0], 13).shape == (0,)
    # The same 13 words in the same order give the same shingle wherever they occur.
    a = shingle_hashes(words[0:13], 13)
    b = shingle_hashes(words, 13)
    assert a[0] == b[0] and a[0] != b[1]


def test_exact_jaccard_on_hand_sets():
    assert exact_jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == pytest.approx(2 / 4)
    assert exact_jaccard(np.array([1, 1, 2]), np.array([1, 2])) == 1.0
    assert exact_jaccard(np.array([]), np.array([])) == 1.0


@pytest.mark.parametrize("keep", [0, 100, 250, 350, 400])
def test_minhash_estimate_tracks_exact_jaccard(keep):
    rng = np.random.default_rng(keep)
    filt = NearDuplicateFilter(threshold=0.8, ngram=3, num_perm=256)
    base = _words(rng, 400)
    other = base[:keep] + _words(rng, 400 - keep)
    exact = exact_jaccard(filt.shingles(" ".join(base)), filt.shingles(" ".join(other)))
    est = estimated_jaccard(filt.signature(" ".join(base)), filt.signature(" ".join(other)))
    # Standard error sqrt(J(1-J)/256) <= 0.031; 4 sigma.
    assert abs(est - exact) <= 0.125, (exact, est)


def test_token_id_documents():
    filt = NearDuplicateFilter(threshold=0.8, ngram=13, num_perm=128)
    ids = np.arange(1000)
    filt.add(ids)
    assert filt.is_near_duplicate(ids.copy())
    assert not filt.is_near_duplicate(ids[::-1].copy())


def test_lsh_bands_fit_the_threshold():
    bands, rows = _lsh_params(0.8, 128)
    assert bands * rows <= 128
    # The S-curve's midpoint (1/b)^(1/r) sits near the threshold.
    assert 0.7 <= (1 / bands) ** (1 / rows) <= 0.85


def test_filter_finds_near_duplicates_and_not_others():
    rng = np.random.default_rng(0)
    filt = NearDuplicateFilter(threshold=0.8, ngram=13, num_perm=128)
    evals = [_words(rng, 600) for _ in range(20)]
    for words in evals:
        filt.add(" ".join(words))
    assert len(filt) == 20
    # One edit every 200 words keeps 13-gram Jaccard around 0.88 -> a near duplicate.
    near = list(evals[7])
    for i in range(100, 600, 200):
        near[i] = "CHANGED"
    words_near = " ".join(near)
    exact = exact_jaccard(filt.shingles(words_near), filt.shingles(" ".join(evals[7])))
    assert exact >= 0.85
    matches = filt.matches(words_near)
    assert [i for i, _ in matches] == [7]
    # A paragraph in common is not a near duplicate (Jaccard well under 0.8).
    half = evals[3][:200] + _words(rng, 400)
    assert not filt.is_near_duplicate(" ".join(half))
    unrelated = [" ".join(_words(rng, 500)) for _ in range(50)]
    assert not any(filt.is_near_duplicate(t) for t in unrelated)
    assert filt.is_near_duplicate(" ".join(evals[19]))  # exact copy
    assert not filt.is_near_duplicate("")
    assert filt.stats.duplicates == 2
