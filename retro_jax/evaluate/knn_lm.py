"""The kNN-LM baseline (Khandelwal et al. 2020; RETRO paper, Table 4).

A datastore maps each context of the retrieval corpus to the token that followed it:
key = the trained baseline model's last-layer hidden state at position t (the vector the
output projection reads), value = token t+1. At evaluation the hidden state of each context
queries the datastore for its k nearest keys (squared L2), and

    p_kNN(y) = sum over retrieved (key_i, value_i) with value_i = y of softmax_i(-d_i / T)
    p(y)     = lambda * p_kNN(y) + (1 - lambda) * p_LM(y)

with k = eval.knn_lm_k, T = eval.knn_lm_temperature, lambda = eval.knn_lm_lambda. Only the
target's probability is needed for its NLL, so the interpolation is done on log p(target):
log(lambda p_kNN + (1 - lambda) p_LM) = logaddexp(log lambda + log p_kNN,
log(1 - lambda) + log p_LM).

The datastore is built over the database's corpus (the train split's tokens), in windows of
n tokens (each document on its own, the same windows as evaluation), capped at `max_entries`
(the paper's full-corpus datastore is 103M entries on Wikitext103; a CPU run caps it). It is
searched with the data pipeline's ScaNN shard searcher (brute force below
`index.brute_force_below` entries, a tree + asymmetric hashing above), or an exact numpy
search when the index module is unavailable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HiddenFn = Callable[[np.ndarray], np.ndarray]  # inputs int32 [B, n] -> float32 [B, n, d]
DATASTORE_META = "datastore.json"


@dataclass
class Datastore:
    """keys float32 [N, d] (context vectors), values int32 [N] (the next token)."""

    keys: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "keys.npy", self.keys)
        np.save(directory / "values.npy", self.values)
        info = {"entries": len(self), "dim": int(self.keys.shape[1]), **(meta or {})}
        (directory / DATASTORE_META).write_text(json.dumps(info, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple[Datastore, dict]:
        directory = Path(directory)
        meta = json.loads((directory / DATASTORE_META).read_text())
        keys = np.load(directory / "keys.npy", allow_pickle=False)
        values = np.load(directory / "values.npy", allow_pickle=False)
        if len(keys) != meta["entries"] or len(values) != meta["entries"]:
            raise ValueError(f"{directory}: datastore arrays ({len(keys)} keys, {len(values)} "
                             f"values) disagree with {DATASTORE_META} ({meta['entries']}); "
                             "delete the directory to rebuild it")
        return cls(keys, values), meta


def build_datastore(
    hidden_fn: HiddenFn, batches: Iterable[dict], *, max_entries: int
) -> Datastore:
    """Collect (hidden state at t, token t+1) over `batches` until `max_entries`.

    Args:
      hidden_fn: inputs int32 [B, n] -> float32 [B, n, d], the model's last-layer states.
      batches: dicts with inputs, targets int32 [B, n] (target 0 = not a real next token)
        and optionally score_mask [B, n] (only scored positions enter: with overlapping
        windows each context is stored once).
      max_entries: cap on N (the first contexts in corpus order are kept).
    """
    keys, values, total = [], [], 0
    for batch in batches:
        if total >= max_entries:
            break
        targets = np.asarray(batch["targets"])
        keep = targets != 0
        if "score_mask" in batch:
            keep &= np.asarray(batch["score_mask"]).astype(bool)
        if not keep.any():
            continue
        hidden = np.asarray(hidden_fn(np.asarray(batch["inputs"])), dtype=np.float32)
        k = hidden[keep][: max_entries - total]
        keys.append(k)
        values.append(targets[keep][: len(k)].astype(np.int32))
        total += len(k)
    if not keys:
        raise ValueError("build_datastore: the batches held no scored token")
    return Datastore(np.concatenate(keys), np.concatenate(values))


class DatastoreSearcher:
    """k nearest datastore keys (squared L2) of query vectors.

    Uses `data_pipeline.retrieval.scann.build_shard` (ScaNN, parameters from
    `index_settings` = config.index with `k` as the neighbour count) when `use_scann`, else an
    exact blocked numpy search (`||q||^2 - 2 q.k + ||k||^2`, top-k by argpartition).
    """

    def __init__(self, datastore: Datastore, *, index_settings=None, k: int = 10,
                 use_scann: bool = True):
        self.datastore = datastore
        self._shard = None
        if use_scann:
            from data_pipeline.retrieval.scann import IndexParams, build_shard

            knobs = dict(index_settings or {})
            # The re-ordering depth scales with k (kNN-LM asks for ~1024 neighbours).
            knobs["num_neighbours"] = int(k)
            self._shard = build_shard(datastore.keys,
                                      IndexParams.for_size(len(datastore), **knobs))
        self._key_norms = None if self._shard is not None else np.einsum(
            "nd,nd->n", datastore.keys, datastore.keys)

    @property
    def kind(self) -> str:
        return "scann" if self._shard is not None else "exact-numpy"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, d] -> (ids int64 [Q, k'], sq. distances float32 [Q, k']),
        k' = min(k, N); ids -1 / distance inf where the index found fewer."""
        queries = np.asarray(queries, dtype=np.float32)
        k = min(int(k), len(self.datastore))
        if self._shard is not None:
            return self._shard.search(queries, k)
        return _exact_search(self.datastore.keys, self._key_norms, queries, k)


