"""`build-db --runner beam` and `precompute-neighbours --runner beam` on Apache Beam's
DirectRunner with 2 worker processes: the same bytes as the single-process build, neighbours
equal to inline retrieval's, and a killed Beam build rerun to the same checksums.

The corpus is a directory of JSONL files, so the build reads several sources in parallel; the
config turns on what the plan stage decides (dedup against evaluation documents, a per-document
chunk cap, a train cap that cuts a document, several shards per split). Keys come from the
hash-trigram stand-in (tests/_db_fixtures.HashEmbedder), which the workers unpickle.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from data_pipeline.corpora.split import hash_split  # noqa: E402
from data_pipeline.database import BUILD_TIMES_FILE, partial_path  # noqa: E402
from data_pipeline.resumable import KILL_ENV, KILL_GROUP_ENV  # noqa: E402
from data_pipeline.shards import temporary_path  # noqa: E402
from retro_jax.build_db import build_run_database, make_runner  # noqa: E402
from tests._db_fixtures import (  # noqa: E402
    FakeDocument,
    HashEmbedder,
    generated_documents,
    tiny_config,
    write_jsonl_corpus,
)

REPO = Path(__file__).resolve().parent.parent
BEAM_OPTIONS = ("--runner=DirectRunner --direct_num_workers=2 "
                "--direct_running_mode=multi_processing")
BLOCK = 64  # key rows per block


def corpus_dir(root: Path) -> Path:
    """Four JSONL files; one train document copies a validation document's text."""
    docs = generated_documents(44, seed=7, max_sentences=10)
    validation = next(d for d in docs if hash_split(d.title, 20.0, 20.0) == "validation")
    leak = next(f"leak {i}" for i in itertools.count() if hash_split(f"leak {i}", 20.0, 20.0)
                == "train")
    docs.insert(5, FakeDocument(id="leak", title=leak, text=validation.text, source="x"))
    directory = root / "corpus"
    for i in range(4):
        write_jsonl_corpus(directory / f"part-{i}.jsonl", docs[i::4])
    return directory


def config(corpus: Path, **overrides):
    return tiny_config(**{"corpus.path": str(corpus), "corpus.title_field": "title",
                          "database.dedup_against_eval": True,
                          "database.max_document_chunks": 24, "database.max_chunks": 500,
                          "database.shard_chunks": 200, **overrides})


def build(corpus: Path, db_path: Path, runner: str):
    return build_run_database(config(corpus), db_path, embedder=HashEmbedder(),
                              block_rows=BLOCK, runner=make_runner(
                                  runner, BEAM_OPTIONS if runner == "beam" else ""))


