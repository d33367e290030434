"""Cross-entropy in fp32, ignoring padding targets (id 0).

`cross_entropy` takes full logits. `chunked_cross_entropy` takes the final hidden states and
the output matrix and computes the same sums block by block, so the `[B, n, V]` logits
(0.5 GB at B=8, n=512, V=32k in fp32; 1 GB more for their gradient) never exist at once: one
`[B*block, V]` slab does, and under differentiation its gradient is taken at once (a custom
VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    blocks of `block_len` tokens (n must be a multiple, else one block is used); one
    `[B*block, V]` slab of logits exists at a time.

    Differentiable in `hidden` and `output_weights` (the total only; the count is a
    constant). Under differentiation the gradients are computed in the forward pass, block by
    block, while the block's softmax is at hand (`dlogits = softmax - onehot`): three
    `[B*block, d] x [d, V]`-sized matmuls per block (logits, dh, dW) instead of the four of
    autodiff with rematerialised logits, and one exp over the slab instead of two.
    """
    b, n, d = hidden.shape
    if n % block_len:
        block_len = n
    n_blocks = n // block_len
    valid = _valid(targets, mask)
    # [n_blocks, B * block_len, ...]: block i holds tokens i*block .. (i+1)*block-1 of every
    # sequence. One row dim keeps every matmul (and `dW = h^T dlogits`) a plain 2-D GEMM
    # (see layers.row_matmul).
    hs = hidden.reshape(b, n_blocks, block_len, d).swapaxes(0, 1).reshape(n_blocks, -1, d)
    ts = (targets.astype(jnp.int32).reshape(b, n_blocks, block_len).swapaxes(0, 1)
          .reshape(n_blocks, -1))
    vs = valid.reshape(b, n_blocks, block_len).swapaxes(0, 1).reshape(n_blocks, -1)
    total = _blockwise_nll(hs, output_weights, ts, vs)
    return total, valid.sum().astype(jnp.float32)


def _block_logits(h_blk: jax.Array, w: jax.Array) -> jax.Array:
    """`[rows, d] x [d, V] -> float32 [rows, V]`."""
    return jnp.einsum("td,dv->tv", h_blk, w, preferred_element_type=jnp.float32)


def _block_nll(logits: jax.Array, t_blk: jax.Array, v_blk: jax.Array):
    """Summed NLL of one block and its log-partition `[rows]`."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t_blk[:, None], axis=-1)[:, 0]
    return jnp.where(v_blk, log_z - target_logit, 0.0).sum(), log_z


@jax.custom_vjp
def _blockwise_nll(hs: jax.Array, w: jax.Array, ts: jax.Array, vs: jax.Array) -> jax.Array:
    """Sum of NLLs over blocks. hs `[n_blocks, rows, d]`, w `[d, V]`, ts int32 and vs bool
    `[n_blocks, rows]` -> fp32 scalar."""
    def body(total, xs):
        h_blk, t_blk, v_blk = xs
        return total + _block_nll(_block_logits(h_blk, w), t_blk, v_blk)[0], None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, vs))
    return total


def _blockwise_nll_fwd(hs, w, ts, vs):
    def body(carry, xs):
        total, dw = carry
        h_blk, t_blk, v_blk = xs
        logits = _block_logits(h_blk, w)
        nll, log_z = _block_nll(logits, t_blk, v_blk)
        # d(sum nll)/d logits = (softmax - onehot(target)) on scored rows, 0 elsewhere.
        probs = jnp.exp(logits - log_z[:, None])
        onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == t_blk[:, None]
        dlogits = jnp.where(v_blk[:, None], probs - onehot, 0.0).astype(w.dtype)
        dh = jnp.einsum("tv,dv->td", dlogits, w,
                        preferred_element_type=jnp.float32).astype(h_blk.dtype)
        dw = dw + jnp.einsum("td,tv->dv", h_blk, dlogits, preferred_element_type=jnp.float32)
        return (total + nll, dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dhs = jax.lax.scan(body, init, (hs, ts, vs))
    return total, (dhs, dw.astype(w.dtype), ts, vs)


def _blockwise_nll_bwd(res, g):
    dhs, dw, ts, vs = res
    zeros_t = np.zeros(ts.shape, jax.dtypes.float0)
    zeros_v = np.zeros(vs.shape, jax.dtypes.float0)
    return (g * dhs).astype(dhs.dtype), (g * dw).astype(dw.dtype), zeros_t, zeros_v


_blockwise_nll.defvjp(_blockwise_nll_fwd, _blockwise_nll_bwd)
