"""Evaluation metrics and the leakage filter on hand-computed cases."""

import math

import numpy as np
import pytest

from retro_jax.evaluate.leakage import (
    chunk_num_bytes,
    leakage_curve,
    longest_common_substring,
    overlap_ratio,
)
from retro_jax.evaluate.metrics import (
    DocumentInfo,
    DocumentScores,
    bits_per_byte,
    perplexity,
    word_perplexity,
)


def test_word_perplexity_hand_computed():
    # 3 tokens each with p = 1/2, 2 tokens with p = 1/4 -> NLL = 3 ln2 + 2 ln4 = 7 ln 2.
    nll = 3 * math.log(2) + 2 * math.log(4)
    assert perplexity(nll, 5) == pytest.approx(2 ** (7 / 5))
    # The same NLL over 4 words (the tokenizer split one word in two).
    assert word_perplexity(nll, 4) == pytest.approx(2 ** (7 / 4))
    assert math.isnan(word_perplexity(nll, 0))


def test_bits_per_byte_hand_computed():
    # 7 ln 2 nats = 7 bits over 14 bytes = 0.5 bits per byte.
    assert bits_per_byte(7 * math.log(2), 14) == pytest.approx(0.5)


def test_document_scores_overall_and_per_source_and_partial_documents():
    scores = DocumentScores()
    ln2 = math.log(2)
    # Batch [2, 4]: doc 10 (pile set A), doc 11 (set B), doc 12 (set A, scored in part).
    doc_ids = np.array([[10, 10, 11, 11], [12, 12, -1, 10]])
    token_nll = np.array([[1, 1, 2, 2], [4, 4, 9, 1]]) * ln2
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores.add(doc_ids, token_nll, mask)
    assert scores.tokens == {10: 3, 11: 1, 12: 2}
    assert scores.nll[10] == pytest.approx(3 * ln2)
    docs = {10: DocumentInfo(num_bytes=6, num_words=2, source="A"),
            11: DocumentInfo(num_bytes=4, num_words=1, source="B"),
            12: DocumentInfo(num_bytes=100, num_words=50, source="A")}
    overall, by_source = scores.summary(docs, complete=[10, 11])
    # Doc 12 was not scored in full: neither its NLL nor its bytes count.
    assert overall.bytes == 10 and overall.tokens == 4 and overall.documents == 2
    assert overall.bits_per_byte == pytest.approx((3 + 2) / 10)
    assert overall.word_perplexity == pytest.approx(math.exp(5 * ln2 / 3))
    assert by_source["A"].bits_per_byte == pytest.approx(3 / 6)
    assert by_source["B"].bits_per_byte == pytest.approx(2 / 4)
    everything, _ = scores.summary(docs)
    assert everything.bytes == 110 and everything.bits_per_byte == pytest.approx(13 / 110)
    row = overall.to_json()
    assert row["bits_per_byte"] == pytest.approx(0.5) and row["tokens"] == 4
    with pytest.raises(KeyError, match="documents table"):
        scores.summary({10: docs[10]})


def test_longest_common_substring_hand_cases():
    chunk = np.array([5, 6, 7, 8, 9, 0, 0, 0])
    # Neighbour 0 shares [6, 7] ; neighbour 1 shares [7, 8, 9] ; pads never match.
    neighbours = np.array([
        [1, 6, 7, 2, 0, 0, 0, 0, 0, 0],
        [3, 3, 7, 8, 9, 4, 0, 0, 0, 0],
    ])
    assert longest_common_substring(chunk, neighbours) == 3
    assert overlap_ratio(chunk[None], neighbours[None], chunk_len=8)[0] == pytest.approx(3 / 8)
    # A run may not continue across two neighbours: [5, 6] ends neighbour 0, [7, 8] starts 1.
    split = np.array([[9, 9, 9, 9, 5, 6], [7, 8, 2, 2, 2, 2]])
    assert longest_common_substring(np.array([5, 6, 7, 8]), split) == 2
    # Whole chunk inside a neighbour.
    inside = np.array([[0, 1, 5, 6, 7, 8, 9, 3]])
    assert longest_common_substring(np.array([5, 6, 7, 8, 9]), inside) == 5
    # No overlap, and padding-only overlap.
    assert longest_common_substring(np.array([1, 2]), np.array([[3, 4]])) == 0
    assert longest_common_substring(np.array([0, 0]), np.array([[0, 0]])) == 0
    # Repeated tokens: longest of several runs.
    assert longest_common_substring(np.array([1, 1, 1, 2]), np.array([[1, 1, 2, 1, 1, 1]])) == 3


def test_longest_common_substring_batched_matches_brute_force():
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, 4, (20, 8))
    neighbours = rng.integers(0, 4, (20, 3, 10))

    def brute(c, nbs):
        best = 0
        for nb in nbs:
            for i in range(len(c)):
                for j in range(len(nb)):
                    length = 0
                    while (i + length < len(c) and j + length < len(nb)
                           and c[i + length] == nb[j + length] and c[i + length] != 0):
                        length += 1
                    best = max(best, length)
        return best

    got = longest_common_substring(chunks, neighbours)
    assert got.tolist() == [brute(c, n) for c, n in zip(chunks, neighbours)]


def test_leakage_curve_alpha_buckets():
    ln2 = math.log(2)
    # m = 8: r = 0, 1/8, 2/8, 4/8, 8/8.
    ratios = np.array([0, 1, 2, 4, 8]) / 8
    chunk_nll = np.array([1, 2, 3, 4, 5]) * ln2  # bits
    chunk_bytes = np.array([10, 10, 10, 10, 10])
    curve = leakage_curve(ratios, chunk_nll, chunk_bytes, (0.0, 0.125, 0.25, 0.5, 0.75, 1.0))
    assert [c["chunks"] for c in curve] == [1, 2, 3, 4, 4, 5]
    assert [c["bpb"] for c in curve] == pytest.approx(
        [1 / 10, 3 / 20, 6 / 30, 10 / 40, 10 / 40, 15 / 50])
    assert curve[-1]["fraction"] == 1.0 and curve[0]["fraction"] == pytest.approx(0.2)
    empty = leakage_curve(np.array([0.5]), np.array([1.0]), np.array([3]), (0.0,))
    assert empty[0]["bpb"] is None and empty[0]["chunks"] == 0


def test_chunk_num_bytes_uses_decoded_text():
    vocab = {5: "é", 6: "ab", 7: " "}
    decode = lambda ids: "".join(vocab[i] for i in ids)
    chunks = np.array([[5, 6, 0], [0, 0, 0], [7, 7, 6]])
    assert chunk_num_bytes(chunks, decode).tolist() == [4, 0, 4]