@pytest.fixture(scope="module", autouse=True)
def workers_import_the_tests():
    """Beam's worker processes unpickle tests._db_fixtures.HashEmbedder: put the repository
    on their path whatever directory pytest runs in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        yield


def digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a database except build_times.json (timings)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != BUILD_TIMES_FILE and "precomputed" not in p.parts}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_dir(tmp_path_factory.mktemp("beam_corpus"))


@pytest.fixture(scope="module")
def local_db(corpus, tmp_path_factory):
    return build(corpus, tmp_path_factory.mktemp("local") / "db", "local")


@pytest.fixture(scope="module")
def beam_db(corpus, tmp_path_factory):
    return build(corpus, tmp_path_factory.mktemp("beam") / "db", "beam")


def test_beam_build_equals_the_single_process_build(local_db, beam_db):
    m = local_db.manifest
    # The plan had work to do: several sources, a cut document, dedup, several shards.
    assert m["splits"]["train"]["num_chunks"] == 500 and m["dedup"]["removed"] == 1
    assert len(m["splits"]["train"]["shards"]) == 3 and len(m["shards"]) == 3
    assert m["index"]["recall_query_source"] == "validation"
    want, got = digests(local_db.path), digests(beam_db.path)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert beam_db.manifest == m  # checksums, counts and the same recall
    beam_db.verify()


def test_beam_precomputed_neighbours_equal_inline_retrieval(beam_db, tmp_path):
    from data_pipeline.beam_runner import BeamRunner
    from data_pipeline.input_pipeline import make_dataset, precompute_neighbours

    k, overfetch = 2, 3
    # 3 query blocks x 3 index shards in elements of 2 x 2: uneven groups, and per-element
    # merges before the combiner's.
    out = precompute_neighbours(beam_db, "train", tmp_path / "beam", num_neighbours=k,
                                overfetch=overfetch, shard_rows=200,
                                runner=BeamRunner(BEAM_OPTIONS, units_per_element=2,
                                                  parts_per_element=2))
    local = precompute_neighbours(beam_db, "train", tmp_path / "local", num_neighbours=k,
                                  overfetch=overfetch, shard_rows=200)
    files = ["manifest.json", *(f"candidates-{i:05d}.npy" for i in range(3))]  # 500 chunks
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name in files:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    kwargs = dict(seq_len=64, batch_size=4, num_neighbours=k, overfetch=overfetch, seed=3)
    inline = list(itertools.islice(make_dataset(beam_db, "train", **kwargs).as_numpy_iterator(),
                                   6))
    pre = list(itertools.islice(make_dataset(beam_db, "train", precomputed_dir=out, **kwargs)
                                .as_numpy_iterator(), 6))
    for a, b in zip(inline, pre):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (np.concatenate([b["neighbour_ids"] for b in pre]) >= 0).mean() > 0.9


_BUILD_CODE = ("import sys; sys.path.insert(0, sys.argv[2]);"
               "from pathlib import Path;"
               "from tests.test_beam import build;"
               "build(Path(sys.argv[1]), Path(sys.argv[3]), sys.argv[4])")


def _killed_build(corpus: Path, db_path: Path, event: str) -> None:
    """The Beam build in its own process group, killed (driver and workers) at `event`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", KILL_ENV: event, KILL_GROUP_ENV: "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _BUILD_CODE, str(corpus), str(REPO),
                           str(db_path), "beam"], env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, (
        f"build not killed at {event} (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    assert partial_path(db_path).is_dir() and not db_path.exists()


def test_killed_beam_build_reruns_to_the_same_checksums(corpus, local_db, tmp_path):
    """Reduced default form: a Beam build killed (driver and workers) after a key block of
    train shard 1 was written, rerun (here in one process: either runner resumes the other's
    build; the slow form reruns on Beam); every file equals the single-process build's. The
    rerun keeps the chunk shards and the finished key blocks and redoes the rest, and drops
    the files the killed workers were writing (planted here: whether a worker is caught
    mid-write depends on timing)."""
    db_path = tmp_path / "db"
    _killed_build(corpus, db_path, "keys/train/shard_00001/block_00001/written")
    build_dir = partial_path(db_path) / ".build"
    assert (build_dir / "done" / "chunks" / "train" / "shard_00002.json").is_file()
    assert list((build_dir / "staging" / "keys" / "train").glob("shard_00001-*/block_00001.npy"))
    for name in ("train/keys-00000.npy", "index/shard_00000/dataset.npy"):
        planted = temporary_path(partial_path(db_path) / name)
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"half-written")
    resumed = build(corpus, db_path, "local")
    want, got = digests(local_db.path), digests(resumed.path)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


@pytest.mark.slow
@pytest.mark.parametrize("event", ["chunks/train/source_00002/done",
                                   "chunks/validation/shard_00000/done",
                                   "keys/train/shard_00001/block_00001/written",
                                   "keys/test/shard_00000/done",
                                   "index/shard_00001/saved",
                                   "finalize/markers_removed"])
def test_beam_build_killed_anywhere_reruns_to_the_same_checksums(corpus, local_db, tmp_path,
                                                                  event):
    db_path = tmp_path / "db"
    _killed_build(corpus, db_path, event)
    resumed = build(corpus, db_path, "beam")
    want, got = digests(local_db.path), digests(resumed.path)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


@pytest.mark.slow
def test_bm25_databases_take_the_same_route(corpus, tmp_path):
    """A bm25 database on Beam (index in the driver, candidate shards on the workers) equals
    the single-process one, and so do its precomputed neighbours."""
    from data_pipeline.input_pipeline import precompute_neighbours

    dbs = {}
    for runner in ("local", "beam"):
        dbs[runner] = build_run_database(
            config(corpus, **{"database.retriever": "bm25"}), tmp_path / runner / "db",
            block_rows=BLOCK,
            runner=make_runner(runner, BEAM_OPTIONS if runner == "beam" else ""))
    assert dbs["local"].manifest["retriever"] == "bm25"
    want, got = digests(dbs["local"].path), digests(dbs["beam"].path)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
    out = {runner: precompute_neighbours(
        dbs["local"], "train", tmp_path / runner / "neighbours", num_neighbours=2,
        shard_rows=200, runner=make_runner(runner, BEAM_OPTIONS if runner == "beam" else ""))
        for runner in ("local", "beam")}
    assert digests(out["local"]) == digests(out["beam"])
