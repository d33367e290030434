"""Is retrieval being used? The loss of one batch under four kinds of neighbours.

    on       the retrieved neighbours (what the model is trained and evaluated with)
    off      no neighbours (RETRO[OFF]: CCA adds nothing)
    random   the neighbours of another sequence of the batch, chunk for chunk (row b gets row
             b - 1's): right format, unrelated content
    oracle   one neighbour per chunk, N = the chunk itself and F = its true continuation (the
             tokens the attending chunk predicts); the other neighbour slots empty

Scored on the positions that attend to neighbours (m-1 onwards, the CCA shift) with a real
target, the same positions for every variant. A model that uses its neighbours has
on < random ~ off, and oracle far below off (it can copy the continuation); on ~ off ~ random
is the signature of a model that ignores retrieval, and oracle ~ off means it cannot copy.

With the real neighbours, each CCA layer's contribution is also measured: the norm of what it
adds to the residual stream relative to the stream's norm (`models.retro.cca_norm_ratio`),
as diag_cca_ratio_layer<l>; a layer near 0 has been silenced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from retro_jax.models.loss import chunked_cross_entropy

VARIANTS = ("on", "off", "random", "oracle")
CCA_RATIO = "cca_ratio_layer"  # + the 1-based layer: `Retro.cca_norm_ratio` with real neighbours


def attending_mask(targets: jax.Array, chunk_len: int) -> jax.Array:
    """bool [B, n]: positions m-1 onwards (they attend to a chunk's neighbours)."""
    return jnp.broadcast_to(jnp.arange(targets.shape[1]) >= chunk_len - 1, targets.shape)


def random_neighbours(neighbours: jax.Array) -> jax.Array:
    """[B, L, k, r] -> the same with row b holding row b - 1's neighbours (a derangement for
    B > 1: no sequence keeps its own)."""
    return jnp.roll(neighbours, 1, axis=0)


def oracle_neighbours(inputs: jax.Array, chunk_len: int, num_neighbours: int) -> jax.Array:
    """inputs int32 [B, n] -> neighbours int32 [B, L, k, 2m]: slot 0 of chunk u is
    [C_u ; C_{u+1}] (the last chunk's continuation lies outside the sequence: zeros), the
    other slots are empty."""
    b, n = inputs.shape
    m = chunk_len
    chunks = inputs.reshape(b, n // m, m)
    continuation = jnp.concatenate([chunks[:, 1:], jnp.zeros_like(chunks[:, :1])], axis=1)
    oracle = jnp.concatenate([chunks, continuation], axis=-1)[:, :, None]  # [B, L, 1, 2m]
    empty = jnp.zeros((b, n // m, num_neighbours - 1, 2 * m), inputs.dtype)
    return jnp.concatenate([oracle, empty], axis=2)


def variant_losses(model, batch: dict) -> tuple[dict, dict]:
    """A loss function for `TrainSetup.make_eval_step`: (NLL sums, scored tokens), each a dict
    over VARIANTS, on one batch with neighbours [B, L, k, 2m]."""
    inputs, targets, neighbours = batch["inputs"], batch["targets"], batch["neighbours"]
    m = model.cfg.chunk_len
    mask = attending_mask(targets, m)
    variants = {"on": neighbours, "off": None, "random": random_neighbours(neighbours),
                "oracle": oracle_neighbours(inputs, m, neighbours.shape[2])}
    sums, counts = {}, {}
    for name, value in variants.items():
        if name == "on":  # also how much each CCA layer adds to the residual stream
            hidden, norms = model.hidden_states(inputs, value, return_cca_norms=True)
            for layer, ratio in norms.items():
                sums[f"{CCA_RATIO}{layer}"], counts[f"{CCA_RATIO}{layer}"] = ratio, 1.0
        else:
            hidden = model.hidden_states(inputs, value)
        sums[name], counts[name] = chunked_cross_entropy(hidden, model.output_weights(),
                                                         targets, mask)
    return sums, counts


def summarize(sums: dict, counts: dict, tokens_per_byte: float | None = None) -> dict:
    """Per variant: diag_loss_<variant> (mean NLL, nats) and, with tokens_per_byte,
    diag_bpb_<variant>; plus diag_oracle_vs_off and diag_on_vs_random (relative changes of
    the mean NLL: -0.5 = half the loss)."""
    out = {}
    for name in VARIANTS:
        loss = float(sums[name]) / max(float(counts[name]), 1.0)
        out[f"diag_loss_{name}"] = loss
        if tokens_per_byte:
            out[f"diag_bpb_{name}"] = loss / math.log(2.0) * tokens_per_byte
    for key in sorted(k for k in sums if k.startswith(CCA_RATIO)):
        out[f"diag_{key}"] = float(sums[key])
    off, random = out["diag_loss_off"], out["diag_loss_random"]
    out["diag_oracle_vs_off"] = out["diag_loss_oracle"] / off - 1.0 if off else float("nan")
    out["diag_on_vs_random"] = out["diag_loss_on"] / random - 1.0 if random else float("nan")
    return out
