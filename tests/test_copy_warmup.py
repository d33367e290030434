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


def test_config_checks():
    from retro_jax.configs import ConfigError
    from tests._train_fixtures import tiny_config

    assert tiny_config(**{"train.copy_warmup_steps": 4}).train.copy_warmup_steps == 4
    with pytest.raises(ConfigError, match="train.copy_warmup_steps.*model.retrieval"):
        tiny_config(**{"train.copy_warmup_steps": 4, "model.retrieval": False})
    with pytest.raises(ConfigError, match="below train.num_steps"):
        tiny_config(**{"train.copy_warmup_steps": 12})
