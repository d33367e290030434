"""The build stages of a `database.retriever = "bm25"` database (in place of keys + ScaNN).

    bm25 index       <db>/bm25/: bm25s index over the train chunks' detokenized text
    bm25 candidates  <db>/<split>/bm25_candidates.npy int64 [num_chunks, K] for every split:
                     each chunk's K best train chunks by BM25 score outside its own
                     document (-1 where fewer match), queried with the chunk's own text, in
                     score order (ties by chunk id)

Why outside its own document: a train chunk's best BM25 matches are itself and the rest of
its document (on the runlocal stdlib database, 88% of the raw top-10 were same-document and
75% of training neighbours came out missing after the pipeline's same-document filter), and
that filter always runs for training and evaluation. Evaluation chunks' documents are never
in the train split, so for them this changes nothing. The pipeline still applies its filters
(same document again, excluded documents) to these rows; only `exclude_same_document=False`
on the train split cannot bring same-document chunks back.

K = config `index.num_neighbours` (the searchers' top-k before filtering; default 10),
recorded in the manifest as bm25.num_candidates. The input pipeline gathers a query chunk's
row in-graph and applies its filters (same document, excluded documents) to it, so k *
overfetch candidates beyond K are never seen: raise index.num_neighbours for more (a
candidate is 8 bytes per chunk on disk and in host memory).

Resumable like the key stage: the index is saved into a temporary directory and renamed,
candidates are written block by block with a done-marker each (data_pipeline/build_state.py).
Markers chain: the candidates' inputs include the index directory's sha256, which includes
the train tokens' sha256, so changing the corpus or tokenizer redoes both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_pipeline.bm25 import BM25_DIR, CANDIDATES_FILE, PARAMS, Bm25Index, bm25s_version
from data_pipeline.build_state import (
    Markers,
    dir_sha256,
    event,
    fingerprint,
    progress,
    write_row_blocks,
)
from data_pipeline.tokenizer import Tokenizer


def _texts(tokenizer: Tokenizer, tokens: np.ndarray) -> list[str]:
    """Detokenized chunk texts (the text BERT keys would be made from)."""
    return [tokenizer.decode(row) for row in np.asarray(tokens)]


def stage_bm25_index(tokenizer: Tokenizer, train_tokens_sha: str, partial: Path,
                     markers: Markers) -> str:
    """Build and save the BM25 index over the train chunks; returns its fingerprint."""
    inputs = fingerprint({"tokens": train_tokens_sha, "params": PARAMS,
                          "bm25s": bm25s_version()})
    target = partial / BM25_DIR
    marker = markers.get("bm25_index", inputs)
    if marker and target.is_dir() and dir_sha256(target) == marker["sha256"]:
        return fingerprint([inputs, marker["sha256"]])
    tokens = np.load(partial / "train" / "tokens.npy", mmap_mode="r")
    bar = progress(int(tokens.shape[0]), "bm25 index", "chunk")
    index = Bm25Index.build(_texts(tokenizer, tokens))
    bar.update(int(tokens.shape[0]))
    bar.close()
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    index.save(tmp)
    event("bm25/index/built")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    sha = dir_sha256(target)
    markers.put("bm25_index", inputs, sha256=sha)
    event("bm25/index/saved")
    return fingerprint([inputs, sha])


def stage_bm25_candidates(tokenizer: Tokenizer, split: str, chunks_fp: str, index_fp: str,
                          num_candidates: int, block_rows: int, partial: Path,
                          markers: Markers) -> str:
    """Write <split>/bm25_candidates.npy block by block; returns its fingerprint."""
    tokens = np.load(partial / split / "tokens.npy", mmap_mode="r")
    doc_ids = np.load(partial / split / "doc_ids.npy", mmap_mode="r")
    train_doc_ids = np.load(partial / "train" / "doc_ids.npy")
    loaded: list[Bm25Index] = []  # loaded on the first block to compute (not when all done)

    def compute(rows: slice) -> np.ndarray:
        if not loaded:
            loaded.append(Bm25Index.load(partial / BM25_DIR))
        return loaded[0].top_k(_texts(tokenizer, tokens[rows]), num_candidates,
                               query_doc_ids=np.asarray(doc_ids[rows]),
                               chunk_doc_ids=train_doc_ids)

    inputs = fingerprint({"chunks": chunks_fp, "index": index_fp, "k": num_candidates,
                          "block_rows": block_rows, "excludes": "own document"})
    return write_row_blocks(partial / split / CANDIDATES_FILE,
                            shape=(int(tokens.shape[0]), num_candidates), dtype=np.int64,
                            inputs=inputs, block_rows=block_rows, markers=markers,
                            name=f"bm25_{split}", event_prefix=f"bm25/{split}",
                            compute=compute, desc=f"bm25 candidates {split}")


def build_bm25(tokenizer: Tokenizer, splits: list[str], chunk_shas: dict[str, dict], *,
               num_candidates: int, block_rows: int, partial: Path, markers: Markers) -> dict:
    """Both stages for every split; returns the manifest's `bm25` section.

    Args:
      chunk_shas: split -> {"tokens": sha256, "doc_ids": sha256, ...} of its chunk arrays.
    """
    index_fp = stage_bm25_index(tokenizer, chunk_shas["train"]["tokens"], partial, markers)
    for split in splits:
        # The train doc ids decide which candidates are the query's own document.
        chunks_fp = fingerprint({"split": chunk_shas[split], "train": chunk_shas["train"]})
        stage_bm25_candidates(tokenizer, split, chunks_fp, index_fp, num_candidates,
                              block_rows, partial, markers)
    return {"num_candidates": int(num_candidates), "dir": BM25_DIR,
            "candidates_file": CANDIDATES_FILE, "params": dict(PARAMS),
            "bm25s_version": bm25s_version()}


def remove_other_retriever_files(partial: Path, retriever: str, splits: list[str]) -> None:
    """Files an earlier attempt with the other retriever left in `<db>.partial/`."""
    if retriever == "bm25":
        stale = [partial / "index", *(partial / s / "keys.npy" for s in splits)]
    else:
        stale = [partial / BM25_DIR, *(partial / s / CANDIDATES_FILE for s in splits)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
