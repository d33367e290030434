"""The neighbour encoder: a bidirectional transformer over each retrieved [chunk ; continuation].

It runs inside the decoder at the first CCA layer: its cross-attending layers attend to H_u,
the decoder activations of chunk u taken after that layer's self-attention, so a neighbour is
encoded conditioned on the chunk that retrieved it (the paper's "query conditioning").

Shapes: B batch, L chunks, k neighbours per chunk, r = 2m neighbour tokens, w encoder width,
d decoder width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.attention import Attention, dot_product_attention
from retro_jax.models.config import RetroConfig
from retro_jax.models.layers import DenseGeneral, FeedForward, RMSNorm, dropout, fold_in, rotary
from retro_jax.models.sharding import shard

# [batch * chunks * neighbours, neighbour tokens, width]
ENC_NAMES = ("batch", "length", "embed")
# Dropout key tags of an encoder layer's residual branches (the layer's key is
# fold_in(encoder key, 1-based layer)).
SELF_ATTENTION_RNG, CROSS_ATTENTION_RNG, FFW_RNG = 0, 1, 2


def select_neighbour_parts(neighbours: jax.Array, parts: str, chunk_len: int) -> jax.Array:
    """Mask (set to PAD=0) the part of each neighbour the `model.neighbour_parts` ablation drops.

    neighbours: int32 `[B, L, k, 2m]`. "both" keeps everything; "neighbours" zeroes the
    continuations (tokens m..2m-1); "continuations" zeroes the retrieved chunks (tokens 0..m-1).
    """
    if parts == "both":
        return neighbours
    keep_first = parts == "neighbours"
    in_first = jnp.arange(neighbours.shape[-1]) < chunk_len
    keep = in_first if keep_first else ~in_first
    return jnp.where(keep, neighbours, 0)


class EncoderLayer(nnx.Module):
    """Pre-norm: self-attention (bidirectional, padding masked), optional cross-attention to
    H_u, feed-forward."""

    def __init__(self, cfg: RetroConfig, cross_attend: bool, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        w = cfg.encoder_width
        self.rope_base = cfg.rope_base
        self.dropout_rate = cfg.dropout
        self.self_norm = RMSNorm(w, dtype=dtype, rngs=rngs)
        self.self_attention = Attention(w, w, cfg.encoder_heads, cfg.encoder_head_dim, w,
                                        dtype=dtype, rngs=rngs)
        if cross_attend:
            self.cross_norm = RMSNorm(w, dtype=dtype, rngs=rngs)
            # keys/values from the decoder width d: the bridge between the two widths.
            self.cross_attention = Attention(w, cfg.d_model, cfg.encoder_heads,
                                             cfg.encoder_head_dim, w, dtype=dtype, rngs=rngs)
        else:
            self.cross_norm = None
            self.cross_attention = None
        self.ffw_norm = RMSNorm(w, dtype=dtype, rngs=rngs)
        self.ffw = FeedForward(w, cfg.encoder_ffw_dim, cfg.activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array, chunk_h: jax.Array,
                 num_neighbours: int, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: `[B*L*k, r, w]`; key_mask: bool `[B*L*k, r]`; chunk_h: `[B*L, m, d]`.
        `dropout_rng` (this layer's key) turns dropout on its residual branches on."""
        n_seq, r, _ = x.shape
        pos = jnp.arange(r)
        h = self.self_norm(x)
        q = rotary(self.self_attention.project_query(h), pos, self.rope_base)
        k, v = self.self_attention.project_key_value(h)
        k = rotary(k, pos, self.rope_base)
        ctx = dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
        out = dropout(self.self_attention.project_output(ctx), self.dropout_rate,
                      fold_in(dropout_rng, SELF_ATTENTION_RNG))
        x = shard(x + out, ENC_NAMES)

        if self.cross_attention is not None:
            # All k neighbours of chunk u attend to the same H_u: fold k into the query length
            # so H_u's keys/values are projected once per chunk, not once per neighbour.
            # Rotary: a neighbour token at position j and a chunk token at position i are at
            # relative distance j - i (neighbour and chunk are aligned token for token).
            m = chunk_h.shape[1]
            h = self.cross_norm(x)
            q = rotary(self.cross_attention.project_query(h), pos, self.rope_base)
            q = q.reshape(n_seq // num_neighbours, num_neighbours * r, *q.shape[-2:])
            k, v = self.cross_attention.project_key_value(chunk_h)
            k = rotary(k, jnp.arange(m), self.rope_base)
            ctx = dot_product_attention(q, k, v)
            ctx = ctx.reshape(n_seq, r, *ctx.shape[-2:])
            out = dropout(self.cross_attention.project_output(ctx), self.dropout_rate,
                          fold_in(dropout_rng, CROSS_ATTENTION_RNG))
            x = shard(x + out, ENC_NAMES)

        out = dropout(self.ffw(self.ffw_norm(x)), self.dropout_rate, fold_in(dropout_rng, FFW_RNG))
        return shard(x + out, ENC_NAMES)


class NeighbourEncoder(nnx.Module):
    """Encodes neighbour tokens (embedded with the decoder's embedding) conditioned on H_u."""

    def __init__(self, cfg: RetroConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        self.chunk_len = cfg.chunk_len
        self.neighbour_parts = cfg.neighbour_parts
        cross = set(cfg.encoder_cross_attend_layers) if cfg.encoder_query_conditioning else set()
        # The token embedding is shared with the decoder; project it when widths differ.
        self.input_projection = (
            DenseGeneral((cfg.d_model,), (cfg.encoder_width,), ("embed", "mlp"), dtype=dtype,
                         rngs=rngs)
            if cfg.encoder_width != cfg.d_model else None)
        self.layers = nnx.List([EncoderLayer(cfg, (i + 1) in cross, rngs=rngs)
                                for i in range(cfg.encoder_layers)])
        self.final_norm = RMSNorm(cfg.encoder_width, dtype=dtype, rngs=rngs)

    def __call__(self, neighbour_emb: jax.Array, neighbour_mask: jax.Array,
                 decoder_h: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Encode the neighbours of every chunk.

        neighbour_emb: `[B, L, k, r, d]` (embedded tokens); neighbour_mask: bool `[B, L, k, r]`
        (False at padding); decoder_h: `[B, n, d]` with n >= L*m (H at the first CCA layer);
        dropout_rng: the encoder's key (training), None for no dropout.
        Returns `[B, L, k, r, w]`.
        """
        b, n_chunks, k, r, d = neighbour_emb.shape
        m = self.chunk_len
        h = decoder_h[:, : n_chunks * m]
        if h.shape[1] < n_chunks * m:  # a partial last chunk (sampling): pad its H
            h = jnp.pad(h, ((0, 0), (0, n_chunks * m - h.shape[1]), (0, 0)))
        chunk_h = h.reshape(b * n_chunks, m, d)
        x = neighbour_emb.reshape(b * n_chunks * k, r, d)
        if self.input_projection is not None:
            x = self.input_projection(x)
        x = shard(x, ENC_NAMES)
        key_mask = neighbour_mask.reshape(b * n_chunks * k, r)
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, key_mask, chunk_h, k, fold_in(dropout_rng, i))
        x = self.final_norm(x)
        return x.reshape(b, n_chunks, k, r, -1)
