"""`database.retriever = "bm25"`: build, candidate order, pipeline filters, resume after
kill -9, manifest checks, sampling, and (slow) train + eval of the bm25 ablation."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.database import BUILD_TIMES_FILE, RetrievalDatabase, partial_path
from data_pipeline.errors import DataError
from data_pipeline.input_pipeline import (
    make_dataset,
    make_eval_windows,
    precompute_neighbours,
    retrieve_chunk_neighbours,
)
from data_pipeline.resumable import KILL_ENV
from data_pipeline.retrieval.bm25 import BM25_DIR, QUERY_ARRAY
from data_pipeline.retrieval.bm25_index import Bm25Index, top_k_from_scores
from retro_jax.build_db import build_run_database
from tests._db_fixtures import make_tiny_database, tiny_config, tiny_corpus

REPO = Path(__file__).resolve().parent.parent
BLOCK = 64  # candidate rows per resumable block: 841 train chunks in shards of 512 -> 8 + 6
BM25 = {"database.retriever": "bm25"}
K = 10  # index.num_neighbours, the candidate table width


def _build(workdir: Path) -> RetrievalDatabase:
    return make_tiny_database(workdir, config_overrides=BM25, key_block_chunks=BLOCK)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> RetrievalDatabase:
    return _build(tmp_path_factory.mktemp("bm25"))


def _reference_row(db, split, i, k, own_docs, exclude_doc_ids=()):
    """The pipeline's filter on chunk i's candidate row, in Python: first k survivors."""
    train_docs = db.split("train").doc_ids
    kept = [c for c in db.split(split).queries[i][: min(k * 4, K)] if c >= 0
            and int(train_docs[c]) not in own_docs and int(train_docs[c]) not in exclude_doc_ids]
    return np.array((kept + [-1] * k)[:k], np.int64)


def _reference(db, split, k, *, exclude_doc_ids=()):
    """Every chunk's neighbours with its own document excluded (a query on its own)."""
    doc_ids = db.split(split).doc_ids
    return np.stack([_reference_row(db, split, i, k, {int(doc_ids[i])}, exclude_doc_ids)
                     for i in range(len(doc_ids))])


# ------------------------------------------------------------------------------ build
def test_build_writes_candidates_and_the_bm25_index_not_keys(db):
    m = db.manifest
    assert m["retriever"] == db.retriever_kind == "bm25" and m["shards"] == []
    assert m["bm25"]["num_candidates"] == K and m["bm25"]["params"]["stopwords"] is None
    assert not (db.path / "index").exists()
    for split in ("train", "validation", "test"):
        arrays = db.split(split)
        assert not list((db.path / split).glob("keys-*.npy"))
        assert arrays.queries.dtype == np.int64  # the BM25 candidate rows
        assert arrays.queries.shape == (m["splits"][split]["num_chunks"], K)
    # bm25s's own files, no pickle: .npy arrays load with allow_pickle=False, the rest is JSON.
    files = sorted(p.name for p in (db.path / BM25_DIR).iterdir())
    assert files == ["data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
                     "params.index.json", "vocab.index.json"]
    for name in files:
        path = db.path / BM25_DIR / name
        if name.endswith(".npy"):
            np.load(path, allow_pickle=False)
        else:
            json.loads(path.read_text())


