"""Chunked cross-attention (CCA), as the RETRO paper defines it (arXiv 2112.04426, sec. 2.4).

The sequence of n = L*m tokens is split into chunks C_1..C_L. The neighbours of chunk C_u were
retrieved with C_u itself, so only tokens after C_u may see them. The sequence is shifted by
m-1: the attending chunk C_u+ is the last token of C_u followed by the first m-1 tokens of
C_{u+1} (positions u*m + m-1 ... u*m + 2m-2, 0-based u). Every token of C_u+ attends jointly
over all k x 2m encoded tokens of C_u's neighbours; the first m-1 tokens of the sequence
attend to nothing (zero output); the outputs are shifted back and added residually.

Relative positions (rotary, applied once to queries and once to keys): the neighbour
[chunk ; continuation] is aligned with C_u followed by C_{u+1}: neighbour token j (0..2m-1)
sits at offset j from the start of C_u. A query token i of C_u+ (0..m-1) sits at offset
m-1+i from the start of C_u. Queries are rotated with position m-1+i and keys with position
j, so the attention logit depends on the relative distance (m-1+i) - j between the query and
the neighbour token in this aligned frame: distance 0 means "the neighbour token at the
query's place", positive distances are its past (the retrieved chunk itself, for most
queries), negative ones its future (the continuation). All k neighbours share the positions
0..2m-1 (they are alternatives, not a sequence), so permuting neighbours leaves the output
unchanged. `cca_relative_positions=False` drops the rotary entirely (ablation).

Decoding token by token (`Retro.decode_step`), each CCA layer keeps a `NeighbourKV`: the
projected keys/values of the neighbours of every completed chunk. The step that feeds the
last token of chunk u (the first token that attends to its neighbours) writes them into slot
u; every step attends from its one token to the slot of the attending chunk it belongs to.
Both paths share `project_neighbours` and `_attend`, so they compute the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.attention import Attention, attention_weights, dot_product_attention
from retro_jax.models.config import RetroConfig
from retro_jax.models.layers import rotary
from retro_jax.models.sharding import shard


def attending_chunks(x: jax.Array, chunk_len: int, num_chunks: int) -> jax.Array:
    """`[B, n, d] -> [B, L, m, d]`: drop the first m-1 tokens, pad the end, cut into chunks.

    Row u holds positions u*m + m-1 ... u*m + 2m-2 (zeros past the end of the sequence).
    """
    b, n, d = x.shape
    m = chunk_len
    shifted = x[:, m - 1:]
    total = num_chunks * m
    shifted = jnp.pad(shifted, ((0, 0), (0, total - shifted.shape[1]), (0, 0)))
    return shifted.reshape(b, num_chunks, m, d)


def unshift(y: jax.Array, chunk_len: int, seq_len: int) -> jax.Array:
    """Inverse of `attending_chunks`: `[B, L, m, d] -> [B, n, d]`, zeros on the first m-1."""
    b, n_chunks, m, d = y.shape
    flat = y.reshape(b, n_chunks * m, d)
    flat = jnp.pad(flat, ((0, 0), (chunk_len - 1, 0), (0, 0)))
    return flat[:, :seq_len]


class NeighbourKV(NamedTuple):
    """One CCA layer's keys (rotated) and values of the encoded neighbours, chunk by chunk.

    k, v: `[B, L, k*r, H, D]` (k neighbours of r = 2m tokens per chunk); mask: bool
    `[B, L, k*r]` (False at padding, for missing neighbours and for chunks not encoded yet).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array

    def write(self, new: NeighbourKV, chunk: jax.Array) -> NeighbourKV:
        """The cache with `new` (`[B, 1, k*r, ...]`, one chunk) written into slot `chunk`."""
        return NeighbourKV(*(jax.lax.dynamic_update_slice(old, upd.astype(old.dtype),
                                                          (0, chunk) + (0,) * (old.ndim - 2))
                             for old, upd in zip(self, new)))

    def chunk(self, u: jax.Array) -> NeighbourKV:
        """Slot `u` (traced), keeping the chunk axis: `[B, 1, k*r, ...]`."""
        return NeighbourKV(*(jax.lax.dynamic_index_in_dim(a, u, axis=1) for a in self))


