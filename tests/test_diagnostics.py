"""Retrieval diagnostics (retro_jax/train/diagnostics.py) on hand-checked cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _model_fixtures import CHUNK, K, make_batch, new_model

from retro_jax.models.loss import chunked_cross_entropy
from retro_jax.train import diagnostics


def test_random_neighbours_come_from_other_sequences():
    neighbours = jnp.arange(4 * 3 * 2 * 6).reshape(4, 3, 2, 6)
    shuffled = np.asarray(diagnostics.random_neighbours(neighbours))
    for b in range(4):
        np.testing.assert_array_equal(shuffled[b], np.asarray(neighbours)[(b - 1) % 4])
        assert not np.array_equal(shuffled[b], np.asarray(neighbours)[b])


def test_oracle_puts_the_true_continuation_where_the_model_reads_it():
    m = 2
    inputs = jnp.asarray([[11, 12, 13, 14, 15, 16]])  # chunks [11 12] [13 14] [15 16]
    oracle = np.asarray(diagnostics.oracle_neighbours(inputs, m, num_neighbours=3))
    assert oracle.shape == (1, 3, 3, 2 * m)
    np.testing.assert_array_equal(oracle[0, :, 0], [[11, 12, 13, 14], [13, 14, 15, 16],
                                                    [15, 16, 0, 0]])
    assert (oracle[0, :, 1:] == 0).all()  # the other slots are empty
    # The attending chunk of u is positions u*m+m-1 .. u*m+2m-2; position p predicts
    # inputs[p+1], which is the oracle's continuation token F[p - (u*m+m-1)].
    for u in range(2):
        for i in range(m):
            p = u * m + m - 1 + i
            assert int(inputs[0, p + 1]) == oracle[0, u, 0, m + i]


def test_variant_losses_off_is_the_model_without_neighbours():
    model = new_model()
    inputs, targets, neighbours = make_batch(batch=2, k=K)
    batch = {"inputs": inputs, "targets": targets, "neighbours": neighbours}
    sums, counts = diagnostics.variant_losses(model, batch)
    mask = diagnostics.attending_mask(targets, CHUNK)
    for name, value in (("off", None), ("on", neighbours)):
        total, count = chunked_cross_entropy(model.hidden_states(inputs, value),
                                             model.output_weights(), targets, mask)
        assert float(sums[name]) == pytest.approx(float(total), rel=1e-6)
        assert float(counts[name]) == float(count)
    assert float(counts["off"]) == targets.size - 2 * (CHUNK - 1)  # the first m-1 not scored
    assert float(sums["random"]) != pytest.approx(float(sums["on"]), rel=1e-6)
    out = diagnostics.summarize(sums, counts, tokens_per_byte=0.25)
    assert out["diag_oracle_vs_off"] == pytest.approx(
        out["diag_loss_oracle"] / out["diag_loss_off"] - 1)
    assert out["diag_bpb_on"] == pytest.approx(out["diag_loss_on"] / np.log(2) * 0.25)
