"""`evaluate`: score every token of an evaluation split with a model, with or without retrieval.

    result = evaluate(model, db, "validation", seq_len=2048, stride=1024, num_neighbours=10,
                      batch_size=8)
    result.overall.bits_per_byte, result.overall.word_perplexity, result.by_source

Windows come from `data_pipeline.input_pipeline.make_eval_windows`: each document on its own,
cut into windows of n = seq_len tokens of whole chunks starting every `stride` tokens; each
window scores only the positions no earlier window scored (`score_mask`), so every token of a
document except its first (there is no beginning-of-sequence token to predict it from) is
scored exactly once, with at least n - stride tokens of context when stride < n. Neighbours
are retrieved inline for each window chunk from the database's train split, with the key of
the chunk itself (the model lets chunk u+1 attend to chunk u's neighbours).

Exclusion: neighbours from the evaluated document itself are dropped (the pipeline's
same-document filter). With the paper's set-up (database = the train split, evaluation on
validation/test) this never triggers, since evaluation documents are not in the database;
it matters when evaluating on `train` (then the model would retrieve the very text it
predicts). `exclude_doc_ids` drops further documents.

Denominators: NLL sums are kept per document; bytes and words come from the documents
table, and a document enters the totals only if every one of its scorable tokens was scored
(checked against the split's tokens), so a `max_documents` cap or an interrupted stream never
divides a partial NLL by a full document's bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from retro_jax.evaluate.knn_lm import KnnLM
from retro_jax.evaluate.metrics import DocumentInfo, DocumentScores, Totals
from retro_jax.evaluate.scoring import make_scorer

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What one evaluation measured (see `to_json` for the file format)."""

    split: str
    num_neighbours: int
    seq_len: int
    stride: int
    overall: Totals
    by_source: dict[str, Totals]
    scores: DocumentScores
    documents_selected: int
    documents_incomplete: int
    timing: dict
    chunk_nll: np.ndarray | None = None  # float64 [split chunks]: NLL of the chunk's tokens
    chunk_tokens: np.ndarray | None = None  # int64 [split chunks]: scored tokens in the chunk
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "split": self.split, "num_neighbours": self.num_neighbours,
            "seq_len": self.seq_len, "stride": self.stride,
            "overall": self.overall.to_json(),
            "by_source": {k: v.to_json() for k, v in self.by_source.items()},
            "documents_selected": self.documents_selected,
            "documents_incomplete": self.documents_incomplete,
            "timing": self.timing, **self.extra,
        }


def document_table(db, split: str) -> dict[int, DocumentInfo]:
    """doc_id -> DocumentInfo (bytes, words, source) for the documents of `split`."""
    out = {}
    for row in db.documents.rows(split):
        out[int(row["doc_id"])] = DocumentInfo(num_bytes=int(row.get("num_bytes", 0)),
                                               num_words=int(row.get("num_words", 0)),
                                               source=str(row.get("source", "") or ""))
    return out


def documents_in_order(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc id [D], first chunk [D], chunks [D]) of the contiguous document runs of a split."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts = np.concatenate([[0], np.flatnonzero(doc_ids[1:] != doc_ids[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [doc_ids.size]]))
    return doc_ids[starts].astype(np.int64), starts.astype(np.int64), lengths.astype(np.int64)


