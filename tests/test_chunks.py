"""Chunking: edge cases, streamed .npy files, document rows, caps and continuation links."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.database import DatabaseWriter
from data_pipeline.text.chunks import (
    ChunkFileWriter,
    chunk_split,
    chunk_token_ids,
    keep_fraction,
)
from data_pipeline.text.tokenizer import EOS_ID, PAD_ID, train_tokenizer
from tests._db_fixtures import FakeDocument, generated_documents

M = 4


class CharEncoder:
    """One id per character (ids >= 10), so token counts are exact in the tests."""

    def encode_batch(self, texts):
        return [[10 + (ord(c) % 200) for c in t] for t in texts]


def doc(i: int, text: str) -> FakeDocument:
    return FakeDocument(id=f"d{i}", title=f"T{i}", text=text, source="s")


def run_split(tmp_path, docs, **kwargs):
    out = tmp_path / kwargs.pop("name", "train")
    rows_path = tmp_path / "rows.jsonl"
    kwargs.setdefault("split", "train")
    kwargs.setdefault("first_doc_id", 0)
    stats = chunk_split(docs, CharEncoder(), out, rows_path, chunk_len=M, **kwargs)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    doc_ids = np.load(out / "doc_ids.npy", mmap_mode="r")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    return stats, np.asarray(tokens), np.asarray(doc_ids), rows


def test_chunk_token_ids_edge_cases():
    assert chunk_token_ids([], M).shape == (0, M)
    np.testing.assert_array_equal(chunk_token_ids([5, 6, 7, 8], M), [[5, 6, 7, 8]])
    np.testing.assert_array_equal(chunk_token_ids([5, 6, 7, 8, 9], M),
                                  [[5, 6, 7, 8], [9, PAD_ID, PAD_ID, PAD_ID]])
    assert chunk_token_ids(np.arange(1, 9), M).dtype == np.int32


def test_split_edge_cases(tmp_path):
    docs = [doc(0, ""), doc(1, "  \n"),  # empty: skipped, no doc id used
            doc(2, "abc"),  # 3 chars + EOS = exactly m tokens: one chunk, no padding
            doc(3, "abcd"),  # 5 tokens: two chunks, the second padded
            doc(4, "x")]
    stats, tokens, doc_ids, rows = run_split(tmp_path, docs, first_doc_id=100)
    assert stats.skipped_empty == 2
    assert stats.num_documents == 3 and stats.num_chunks == 4
    assert tokens.shape == (4, M) and tokens.dtype == np.int32 and doc_ids.dtype == np.int64
    np.testing.assert_array_equal(doc_ids, [100, 101, 101, 102])
    assert tokens[0, -1] == EOS_ID and PAD_ID not in tokens[0]
    np.testing.assert_array_equal(tokens[2], [EOS_ID, PAD_ID, PAD_ID, PAD_ID])
    np.testing.assert_array_equal(tokens[3, 1:], [EOS_ID, PAD_ID, PAD_ID][:2] + [PAD_ID])
    assert [(r["doc_id"], r["id"], r["first_chunk"], r["num_chunks"], r["num_tokens"])
            for r in rows] == [(100, "d2", 0, 1, 4), (101, "d3", 1, 2, 5), (102, "d4", 3, 1, 2)]
    assert rows[0]["num_bytes"] == 3 and rows[0]["split"] == "train"
    assert stats.next_doc_id == 103
    assert stats.num_tokens == 11 and stats.num_bytes == 8


def test_max_chunks_truncates_train_and_keeps_eval_documents_whole(tmp_path):
    docs = [doc(i, "abcdefghij") for i in range(5)]  # 11 tokens -> 3 chunks each
    stats, tokens, doc_ids, rows = run_split(tmp_path, docs, max_chunks=7, truncate_last=True)
    assert stats.num_chunks == 7 and tokens.shape[0] == 7
    assert stats.truncated_documents == 1 and rows[-1]["num_chunks"] == 1
    np.testing.assert_array_equal(doc_ids, [0, 0, 0, 1, 1, 1, 2])
    stats, tokens, _, rows = run_split(tmp_path, docs, max_chunks=7, truncate_last=False,
                                       split="validation", name="validation")
    assert stats.num_chunks == 9 and len(rows) == 3 and stats.truncated_documents == 0


def test_fraction_is_deterministic_and_nested():
    ids = [f"doc-{i}" for i in range(4000)]
    half = {i for i in ids if keep_fraction(i, 0.5)}
    quarter = {i for i in ids if keep_fraction(i, 0.25)}
    assert quarter <= half  # a smaller database is a subset of a larger one
    assert 0.45 < len(half) / len(ids) < 0.55 and 0.2 < len(quarter) / len(ids) < 0.3
    assert all(keep_fraction(i, 1.0) for i in ids[:10])


def test_fraction_and_drop_filters(tmp_path):
    docs = [doc(i, f"text {i}") for i in range(200)]
    stats, _, _, rows = run_split(tmp_path, docs, fraction=0.5,
                                  drop=lambda text: text.endswith("7"))
    assert stats.skipped_fraction + stats.skipped_dedup + stats.num_documents == 200
    assert stats.skipped_dedup > 0 and not any(r["id"].endswith("7") for r in rows)
    assert {r["id"] for r in rows} == {d.id for d in docs
                                       if keep_fraction(d.id, 0.5) and not d.text.endswith("7")}


def test_streaming_writer_matches_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 50, size=rng.integers(0, 20)) for _ in range(300)]
    writer = ChunkFileWriter(tmp_path, M, block_chunks=7)  # many small appends
    for i, ids in enumerate(docs):
        writer.add(chunk_token_ids(ids, M), i)
    writer.close()
    expected = np.concatenate([chunk_token_ids(d, M) for d in docs])
    expected_ids = np.concatenate([np.full(-(-len(d) // M), i) for i, d in enumerate(docs)])
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "doc_ids.npy"), expected_ids)


def test_real_tokenizer_chunks_decode_to_the_document(tmp_path):
    docs = generated_documents(6, seed=1)
    tok = train_tokenizer([d.text for d in docs], tmp_path / "t.model", vocab_size=320,
                          sample_bytes=50_000)
    rows_path = tmp_path / "rows.jsonl"
    chunk_split(docs, tok, tmp_path / "train", rows_path, split="train", chunk_len=8,
                first_doc_id=0)
    tokens = np.load(tmp_path / "train" / "tokens.npy")
    for row, d in zip((json.loads(x) for x in rows_path.read_text().splitlines()), docs):
        ids = tokens[row["first_chunk"]:row["first_chunk"] + row["num_chunks"]].reshape(-1)
        assert ids[row["num_tokens"] - 1] == EOS_ID
        assert tok.decode(ids) == d.text


@pytest.fixture
def two_doc_database(tmp_path):
    tok = train_tokenizer([d.text for d in generated_documents(20)], tmp_path / "t.model",
                          vocab_size=320, sample_bytes=50_000)
    writer = DatabaseWriter(tmp_path / "db", chunk_len=M, tokenizer_path=tok.path,
                            embedder_name="e", embed_dim=2)
    tokens = np.arange(1, 1 + 5 * M, dtype=np.int32).reshape(5, M)
    writer.write_split("train", tokens, [7, 7, 8, 8, 8], np.zeros((5, 2)))
    return writer.finish(), tokens


def test_continuation_never_crosses_documents(two_doc_database):
    db, tokens = two_doc_database
    out = db.neighbour_tokens(np.array([[0, 1], [2, -1], [4, 3]]))
    assert out.shape == (3, 2, 2 * M) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0, 0], np.concatenate([tokens[0], tokens[1]]))
    # Chunk 1 is its document's last chunk: the next chunk (doc 8) is not its continuation.
    np.testing.assert_array_equal(out[0, 1], np.concatenate([tokens[1], np.zeros(M)]))
    np.testing.assert_array_equal(out[1, 0], np.concatenate([tokens[2], tokens[3]]))
    np.testing.assert_array_equal(out[1, 1], np.zeros(2 * M))  # -1: no chunk
    # The last chunk of the split has no continuation.
    np.testing.assert_array_equal(out[2, 0], np.concatenate([tokens[4], np.zeros(M)]))
    np.testing.assert_array_equal(out[2, 1], np.concatenate([tokens[3], tokens[4]]))
