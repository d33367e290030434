"""Checks that fail before the first batch, with a message that says what to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError

_BUILD = "retro-jax build-db --config <experiment> --workdir <workdir>"


def db_path(db: Any) -> str:
    return str(getattr(db, "path", "<database>"))


def tokenizer_sha256(db: Any) -> str | None:
    manifest = getattr(db, "manifest", None) or {}
    return (manifest.get("tokenizer") or {}).get("sha256")


def check_database(db: Any, *, expect_chunk_len: int | None,
                   expect_tokenizer_sha256: str | None, split_db: Any | None) -> None:
    """The database (and a separate split database) match each other and the caller."""
    db.check_expectations(expect_chunk_len, expect_tokenizer_sha256)
    if split_db is None or split_db is db:
        return
    manifest = Path(db_path(db)) / "manifest.json"
    sha = tokenizer_sha256(db)
    other = Path(db_path(split_db)) / "manifest.json"
    if split_db.chunk_len != db.chunk_len:
        raise DataError(f"{other}: chunk_len {split_db.chunk_len}, but the retrieval database "
                        f"{manifest} has chunk_len {db.chunk_len}; build both with the same "
                        f"database.chunk_len ({_BUILD})")
    other_sha = tokenizer_sha256(split_db)
    if sha is not None and other_sha is not None and sha != other_sha:
        raise DataError(f"{other}: tokenizer sha256 {other_sha[:12]}..., but the retrieval "
                        f"database {manifest} uses {sha[:12]}...: token ids would not match; "
                        f"build the split with the database's tokenizer.model "
                        f"(tokenizer.model_path={Path(db_path(db)) / 'tokenizer.model'})")


def check_sequence_args(*, seq_len: int, chunk_len: int, batch_size: int, num_neighbours: int,
                        overfetch: int, packing: str, process_index: int,
                        process_count: int) -> int:
    """Argument checks; returns L = seq_len / chunk_len."""
    if seq_len <= 0 or seq_len % chunk_len:
        raise DataError(f"data.seq_len={seq_len} must be a positive multiple of the database's "
                        f"chunk length {chunk_len} (sequences are whole chunks)")
    if batch_size <= 0:
        raise DataError(f"batch_size={batch_size} must be positive")
    if num_neighbours < 0 or overfetch < 1:
        raise DataError(f"num_neighbours={num_neighbours} must be >= 0 and "
                        f"overfetch={overfetch} >= 1")
    if packing not in ("packed", "document"):
        raise DataError(f"data.packing={packing!r}: use 'packed' or 'document'")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} outside [0, {process_count})")
    return seq_len // chunk_len


def check_split_size(*, db: Any, split: str, num_chunks: int, num_examples: int,
                     chunks_per_example: int, batch_size: int, process_count: int,
                     drop_remainder: bool) -> None:
    per_host = num_examples // process_count
    if num_chunks < chunks_per_example and num_examples == 0:
        raise DataError(f"{db_path(db)}/{split}: {num_chunks} chunks, shorter than one "
                        f"sequence of {chunks_per_example} chunks; lower data.seq_len or add "
                        f"documents (corpus.max_documents / database.max_chunks) and rerun "
                        f"{_BUILD} --force")
    if per_host == 0 or (drop_remainder and per_host < batch_size):
        raise DataError(f"{db_path(db)}/{split}: {num_examples} sequences of "
                        f"{chunks_per_example} chunks make {per_host} per host for "
                        f"{process_count} host(s), fewer than one batch of {batch_size}; "
                        f"lower the batch size or data.seq_len, or build a larger database "
                        f"({_BUILD} --force)")


def check_neighbours(*, db: Any, num_neighbours: int, num_db_chunks: int) -> None:
    if num_neighbours > num_db_chunks:
        raise DataError(f"num_neighbours={num_neighbours} is larger than the retrieval database "
                        f"{db_path(db)} ({num_db_chunks} train chunks); lower "
                        f"data.num_neighbours / eval.num_neighbours or build a larger database "
                        f"({_BUILD} --force)")


def check_split_db_retriever(db: Any, split_db: Any | None) -> None:
    """A split of another database can query `db` only when its query rows mean the same in
    both (frozen-BERT keys of one embedder do; BM25 candidate ids point into the database
    they were computed for)."""
    if split_db is None or split_db is db or db.retriever_class.portable_queries:
        return
    raise DataError(f"{Path(db_path(db)) / 'manifest.json'}: a {db.retriever_kind!r} database's "
                    f"query rows ({db.retriever_class.query_array}) were computed at build time "
                    f"for its own splits, so it cannot serve sequences of another database "
                    f"({db_path(split_db)}); build that split into this database "
                    f"(database.eval_splits) with {_BUILD} --force")


def split_arrays(db: Any, split: str, *, need_queries: bool):
    """(tokens, doc_ids, queries) of a split; the query rows (the retriever's query array)
    only when `need_queries`, else None; DataError when they are needed and missing."""
    try:
        arrays = db.split(split)
    except FileNotFoundError as e:
        raise DataError(f"{db_path(db)}/{split}: {e}; rebuild with {_BUILD} --force") from e
    if need_queries and arrays.queries is None:
        name = db.retriever_class.query_array
        raise DataError(f"{db_path(db)}/{split}/{name}-*.npy is missing: retrieval for split "
                        f"{split!r} reads its chunks' query rows; add {split!r} to "
                        f"database.eval_splits and rebuild with {_BUILD} --force (or write "
                        "the neighbours once with retro-jax precompute-neighbours and set "
                        "data.precomputed_neighbours=True)")
    return arrays.tokens, arrays.doc_ids, arrays.queries if need_queries else None
