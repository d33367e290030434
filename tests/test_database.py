"""The database directory: writer, reader, and the manifest checks on every open."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_pipeline.database import (
    MANIFEST,
    DatabaseWriter,
    RetrievalDatabase,
    partial_path,
)
from data_pipeline.errors import DataError
from data_pipeline.retrieval import BertRetriever
from data_pipeline.text.tokenizer import train_tokenizer
from tests._db_fixtures import generated_documents

M, DIM = 8, 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small database written with DatabaseWriter (one index shard); tests copy it."""
    root = tmp_path_factory.mktemp("dbs")
    docs = generated_documents(10, seed=5)
    tok = train_tokenizer([d.text for d in docs], root / "t.model", vocab_size=320,
                          sample_bytes=50_000)
    rng = np.random.default_rng(0)
    writer = DatabaseWriter(root / "db", chunk_len=M, tokenizer_path=tok.path,
                            embedder_name="stub", embed_dim=DIM,
                            corpus={"kind": "test", "description": "generated"})
    rows, tokens, doc_ids = [], [], []
    for i, d in enumerate(docs[:6]):
        ids = tok.encode(d.text) + [3]
        chunks = np.zeros((-(-len(ids) // M), M), np.int32)
        chunks.reshape(-1)[:len(ids)] = ids
        rows.append({"doc_id": i, "id": d.id, "title": d.title, "source": d.source,
                     "split": "train", "first_chunk": sum(len(t) for t in tokens),
                     "num_chunks": len(chunks), "num_tokens": len(ids),
                     "num_bytes": len(d.text.encode()), "num_words": len(d.text.split())})
        tokens.append(chunks)
        doc_ids.append(np.full(len(chunks), i))
    tokens, doc_ids = np.concatenate(tokens), np.concatenate(doc_ids)
    writer.write_split("train", tokens, doc_ids, rng.normal(size=(len(tokens), DIM)))
    writer.write_split("validation", tokens[:5], np.full(5, 99), rng.normal(size=(5, DIM)))
    rows.append({"doc_id": 99, "id": "v", "title": "V", "source": "s", "split": "validation",
                 "first_chunk": 0, "num_chunks": 5, "num_tokens": 40, "num_bytes": 50,
                 "num_words": 9})
    writer.write_documents(rows)
    writer.build_index(shard_chunks=len(tokens))  # one shard: saving one takes seconds
    db = writer.finish()
    return db, tok, tokens


@pytest.fixture
def db_copy(built, tmp_path):
    db, _, _ = built
    path = tmp_path / "db"
    shutil.copytree(db.path, path)
    return path


def test_writer_output_reads_back(built):
    db, tok, tokens = built
    assert not partial_path(db.path).exists()
    assert db.chunk_len == M and db.embed_dim == DIM
    assert db.splits == ("train", "validation")
    train = db.split("train")
    np.testing.assert_array_equal(train.tokens, tokens)
    assert train.queries.shape == (len(tokens), DIM) and train.queries.dtype == np.float32
    assert db.tokenizer.sha256 == tok.sha256 == db.manifest["tokenizer"]["sha256"]
    m = db.manifest
    assert m["splits"]["train"]["num_documents"] == 6
    assert m["splits"]["validation"]["num_chunks"] == 5
    assert [(s["first_chunk"], s["num_chunks"]) for s in m["shards"]] == [(0, len(tokens))]
    assert db.documents[99]["split"] == "validation"
    assert len(list(db.documents.rows("train"))) == 6
    assert "saved_at" not in json.dumps(m) and "time" not in json.dumps(m)


def test_searcher_finds_exact_keys(built):
    db, _, tokens = built
    keys = db.split("train").queries
    searcher = db.in_graph_search().searcher
    ids, dists = searcher.search(np.asarray(keys[[0, 7, len(tokens) - 1]]), 3)
    np.testing.assert_array_equal(ids[:, 0], [0, 7, len(tokens) - 1])
    assert np.allclose(dists[:, 0], 0.0, atol=1e-4)


class StubEmbedder:
    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim


def test_expectations_match(built):
    db, tok, _ = built
    RetrievalDatabase.open(db.path, expect_chunk_len=M, expect_tokenizer_sha256=tok.sha256,
                           retriever=BertRetriever(StubEmbedder("stub", DIM)))


@pytest.mark.parametrize("kwargs, message", [
    ({"expect_chunk_len": 64}, r"chunk_len is 8 .*database\.chunk_len=64"),
    ({"expect_tokenizer_sha256": "0" * 64}, r"tokenizer sha256"),
    ({"retriever": BertRetriever()}, r"embedder 'stub'.*embedder\.name"),
    ({"retriever": BertRetriever(StubEmbedder("stub", 384))}, r"dim 6.*384"),
    ({"retriever": "bm25"}, r"built for retriever 'bert'.*database\.retriever='bm25'"),
])
def test_expectation_mismatch(built, kwargs, message):
    db, _, _ = built
    with pytest.raises(DataError, match=message) as e:
        RetrievalDatabase.open(db.path, **kwargs)
    assert "build-db" in str(e.value) and "--force" in str(e.value)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def _rewrite_manifest(change):
    def apply(db_path):
        manifest = json.loads((db_path / MANIFEST).read_text())
        change(manifest)
        (db_path / MANIFEST).write_text(json.dumps(manifest))
    return apply


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: _truncate(p / "train" / "tokens-00000.npy"), r"train/tokens-00000\.npy.*truncated"),
    (lambda p: _truncate(p / "train" / "keys-00000.npy"), r"train/keys-00000\.npy.*truncated"),
    (lambda p: (p / "validation" / "doc_ids-00000.npy").unlink(),
     r"validation/doc_ids-00000\.npy is missing"),
    (lambda p: np.save(p / "train" / "doc_ids-00000.npy", np.zeros(3, np.int64)),
     r"train/doc_ids-00000\.npy: found int64 \[3\]"),
    (lambda p: np.save(p / "validation" / "keys-00000.npy", np.zeros((5, DIM), np.float64)),
     r"validation/keys-00000\.npy: found float64"),
    (lambda p: (p / "tokenizer.model").write_bytes(b"x"), r"tokenizer\.model: sha256 differs"),
    (lambda p: (p / "tokenizer.model").unlink(), r"tokenizer\.model is missing"),
    (lambda p: (p / "documents.jsonl").unlink(), r"documents\.jsonl is missing"),
    (lambda p: shutil.rmtree(p / "index" / "shard_00000"), r"shard_00000 is missing"),
    (_rewrite_manifest(lambda m: m.update(format_version=0)), r"format_version 0"),
    (_rewrite_manifest(lambda m: m.update(complete=False)), r"not complete"),
    (_rewrite_manifest(lambda m: m["splits"]["train"].update(num_chunks=2)),
     r"splits\.train: num_chunks is 2 but its shards hold \d+ chunks"),
    (_rewrite_manifest(lambda m: m["splits"]["train"]["shards"][0].update(num_chunks=2)),
     r"splits\.train: num_chunks is \d+ but its shards hold 2 chunks"),
    (_rewrite_manifest(lambda m: m.update(format_version=1)),
     r"single-file layout of format_version 1.*retro-jax build-db .*--force"),
    (lambda p: (p / MANIFEST).write_text("{"), r"not valid JSON"),
])
def test_corruption_is_detected_on_open(db_copy, corrupt, message):
    corrupt(db_copy)
    with pytest.raises(DataError, match=message) as e:
        RetrievalDatabase.open(db_copy)
    assert "--force" in str(e.value)


