"""Train/eval near-duplicate filtering with MinHash + LSH (RETRO paper, section 2.1).

The paper drops training documents whose 13-gram Jaccard similarity to an evaluation
document is >= 0.8. `NearDuplicateFilter` holds the evaluation documents (few: thousands)
and is queried once per training document (many: millions), streaming:

    filt = NearDuplicateFilter(threshold=0.8, ngram=13, num_perm=128)
    for doc in eval_documents: filt.add(doc.text)
    keep = [doc for doc in train_documents if not filt.is_near_duplicate(doc.text)]

Shingles are the word 13-grams of the text (words = runs of non-whitespace bytes, ASCII
whitespace separating them) or the token 13-grams of an int sequence; a text shorter than
`ngram` words is one shingle of all its words. Hashing is numpy-vectorised over the text's
bytes (no Python loop per word): a polynomial hash mod 2^64 of each word from one prefix sum,
then the same for each n-gram over the word hashes, both passed through the splitmix64
finaliser. The MinHash of permutation p is min over shingles of the multiply-shift hash
(a_p * x + b_p) mod 2^64 >> 32, kept as uint32.

Candidates come from banded LSH (b bands of r rows, chosen for the threshold by minimising
the weighted false-positive and false-negative areas of the S-curve 1 - (1 - s^r)^b, as
datasketch does, weighted towards recall because a candidate is then confirmed), and a
candidate is confirmed when the estimated Jaccard (share of equal signature slots) is
>= threshold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_U64 = np.uint64
_WORD_BASE = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_GRAM_BASE = 0xC2B2AE3D27D4EB4F
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True
_SHINGLE_BLOCK = 4096  # shingles per MinHash block: bounds memory at [block, num_perm] uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wraps mod 2^64)."""
    x = x.astype(_U64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


def _powers(base: int, count: int) -> np.ndarray:
    """[base^0, base^1, ..., base^(count-1)] mod 2^64, uint64 [count]."""
    out = np.full(count, base, dtype=_U64)
    if count:
        out[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(out, dtype=_U64)


def _span_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int) -> np.ndarray:
    """Polynomial hash sum_j values[j] * base^(e-1-j) over each span [s, e), uint64.

    One prefix sum of values[j] * base^-j, then hash = base^(e-1) * (C[e] - C[s]).
    """
    n = len(values)
    inv = pow(base, -1, 1 << 64)
    with np.errstate(over="ignore"):
        weighted = values.astype(_U64) * _powers(inv, n)
        prefix = np.zeros(n + 1, dtype=_U64)
        np.cumsum(weighted, dtype=_U64, out=prefix[1:])
        scale = _powers(base, n + 1)[np.maximum(ends - 1, 0)]
        return scale * (prefix[ends] - prefix[starts])


def word_hashes(text: str) -> np.ndarray:
    """uint64 [num_words]: one hash per whitespace-separated word of `text`."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=_U64)
    word = ~_ASCII_SPACE[data]
    edges = np.diff(np.concatenate(([False], word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.zeros(0, dtype=_U64)
    # +1 so that a zero byte still changes the hash; the length makes "ab" != "\0ab".
    raw = _span_hashes(data.astype(_U64) + _U64(1), starts, ends, _WORD_BASE)
    with np.errstate(over="ignore"):
        return _splitmix64(raw + (ends - starts).astype(_U64))


def shingle_hashes(items: np.ndarray, ngram: int) -> np.ndarray:
    """uint64 [max(1, N - ngram + 1)] hashes of the `ngram`-grams of `items` (uint64/int [N]).

    A sequence shorter than `ngram` is one shingle of all its items; an empty one has none.
    """
    items = _splitmix64(np.asarray(items).astype(_U64))
    n = len(items)
    if n == 0:
        return np.zeros(0, dtype=_U64)
    width = min(ngram, n)
    starts = np.arange(n - width + 1)
    return _splitmix64(_span_hashes(items, starts, starts + width, _GRAM_BASE))


@lru_cache(maxsize=16)
def _lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.3,
                fn_weight: float = 0.7) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight * FP area + fn_weight * FN area of 1-(1-s^r)^b."""
    grid_lo = np.linspace(0.0, threshold, 201)
    grid_hi = np.linspace(threshold, 1.0, 201)
    best, best_cost = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - grid_lo**rows) ** bands, grid_lo)
            fn = np.trapezoid((1 - grid_hi**rows) ** bands, grid_hi)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


@dataclass
class FilterStats:
    added: int = 0  # evaluation documents held
    queries: int = 0  # documents checked
    candidates: int = 0  # LSH candidate pairs confirmed or rejected
    duplicates: int = 0  # documents found near-duplicate


