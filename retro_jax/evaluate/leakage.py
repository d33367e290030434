"""Leakage-filtered evaluation (RETRO paper, section 2.6).

For each evaluation chunk C (m tokens) we retrieve its `eval.leakage_neighbours` nearest
training chunks, each with its continuation (2m tokens), and measure

    r(C) = (longest run of tokens common to C and any one neighbour) / m

Padding tokens never match (a half-empty last chunk of a document does not "overlap" with
the padding of a neighbour). A substring must lie inside one neighbour (a neighbour is a
contiguous span of training text; two neighbours are not). Then bpb(alpha) is the bits per
byte over the chunks with r(C) <= alpha: alpha = 0 keeps chunks sharing no token with their
neighbours, alpha = 1 keeps every chunk, alpha = 12.5% with m = 64 keeps chunks sharing no
run of 9 or more tokens.

The bytes of a chunk are the UTF-8 bytes of its decoded tokens (`chunk_num_bytes`). This is an
approximation of the chunk's share of the original text: SentencePiece drops the leading
word-boundary space when a piece sequence is decoded on its own and normalisation may change
whitespace, so per chunk the count can differ by a byte or so from the slice of the original
document; summed over every chunk of a document it is close to the document's `num_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline.text.counting import byte_count
from retro_jax.evaluate.metrics import LN2


def longest_common_substring(
    chunks: np.ndarray, neighbours: np.ndarray, pad_id: int = 0
) -> np.ndarray:
    """Longest common contiguous token run between each chunk and any of its neighbours.

    Dynamic programming over the chunk's positions, vectorised over chunks, neighbours and
    neighbour positions: run[q, j, p] = length of the common run ending at chunk position i
    and neighbour position p; O(m) numpy steps of size [Q, K, r].

    Args:
      chunks: int [Q, m] (or [m]) evaluation chunks.
      neighbours: int [Q, K, r] (or [K, r] / [r] with an unbatched chunk) retrieved tokens.
      pad_id: never part of a match.

    Returns:
      int32 [Q] (or a scalar for an unbatched chunk): the longest run length, 0..m.
    """
    chunks = np.asarray(chunks)
    neighbours = np.asarray(neighbours)
    single = chunks.ndim == 1
    if single:
        chunks = chunks[None]
        neighbours = neighbours.reshape((1, -1, neighbours.shape[-1]))
    if chunks.ndim != 2 or neighbours.ndim != 3 or neighbours.shape[0] != chunks.shape[0]:
        raise ValueError(f"expected chunks [Q, m] and neighbours [Q, K, r]; found "
                         f"{chunks.shape} and {neighbours.shape}")
    q, m = chunks.shape
    _, k, r = neighbours.shape
    best = np.zeros(q, dtype=np.int32)
    if k == 0 or r == 0 or m == 0:
        return best[0] if single else best
    nb_valid = neighbours != pad_id
    run = np.zeros((q, k, r), dtype=np.int32)
    for i in range(m):
        token = chunks[:, i]
        match = (neighbours == token[:, None, None]) & nb_valid & (token != pad_id)[:, None, None]
        shifted = np.zeros_like(run)
        shifted[:, :, 1:] = run[:, :, :-1]  # the run ending at (i-1, p-1), same neighbour only
        run = np.where(match, shifted + 1, 0)
        best = np.maximum(best, run.reshape(q, -1).max(axis=1))
    return best[0] if single else best


def overlap_ratio(
    chunks: np.ndarray, neighbours: np.ndarray, chunk_len: int, pad_id: int = 0
) -> np.ndarray:
    """r(C) = longest common substring / m, float64 [Q] in [0, 1]."""
    return longest_common_substring(chunks, neighbours, pad_id).astype(np.float64) / chunk_len


def chunk_num_bytes(chunks: np.ndarray, decode: Callable[[list[int]], str]) -> np.ndarray:
    """UTF-8 bytes of each chunk's decoded tokens (pads dropped): int64 [Q].

    `decode` is the tokenizer's `decode(ids) -> str` (see the module docstring for why this
    approximates the chunk's share of the original text).
    """
    chunks = np.asarray(chunks)
    out = np.zeros(len(chunks), dtype=np.int64)
    for i, row in enumerate(chunks):
        ids = [int(t) for t in row if t != 0]
        out[i] = byte_count(decode(ids)) if ids else 0
    return out


def leakage_curve(
    ratios: np.ndarray,
    chunk_nll: np.ndarray,
    chunk_bytes: np.ndarray,
    alphas: Sequence[float],
) -> list[dict]:
    """bpb(alpha) over the chunks with r(C) <= alpha.

    Args:
      ratios: float [N] r(C) per evaluation chunk.
      chunk_nll: float [N] summed NLL (nats) of the chunk's scored tokens.
      chunk_bytes: int [N] bytes of each chunk.
      alphas: thresholds in [0, 1].

    Returns:
      One dict per alpha: alpha, bpb (None when no chunk qualifies), chunks, bytes,
      fraction (share of the chunks kept).
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    chunk_nll = np.asarray(chunk_nll, dtype=np.float64)
    chunk_bytes = np.asarray(chunk_bytes, dtype=np.int64)
    if not ratios.shape == chunk_nll.shape == chunk_bytes.shape:
        raise ValueError(f"ratios {ratios.shape}, chunk_nll {chunk_nll.shape} and chunk_bytes "
                         f"{chunk_bytes.shape} must have the same shape [N]")
    total = len(ratios)
    curve = []
    for alpha in alphas:
        # A tiny tolerance: r = 8/64 must count as <= 0.125 whatever the float rounding.
        keep = ratios <= float(alpha) + 1e-9
        num_bytes = int(chunk_bytes[keep].sum())
        nll = float(chunk_nll[keep].sum())
        curve.append({
            "alpha": float(alpha),
            "bpb": (nll / LN2 / num_bytes) if num_bytes > 0 else None,
            "chunks": int(keep.sum()),
            "bytes": num_bytes,
            "fraction": (float(keep.sum()) / total) if total else None,
        })
    return curve


def chunk_overlaps(db, split: str, chunk_ids: np.ndarray, *, num_neighbours: int,
                   overfetch: int = 4, exclude_doc_ids=None,
                   batch_size: int = 4096) -> np.ndarray:
    """r(C) of evaluation chunks of `split`, against their nearest train chunks.

    Each chunk is its own query (its key, or its BM25 candidates for a "bm25" database),
    neighbours come from the database with the evaluation filters (never the chunk's own
    document), each as [neighbour ; continuation] (2m tokens).

    Args:
      chunk_ids: int64 [Q] chunk ids of `split`.
    Returns:
      float64 [Q] in [0, 1].
    """
    from data_pipeline.input_pipeline import retrieve_chunk_neighbours

    arrays = db.split(split)  # (retrieve_chunk_neighbours says when the split has no keys)
    chunk_ids = np.asarray(chunk_ids, np.int64)
    m = int(db.chunk_len)
    out = np.zeros(chunk_ids.size, np.float64)
    # One retriever (one traced search) for all chunks; it batches the queries itself.
    all_neighbour_ids = retrieve_chunk_neighbours(db, split, chunk_ids, num_neighbours,
                                                  overfetch, exclude_doc_ids,
                                                  batch_size=batch_size)  # [Q, k]
    for lo in range(0, chunk_ids.size, batch_size):
        ids = chunk_ids[lo:lo + batch_size]
        neighbours = db.neighbour_tokens(all_neighbour_ids[lo:lo + batch_size])  # [q, k, 2m]
        out[lo:lo + ids.size] = overlap_ratio(np.asarray(arrays.tokens[ids]), neighbours, m)
    return out
