"""train.copy_warmup_steps: synthetic copy batches first, then the real pipeline."""

import numpy as np
import pytest

from retro_jax.train.copy_warmup import copy_batch, with_copy_warmup

KW = dict(seed=3, batch_size=4, seq_len=32, chunk_len=8, num_neighbours=2, vocab_size=64)


def test_copy_batch_neighbours_hold_the_aligned_continuation():
    batch = copy_batch(5, **KW)
    inputs, targets, neighbours = batch["inputs"], batch["targets"], batch["neighbours"]
    assert inputs.shape == (4, 32) and neighbours.shape == (4, 4, 2, 16)
    assert inputs.min() >= 4 and inputs.max() < 64
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    for u in range(4):
        # Slot j of chunk u: [C_u ; C_u+1]; the target of position u*m + m - 1 + i (which
        # reads chunk u's neighbours) is neighbour token m + i: copying is exact.
        np.testing.assert_array_equal(neighbours[:, u, 1, :8], inputs[:, u * 8:(u + 1) * 8])
        for i in range(8):
            position = u * 8 + 7 + i
            if position < 32:
                np.testing.assert_array_equal(targets[:, position], neighbours[:, u, 0, 8 + i])
    np.testing.assert_array_equal(copy_batch(5, **KW)["inputs"], inputs)  # resumable
    assert not np.array_equal(copy_batch(6, **KW)["inputs"], inputs)


def test_warmup_then_real_batches_and_resume():
    real = [{"inputs": np.full((2, 32), i, np.int32)} for i in range(3)]
    stream = list(with_copy_warmup(iter(real), start_step=0, warmup_steps=2, rows=2,
                                   row_offset=2, **KW))
    assert len(stream) == 5
    np.testing.assert_array_equal(stream[1]["inputs"], copy_batch(1, **KW)["inputs"][2:4])
    assert stream[2] is real[0]
    resumed = list(with_copy_warmup(iter(real), start_step=1, warmup_steps=2, rows=2,
                                    row_offset=2, **KW))
    np.testing.assert_array_equal(resumed[0]["inputs"], stream[1]["inputs"])
    assert resumed[1] is real[0]


def test_copy_mix_replaces_the_first_rows_of_real_batches():
    real = [{"inputs": np.full((4, 32), i, np.int32), "targets": np.full((4, 32), i, np.int32),
             "neighbours": np.zeros((4, 4, 2, 16), np.int32), "doc_ids": np.full((4, 4), i)}
            for i in range(3)]
    kw = dict(KW, batch_size=8)
    stream = list(with_copy_warmup(iter(real), start_step=1, warmup_steps=2, rows=4,
                                   row_offset=4, mix=0.5, **kw))
    assert len(stream) == 4  # one warm-up batch left, then the three real ones
    for step, batch in zip((2, 3, 4), stream[1:]):
        copy = copy_batch(step, **kw)
        i = step - 2
        for key in ("inputs", "targets", "neighbours"):
            np.testing.assert_array_equal(batch[key][:2], copy[key][4:6])
            np.testing.assert_array_equal(batch[key][2:], real[i][key][2:])
        np.testing.assert_array_equal(batch["doc_ids"], real[i]["doc_ids"])


def test_config_checks():
    from retro_jax.configs import ConfigError
    from tests._train_fixtures import tiny_config

    assert tiny_config(**{"train.copy_warmup_steps": 4}).train.copy_warmup_steps == 4
    with pytest.raises(ConfigError, match="train.copy_warmup_steps.*model.retrieval"):
        tiny_config(**{"train.copy_warmup_steps": 4, "model.retrieval": False})
    with pytest.raises(ConfigError, match="train.copy_mix"):
        tiny_config(**{"train.copy_mix": 1.0})
    with pytest.raises(ConfigError, match="below train.num_steps"):
        tiny_config(**{"train.copy_warmup_steps": 12})