class NearDuplicateFilter:
    """MinHash-LSH index of evaluation documents; answers "is this a near-duplicate?".

    Args:
      threshold: Jaccard similarity at or above which a document is a near-duplicate (0.8).
      ngram: shingle length in words or tokens (13).
      num_perm: MinHash permutations (128); more = tighter Jaccard estimates, slower.
      seed: the permutations' seed (fixed: signatures are reproducible across runs).
    """

    def __init__(self, threshold: float = 0.8, ngram: int = 13, num_perm: int = 128,
                 seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], found {threshold}")
        if ngram < 1 or num_perm < 2:
            raise ValueError(f"need ngram >= 1 and num_perm >= 2, found {ngram}, {num_perm}")
        self.threshold = float(threshold)
        self.ngram = int(ngram)
        self.num_perm = int(num_perm)
        self.seed = int(seed)
        rng = np.random.default_rng(seed)
        # Odd multipliers: multiply-shift hashing needs them odd.
        self._mul = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * _U64(2) + _U64(1)
        self._add = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.bands, self.rows = _lsh_params(self.threshold, self.num_perm)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self.stats = FilterStats()

    # ------------------------------------------------------------------ signatures
    def shingles(self, doc: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """uint64 shingle hashes of a text (word n-grams) or a token id sequence."""
        if isinstance(doc, str):
            return shingle_hashes(word_hashes(doc), self.ngram)
        return shingle_hashes(np.asarray(doc, dtype=np.int64), self.ngram)

    def signature(self, doc: str | Sequence[int] | np.ndarray) -> np.ndarray | None:
        """uint32 [num_perm] MinHash signature; None for a document with no words."""
        hashes = self.shingles(doc)
        if hashes.size == 0:
            return None
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=_U64)
        with np.errstate(over="ignore"):
            for lo in range(0, hashes.size, _SHINGLE_BLOCK):
                block = hashes[lo:lo + _SHINGLE_BLOCK, None]
                mixed = (block * self._mul[None, :] + self._add[None, :]) >> _U64(32)
                np.minimum(sig, mixed.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[b * r:(b + 1) * r].tobytes() for b in range(self.bands)]

    # ---------------------------------------------------------------------- API
    def add(self, doc: str | Sequence[int] | np.ndarray) -> int:
        """Hold an evaluation document; returns its index (-1 if it has no words)."""
        sig = self.signature(doc)
        if sig is None:
            return -1
        return self._add_signature(sig)

    def _add_signature(self, sig: np.ndarray) -> int:
        index = len(self._signatures)
        self._signatures.append(sig)
        for table, key in zip(self._tables, self._band_keys(sig)):
            table.setdefault(key, []).append(index)
        self.stats.added += 1
        return index

    def matches(self, doc: str | Sequence[int] | np.ndarray) -> list[tuple[int, float]]:
        """[(evaluation document index, estimated Jaccard)] of the confirmed near-duplicates."""
        self.stats.queries += 1
        sig = self.signature(doc)
        if sig is None or not self._signatures:
            return []
        candidates: set[int] = set()
        for table, key in zip(self._tables, self._band_keys(sig)):
            candidates.update(table.get(key, ()))
        self.stats.candidates += len(candidates)
        found = []
        for index in sorted(candidates):
            jaccard = float(np.mean(self._signatures[index] == sig))
            if jaccard >= self.threshold:
                found.append((index, jaccard))
        if found:
            self.stats.duplicates += 1
        return found

    def is_near_duplicate(self, doc: str | Sequence[int] | np.ndarray) -> bool:
        """True when some evaluation document has estimated Jaccard >= threshold with `doc`."""
        return bool(self.matches(doc))

    def __len__(self) -> int:
        return len(self._signatures)

    # ---------------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> None:
        """Write the held signatures (signatures.npy, uint32 [E, num_perm]) and the settings
        (filter.json) into `directory`, so workers load the filter instead of re-reading the
        evaluation documents. The bytes depend only on the documents added, in order."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sigs = (np.stack(self._signatures) if self._signatures
                else np.zeros((0, self.num_perm), np.uint32))
        tmp = directory / "signatures.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, sigs, allow_pickle=False)
        os.replace(tmp, directory / "signatures.npy")
        settings = {"threshold": self.threshold, "ngram": self.ngram,
                    "num_perm": self.num_perm, "seed": self.seed}
        (directory / "filter.json.tmp").write_text(json.dumps(settings, sort_keys=True) + "\n")
        os.replace(directory / "filter.json.tmp", directory / "filter.json")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NearDuplicateFilter:
        """A filter written by `save` (the same answers as the one saved)."""
        directory = Path(directory)
        settings = json.loads((directory / "filter.json").read_text())
        filt = cls(**settings)
        for sig in np.load(directory / "signatures.npy", allow_pickle=False):
            filt._add_signature(np.asarray(sig, np.uint32))
        return filt


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of equal MinHash slots: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two hash sets (1.0 for two empty sets)."""
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0
