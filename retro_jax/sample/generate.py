"""The generation loop: prefill the prompt, sample token by token, re-retrieve every chunk.

    retriever = DatabaseRetriever(db, text_search, num_neighbours=2)
    result = generate(model, prompt_tokens, max_tokens=128, max_len=config.data.seq_len,
                      retriever=retriever, temperature=0.0)
    records = attribution(result, db)

When a chunk of m tokens is complete (prompt or generated), its text is decoded and searched
with the database's retriever (`Retriever.text_search`: keyed with the frozen BERT and
searched in the ScaNN index, or scored by the saved BM25 index); its k neighbours
[chunk ; continuation] are fed with the chunk's last token, whose step encodes them
(conditioned on H_u) for the m tokens that attend to them (see decode.py).

Context length: positions are absolute rotary positions 0..max_len-1 and the cache holds
max_len tokens (default: the trained `data.seq_len`). A prompt longer than max_len - 1 keeps
its last tokens; generation stops when the sequence reaches max_len (`stop_reason`
"max_len"), at EOS ("eos"), or after max_tokens ("max_tokens").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from retro_jax.models.retro import Retro
from retro_jax.sample.decode import CachedDecoder, UncachedDecoder

log = logging.getLogger(__name__)

EOS_ID = 3


class Retriever(Protocol):
    """Neighbours of a completed chunk: `__call__(chunk_tokens int32 [m])` ->
    (chunk ids int64 [k] with -1 where missing, neighbour tokens int32 [k, 2m])."""

    num_neighbours: int

    def __call__(self, chunk_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class DatabaseRetriever:
    """Query `db` with a chunk's text, gather [chunk ; continuation] of its k neighbours.

    Args:
      db: a RetrievalDatabase (tokenizer, train split, neighbour_tokens()).
      text_search: `(texts, k) -> candidate chunk ids int64 [Q, k]` of the database's
        retriever (`Retriever.text_search(db)`: frozen-BERT keys + ScaNN, or BM25; a
        deterministic stand-in in tests).
      num_neighbours: k.
      exclude_doc_ids: documents whose chunks are never returned (e.g. the prompt's source).
      align_max_shift: token alignment of the windows with the querying chunk, as in
        training (`data.align_max_shift`).
    """

    def __init__(self, db: Any, text_search: Any, num_neighbours: int, *,
                 exclude_doc_ids: Sequence[int] = (), overfetch: int = 4,
                 align_max_shift: int = 0):
        self.db = db
        self.align_max_shift = int(align_max_shift)
        self.text_search = text_search
        self.num_neighbours = int(num_neighbours)
        self.exclude_doc_ids = frozenset(int(d) for d in exclude_doc_ids)
        self.overfetch = overfetch if self.exclude_doc_ids else 1
        self.seconds = 0.0  # time spent keying and searching (reported by generate)
        self.calls = 0

    def __call__(self, chunk_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        text = self.db.tokenizer.decode([int(t) for t in chunk_tokens])
        k = self.num_neighbours
        ids = np.asarray(self.text_search([text], k * self.overfetch)[0], np.int64)
        if self.exclude_doc_ids:
            doc_ids = self.db.split("train").doc_ids
            ids = np.asarray([i for i in ids if i >= 0 and int(doc_ids[i])
                              not in self.exclude_doc_ids], np.int64)
        out = np.full((k,), -1, np.int64)
        out[: min(k, ids.size)] = ids[:k]
        self.seconds += time.perf_counter() - start
        self.calls += 1
        if self.align_max_shift > 0:
            from data_pipeline.input_pipeline import neighbour_windows

            return out, neighbour_windows(self.db, out, chunk_tokens, self.align_max_shift)
        return out, self.db.neighbour_tokens(out)


@dataclasses.dataclass
class GenerationResult:
    """What `generate` produced (batch of one).

    tokens: prompt (as used) + generated, int32 `[n]`; neighbour_ids int64 `[L, k]` for each
    completed chunk u (-1 = none); shares f32 `[L', k]`: for attending chunk u (positions
    u*m+m-1 .. u*m+2m-2) the share of CCA attention each neighbour of chunk u received.
    """

    tokens: np.ndarray
    prompt_len: int
    chunk_len: int
    neighbour_ids: np.ndarray
    shares: np.ndarray
    stop_reason: str
    prompt_truncated: int = 0
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def generated(self) -> np.ndarray:
        return self.tokens[self.prompt_len:]


def generate(
    model: Retro,
    prompt_tokens: Sequence[int],
    *,
    max_tokens: int,
    max_len: int,
    retriever: Retriever | None = None,
    num_neighbours: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    decoder: CachedDecoder | UncachedDecoder | None = None,
) -> GenerationResult:
    """Continue `prompt_tokens` by up to `max_tokens` tokens (batch of one).

    Args:
      retriever: neighbours of each completed chunk; None = RETRO[OFF] (and the baseline).
      num_neighbours: k (default: the retriever's; 1 without retriever, unused then).
      use_cache: CachedDecoder (default) or the full-forward UncachedDecoder.
      decoder: reuse a decoder (and its compiled steps) across calls; it is reset here.
    """
    cfg = model.cfg
    m = cfg.chunk_len
    if max_len % m:
        raise ValueError(f"max_len={max_len} must be a multiple of chunk_len={m}")
    if retriever is not None and not cfg.retrieval:
        raise ValueError("this model is a baseline (no CCA): pass retriever=None")
    k = num_neighbours or (retriever.num_neighbours if retriever is not None else 1)
    prompt = [int(t) for t in prompt_tokens] or [EOS_ID]  # an empty prompt starts a document
    truncated = max(0, len(prompt) - (max_len - 1))
    if truncated:
        log.warning("prompt of %d tokens truncated to its last %d (max_len %d)",
                    len(prompt), max_len - 1, max_len)
        prompt = prompt[truncated:]
    if decoder is None:
        cls = CachedDecoder if use_cache else UncachedDecoder
        decoder = cls(model, batch=1, max_len=max_len, num_neighbours=k,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    else:
        decoder.reset()

    tokens = list(prompt)
    neighbour_ids: list[np.ndarray] = []
    retrieval_seconds = 0.0

    def neighbours_for(pos: int):
        """Retrieve for the chunk that `pos` completes (None if it completes none)."""
        nonlocal retrieval_seconds
        if retriever is None or (pos + 1) % m:
            return None
        start = time.perf_counter()
        ids, neighbour_tokens = retriever(np.asarray(tokens[pos + 1 - m: pos + 1], np.int32))
        retrieval_seconds += time.perf_counter() - start
        neighbour_ids.append(np.asarray(ids, np.int64))
        return np.asarray(neighbour_tokens, np.int32)[None]  # [1, k, 2m]

    # Prefill: the prompt token by token (one compiled step each, retrieval at chunk ends).
    start = time.perf_counter()
    next_token = None
    for pos, token in enumerate(prompt):
        last = pos == len(prompt) - 1
        next_token = decoder.feed(np.asarray([token], np.int32), pos, neighbours_for(pos),
                                  need_output=last)
    next_token = int(np.asarray(next_token)[0])
    tokens_fed = len(prompt)
    prefill_seconds = time.perf_counter() - start
    prefill_retrieval_seconds, retrieval_seconds = retrieval_seconds, 0.0

    start = time.perf_counter()
    num_generated = 0
    stop_reason = ""
    while num_generated < max_tokens and len(tokens) < max_len:
        tokens.append(next_token)
        num_generated += 1
        if stop_at_eos and next_token == EOS_ID:
            stop_reason = "eos"
            break
        if num_generated >= max_tokens or len(tokens) >= max_len:
            break  # the last token is never fed: nothing would read its output
        pos = len(tokens) - 1
        next_token = int(np.asarray(decoder.feed(np.asarray([next_token], np.int32), pos,
                                                 neighbours_for(pos)))[0])
        tokens_fed = len(tokens)
    if not stop_reason:
        stop_reason = "max_tokens" if num_generated >= max_tokens else "max_len"
    decode_seconds = time.perf_counter() - start

    shares = decoder.attention_shares(tokens_fed)[0] if cfg.retrieval else np.zeros((0, k))
    ids = (np.stack(neighbour_ids) if neighbour_ids
           else np.zeros((0, k), np.int64))
    decode_only = max(decode_seconds - retrieval_seconds, 1e-9)
    timings = {
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "prefill_retrieval_seconds": prefill_retrieval_seconds,
        "retrieval_seconds": retrieval_seconds,  # of decode_seconds
        "tokens_per_second": num_generated / max(decode_seconds, 1e-9),
        "tokens_per_second_without_retrieval": num_generated / decode_only,
    }
    return GenerationResult(tokens=np.asarray(tokens, np.int32), prompt_len=len(prompt),
                            chunk_len=m, neighbour_ids=ids, shares=np.asarray(shares),
                            stop_reason=stop_reason, prompt_truncated=truncated,
                            timings=timings)


def attribution(result: GenerationResult, db: Any, *, generated_only: bool = True
                ) -> list[dict]:
    """Per attending chunk, the neighbours it attended to, their documents and shares.

    Attending chunk u+ = positions u*m+m-1 .. u*m+2m-2 (the last token of chunk u and the
    first m-1 of chunk u+1) attends to the neighbours of chunk u. One record per u with
    neighbours; `generated_only` keeps those with at least one generated token.
    Each record: {"chunk": u + 1, "first_token", "last_token" (positions, inclusive),
    "text" (of those positions), "retrieved_with" (text of chunk u), "neighbours": [{chunk_id,
    doc_id, title, source, share, text}] in retrieval order}.
    """
    m = result.chunk_len
    tokens = result.tokens
    tokenizer = db.tokenizer
    doc_ids = db.split("train").doc_ids
    records = []
    for u in range(min(len(result.neighbour_ids), len(result.shares))):
        first, last = u * m + m - 1, min(u * m + 2 * m - 2, len(tokens) - 1)
        if generated_only and last < result.prompt_len:
            continue
        neighbours = []
        for j, chunk_id in enumerate(result.neighbour_ids[u]):
            if chunk_id < 0:
                continue
            doc_id = int(doc_ids[chunk_id])
            row = db.documents.get(doc_id, {}) if hasattr(db.documents, "get") else {}
            neighbours.append({
                "chunk_id": int(chunk_id), "doc_id": doc_id,
                "title": row.get("title", ""), "source": row.get("source", ""),
                "share": float(result.shares[u, j]),
                "text": tokenizer.decode([int(t) for t in db.split("train").tokens[chunk_id]]),
            })
        if not neighbours:
            continue
        records.append({
            "chunk": u + 1, "first_token": int(first), "last_token": int(last),
            "text": tokenizer.decode([int(t) for t in tokens[first: last + 1]]),
            "retrieved_with": tokenizer.decode([int(t) for t in tokens[u * m: u * m + m]]),
            "neighbours": neighbours,
        })
    return records
