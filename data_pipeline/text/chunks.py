"""Documents -> token ids -> fixed-length chunks, streamed into `.npy` files.

A document's tokens are `encode(text) + [EOS_ID]`, cut into chunks of m tokens; the last
chunk of a document is padded with PAD_ID (0), so a chunk never holds two documents and
"chunk i+1 continues chunk i" is exactly "doc_ids[i+1] == doc_ids[i]".

`ChunkFileWriter` appends chunks to `tokens.npy` / `doc_ids.npy` in blocks and writes the
final shape into the `.npy` header at the end (numpy pads the header so that the first
axis can grow in place), so memory holds one block, never the split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from data_pipeline.text.counting import byte_count, word_count
from data_pipeline.text.tokenizer import EOS_ID, PAD_ID


class _Encoder(Protocol):
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def chunk_token_ids(ids: list[int] | np.ndarray, chunk_len: int) -> np.ndarray:
    """Cut one document's token ids into chunks.

    Args:
      ids: the document's ids (with its EOS).
      chunk_len: m.
    Returns:
      int32 [ceil(len(ids) / m), m], the last row padded with PAD_ID (0 rows for no ids).
    """
    ids = np.asarray(ids, dtype=np.int32)
    num_chunks = -(-ids.size // chunk_len)
    out = np.full((num_chunks, chunk_len), PAD_ID, dtype=np.int32)
    out.reshape(-1)[: ids.size] = ids
    return out


def keep_fraction(doc_id: str, fraction: float) -> bool:
    """Deterministic share `fraction` of documents, by a hash of the corpus' document id
    (database-size ablation: a smaller fraction keeps a subset of a larger one)."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class ChunkFileWriter:
    """Streams chunks of one split into `<dir>/tokens.npy` (int32 [N, m]) and
    `<dir>/doc_ids.npy` (int64 [N]).

    Chunks are buffered up to `block_chunks` rows and appended to the files; `close()`
    writes the final N into both headers. Until then the files hold N = 0 in their headers,
    so a half-written split never reads as complete.
    """

    def __init__(self, directory: str | os.PathLike, chunk_len: int, block_chunks: int = 65536):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.chunk_len = chunk_len
        self.block_chunks = block_chunks
        self.num_chunks = 0
        self._tokens_buf: list[np.ndarray] = []
        self._doc_buf: list[np.ndarray] = []
        self._buffered = 0
        self._files = {
            "tokens": self._open("tokens", np.int32, (0, chunk_len)),
            "doc_ids": self._open("doc_ids", np.int64, (0,)),
        }

    def _open(self, name: str, dtype, shape: tuple[int, ...]):
        f = open(self.directory / f"{name}.npy", "wb")  # noqa: SIM115 (closed in close())
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False, "shape": shape})
        return f

    def add(self, chunks: np.ndarray, doc_id: int) -> None:
        """Append one document's chunks (int32 [c, m])."""
        if chunks.shape[0] == 0:
            return
        self._tokens_buf.append(np.ascontiguousarray(chunks, dtype=np.int32))
        self._doc_buf.append(np.full(chunks.shape[0], doc_id, dtype=np.int64))
        self._buffered += chunks.shape[0]
        self.num_chunks += chunks.shape[0]
        if self._buffered >= self.block_chunks:
            self._flush()

    def _flush(self) -> None:
        if self._tokens_buf:
            self._files["tokens"].write(np.concatenate(self._tokens_buf).tobytes())
            self._files["doc_ids"].write(np.concatenate(self._doc_buf).tobytes())
        self._tokens_buf, self._doc_buf, self._buffered = [], [], 0

    def close(self) -> None:
        """Flush, then write the real shapes into the headers (same header length)."""
        self._flush()
        shapes = {"tokens": (self.num_chunks, self.chunk_len), "doc_ids": (self.num_chunks,)}
        dtypes = {"tokens": np.int32, "doc_ids": np.int64}
        for name, f in self._files.items():
            header_end = f.tell() - self.num_chunks * int(np.prod(shapes[name][1:], dtype=int)) \
                * np.dtype(dtypes[name]).itemsize
            f.seek(0)
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtypes[name])),
                    "fortran_order": False, "shape": shapes[name]})
            if f.tell() != header_end:
                raise RuntimeError(f"{f.name}: .npy header changed length on finalising")
            f.flush()
            os.fsync(f.fileno())
            f.close()


