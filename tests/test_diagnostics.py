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
    # One CCA contribution per CCA layer, a positive share of the residual stream.
    layers = sorted(model.cfg.cca_layers)
    assert sorted(k for k in out if k.startswith("diag_cca_ratio")) == [
        f"diag_cca_ratio_layer{layer}" for layer in layers]
    assert all(0 < out[f"diag_cca_ratio_layer{layer}"] < 10 for layer in layers)


def test_cca_norm_ratio_is_what_the_layer_adds():
    from retro_jax.models.retro import cca_norm_ratio

    before = jnp.ones((2, 6, 4))  # |before| = 2 at every position
    after = before.at[:, :, 0].add(1.0)  # adds 1 at every position
    assert float(cca_norm_ratio(before, after, chunk_len=3)) == pytest.approx(0.5)
    # Positions before m-1 (which read no neighbours) are not counted.
    early = before.at[:, :2, 0].add(100.0)
    assert float(cca_norm_ratio(before, early, chunk_len=3)) == pytest.approx(0.0)


def test_cca_norms_agree_between_scanned_and_unrolled_models():
    from _model_fixtures import tiny_config

    inputs, _, neighbours = make_batch(batch=2, k=K)
    ratios = []
    for scan in (False, True):
        cfg = tiny_config(num_layers=6, cca_layers=(2, 4, 6), scan_layers=scan)
        model = new_model(cfg, 5)
        h, norms = model.hidden_states(inputs, neighbours, return_cca_norms=True)
        ratios.append({layer: float(v) for layer, v in norms.items()})
    assert set(ratios[0]) == {2, 4, 6}
    for layer in ratios[0]:
        assert ratios[1][layer] == pytest.approx(ratios[0][layer], rel=1e-4)
