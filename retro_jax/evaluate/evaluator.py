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

Exact sums, one process or many: every window's scored NLL is summed on its own (float64,
in position order), with its token count and, for the leakage filter, its sums per chunk.
These per-window records are the only thing reduced: each process scores its share of the
windows (make_eval_windows deals them round robin; every process gets the same number of
batches), the records of all processes are gathered bit for bit (`allgather_host_arrays`),
ordered by the window's first chunk (document order, then position) and summed in that order
on every process. So the totals do not depend on the batch size, on how windows fall into
batches or on the number of processes. The per-token log-probabilities are the same too,
given the same mesh and global batch: the scorer lays the processes' rows out so that every
device computes what it would in one process (scoring.BatchPlacement). So two processes
produce the numbers one does, to the last bit. The global batch is `batch_size` rounded up
to a multiple of the processes and of the mesh's batch shards, so each device scores whole
windows.
"""

from __future__ import annotations

import logging
import math
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
    neighbour_source: str = "retrieved",
    align_max_shift: int = 0,
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
      neighbour_source: what the model reads as each chunk's k neighbours (a retrieval
        diagnostic, `NEIGHBOUR_SOURCES`): "retrieved" (RETRO[ON]), "random" (database chunks
        drawn at random, with their continuations) or "oracle" (the chunk itself and its true
        continuation in slot 0).
      align_max_shift: token alignment of the retrieved neighbours (`data.align_max_shift`,
        as the model was trained).
      mesh, rules: the device mesh and logical axis rules the model is sharded with.
    """
    import jax

    from data_pipeline.input_pipeline import make_eval_windows

    if neighbour_source not in NEIGHBOUR_SOURCES:
        raise ValueError(f"neighbour_source must be one of {NEIGHBOUR_SOURCES}, found "
                         f"{neighbour_source!r}")
    if neighbour_source != "retrieved" and num_neighbours <= 0:
        raise ValueError(f"neighbour_source={neighbour_source!r} needs num_neighbours > 0")
    process_count, process_index = jax.process_count(), jax.process_index()
    if knn is not None and process_count > 1:
        raise ValueError("kNN-LM evaluation runs in one process (its datastore and search are "
                         f"local); this is process {process_index} of {process_count}")
    arrays = db.split(split)
    m = int(db.chunk_len)
    chunks_per_window = seq_len // m
    doc_order, doc_first, doc_chunks = documents_in_order(arrays.doc_ids)
    if max_documents is not None and max_documents > 0:
        doc_order, doc_first = doc_order[:max_documents], doc_first[:max_documents]
        doc_chunks = doc_chunks[:max_documents]
        doc_filter = doc_order.tolist()
    else:
        doc_filter = None
    expected = dict(zip(doc_order.tolist(),
                        scorable_tokens(arrays.tokens, doc_first, doc_chunks).tolist()))
    global_batch = eval_batch_size(batch_size, mesh, rules, process_count)
    local_batch = global_batch // process_count
    if global_batch != batch_size:
        log.info("evaluation batch: %d windows (eval.batch_size=%d rounded up to a multiple of "
                 "%d processes and the mesh's batch shards), %d per process", global_batch,
                 batch_size, process_count, local_batch)
    # The diagnostics replace the neighbours: nothing is retrieved for them.
    retrieved = num_neighbours if neighbour_source == "retrieved" else 0
    dataset = make_eval_windows(db, split, seq_len, stride, doc_filter, batch_size=local_batch,
                                num_neighbours=retrieved, overfetch=overfetch,
                                exclude_same_document=True, exclude_doc_ids=exclude_doc_ids,
                                process_index=process_index, process_count=process_count,
                                align_max_shift=align_max_shift)
    scorer = make_scorer(model, mesh=mesh, rules=rules, with_hidden=knn is not None)
    records = WindowRecords(chunks_per_window, m, per_chunk=per_chunk)

    total_batches = _num_batches(arrays.doc_ids, chunks_per_window, m, stride, doc_filter,
                                 local_batch, process_count)
    bar = _progress(total_batches, f"eval {split}", progress and process_index == 0)
    t_start = time.perf_counter()
    t_first = None
    wait_s = model_s = 0.0
    first_tokens = 0
    iterator = dataset.as_numpy_iterator()
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        neighbours = None
        if neighbour_source != "retrieved":
            neighbours = substitute_neighbours(neighbour_source, batch, db, m, num_neighbours)
        elif num_neighbours > 0:
            neighbours = batch["neighbours"]
        log_probs, hidden = scorer(batch["inputs"], neighbours, batch["targets"])
        mask = batch["score_mask"].astype(bool) & (batch["targets"] != 0)
        if knn is not None:
            log_probs = log_probs.astype(np.float64)
            log_probs[mask] = knn.log_probs(hidden[mask], log_probs[mask],
                                            batch["targets"][mask])
        t2 = time.perf_counter()
        scored = records.add(batch, -log_probs.astype(np.float64), mask)
        if t_first is None:  # the first batch pays for compilation and the pipeline start
            t_first = t2 - t_start
            first_tokens = scored
        else:
            wait_s += t1 - t0
            model_s += t2 - t1
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t_start
    local_tokens = records.scored_tokens()

    windows = records.reduce()  # every process's windows, in document order
    scores = DocumentScores()
    scores.add(windows.doc, windows.nll, np.ones(len(windows.doc), bool), counts=windows.tokens)
    complete = [d for d, want in expected.items() if scores.tokens.get(d, 0) == want and want > 0]
    incomplete = [d for d, want in expected.items()
                  if want > 0 and scores.tokens.get(d, 0) != want]
    if incomplete and process_index == 0:
        log.warning("%d of %d documents were not scored in full (e.g. doc %d: %d of %d tokens); "
                    "they are left out of bpb / word perplexity", len(incomplete),
                    len(expected), incomplete[0], scores.tokens.get(incomplete[0], 0),
                    expected[incomplete[0]])
    overall, by_source = scores.summary(document_table(db, split), complete)
    chunk_nll = chunk_tokens = None
    if per_chunk:
        chunk_nll, chunk_tokens = windows.per_chunk(int(arrays.tokens.shape[0]))
    timing = _timing(elapsed=elapsed, first=t_first or 0.0, wait_s=wait_s, model_s=model_s,
                     steady_tokens=local_tokens - first_tokens)
    timing.update({"windows": len(windows.doc), "scored_tokens": int(windows.tokens.sum()),
                   "global_batch": global_batch, "processes": process_count})
    return EvalResult(
        split=split, num_neighbours=int(num_neighbours), seq_len=int(seq_len),
        stride=int(stride), overall=overall, by_source=by_source, scores=scores,
        documents_selected=len(expected), documents_incomplete=len(incomplete), timing=timing,
        chunk_nll=chunk_nll, chunk_tokens=chunk_tokens)