@dataclass
class SplitChunkStats:
    """What chunking one split produced."""

    num_chunks: int = 0
    num_documents: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    skipped_empty: int = 0
    skipped_fraction: int = 0
    skipped_dedup: int = 0
    truncated_documents: int = 0
    next_doc_id: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _kept_bytes(tokenizer, kept_ids: list[int], full_bytes: int, share: float) -> int:
    """UTF-8 bytes of a truncated document's kept tokens (a proportional estimate when the
    tokenizer cannot decode)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return int(round(full_bytes * share))
    return byte_count(decode([t for t in kept_ids if t > EOS_ID]))


def chunk_split(
    documents: Iterable,
    tokenizer: _Encoder,
    directory: str | os.PathLike,
    documents_path: str | os.PathLike,
    *,
    split: str,
    chunk_len: int,
    first_doc_id: int,
    max_chunks: int = -1,
    truncate_last: bool = False,
    fraction: float = 1.0,
    drop=None,
    progress=None,
    max_document_chunks: int = -1,
) -> SplitChunkStats:
    """Tokenize and chunk one split's documents into `directory`, rows into `documents_path`.

    Args:
      documents: Document objects (id, title, text, source) in corpus order.
      tokenizer: has `encode_batch`.
      directory: receives tokens.npy / doc_ids.npy.
      documents_path: a JSONL file of document rows (doc_id, id, title, source, split,
        first_chunk, num_chunks, num_tokens, num_bytes, num_words).
      first_doc_id: doc id of the first kept document (doc ids are unique across splits).
      max_chunks: stop once the split holds this many chunks (-1 = no cap).
      truncate_last: cut the document that crosses `max_chunks` so the split holds exactly
        max_chunks (train); otherwise keep it whole (evaluation splits keep whole documents).
      fraction: keep this share of documents (by id hash).
      drop: optional callable(text) -> bool; True drops the document (deduplication).
      progress: optional tqdm bar, advanced by documents read.
      max_document_chunks: keep at most this many leading chunks of each document (-1 = all),
        so that a small chunk budget samples many documents instead of a few long ones.
    Returns:
      the split's SplitChunkStats (next_doc_id = the first id the next split may use).
    """
    stats = SplitChunkStats(next_doc_id=first_doc_id)
    writer = ChunkFileWriter(directory, chunk_len)
    tmp_rows = Path(str(documents_path) + ".tmp")
    with open(tmp_rows, "w", encoding="utf-8") as rows:
        for batch in _batched(documents, 64):
            kept = []
            for doc in batch:
                if not doc.text.strip():
                    stats.skipped_empty += 1
                elif not keep_fraction(doc.id, fraction):
                    stats.skipped_fraction += 1
                elif drop is not None and drop(doc.text):
                    stats.skipped_dedup += 1
                else:
                    kept.append(doc)
            if progress is not None:
                progress.update(len(batch))
            for doc, ids in zip(kept, tokenizer.encode_batch([d.text for d in kept])):
                ids = list(ids) + [EOS_ID]
                chunks = chunk_token_ids(ids, chunk_len)
                num_tokens = len(ids)
                num_bytes = byte_count(doc.text)
                keep = len(chunks)
                if max_document_chunks >= 0:
                    keep = min(keep, max_document_chunks)
                if max_chunks >= 0 and stats.num_chunks + keep > max_chunks and truncate_last:
                    keep = max_chunks - stats.num_chunks
                if keep < len(chunks):
                    chunks = chunks[:keep]
                    num_tokens = min(num_tokens, keep * chunk_len)
                    # The bytes of the text actually kept, so tokens/byte stays right.
                    num_bytes = _kept_bytes(tokenizer, ids[:num_tokens], num_bytes,
                                            num_tokens / len(ids))
                    stats.truncated_documents += 1
                doc_id = stats.next_doc_id
                row = {"doc_id": doc_id, "id": doc.id, "title": doc.title, "source": doc.source,
                       "split": split, "first_chunk": stats.num_chunks,
                       "num_chunks": int(len(chunks)), "num_tokens": num_tokens,
                       "num_bytes": num_bytes,
                       "num_words": word_count(doc.text)}
                rows.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
                writer.add(chunks, doc_id)
                stats.next_doc_id += 1
                stats.num_documents += 1
                stats.num_chunks += len(chunks)
                stats.num_tokens += num_tokens
                stats.num_bytes += row["num_bytes"]
                if 0 <= max_chunks <= stats.num_chunks:
                    break
            if 0 <= max_chunks <= stats.num_chunks:
                break
    writer.close()
    os.replace(tmp_rows, documents_path)
    return stats