def test_candidates_are_bm25_order_against_a_direct_bm25s_query(db):
    import bm25s

    direct = bm25s.BM25.load(str(db.path / BM25_DIR), backend="numpy")
    train_docs = db.split("train").doc_ids
    checked = 0
    for split in ("train", "validation"):
        arrays = db.split(split)
        for i in range(0, len(arrays.tokens), 11):
            text = db.tokenizer.decode(arrays.tokens[i])
            words = bm25s.tokenize([text], stopwords=None, return_ids=False,
                                   show_progress=False)
            if not words[0]:
                continue
            ids, scores = direct.retrieve(words, k=len(train_docs), sorted=True,
                                          backend_selection="numpy", show_progress=False)
            ids, scores = ids[0], scores[0]
            keep = (scores > 0) & (train_docs[ids] != arrays.doc_ids[i])  # own document out
            ids, scores = ids[keep][:K], scores[keep][:K]
            row = db.split(split).queries[i]
            got = row[row >= 0]
            assert len(got) == len(ids)
            got_scores = direct.get_scores(words[0])[got]
            np.testing.assert_array_equal(got_scores, scores)  # same scores, same order
            # Ties are broken by chunk id; without ties the ids are bm25s's own.
            assert all(a > b or (a == b and x < y) for a, b, x, y in
                       zip(got_scores, got_scores[1:], got, got[1:]))
            assert set(got[got_scores > scores[-1]]) == set(ids[scores > scores[-1]])
            checked += 1
    assert checked >= 80


def test_top_k_from_scores_breaks_ties_by_id_and_skips_zero():
    scores = np.array([0.0, 2.0, 1.0, 2.0, 0.5, 1.0, 0.0], np.float32)
    np.testing.assert_array_equal(top_k_from_scores(scores, 4), [1, 3, 2, 5])
    np.testing.assert_array_equal(top_k_from_scores(scores, 7), [1, 3, 2, 5, 4, -1, -1])
    np.testing.assert_array_equal(top_k_from_scores(np.zeros(3, np.float32), 2), [-1, -1])


# --------------------------------------------------------------------------- pipeline
def test_training_batches_exclude_the_same_document(db):
    train = db.split("train")
    dataset = make_dataset(db, "train", seq_len=64, batch_size=4, num_neighbours=2, seed=3)
    for batch in dataset.take(3).as_numpy_iterator():
        ids, chunk_ids = batch["neighbour_ids"], batch["chunk_ids"]
        for row in range(len(chunk_ids)):
            sequence_docs = {int(d) for d in batch["doc_ids"][row]}  # packed: several
            want = np.stack([_reference_row(db, "train", c, 2, sequence_docs)
                             for c in chunk_ids[row]])
            np.testing.assert_array_equal(ids[row], want)
        found = ids >= 0
        assert found.mean() > 0.9
        assert not (train.doc_ids[ids[found]] == batch["doc_ids"][..., None].repeat(2, -1)[
            found]).any()
        np.testing.assert_array_equal(batch["neighbours"], db.neighbour_tokens(ids))


def test_eval_windows_exclude_doc_ids_and_precompute_matches_inline(db, tmp_path):
    val = db.split("validation")
    train_docs = db.split("train").doc_ids
    # Exclude the documents of the first few candidates of the validation chunks.
    first = db.split("validation").queries[:20, 0]
    excluded = {int(d) for d in train_docs[first[first >= 0]]}
    dataset = make_eval_windows(db, "validation", 64, 64, batch_size=2, num_neighbours=3,
                                exclude_doc_ids=excluded)
    want = _reference(db, "validation", 3, exclude_doc_ids=excluded)
    for batch in dataset.as_numpy_iterator():
        ids, chunk_ids = batch["neighbour_ids"], batch["chunk_ids"]
        real = chunk_ids >= 0
        np.testing.assert_array_equal(ids[real], want[chunk_ids[real]])
        assert not np.isin(train_docs[ids[ids >= 0]], list(excluded)).any()
    np.testing.assert_array_equal(
        retrieve_chunk_neighbours(db, "validation", np.arange(len(val.tokens)), 3,
                                  exclude_doc_ids=excluded), want)
    # Precomputed neighbours (one file set) give the inline batches.
    out = precompute_neighbours(db, "train", tmp_path / "pre", num_neighbours=2)
    inline = make_dataset(db, "train", seq_len=64, batch_size=4, num_neighbours=2)
    stored = make_dataset(db, "train", seq_len=64, batch_size=4, num_neighbours=2,
                          precomputed_dir=out)
    for a, b in zip(inline.take(2).as_numpy_iterator(), stored.take(2).as_numpy_iterator()):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_k_above_the_table_width_pads_with_missing(db):
    ids = retrieve_chunk_neighbours(db, "validation", np.arange(4), K + 3)
    assert ids.shape == (4, K + 3) and (ids[:, K:] == -1).all()
    np.testing.assert_array_equal(ids[:, :K], db.split("validation").queries[:4])