NEIGHBOUR_SOURCES = ("retrieved", "random", "oracle")


def substitute_neighbours(source: str, batch: dict, db, chunk_len: int,
                          num_neighbours: int) -> np.ndarray:
    """The neighbours a diagnostic evaluation feeds instead of the retrieved ones.

    Args:
      source: "random": for every chunk, k database chunks drawn uniformly (seeded by the
        chunk's id in its split, so the draw does not depend on batching or processes) with
        their continuations: the right format, unrelated content. "oracle": slot 0 holds
        [C_u ; C_{u+1}] (the window's own tokens; zeros past the window), the rest empty.
      batch: the window batch: chunk_ids int64 [B, L], inputs int32 [B, n].
      num_neighbours: k.
    Returns:
      int32 [B, L, k, 2m].
    """
    k = int(num_neighbours)
    if source == "oracle":
        from retro_jax.train.diagnostics import oracle_neighbours

        return np.asarray(oracle_neighbours(np.asarray(batch["inputs"]), chunk_len, k))
    num_db_chunks = int(db.split("train").tokens.shape[0])
    chunk_ids = np.asarray(batch["chunk_ids"], np.int64)
    ids = np.stack([np.random.default_rng([17, int(c)]).integers(0, num_db_chunks, k)
                    if c >= 0 else np.full(k, -1) for c in chunk_ids.reshape(-1)])
    return db.neighbour_tokens(ids.reshape(chunk_ids.shape + (k,)))


