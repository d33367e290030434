"""Multi-head attention, split into projection and application so a KV cache fits in.

`Attention` owns the weights and exposes three steps:

    q = attn.project_query(x)            # [..., T, heads, head_dim]
    k, v = attn.project_key_value(y)     # [..., S, heads, head_dim]
    (rotary is applied by the caller, which knows the positions)
    ctx = dot_product_attention(q, k, v, mask=..., is_causal=...)
    out = attn.project_output(ctx)       # [..., T, out_dim]

Autoregressive decoding (`Retro.decode_step`) keeps, per decoder layer, a `KVCache`: the
rotated keys and the values of every past position in `[B, S, heads, head_dim]` buffers
(S = the longest sequence decoded). The self-attention of a new token projects its own
key/value only, writes them at its position (`KVCache.write`, a `dynamic_update_slice`) and
attends to the buffers with `cache_mask` (key s visible to a query at position p iff s <= p),
which replaces `is_causal`: positions not written yet are masked. CCA keys/values depend
only on the neighbours of a chunk, so they are projected once per chunk and reused by the m
tokens that attend to them (`cca.NeighbourKV`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.layers import DenseGeneral


class Attention(nnx.Module):
    """Projections of one multi-head attention: queries from width `q_dim`, keys/values from
    width `kv_dim` (different for cross-attention: this bridges encoder and decoder widths),
    output to width `out_dim`."""

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int, head_dim: int, out_dim: int,
                 *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim
        hd = (num_heads, head_dim)
        self.query = DenseGeneral((q_dim,), hd, ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        # Keys and values in one matrix: one GEMM instead of two, same FLOPs.
        self.key_value = DenseGeneral((kv_dim,), (2,) + hd, ("embed", None, "heads", "kv"),
                                      dtype=dtype, rngs=rngs)
        self.out = DenseGeneral(hd, (out_dim,), ("heads", "kv", "embed"), dtype=dtype,
                                rngs=rngs)

    def project_query(self, x: jax.Array) -> jax.Array:
        """`[..., T, q_dim] -> [..., T, heads, head_dim]`."""
        return self.query(x)

    def project_key_value(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`[..., S, kv_dim] -> (k, v)`, each `[..., S, heads, head_dim]`."""
        kv = self.key_value(y)
        return kv[..., 0, :, :], kv[..., 1, :, :]

    def project_output(self, ctx: jax.Array) -> jax.Array:
        """`[..., T, heads, head_dim] -> [..., T, out_dim]`."""
        return self.out(ctx)


class KVCache(NamedTuple):
    """Self-attention keys (rotated) and values of every position so far, `[B, S, H, D]`.

    Entries past the last written position are stale (zeros at first): `cache_mask` hides them.
    """

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """The cache with `k`, `v` `[B, T, H, D]` written at positions start .. start+T-1."""
        at = (0, start, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at))


def cache_mask(positions: jax.Array, length: int) -> jax.Array:
    """bool `[1, 1, T, length]`: cache slot s is visible to the query at `positions[t]` iff
    s <= positions[t] (causal over absolute positions; later slots are not written yet)."""
    return (jnp.arange(length)[None, :] <= positions[:, None])[None, None]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """Softmax attention, `softmax(q k^T / sqrt(D)) v` with fp32 logits and softmax.

    q: `[B, T, H, D]`; k, v: `[B, S, H, D]`; mask: bool broadcastable to `[B, H, T, S]`
    (True = attend); `is_causal`: query t sees keys 0..t (top-left aligned). Returns
    `[B, T, H, D]` in v's dtype. A query row with every key masked gets a finite (uniform)
    output, never NaN: callers that can see such rows (CCA of a chunk with no neighbours) zero
    them with a `where` on the output.

    On TPU/GPU this is `jax.nn.dot_product_attention` (a fused kernel where the backend has
    one). On CPU it is two einsums around a softmax, the same function (tested): XLA:CPU has
    no fused kernel, and this form's forward + backward is ~20% faster there than the "xla"
    implementation (fewer layout copies, no padded-mask bookkeeping). The backend is read when
    the function is traced.
    """
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                            implementation=None)
    weights = _softmax_weights(q, k, mask, is_causal)
    return jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)


def _softmax_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None,
                     is_causal: bool) -> jax.Array:
    """fp32 softmax weights `[B, H, T, S]`; masked keys get weight 0 (uniform if all are)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if is_causal:
        t, s = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((t, s), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)


# A finite "minus infinity": a fully masked row stays finite (uniform weights), never NaN.
_MASKED = -1e30


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The softmax weights `[B, H, T, S]` (fp32) of `dot_product_attention` (for attribution).

    Rows with every key masked are all zero.
    """
    weights = _softmax_weights(q, k, mask, is_causal=False)
    if mask is None:
        return weights
    mask = jnp.broadcast_to(mask, weights.shape)
    return jnp.where(mask.any(-1, keepdims=True), weights, 0.0)