def test_missing_database_and_interrupted_build(tmp_path):
    with pytest.raises(DataError, match="no retrieval database .*build-db"):
        RetrievalDatabase.open(tmp_path / "db")
    partial_path(tmp_path / "db").mkdir()
    with pytest.raises(DataError, match=r"interrupted build left .*db\.partial.*resume"):
        RetrievalDatabase.open(tmp_path / "db")


def test_unknown_split_and_bad_ids(built):
    db, _, tokens = built
    with pytest.raises(DataError, match="no split 'test'.*eval_splits"):
        db.split("test")
    with pytest.raises(DataError, match="outside"):
        db.neighbour_tokens(np.array([len(tokens)]))


def test_writer_refuses_to_overwrite(built, tmp_path):
    db, tok, _ = built
    writer = DatabaseWriter(db.path, chunk_len=M, tokenizer_path=tok.path,
                            embedder_name="stub", embed_dim=DIM)
    writer.write_split("train", np.ones((2, M)), [0, 0], None)
    with pytest.raises(DataError, match="already exists.*--force"):
        writer.finish()
    shutil.rmtree(writer.partial)


def test_verify_compares_every_file_with_the_manifest(db_copy):
    RetrievalDatabase.open(db_copy).verify()
    keys = db_copy / "train" / "keys-00000.npy"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: opening cannot tell, verify can
    keys.write_bytes(bytes(data))
    db = RetrievalDatabase.open(db_copy)
    with pytest.raises(DataError, match=r"train/keys-00000\.npy.*--force"):
        db.verify()


