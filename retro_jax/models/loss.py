"""Cross-entropy in fp32, ignoring padding targets (id 0).

`cross_entropy` takes full logits. `chunked_cross_entropy` takes the final hidden states and
the output matrix and computes the same sums block by block under `jax.checkpoint`, so the
`[B, n, V]` logits (0.5 GB at B=8, n=512, V=32k in fp32; 1 GB more for their gradient) never
exist at once: forward and backward each hold one `[B, block, V]` slab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_ID = 0


def _valid(targets: jax.Array, mask: jax.Array | None) -> jax.Array:
    valid = targets != PAD_ID
    if mask is not None:
        valid = valid & mask.astype(bool)
    return valid


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """logits `[..., V]`, targets int `[...]`, mask bool `[...]` | None ->
    (sum of negative log-likelihoods, number of scored tokens), both fp32 scalars.

    Targets equal to 0 (padding) are never scored.
    """
    valid = _valid(targets, mask)
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0]
    nll = jnp.where(valid, log_z - target_logit, 0.0)
    return nll.sum(), valid.sum().astype(jnp.float32)


def chunked_cross_entropy(hidden: jax.Array, output_weights: jax.Array, targets: jax.Array,
                          mask: jax.Array | None = None, *,
                          block_len: int = 128) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(hidden @ output_weights, targets, mask)` without materialising logits.

    hidden `[B, n, d]`, output_weights `[d, V]`, targets `[B, n]`. The sequence is cut into
    blocks of `block_len` tokens (n must be a multiple, else one block is used); each block's
    logits are recomputed in the backward pass (one extra `[B, block, d] x [d, V]` matmul).
    """
    b, n, d = hidden.shape
    if n % block_len:
        block_len = n
    n_blocks = n // block_len
    valid = _valid(targets, mask)

    @jax.checkpoint
    def block_nll(h_blk, t_blk, v_blk, w):
        logits = jnp.einsum("bnd,dv->bnv", h_blk, w, preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_blk[..., None], axis=-1)[..., 0]
        return jnp.where(v_blk, log_z - target_logit, 0.0).sum()

    hs = hidden.reshape(b, n_blocks, block_len, d).swapaxes(0, 1)
    ts = targets.astype(jnp.int32).reshape(b, n_blocks, block_len).swapaxes(0, 1)
    vs = valid.reshape(b, n_blocks, block_len).swapaxes(0, 1)

    def body(total, xs):
        return total + block_nll(*xs, output_weights), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, vs))
    return total, valid.sum().astype(jnp.float32)