# ----------------------------------------------------------------------------- checks
def test_manifest_retriever_mismatch_names_both_values_and_the_fix(db, tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: the database was built for retriever "
                       r"'bm25'.*database\.retriever='bert'.*database\.retriever='bm25'.*"
                       r"--force"):
        RetrievalDatabase.open(db.path, retriever="bert")
    assert RetrievalDatabase.open(db.path, retriever="bm25").retriever_kind == "bm25"
    # build-db with a BERT config over the existing bm25 database (no --force).
    with pytest.raises(DataError, match="retriever 'bm25'"):
        build_run_database(tiny_config(), db.path, corpus=tiny_corpus())
    # And the other way round: a BERT database opened by a bm25 config.
    from tests._input_pipeline_fixtures import tiny_tokenizer, write_database

    bert = write_database(tmp_path / "bert", tiny_tokenizer(tmp_path))
    with pytest.raises(DataError, match=r"built for retriever 'bert'.*"
                       r"database\.retriever='bm25'"):
        RetrievalDatabase.open(bert.path, retriever="bm25")


# ----------------------------------------------------------------------- kill -9 resume
def _digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != BUILD_TIMES_FILE}


EVENTS = ["bm25/index/built", "bm25/index/saved",
          *(f"bm25/train/shard_00000/block_{b:05d}/written" for b in (0, 6)),
          "bm25/train/shard_00001/block_00005/written",
          "bm25/validation/shard_00000/block_00001/written",
          "bm25/test/shard_00000/block_00000/written"]


def test_kill_during_the_candidate_stage_then_resume_is_byte_identical(db, tmp_path):
    """kill -9 at a random BM25 event in a subprocess, resume here, compare every byte with
    the clean build. Rerun a failure with the printed RETRO_JAX_TEST_SEED."""
    seed = int(os.environ.get("RETRO_JAX_TEST_SEED", random.randrange(1 << 30)))
    event = random.Random(seed).choice(EVENTS)
    print(f"kill at {event} (RETRO_JAX_TEST_SEED={seed})")
    code = ("import sys; sys.path.insert(0, sys.argv[2]);"
            "from tests._db_fixtures import make_tiny_database;"
            f"make_tiny_database(sys.argv[1], config_overrides={BM25!r}, "
            f"key_block_chunks={BLOCK})")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", KILL_ENV: event}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"not killed at {event}:\n{proc.stderr[-3000:]}"
    assert partial_path(tmp_path / "db").is_dir() and not (tmp_path / "db").exists()
    resumed = _build(tmp_path)
    want, got = _digests(db.path), _digests(resumed.path)
    assert got.keys() == want.keys() and f"train/{QUERY_ARRAY}-00001.npy" in want
    assert [k for k in want if got[k] != want[k]] == [], f"differs after kill at {event}"


# --------------------------------------------------------------------------- sampling
TINY_MODEL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
              "model.head_dim": 16, "model.ffw_dim": 64, "model.cca_layers": (2,),
              "model.encoder_width": 32, "model.encoder_layers": 1, "model.encoder_heads": 2,
              "model.encoder_head_dim": 16, "model.encoder_ffw_dim": 64,
              "model.dtype": "float32", "sample.num_neighbours": 2}