def _exact_search(keys: np.ndarray, key_norms: np.ndarray, queries: np.ndarray, k: int,
                  block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty((len(queries), k), np.int64)
    dists = np.empty((len(queries), k), np.float32)
    for lo in range(0, len(queries), block):
        q = queries[lo:lo + block]
        d = (np.einsum("qd,qd->q", q, q)[:, None] - 2.0 * (q @ keys.T) + key_norms[None, :])
        d = np.maximum(d, 0.0)
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(
            np.arange(d.shape[1]), (len(q), 1))
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.argsort(part_d, axis=1, kind="stable")
        ids[lo:lo + block] = np.take_along_axis(part, order, axis=1)
        dists[lo:lo + block] = np.take_along_axis(part_d, order, axis=1)
    return ids, dists


def knn_log_prob(
    dists: np.ndarray, neighbour_values: np.ndarray, targets: np.ndarray, temperature: float
) -> np.ndarray:
    """log p_kNN(target) per query, float64 [Q]; -inf when no neighbour holds the target.

    Args:
      dists: float [Q, k] squared L2 distances (inf for a missing neighbour).
      neighbour_values: int [Q, k] the datastore values of the neighbours (-1 if missing).
      targets: int [Q].
      temperature: T in softmax(-d / T).
    """
    logits = -np.asarray(dists, dtype=np.float64) / float(temperature)
    hit = np.asarray(neighbour_values) == np.asarray(targets)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.max(logits, axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)  # all neighbours missing: p_kNN = 0
        log_norm = top[:, 0] + np.log(np.sum(np.exp(logits - top), axis=1))
        hit_logits = np.where(hit, logits, -np.inf)
        log_hit = top[:, 0] + np.log(np.sum(np.exp(hit_logits - top), axis=1))
        return np.where(np.isfinite(log_norm), log_hit - log_norm, -np.inf)


def interpolate(lm_log_prob: np.ndarray, knn_log_prob_: np.ndarray, lam: float) -> np.ndarray:
    """log(lam * p_kNN + (1 - lam) * p_LM), elementwise, float64."""
    lm = np.asarray(lm_log_prob, dtype=np.float64)
    knn = np.asarray(knn_log_prob_, dtype=np.float64)
    if lam <= 0.0:
        return lm
    if lam >= 1.0:
        return knn
    return np.logaddexp(math.log(lam) + knn, math.log1p(-lam) + lm)


class KnnLM:
    """Scores target tokens with the kNN-LM interpolation.

    Args:
      searcher: a DatastoreSearcher.
      k, temperature, lam: eval.knn_lm_k, eval.knn_lm_temperature, eval.knn_lm_lambda.
    """

    def __init__(self, searcher: DatastoreSearcher, *, k: int, temperature: float, lam: float):
        self.searcher = searcher
        self.k = int(k)
        self.temperature = float(temperature)
        self.lam = float(lam)

    def log_probs(self, hidden: np.ndarray, lm_log_prob: np.ndarray,
                  targets: np.ndarray) -> np.ndarray:
        """Interpolated log p(target).

        Args:
          hidden: float [Q, d] query context vectors.
          lm_log_prob: float [Q] the model's log p(target).
          targets: int [Q].
        Returns:
          float64 [Q].
        """
        if len(targets) == 0:
            return np.zeros(0, np.float64)
        ids, dists = self.searcher.search(np.asarray(hidden, np.float32), self.k)
        values = np.where(ids >= 0, self.searcher.datastore.values[np.maximum(ids, 0)], -1)
        knn = knn_log_prob(dists, values, targets, self.temperature)
        return interpolate(lm_log_prob, knn, self.lam)