def test_a_split_in_several_shards_reads_as_one_array(built, tmp_path):
    """write_split cuts the arrays into shards of shard_chunks rows; the reader serves them as
    one array (a ShardedArray) that indexes like the in-memory one."""
    from data_pipeline.shards import ShardedArray

    db, tok, tokens = built
    n = len(tokens)
    keys = np.arange(n * DIM, dtype=np.float32).reshape(n, DIM)
    doc_ids = np.repeat(np.arange(n // 4 + 1), 4)[:n]
    writer = DatabaseWriter(tmp_path / "sharded", chunk_len=M, tokenizer_path=tok.path,
                            embedder_name="stub", embed_dim=DIM, shard_chunks=7)
    writer.write_split("train", tokens, doc_ids, keys)
    writer.build_index(shard_chunks=n)
    sharded = writer.finish()
    shards = sharded.manifest["splits"]["train"]["shards"]
    assert [s["num_chunks"] for s in shards] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
    assert sharded.manifest["shard_chunks"] == 7
    train = sharded.split("train")
    assert isinstance(train.tokens, ShardedArray) and train.tokens.shape == tokens.shape
    for index in (3, -1, slice(2, 19), slice(None, None, 3), [0, 20, 6, 6], np.array([[1, 15]]),
                  doc_ids == 2, (slice(5, 16), 0), (np.array([9, 1]), slice(2, 4)), (4, 1)):
        np.testing.assert_array_equal(train.tokens[index], tokens[index], err_msg=str(index))
        np.testing.assert_array_equal(train.queries[index], keys[index], err_msg=str(index))
    np.testing.assert_array_equal(np.asarray(train.doc_ids), doc_ids)
    assert (train.doc_ids == doc_ids).all() and len(train.doc_ids) == n
    np.testing.assert_array_equal(list(train.tokens), list(tokens))
    with pytest.raises(IndexError):
        train.tokens[n]
    # neighbour tokens (continuations across shard boundaries) as from one array
    ids = np.array([[6, 7], [13, -1]])
    want = np.zeros((2, 2, 2 * M), np.int32)
    for (i, j), c in np.ndenumerate(ids):
        if c >= 0:
            want[i, j, :M] = tokens[c]
            if c + 1 < n and doc_ids[c + 1] == doc_ids[c]:
                want[i, j, M:] = tokens[c + 1]
    np.testing.assert_array_equal(sharded.neighbour_tokens(ids), want)
    sharded.verify()