class ChunkedCrossAttention(nnx.Module):
    """CCA of one decoder layer: queries from the decoder (width d), keys/values from the
    encoded neighbours (width w, bridged by the key/value projection)."""

    def __init__(self, cfg: RetroConfig, *, rngs: nnx.Rngs):
        self.chunk_len = cfg.chunk_len
        self.rope_base = cfg.rope_base
        self.relative_positions = cfg.cca_relative_positions
        self.attention = Attention(cfg.d_model, cfg.encoder_width, cfg.num_heads, cfg.head_dim,
                                   cfg.d_model, dtype=cfg.compute_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array | None,
        neighbour_mask: jax.Array | None,
        *,
        return_attention: bool = False,
        positions: jax.Array | None = None,
        cache: NeighbourKV | None = None,
    ):
        """Chunked cross-attention of (normed) decoder activations to encoded neighbours.

        Whole sequence (no cache): x `[B, n, d]`; encoded `[B, L, k, r, w]` (r = 2m);
        neighbour_mask bool `[B, L, k, r]` (False at padding and for missing neighbours).
        Returns (`[B, n, d]` to add to the residual stream, and with `return_attention` the
        share of attention each neighbour got `[B, L, k]`, averaged over heads and query
        tokens; zero for a chunk without neighbours).

        One token (with `cache`, the `NeighbourKV` of every chunk `[B, T/m, k*r, H, D]`):
        x `[B, 1, d]` at `positions` `[1]`; encoded/neighbour_mask `[B, 1, k, r]`: the
        neighbours of the chunk this token completes (position u*m + m-1), written into slot
        u first, or None. Returns (`[B, 1, d]`, shares `[B, 1, k]` | None, cache).
        """
        if cache is not None:
            return self._decode(x, encoded, neighbour_mask, positions, cache, return_attention)
        b, n, _ = x.shape
        _, n_chunks, k, _, _ = encoded.shape
        m = self.chunk_len
        if n > n_chunks * m:
            raise ValueError(f"CCA: {n} tokens need {-(-n // m)} chunks of neighbours, "
                             f"got {n_chunks} (neighbours [B, L, k, 2m])")
        queries = attending_chunks(x, m, n_chunks)  # [B, L, m, d]
        neighbours = self.project_neighbours(encoded, neighbour_mask)
        out, shares = self._attend(queries, jnp.arange(m) + (m - 1), neighbours, k,
                                   return_attention)
        return shard(unshift(out, m, n), ("batch", "length", "embed")), shares

    def project_neighbours(self, encoded: jax.Array, neighbour_mask: jax.Array) -> NeighbourKV:
        """encoded `[B, L, k, r, w]`, mask `[B, L, k, r]` -> `NeighbourKV` `[B, L, k*r, H, D]`."""
        b, n_chunks, k, r, w = encoded.shape
        keys, values = self.attention.project_key_value(encoded.reshape(b, n_chunks, k * r, w))
        if self.relative_positions:  # neighbour token j at offset j; all k share 0..r-1
            keys = rotary(keys, jnp.tile(jnp.arange(r), k), self.rope_base)
        return NeighbourKV(keys, values, neighbour_mask.reshape(b, n_chunks, k * r))

    def _decode(self, x, encoded, neighbour_mask, positions, cache: NeighbourKV,
                return_attention: bool):
        """The one-token path of `__call__` (see there)."""
        m = self.chunk_len
        pos = positions[0]
        if encoded is not None:
            cache = cache.write(self.project_neighbours(encoded, neighbour_mask), pos // m)
        # The token's place in the shifted sequence: it belongs to attending chunk C_u+ as
        # query i; tokens before m-1 (offset < 0) attend to nothing.
        offset = pos - (m - 1)
        u, i = jnp.maximum(offset, 0) // m, jnp.maximum(offset, 0) % m
        neighbours = cache.chunk(u)
        neighbours = neighbours._replace(mask=neighbours.mask & (offset >= 0))
        num_neighbours = cache.k.shape[2] // (2 * m)
        out, shares = self._attend(x[:, None], (m - 1 + i)[None], neighbours, num_neighbours,
                                   return_attention)
        return out[:, 0], shares, cache

    def _attend(self, queries: jax.Array, query_positions: jax.Array, neighbours: NeighbourKV,
                num_neighbours: int, return_attention: bool):
        """Row u of `queries` `[B, L, T, d]` attends to row u of `neighbours` (`[B, L, k*r, H, D]`).

        query_positions `[T]`: the queries' offsets from the start of chunk u (the frame the
        neighbour keys were rotated in). Returns (`[B, L, T, d]`, shares `[B, L, k]` | None).
        """
        b, n_chunks, t, _ = queries.shape
        q = self.attention.project_query(queries)  # [B, L, T, H, D]
        if self.relative_positions:
            q = rotary(q, query_positions, self.rope_base)
        heads, head_dim = q.shape[-2:]
        s = neighbours.k.shape[2]
        q = q.reshape(b * n_chunks, t, heads, head_dim)
        keys = neighbours.k.reshape(b * n_chunks, s, heads, head_dim)
        values = neighbours.v.reshape(b * n_chunks, s, heads, head_dim)
        key_mask = neighbours.mask.reshape(b * n_chunks, 1, 1, s)
        ctx = dot_product_attention(q, keys, values, mask=key_mask)
        # A chunk with no neighbour at all gets zero (not the uniform average dot-product
        # attention gives a fully masked row); `where` also zeroes its gradient.
        has_any = key_mask.any(axis=-1, keepdims=True)  # [B*L, 1, 1, 1]
        ctx = jnp.where(has_any, ctx, jnp.zeros((), ctx.dtype))
        out = self.attention.project_output(ctx).reshape(b, n_chunks, t, -1)

        shares = None
        if return_attention:
            weights = attention_weights(q, keys, key_mask)  # [B*L, H, T, k*r]
            per_neighbour = weights.reshape(b * n_chunks, heads, t, num_neighbours, -1).sum(-1)
            shares = per_neighbour.mean(axis=(1, 2)).reshape(b, n_chunks, num_neighbours)
        return out, shares