def eval_batch_size(batch_size: int, mesh=None, rules=None, process_count: int = 1) -> int:
    """The global evaluation batch: `batch_size` rounded up to a multiple of the processes and
    of the mesh's batch shards (the devices the rule table splits the batch over)."""
    shards = 1
    if mesh is not None and rules is not None:
        from retro_jax.models.sharding import batch_sharding

        axes = batch_sharding(mesh, rules, 1).spec
        axes = axes[0] if len(axes) else None
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        shards = int(np.prod([dict(mesh.shape)[a] for a in axes])) if axes else 1
    unit = math.lcm(max(int(process_count), 1), shards)
    return -(-max(int(batch_size), 1) // unit) * unit


@dataclass
class Windows:
    """Per-window sums of every process, one row per scored window, in document order."""

    first_chunk: np.ndarray  # int64 [W]: the window's first chunk (its unique key)
    doc: np.ndarray  # int64 [W]
    nll: np.ndarray  # float64 [W]: summed NLL of the window's scored targets
    tokens: np.ndarray  # int64 [W]: scored targets
    slot_nll: np.ndarray | None = None  # float64 [W, L+1]: NLL of targets in chunk first + s
    slot_tokens: np.ndarray | None = None  # int64 [W, L+1]

    def per_chunk(self, num_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """(NLL float64 [num_chunks], scored targets int64 [num_chunks]) per split chunk, each
        summed over windows in document order."""
        nll = np.zeros(num_chunks, np.float64)
        tokens = np.zeros(num_chunks, np.int64)
        slots = self.first_chunk[:, None] + np.arange(self.slot_nll.shape[1])[None, :]
        used = (self.slot_tokens > 0) & (slots < num_chunks)
        np.add.at(nll, slots[used], self.slot_nll[used])  # unbuffered, in window order
        np.add.at(tokens, slots[used], self.slot_tokens[used])
        return nll, tokens


class WindowRecords:
    """This process's per-window sums, batch by batch; `reduce` gathers every process's."""

    def __init__(self, chunks_per_window: int, chunk_len: int, *, per_chunk: bool):
        self.L, self.m, self.per_chunk = int(chunks_per_window), int(chunk_len), per_chunk
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, batch: dict, token_nll: np.ndarray, mask: np.ndarray) -> int:
        """Record one batch: token_nll float64 [b, n], mask bool [b, n] (scored targets).
        Returns the number of scored targets."""
        chunk_ids = np.asarray(batch["chunk_ids"], np.int64)
        doc_ids = np.asarray(batch["doc_ids"], np.int64)
        token_docs = np.repeat(doc_ids, self.m, axis=1)
        mask = np.asarray(mask, bool) & (token_docs >= 0)
        b, n = mask.shape
        # Sums per window, in position order (one row at a time: independent of the batch).
        nll = np.where(mask, token_nll, 0.0).sum(axis=1)
        parts = {"first_chunk": chunk_ids[:, 0], "doc": doc_ids[:, 0], "nll": nll,
                 "tokens": mask.sum(axis=1).astype(np.int64)}
        if self.per_chunk:
            # Target t is token t+1, in the window's chunk (t + 1) // m: slot L is the chunk
            # after the window (a scored target never leaves its document).
            slot = (np.arange(n) + 1) // self.m
            flat = (np.arange(b)[:, None] * (self.L + 1) + slot[None, :])[mask]
            size = b * (self.L + 1)
            parts["slot_nll"] = np.bincount(flat, weights=token_nll[mask],
                                            minlength=size).reshape(b, self.L + 1)
            parts["slot_tokens"] = np.bincount(flat, minlength=size).reshape(
                b, self.L + 1).astype(np.int64)
        for key, value in parts.items():
            self._parts.setdefault(key, []).append(value)
        return int(mask.sum())

    def local(self) -> dict[str, np.ndarray]:
        empty = {"first_chunk": np.zeros(0, np.int64), "doc": np.zeros(0, np.int64),
                 "nll": np.zeros(0, np.float64), "tokens": np.zeros(0, np.int64)}
        if self.per_chunk:
            empty["slot_nll"] = np.zeros((0, self.L + 1), np.float64)
            empty["slot_tokens"] = np.zeros((0, self.L + 1), np.int64)
        return {k: np.concatenate(self._parts[k]) if self._parts.get(k) else v
                for k, v in empty.items()}

    def scored_tokens(self) -> int:
        return int(sum(int(t.sum()) for t in self._parts.get("tokens", [])))

    def reduce(self) -> Windows:
        """Every process's windows (gathered bit for bit), padding dropped, in the order of
        their first chunk: the same arrays on every process, whatever the process count."""
        from retro_jax.train.multihost import allgather_host_arrays

        gathered = allgather_host_arrays(self.local())
        flat = {k: v.reshape((-1, *v.shape[2:])) for k, v in gathered.items()}
        keep = flat["first_chunk"] >= 0
        flat = {k: v[keep] for k, v in flat.items()}
        order = np.argsort(flat["first_chunk"], kind="stable")
        flat = {k: v[order] for k, v in flat.items()}
        if len(order) > 1 and (np.diff(flat["first_chunk"]) == 0).any():
            raise AssertionError("a window was scored twice (two windows share a first chunk)")
        return Windows(**flat)


def _timing(*, elapsed: float, first: float, wait_s: float, model_s: float,
            steady_tokens: int) -> dict:
    """Wall-clock figures; with several processes, the slowest process's times and the sum
    of their tokens (the rate is that of the whole job)."""
    from retro_jax.train.multihost import allgather_host_arrays

    mine = np.array([elapsed, first, wait_s, model_s, wait_s + model_s, steady_tokens],
                    np.float64)
    every = allgather_host_arrays({"t": mine})["t"]
    elapsed, first, wait_s, model_s, steady_s = every[:, :5].max(axis=0).tolist()
    steady_tokens = float(every[:, 5].sum())
    return {"seconds": elapsed, "first_batch_seconds": first, "input_wait_seconds": wait_s,
            "model_seconds": model_s,
            "tokens_per_second": (steady_tokens / steady_s) if steady_s > 0 else None}


def _num_batches(doc_ids, chunks_per_window, m, stride, doc_filter, batch_size,
                 process_count: int = 1) -> int | None:
    """Batches per process (make_eval_windows gives every process the same number)."""
    try:
        from data_pipeline.input_pipeline import eval_windows
    except ImportError:
        return None
    count = len(eval_windows(np.asarray(doc_ids), chunks_per_window, m, stride, doc_filter))
    per_process = -(-count // process_count)
    return -(-per_process // batch_size)


def _progress(total, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False,
                mininterval=2.0)