def test_sampling_queries_the_bm25_index_and_attributes_neighbours(db, tmp_path):
    from data_pipeline.retrieval import Bm25Retriever
    from retro_jax.sample.cli import sample_run
    from retro_jax.sample.generate import DatabaseRetriever
    from retro_jax.train.data import retriever_from_config
    from tests._model_fixtures import save_untrained_run

    # Live queries use the saved index: a train chunk's own text finds the chunk itself.
    search = Bm25Retriever().text_search(db)
    retriever = DatabaseRetriever(db, search, num_neighbours=2)
    train = db.split("train")
    ids, tokens = retriever(train.tokens[5])
    assert ids[0] == 5 and tokens.shape == (2, 2 * db.chunk_len)
    texts = [db.tokenizer.decode(train.tokens[5])]
    np.testing.assert_array_equal(ids, Bm25Index.load(db.path / BM25_DIR).top_k(texts, 2)[0])
    excluding = DatabaseRetriever(db, search, num_neighbours=2,
                                  exclude_doc_ids=[int(train.doc_ids[5])])
    assert not np.isin(train.doc_ids[excluding(train.tokens[5])[0]], [train.doc_ids[5]]).any()

    config = tiny_config(**TINY_MODEL, **BM25, **{"database.path": str(db.path)})
    assert isinstance(retriever_from_config(config), Bm25Retriever)  # no BERT to load
    save_untrained_run(config, tmp_path)
    prompt = db.tokenizer.decode(np.asarray(train.tokens[:2]).reshape(-1))
    out = sample_run(config, tmp_path, prompt, max_tokens=40, temperature=0.8, top_k=20,
                     top_p=0.95, seed=1)
    assert out["settings"]["num_neighbours"] == 2 and out["attribution"]
    for record in out["attribution"]:
        assert 1 <= len(record["neighbours"]) <= 2
        for n in record["neighbours"]:
            assert n["title"].startswith("train document") and n["text"]
    with pytest.raises(DataError, match="retriever 'bm25'"):
        sample_run(tiny_config(**TINY_MODEL, **{"database.path": str(db.path)}), tmp_path,
                   prompt, max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0)


# ------------------------------------------------------------------ ablation, train, eval
def test_bm25_ablation_config_selects_the_retriever():
    from retro_jax.configs import config_from_args

    class Args:
        config = str(REPO / "experiments" / "ablations" / "bm25_keys.py") + ":runlocal"
        overrides: list[str] = []

    config = config_from_args(Args(), num_devices=8)
    assert config.database.retriever == "bm25" and config.corpus.kind == "stdlib"


@pytest.mark.slow  # compiles a model: about a minute on 2 cores
def test_train_and_evaluate_on_a_bm25_database(db, tmp_path):
    """The tiny-config equivalent of `retro-jax train/eval` on the bm25 ablation: train a
    few steps through the pipeline, then eval ON and OFF with the leakage curve."""
    from retro_jax.evaluate.runner import evaluate_run
    from retro_jax.train.loop import train
    from tests._train_fixtures import tiny_config as train_config

    vocab = db.tokenizer.vocab_size
    config = train_config(**{
        "database.retriever": "bm25", "database.path": str(db.path), "corpus.kind": "jsonl",
        "database.chunk_len": db.chunk_len, "data.seq_len": 4 * db.chunk_len,
        "eval.stride": 4 * db.chunk_len, "eval.num_neighbours": 2, "eval.max_documents": 2,
        "eval.batch_size": 8, "tokenizer.vocab_size": vocab, "model.vocab_size": vocab,
        "train.batch_size": 8, "train.num_steps": 2, "train.checkpoint_every": 2})
    result = train(config, tmp_path, progress="none", tensorboard=False)
    assert result["step"] == 2
    on = evaluate_run(config, tmp_path, retrieval="on", leakage=True, progress=False)
    off = evaluate_run(config, tmp_path, retrieval="off", progress=False)
    assert on["mode"] == "on" and off["mode"] == "off"
    assert np.isfinite(on["value"]) and np.isfinite(off["value"])
    assert on["leakage"]["chunks"] > 0 and on["leakage"]["curve"][-1]["fraction"] == 1.0
