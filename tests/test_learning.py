"""A RETRO model learns to use its neighbours (the reduced learning test CI runs).

A tiny model trains on a Pile-layout corpus of random-word documents in which every document
has a planted near-duplicate (tests/_corpora_fixtures.py:write_planted_pile): the text is
unpredictable except by copying the next chunk from the near-duplicate that BM25 retrieves.
The real path runs end to end: corpus reader, tokenizer, chunks, BM25 database, the tf.data
pipeline with inline retrieval, the trainer and its retrieval diagnostics on held-out
documents. A model that learned to read its neighbours scores far lower with them than
without (OFF) or with another sequence's (random), and lower still with the oracle.
"""

import json

import pytest

from tests._corpora_fixtures import write_planted_pile
from tests._train_fixtures import tiny_config

STEPS = 150  # copying forms by ~120 steps at this learning rate (ON/OFF ~0.55 at 150)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from retro_jax.build_db import build_run_database
    from retro_jax.train.loop import train

    root = tmp_path_factory.mktemp("learning")
    corpus = write_planted_pile(root / "corpus", num_docs=40, num_eval=8, sentences=10)
    config = tiny_config(**{
        "corpus.kind": "pile", "corpus.path": str(corpus), "corpus.max_documents": -1,
        "database.retriever": "bm25", "database.path": str(root / "db"),
        "database.max_chunks": -1, "database.eval_splits": "('validation',)",
        "tokenizer.vocab_size": 384, "model.vocab_size": 384,
        "data.seq_len": 64, "data.num_neighbours": 2,
        "train.num_steps": STEPS, "train.batch_size": 16, "train.learning_rate": 6e-3,
        "train.warmup_steps": 20, "train.log_every": 40, "train.eval_every": STEPS,
        "train.eval_batches": 1, "train.checkpoint_every": STEPS,
        "eval.batch_size": 8,
    })
    build_run_database(config, config.database.path)
    train(config, root / "retro")
    rows = [json.loads(line) for line in (root / "retro" / "metrics.jsonl").open()]
    return next(r for r in reversed(rows) if "diag_loss_on" in r)


def test_retrieval_lowers_the_held_out_loss(trained_run):
    on, off = trained_run["diag_loss_on"], trained_run["diag_loss_off"]
    random, oracle = trained_run["diag_loss_random"], trained_run["diag_loss_oracle"]
    print({k: round(v, 3) for k, v in trained_run.items() if k.startswith("diag_")})
    assert on < 0.75 * off, trained_run
    assert on < 0.75 * random, trained_run
    assert oracle < 0.75 * off, trained_run