def scorable_tokens(tokens: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per document, the targets an evaluation scores: its non-padding tokens minus the first
    (nothing predicts a document's first token). int64 [D]."""
    per_chunk = (np.asarray(tokens) != 0).sum(axis=1).astype(np.int64)
    prefix = np.concatenate([[0], np.cumsum(per_chunk)])
    return np.maximum(prefix[first + count] - prefix[first] - 1, 0)


def target_chunk_ids(chunk_ids: np.ndarray, chunk_len: int) -> np.ndarray:
    """The split chunk holding each target token: int64 [B, n].

    Target t is token t+1: in chunk u = t // m, or in chunk u+1 at a chunk's last position
    (for the window's last position, the chunk after the window, which is chunk id + 1 since a
    scored target never leaves its document and a document's chunks are consecutive).
    """
    chunk_ids = np.asarray(chunk_ids, np.int64)
    per_position = np.repeat(chunk_ids, chunk_len, axis=1)  # [B, n]
    last = (np.arange(per_position.shape[1]) % chunk_len) == chunk_len - 1
    return np.where((per_position >= 0) & last[None, :], per_position + 1, per_position)


def evaluate(
    model,
    db,
    split: str,
    *,
    seq_len: int,
    stride: int,
    num_neighbours: int,
    batch_size: int,
    overfetch: int = 4,
    max_documents: int = -1,
    exclude_doc_ids: Collection[int] | None = None,
    per_chunk: bool = False,
    knn: KnnLM | None = None,
    mesh=None,
    rules=None,
    progress: bool = True,
) -> EvalResult:
    """Score the documents of `split` with `model`.

    Args:
      model: a Retro (anything with `hidden_states(inputs, neighbours)` and
        `output_weights()`).
      db: the RetrievalDatabase (its train split is searched; `split` is evaluated).
      seq_len, stride: window length n and step (multiples of the chunk length, stride <= n).
      num_neighbours: k per chunk; 0 = no retrieval (RETRO[OFF], the baseline, kNN-LM).
      batch_size: windows per forward pass.
      overfetch: candidates fetched per chunk = k * overfetch before the document filters.
      max_documents: evaluate only the first N documents of the split (-1 = all).
      exclude_doc_ids: documents never retrieved (besides the evaluated document itself).
      per_chunk: also sum NLL per split chunk (for the leakage filter).
      knn: score with the kNN-LM interpolation of this datastore instead of the model alone.
      mesh, rules: the device mesh and logical axis rules the model is sharded with.
    """
    from data_pipeline.input_pipeline import make_eval_windows

    arrays = db.split(split)
    m = int(db.chunk_len)
    doc_order, doc_first, doc_chunks = documents_in_order(arrays.doc_ids)
    if max_documents is not None and max_documents > 0:
        doc_order, doc_first = doc_order[:max_documents], doc_first[:max_documents]
        doc_chunks = doc_chunks[:max_documents]
        doc_filter = doc_order.tolist()
    else:
        doc_filter = None
    expected = dict(zip(doc_order.tolist(),
                        scorable_tokens(arrays.tokens, doc_first, doc_chunks).tolist()))
    dataset = make_eval_windows(db, split, seq_len, stride, doc_filter, batch_size=batch_size,
                                num_neighbours=num_neighbours, overfetch=overfetch,
                                exclude_same_document=True, exclude_doc_ids=exclude_doc_ids)
    scorer = make_scorer(model, mesh=mesh, rules=rules, with_hidden=knn is not None)
    scores = DocumentScores()
    num_chunks = int(arrays.tokens.shape[0])
    chunk_nll = np.zeros(num_chunks + 1, np.float64) if per_chunk else None
    chunk_tokens = np.zeros(num_chunks + 1, np.int64) if per_chunk else None

    total_batches = _num_batches(arrays.doc_ids, seq_len // m, m, stride, doc_filter, batch_size)
    bar = _progress(total_batches, f"eval {split}", progress)
    t_start = time.perf_counter()
    t_first = None
    wait_s = model_s = 0.0
    windows = scored_total = first_tokens = 0
    iterator = dataset.as_numpy_iterator()
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        neighbours = batch.get("neighbours") if num_neighbours > 0 else None
        log_probs, hidden = scorer(batch["inputs"], neighbours, batch["targets"])
        mask = batch["score_mask"].astype(bool) & (batch["targets"] != 0)
        if knn is not None:
            log_probs = log_probs.astype(np.float64)
            log_probs[mask] = knn.log_probs(hidden[mask], log_probs[mask],
                                            batch["targets"][mask])
        t2 = time.perf_counter()
        token_nll = -log_probs.astype(np.float64)
        token_docs = np.repeat(batch["doc_ids"], m, axis=1)
        scores.add(token_docs, token_nll, mask)
        if per_chunk:
            chunks = target_chunk_ids(batch["chunk_ids"], m)[mask]
            chunks = np.where(chunks >= 0, chunks, num_chunks)
            chunk_nll += np.bincount(chunks, weights=token_nll[mask], minlength=num_chunks + 1)
            chunk_tokens += np.bincount(chunks, minlength=num_chunks + 1)
        if t_first is None:  # the first batch pays for compilation and the pipeline start
            t_first = t2 - t_start
            first_tokens = int(mask.sum())
        else:
            wait_s += t1 - t0
            model_s += t2 - t1
        windows += int((batch["chunk_ids"][:, 0] >= 0).sum())
        scored_total += int(mask.sum())
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t_start

    complete = [d for d, want in expected.items() if scores.tokens.get(d, 0) == want and want > 0]
    incomplete = [d for d, want in expected.items()
                  if want > 0 and scores.tokens.get(d, 0) != want]
    if incomplete:
        log.warning("%d of %d documents were not scored in full (e.g. doc %d: %d of %d tokens); "
                    "they are left out of bpb / word perplexity", len(incomplete),
                    len(expected), incomplete[0], scores.tokens.get(incomplete[0], 0),
                    expected[incomplete[0]])
    overall, by_source = scores.summary(document_table(db, split), complete)
    steady_tokens = scored_total - first_tokens  # after the first (compiling) batch
    steady_s = wait_s + model_s
    timing = {
        "seconds": elapsed, "first_batch_seconds": t_first or 0.0,
        "input_wait_seconds": wait_s, "model_seconds": model_s, "windows": windows,
        "scored_tokens": scored_total,
        "tokens_per_second": (steady_tokens / steady_s) if steady_s > 0 else None,
    }
    return EvalResult(
        split=split, num_neighbours=int(num_neighbours), seq_len=int(seq_len),
        stride=int(stride), overall=overall, by_source=by_source, scores=scores,
        documents_selected=len(expected), documents_incomplete=len(incomplete), timing=timing,
        chunk_nll=None if chunk_nll is None else chunk_nll[:num_chunks],
        chunk_tokens=None if chunk_tokens is None else chunk_tokens[:num_chunks])


def _num_batches(doc_ids, chunks_per_window, m, stride, doc_filter, batch_size) -> int | None:
    try:
        from data_pipeline.input_pipeline import eval_windows
    except ImportError:
        return None
    count = len(eval_windows(np.asarray(doc_ids), chunks_per_window, m, stride, doc_filter))
    return -(-count // batch_size)


def _progress(total, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False,
                mininterval=2.0)
