"""The tf.data input pipeline: layout, targets, filters, order, resume, precompute, device feed."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from _input_pipeline_fixtures import (
    CHUNK_LEN,
    reference_neighbours,
    reference_targets,
    tiny_tokenizer,
    write_database,
)
from jax.sharding import Mesh, PartitionSpec

from data_pipeline.database import DatabaseWriter
from data_pipeline.errors import DataError
from data_pipeline.input_pipeline import (
    device_batches,
    make_dataset,
    make_eval_windows,
    precompute_neighbours,
    retrieve_neighbours,
)
from data_pipeline.shards import temporary_path
from data_pipeline.text.tokenizer import EOS_ID

M = CHUNK_LEN
SEQ = 4 * M  # L = 4 chunks
K = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tok = tiny_tokenizer(root)
    db = write_database(root / "db", tok)
    return root, tok, db


@pytest.fixture(scope="module")
def db(workspace):
    return workspace[2]


def take(ds, count):
    return list(itertools.islice(ds.as_numpy_iterator(), count))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_shapes_dtypes_and_targets(db, packing):
    ds = make_dataset(db, "train", seq_len=SEQ, batch_size=4, num_neighbours=K, packing=packing,
                      shuffle=False, repeat=False)
    tokens, doc_ids, _ = db.split("train")
    batches = list(ds.as_numpy_iterator())
    b = batches[0]
    L = SEQ // M
    expected = {"inputs": ((4, SEQ), np.int32), "targets": ((4, SEQ), np.int32),
                "neighbours": ((4, L, K, 2 * M), np.int32),
                "neighbour_ids": ((4, L, K), np.int64), "doc_ids": ((4, L), np.int64),
                "chunk_ids": ((4, L), np.int64)}
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == expected
    crossings = 0
    for batch in batches:
        for row in range(4):
            ids = batch["chunk_ids"][row]
            np.testing.assert_array_equal(batch["targets"][row],
                                          reference_targets(tokens, doc_ids, ids))
            real = ids[ids >= 0]
            np.testing.assert_array_equal(batch["inputs"][row][:real.size * M],
                                          tokens[real].reshape(-1))
            docs = batch["doc_ids"][row]
            if packing == "document":
                assert len(set(docs[docs >= 0])) == 1  # never two documents
            crossings += len(set(docs[docs >= 0])) - 1
            # EOS is predicted, nothing after it within its document.
            inputs, targets = batch["inputs"][row], batch["targets"][row]
            assert (targets[inputs == EOS_ID] == 0).all()
            assert (targets[inputs == 0] == 0).all()
    if packing == "packed":
        assert crossings > 0  # the test saw document boundaries inside sequences


def test_targets_continue_into_next_chunk_of_same_document(db):
    tokens, doc_ids, _ = db.split("train")
    ds = make_dataset(db, "train", seq_len=SEQ, batch_size=1, num_neighbours=0,
                      packing="document", shuffle=False, repeat=False)
    seen = 0
    for b in ds.as_numpy_iterator():
        last = b["chunk_ids"][0][-1]
        if last >= 0 and last + 1 < len(doc_ids) and doc_ids[last + 1] == doc_ids[last]:
            assert b["targets"][0, -1] == tokens[last + 1, 0] != 0
            seen += 1
    assert seen > 0


def test_neighbours_match_brute_force_and_skip_own_document(db):
    train_tokens, train_docs, train_keys = db.split("train")
    ds = make_dataset(db, "train", seq_len=SEQ, batch_size=4, num_neighbours=K, overfetch=3,
                      packing="packed", seed=1)
    graph = ds._as_serialized_graph().numpy()
    assert b"Scann" in graph and b"PyFunc" not in graph  # ScaNN's TF op, no Python in the map
    own_doc_in_candidates = 0
    for b in take(ds, 3):
        L = b["chunk_ids"].shape[1]
        sequence_docs = np.repeat(b["doc_ids"], L, axis=0)  # [B * L, L]
        chunk_ids, ids = b["chunk_ids"].reshape(-1), b["neighbour_ids"].reshape(-1, K)
        for c, docs, row in zip(chunk_ids, sequence_docs, ids):
            ref = reference_neighbours(train_keys, train_docs, train_keys[c], docs, K, 3)
            np.testing.assert_array_equal(row, ref)
            assert not (train_docs[row[row >= 0]] == train_docs[c]).any()
            nearest = np.argsort(((train_keys - train_keys[c]) ** 2).sum(1))[:K]
            own_doc_in_candidates += int((train_docs[nearest] == train_docs[c]).any())
        np.testing.assert_array_equal(b["neighbours"],
                                      db.neighbour_tokens(b["neighbour_ids"]))
    assert own_doc_in_candidates > 0  # the filter had something to drop


def test_packed_sequences_get_no_neighbours_from_their_own_documents(workspace):
    """Paper: neighbours from the training sequence's own documents are dropped. A packed
    sequence holds several documents; a chunk's neighbour from another of them (here a later
    chunk of the very sequence) would show the model the tokens it is trained to predict."""
    root, tok, _ = workspace
    # 8 documents of 2 chunks; a packed sequence of 4 chunks holds documents 2i and 2i+1,
    # whose keys are near-copies of each other and far from every other pair.
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, size=(16, M)).astype(np.int32)
    doc_ids = np.repeat(np.arange(8), 2).astype(np.int64)
    pair_keys = rng.normal(scale=10.0, size=(4, 2, 16))
    keys = np.concatenate([pair_keys[i // 2] + 0.01 * rng.normal(size=(2, 16))
                           for i in range(8)]).astype(np.float32)
    writer = DatabaseWriter(root / "pairs", chunk_len=M, tokenizer_path=tok,
                            embedder_name="synthetic", embed_dim=16)
    writer.write_split("train", tokens, doc_ids, keys)
    writer.write_documents({"doc_id": d, "id": str(d), "title": str(d), "source": "s",
                            "split": "train", "first_chunk": 2 * d, "num_chunks": 2,
                            "num_tokens": 2 * M, "num_bytes": 2 * M, "num_words": 2 * M}
                           for d in range(8))
    writer.build_index(16, {"brute_force_below": 1000})
    pairs = writer.finish()
    # Alone, chunk 0's nearest chunk outside its document is chunk 2: the same sequence.
    assert retrieve_neighbours(pairs, keys[:1], doc_ids[:1], 1)[0, 0] == 2
    batches = list(make_dataset(pairs, "train", seq_len=SEQ, batch_size=4, num_neighbours=K,
                                packing="packed", shuffle=False,
                                repeat=False).as_numpy_iterator())
    for b in batches:
        for row in range(4):
            ids = b["neighbour_ids"][row]
            assert set(b["doc_ids"][row].tolist()) == {2 * b["chunk_ids"][row][0] // 4,
                                                       2 * b["chunk_ids"][row][0] // 4 + 1}
            assert (ids >= 0).all()
            assert not np.isin(doc_ids[ids], b["doc_ids"][row]).any()
            assert not np.isin(ids, b["chunk_ids"][row]).any()


def test_host_shards_are_disjoint_and_cover_the_epoch(db):
    def firsts(process_index, process_count):
        ds = make_dataset(db, "train", seq_len=SEQ, batch_size=1, num_neighbours=0,
                          packing="document", seed=3, repeat=False,
                          process_index=process_index, process_count=process_count)
        return [int(b["chunk_ids"][0, 0]) for b in ds.as_numpy_iterator()]

    everything = firsts(0, 1)
    assert len(set(everything)) == len(everything)
    per_host = [firsts(p, 3) for p in range(3)]
    sets = [set(h) for h in per_host]
    assert all(len(h) == len(everything) // 3 for h in per_host)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) <= set(everything)
    assert len(set().union(*sets)) == 3 * (len(everything) // 3)


def test_deterministic_and_reshuffled_per_epoch(db):
    kwargs = dict(seq_len=SEQ, batch_size=4, num_neighbours=K, packing="packed", seed=7)
    a = take(make_dataset(db, "train", **kwargs), 3)
    assert_batches_equal(a, take(make_dataset(db, "train", **kwargs), 3))
    other = take(make_dataset(db, "train", **dict(kwargs, seed=8)), 1)
    assert not np.array_equal(a[0]["chunk_ids"], other[0]["chunk_ids"])
    # Epoch 0 and epoch 1 are different orders of the same sequences.
    per_epoch = len(db.split("train").doc_ids) // (SEQ // M)
    single = make_dataset(db, "train", seq_len=SEQ, batch_size=1, num_neighbours=0, seed=7)
    starts = [int(b["chunk_ids"][0, 0]) for b in take(single, 2 * per_epoch)]
    e0, e1 = starts[:per_epoch], starts[per_epoch:]
    assert sorted(e0) == sorted(e1) == list(range(0, per_epoch * (SEQ // M), SEQ // M))
    assert e0 != e1


def test_resume_equals_uninterrupted_across_epochs(db):
    kwargs = dict(seq_len=SEQ, batch_size=8, num_neighbours=K, packing="document", seed=5,
                  process_index=1, process_count=2)
    full = take(make_dataset(db, "train", **kwargs), 12)  # > 1 epoch per host
    resumed = take(make_dataset(db, "train", start_step=7, **kwargs), 5)
    assert_batches_equal(full[7:], resumed)


def test_precomputed_equals_inline(db, tmp_path):
    """Also: a file a killed writer left half-written in `<out>.partial/` is not kept."""
    planted = temporary_path(tmp_path / "nbrs.partial" / "candidates-00000.npy")
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"half-written")
    out = precompute_neighbours(db, "train", tmp_path / "nbrs", num_neighbours=K, overfetch=3,
                                shard_rows=50)
    num_chunks = len(db.split("train").doc_ids)
    assert len(list(out.glob("candidates-*.npy"))) == -(-num_chunks // 50)
    assert not (out / ".build").exists()
    assert not list(out.rglob("*.tmp-*"))
    kwargs = dict(seq_len=SEQ, batch_size=4, num_neighbours=K, overfetch=3, seed=11)
    inline = take(make_dataset(db, "train", **kwargs), 4)
    pre = take(make_dataset(db, "train", precomputed_dir=out, **kwargs), 4)
    assert_batches_equal(inline, pre)
    with pytest.raises(DataError, match="num_candidates"):
        make_dataset(db, "train", precomputed_dir=out, **dict(kwargs, num_neighbours=1))


def test_retrieval_off_yields_the_same_tokens(db):
    kwargs = dict(seq_len=SEQ, batch_size=4, seed=2)
    on = take(make_dataset(db, "train", num_neighbours=K, **kwargs), 2)
    off = take(make_dataset(db, "train", num_neighbours=0, **kwargs), 2)
    for a, b in zip(on, off):
        assert "neighbours" not in b and "neighbour_ids" not in b
        for key in ("inputs", "targets", "doc_ids", "chunk_ids"):
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_inputs_fail_before_the_first_batch(workspace, db):
    root, _, _ = workspace
    with pytest.raises(DataError, match="chunk_len"):
        make_dataset(db, "train", seq_len=SEQ, batch_size=2, num_neighbours=K,
                     expect_chunk_len=64)
    with pytest.raises(DataError, match="tokenizer"):
        make_dataset(db, "train", seq_len=SEQ, batch_size=2, num_neighbours=K,
                     expect_tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="shorter than one sequence"):
        make_dataset(db, "train", seq_len=1000 * M, batch_size=2, num_neighbours=0)
    with pytest.raises(DataError, match="multiple"):
        make_dataset(db, "train", seq_len=SEQ + 1, batch_size=2, num_neighbours=0)
    with pytest.raises(DataError, match="larger than the retrieval database"):
        make_dataset(db, "train", seq_len=SEQ, batch_size=2, num_neighbours=10_000)
    no_keys = write_database(root / "nokeys", root / "tok0.model", num_train_docs=8,
                             num_eval_docs=6, eval_keys=False, seed=1)
    with pytest.raises(DataError, match=r"keys-\*\.npy is missing.*build-db"):
        make_dataset(no_keys, "validation", seq_len=SEQ, batch_size=1, num_neighbours=K)
    # Retrieval off needs no keys.
    take(make_dataset(no_keys, "validation", seq_len=SEQ, batch_size=1, num_neighbours=0), 1)
    other = write_database(root / "othertok", tiny_tokenizer(root, variant=1), num_train_docs=8,
                           num_eval_docs=6, seed=2)
    with pytest.raises(DataError, match="tokenizer"):
        make_dataset(db, "validation", split_db=other, seq_len=SEQ, batch_size=1,
                     num_neighbours=K)


def test_split_db_reads_another_database_split(workspace, db):
    root, tok, _ = workspace
    other = write_database(root / "same_tok", tok, num_train_docs=8, num_eval_docs=10, seed=4)
    b = take(make_dataset(db, "validation", split_db=other, seq_len=SEQ, batch_size=2,
                          num_neighbours=K, shuffle=False), 1)[0]
    tokens, _, keys = other.split("validation")
    np.testing.assert_array_equal(b["inputs"][0][:M], tokens[0])
    train_keys, train_docs = db.split("train").queries, db.split("train").doc_ids
    ref = reference_neighbours(train_keys, train_docs, keys[0], -5, K, 4)
    np.testing.assert_array_equal(b["neighbour_ids"][0, 0], ref)


def test_retrieve_neighbours_and_exclusion(db):
    train_keys, train_docs = db.split("train").queries, db.split("train").doc_ids
    val = db.split("validation")
    excluded = sorted(set(train_docs.tolist()))[:-5]  # all but 5 train documents
    ids = retrieve_neighbours(db, val.queries, val.doc_ids, 3, 4, exclude_doc_ids=excluded)
    assert ids.shape == (len(val.queries), 3) and ids.dtype == np.int64
    for q in range(len(val.queries)):
        ref = reference_neighbours(train_keys, train_docs, val.queries[q], val.doc_ids[q], 3, 4,
                                   excluded=excluded)
        np.testing.assert_array_equal(ids[q], ref)
    assert not np.isin(train_docs[ids[ids >= 0]], excluded).any()
    assert (ids == -1).any()  # some queries lost candidates to the exclusion


@pytest.mark.parametrize("stride", [SEQ, 2 * M])
def test_eval_windows_score_every_token_once(db, stride):
    tokens, doc_ids, _ = db.split("validation")
    ds = make_eval_windows(db, "validation", SEQ, stride, batch_size=3, num_neighbours=K)
    scored: dict[tuple[int, int], int] = {}
    for b in ds.as_numpy_iterator():
        assert b["score_mask"].shape == (3, SEQ) and b["neighbours"].shape[1:] == (4, K, 2 * M)
        for row in range(3):
            ids = b["chunk_ids"][row]
            if (ids < 0).all():
                assert b["score_mask"][row].sum() == 0
                continue
            for t in np.flatnonzero(b["score_mask"][row]):
                chunk = ids[t // M]
                key = (int(chunk), int(t % M))
                scored[key] = scored.get(key, 0) + 1
                assert b["targets"][row, t] != 0
    # Reference: every position of every document whose next token is in the same document.
    expected = set()
    for c in range(len(doc_ids)):
        for t in range(M):
            nxt_tok = tokens[c, t + 1] if t + 1 < M else (
                tokens[c + 1, 0] if c + 1 < len(doc_ids) and doc_ids[c + 1] == doc_ids[c] else 0)
            if nxt_tok != 0:
                expected.add((c, t))
    assert set(scored) == expected
    assert set(scored.values()) == {1}
    if stride == SEQ:  # doc_filter keeps only the named documents
        wanted = sorted(set(doc_ids.tolist()))[:2]
        only = make_eval_windows(db, "validation", SEQ, stride, doc_filter=wanted, batch_size=2)
        seen = {int(d) for b in only.as_numpy_iterator() for d in b["doc_ids"].ravel() if d >= 0}
        assert seen == set(wanted)


def test_device_batches_global_arrays(db):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    ds = make_dataset(db, "train", seq_len=SEQ, batch_size=8, num_neighbours=K, seed=0)
    host = take(ds, 2)
    it = device_batches(ds, mesh, prefetch=2)
    for expected in host:
        got = next(it)
        assert set(got) == {"inputs", "targets", "neighbours"}
        for key, value in got.items():
            assert value.shape == expected[key].shape
            assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
            np.testing.assert_array_equal(np.asarray(value), expected[key])
        assert len(got["inputs"].addressable_shards) == 8
    assert it.wait_seconds >= 0.0 and it.batches == 2
    it.close()
