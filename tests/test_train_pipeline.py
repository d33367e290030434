"""`train()` on its default data path: the tf.data pipeline over a real (tiny) database."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _db_fixtures import make_tiny_database
from _train_fixtures import tiny_config

from data_pipeline.errors import DataError
from retro_jax.models.sharding import logical_axis_rules, make_mesh
from retro_jax.train.data import held_out_batches, pipeline_batches
from retro_jax.train.loop import _first_batch, train
from retro_jax.train.metrics import read_metrics, tokens_per_byte_from_manifest


@pytest.mark.slow  # builds a database, imports TensorFlow and compiles: minutes on 2 cores
def test_train_reads_the_database_through_the_input_pipeline(tmp_path):
    db = make_tiny_database(tmp_path)  # hash keys, brute-force search, chunk_len 16
    vocab = db.tokenizer.vocab_size
    config = tiny_config(**{
        "database.chunk_len": db.chunk_len, "data.seq_len": 4 * db.chunk_len,
        "eval.stride": 4 * db.chunk_len, "tokenizer.vocab_size": vocab,
        "model.vocab_size": vocab, "train.batch_size": 8, "train.num_steps": 2,
        "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2})
    workdir = tmp_path / "run"
    result = train(config, workdir, database=db, progress="none", tensorboard=False)
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isfinite(rows[-1]["eval_loss"])
    assert rows[-1]["bits_per_byte"] == pytest.approx(
        rows[-1]["loss"] / math.log(2) * tokens_per_byte_from_manifest(db.manifest))
    assert 0.0 <= rows[-1]["input_wait"] <= 1.0
    assert result["step"] == 2


def test_batch_that_does_not_split_over_the_mesh_is_a_config_error(tmp_path):
    from retro_jax.configs import ConfigError

    with pytest.raises(ConfigError, match="multiple of 8"):
        train(tiny_config(**{"train.batch_size": 4}), tmp_path / "run", progress="none",
              tensorboard=False)


def test_train_without_a_database_says_to_build_it(tmp_path):
    with pytest.raises(DataError, match="retro-jax build-db"):
        train(tiny_config(), tmp_path / "run", progress="none", tensorboard=False)


def test_held_out_batches_are_drawn_across_the_split(tmp_path):
    """The periodic evaluation's batches sample the whole split, the same ones every time."""
    db = make_tiny_database(tmp_path, eval_docs=8)
    vocab = db.tokenizer.vocab_size
    config = tiny_config(**{
        "database.chunk_len": db.chunk_len, "data.seq_len": 4 * db.chunk_len,
        "tokenizer.vocab_size": vocab, "model.vocab_size": vocab, "train.batch_size": 8})
    mesh, rules = make_mesh(config.mesh), logical_axis_rules(config.mesh)

    def first_inputs(factory):  # as the training loop fetches its held-out batch
        return np.asarray(_first_batch(factory(0))["inputs"])

    held_out = first_inputs(held_out_batches(config, db, mesh, rules))
    np.testing.assert_array_equal(held_out, first_inputs(held_out_batches(config, db, mesh, rules)))
    in_order = np.concatenate([
        np.asarray(batch["inputs"]) for batch in pipeline_batches(
            config, db, mesh, rules, config.eval.split, shuffle=False, repeat=False)(0)])
    assert len(in_order) >= 3 * len(held_out)
    positions = [int(np.flatnonzero((in_order == row).all(axis=1))[0]) for row in held_out]
    assert max(positions) >= len(held_out)  # not just the split's first batch
    assert len(set(positions)) == len(held_out)
