"""The RETRO model: decoder with chunked cross-attention, neighbour encoder, output layer.

    logits = Retro(cfg, rngs=nnx.Rngs(0))(inputs [B, n], neighbours [B, L, k, 2m] | None)

Modes (one class):
- RETRO[ON]: neighbours given.
- RETRO[OFF]: the same weights with `neighbours=None`: CCA contributes zero, exactly as if
  every neighbour were padding.
- baseline: `cfg.cca_layers == ()` (model.retrieval=False): no CCA and no encoder parameters.
- retrofitting: train only `nnx.state(model, retrofit_filter)` (CCA + encoder).

Decoder layer l (1-based, pre-norm): x += SelfAttn(norm(x)); at the first CCA layer the encoder
runs on the neighbours, attending to H = x (after this layer's self-attention); at CCA layers
x += CCA(norm(x), encoded); x += FFW(norm(x)). Final RMSNorm, then the output projection
(tied to the embedding or not).

Dropout (`cfg.dropout`, training only): on every residual branch, `x += Dropout(Branch(norm(x)))`,
in the decoder (self-attention, CCA, FFW) and the encoder (self-attention, cross-attention to
H_u, FFW). It is on exactly when the forward pass is given a `dropout_rng`; each site draws
from its own key, `fold_in`ed from that one by (layer, branch), so no RNG state is carried
(evaluation and sampling pass no key and are deterministic).

Decoding: `Retro.decode_step(tokens [B], pos, cache, neighbours)` feeds one token per call
through the same block methods as the forward pass, each given its slice of a `DecodeCache`
(the self-attention keys/values of every layer, the CCA keys/values of every completed chunk).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.attention import Attention, KVCache, cache_mask, dot_product_attention
from retro_jax.models.cca import ChunkedCrossAttention, NeighbourKV
from retro_jax.models.config import RetroConfig
from retro_jax.models.encoder import NeighbourEncoder, select_neighbour_parts
from retro_jax.models.layers import (
    DenseGeneral,
    Embed,
    FeedForward,
    RMSNorm,
    dropout,
    fold_in,
    rotary,
    row_matmul,
)
from retro_jax.models.sharding import shard

ACT_NAMES = ("batch", "length", "embed")
PAD_ID = 0

# nnx filter: the parameters retrofitting trains (every CCA and the encoder); the rest of the
# model (embedding, decoder self-attention and FFW, output) stays frozen.
# `cca_norm` (the CCA pre-norm) is listed on its own: PathContains matches whole path parts.
retrofit_filter = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("cca"),
                                             nnx.PathContains("cca_norm"),
                                             nnx.PathContains("encoder")))

# Dropout key tags: decoder layer l (1-based) gets fold_in(rng, l), the encoder fold_in(rng, 0);
# within a layer each residual branch folds in its own tag.
ENCODER_RNG = 0
SELF_ATTENTION_RNG, CCA_RNG, FFW_RNG = 0, 1, 2


class DecoderBlock(nnx.Module):
    """One decoder layer; `cca` is None at layers without chunked cross-attention."""

    def __init__(self, cfg: RetroConfig, has_cca: bool, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        d = cfg.d_model
        self.rope_base = cfg.rope_base
        self.dropout_rate = cfg.dropout
        self.attention_norm = RMSNorm(d, dtype=dtype, rngs=rngs)
        self.attention = Attention(d, d, cfg.num_heads, cfg.head_dim, d, dtype=dtype, rngs=rngs)
        self.cca_norm = RMSNorm(d, dtype=dtype, rngs=rngs) if has_cca else None
        self.cca = ChunkedCrossAttention(cfg, rngs=rngs) if has_cca else None
        self.ffw_norm = RMSNorm(d, dtype=dtype, rngs=rngs)
        self.ffw = FeedForward(d, cfg.ffw_dim, cfg.activation, dtype=dtype, rngs=rngs)

    def self_attention(self, x: jax.Array, positions: jax.Array | None = None,
                       cache: KVCache | None = None, dropout_rng: jax.Array | None = None):
        """`x + CausalSelfAttn(norm(x))`, rotary on `positions` `[T]` (default 0..T-1).

        Without a cache: `[B, T, d] -> [B, T, d]`, causal within x.
        With a `KVCache` (`[B, S, H, D]`): x holds the tokens at the consecutive `positions`;
        their rotated keys and values are written into the cache, and each attends to every
        cached position up to its own. Returns (`[B, T, d]`, the updated cache).
        `dropout_rng` (this layer's key) turns dropout on.
        """
        if positions is None:
            positions = jnp.arange(x.shape[1])
        h = self.attention_norm(x)
        q = rotary(self.attention.project_query(h), positions, self.rope_base)
        k, v = self.attention.project_key_value(h)
        k = rotary(k, positions, self.rope_base)
        if cache is None:
            ctx = dot_product_attention(q, k, v, is_causal=True)
        else:
            cache = cache.write(k, v, positions[0])
            ctx = dot_product_attention(q, cache.k, cache.v,
                                        mask=cache_mask(positions, cache.k.shape[1]))
        out = dropout(self.attention.project_output(ctx), self.dropout_rate,
                      fold_in(dropout_rng, SELF_ATTENTION_RNG))
        x = shard(x + out, ACT_NAMES)
        return x if cache is None else (x, cache)

    def chunked_cross_attention(self, x: jax.Array, encoded: jax.Array | None,
                                neighbour_mask: jax.Array | None, return_attention: bool = False,
                                positions: jax.Array | None = None,
                                cache: NeighbourKV | None = None,
                                dropout_rng: jax.Array | None = None):
        """`x + CCA(norm(x), encoded)` and the per-neighbour attention shares (None unless
        `return_attention`); with a cache, also the updated cache (`ChunkedCrossAttention`
        has the shapes of both paths). `dropout_rng` (this layer's key) turns dropout on."""
        out = self.cca(self.cca_norm(x), encoded, neighbour_mask,
                       return_attention=return_attention, positions=positions, cache=cache)
        delta = dropout(out[0], self.dropout_rate, fold_in(dropout_rng, CCA_RNG))
        x = shard(x + delta, ACT_NAMES)
        return (x,) + tuple(out[1:])

    def feed_forward(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """`x + FFW(norm(x))`: `[B, T, d] -> [B, T, d]`; `dropout_rng` turns dropout on."""
        out = dropout(self.ffw(self.ffw_norm(x)), self.dropout_rate,
                      fold_in(dropout_rng, FFW_RNG))
        return shard(x + out, ACT_NAMES)


class DecodeCache(NamedTuple):
    """What `Retro.decode_step` carries from one token to the next
    (`retro_jax.sample.decode.init_cache` allocates it for a batch and a maximum length T).

    layers: a `KVCache` per decoder layer, `[B, T, H, D]`.
    chunk_h: `[B, m, d]`, the current chunk's activations after the first CCA layer's
      self-attention (written at pos % m; complete, H_u, at the chunk's last token, when its
      neighbours are encoded); None for the baseline.
    cca: a `NeighbourKV` per CCA layer, `[B, T/m, k*2m, H, D]` (mask `[B, T/m, k*2m]`).
    """

    layers: tuple[KVCache, ...]
    chunk_h: jax.Array | None
    cca: tuple[NeighbourKV, ...]


class Retro(nnx.Module):
    """RETRO (or its baseline when `cfg.cca_layers` is empty)."""

    def __init__(self, cfg: RetroConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        cca = set(cfg.cca_layers)
        self.blocks = nnx.List([DecoderBlock(cfg, (i + 1) in cca, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.encoder = NeighbourEncoder(cfg, rngs=rngs) if cfg.retrieval else None
        self.final_norm = RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.output = (None if cfg.tie_embeddings else
                       DenseGeneral((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                                    dtype=dtype, rngs=rngs))

    # ------------------------------------------------------------------ forward
    def __call__(self, inputs: jax.Array, neighbours: jax.Array | None = None, *,
                 return_cca_attention: bool = False, dropout_rng: jax.Array | None = None):
        """inputs int32 `[B, n]`, neighbours int32 `[B, L, k, 2m]` | None ->
        logits float32 `[B, n, V]`; with `return_cca_attention`, also a dict
        {1-based CCA layer: share of attention per neighbour `[B, L, k]`}.
        `dropout_rng` (a PRNG key): training mode, dropout at rate `cfg.dropout`."""
        if return_cca_attention:
            h, shares = self.hidden_states(inputs, neighbours, return_cca_attention=True,
                                           dropout_rng=dropout_rng)
            return self.logits(h), shares
        return self.logits(self.hidden_states(inputs, neighbours, dropout_rng=dropout_rng))

    def hidden_states(self, inputs: jax.Array, neighbours: jax.Array | None = None, *,
                      return_cca_attention: bool = False, dropout_rng: jax.Array | None = None):
        """The final-normed activations `[B, n, d]` (before the output projection).

        Training computes the loss from these in sequence blocks
        (`loss.chunked_cross_entropy`) so the `[B, n, V]` logits never exist at once.
        `dropout_rng`: as in `__call__` (ignored when `cfg.dropout` is 0: nothing random is
        traced).
        """
        cfg = self.cfg
        rng = dropout_rng if cfg.dropout > 0 else None
        if neighbours is not None and not cfg.retrieval:
            raise ValueError("this is the baseline (model.retrieval=False, no CCA): "
                             "pass neighbours=None")
        x = shard(self.embed(inputs), ACT_NAMES)
        encoded = neighbour_mask = None
        shares: dict[int, jax.Array] = {}
        remat = self._remat
        for layer, block in enumerate(self.blocks, start=1):
            layer_rng = fold_in(rng, layer)
            x = remat(DecoderBlock.self_attention)(block, x, dropout_rng=layer_rng)
            if layer == cfg.first_cca_layer and neighbours is not None:
                encoded, neighbour_mask = remat(Retro._encode)(self, neighbours, x,
                                                               fold_in(rng, ENCODER_RNG))
            if block.cca is not None and encoded is not None:
                x, share = remat(DecoderBlock.chunked_cross_attention, static_argnums=(4,))(
                    block, x, encoded, neighbour_mask, return_cca_attention,
                    dropout_rng=layer_rng)
                if return_cca_attention:
                    shares[layer] = share
            x = remat(DecoderBlock.feed_forward)(block, x, layer_rng)
        h = self.final_norm(x)
        return (h, shares) if return_cca_attention else h

    def decode_step(self, tokens: jax.Array, pos: jax.Array, cache: DecodeCache,
                    neighbours: jax.Array | None = None, *, return_cca_attention: bool = False):
        """Feed `tokens` int32 `[B]` at position `pos` (int32 scalar, may be traced): the
        forward pass of one token, reading and updating `cache`.

        neighbours int32 `[B, k, 2m]`: the neighbours of the chunk that `pos` completes
        (pos = u*m + m-1), encoded now (conditioned on H_u) for the m tokens that attend to
        them; None at every other position.
        Returns (logits f32 `[B, V]`, cache); with `return_cca_attention` also
        {1-based CCA layer: this token's share of attention per neighbour `[B, k]`}.
        The logits equal those of `__call__` on the tokens fed so far, with the same
        neighbours (tested).
        """
        cfg = self.cfg
        if neighbours is not None and not cfg.retrieval:
            raise ValueError("this is the baseline (model.retrieval=False, no CCA): "
                             "pass neighbours=None")
        pos = jnp.asarray(pos, jnp.int32)
        positions = pos[None]
        layers, cca, chunk_h = list(cache.layers), list(cache.cca), cache.chunk_h
        x = self.embed(tokens[:, None])  # [B, 1, d]
        encoded = neighbour_mask = None
        shares: dict[int, jax.Array] = {}
        cca_index = 0
        for layer, block in enumerate(self.blocks, start=1):
            x, layers[layer - 1] = block.self_attention(x, positions, layers[layer - 1])
            if layer == cfg.first_cca_layer:
                # H of the current chunk; complete (H_u) when pos is its last token.
                chunk_h = jax.lax.dynamic_update_slice(chunk_h, x.astype(chunk_h.dtype),
                                                       (0, pos % cfg.chunk_len, 0))
                if neighbours is not None:
                    encoded, neighbour_mask = self._encode(neighbours[:, None], chunk_h)
            if block.cca is not None:
                x, share, cca[cca_index] = block.chunked_cross_attention(
                    x, encoded, neighbour_mask, return_cca_attention, positions, cca[cca_index])
                if return_cca_attention:
                    shares[layer] = share[:, 0]
                cca_index += 1
            x = block.feed_forward(x)
        logits = self.logits(self.final_norm(x))[:, 0]
        cache = DecodeCache(tuple(layers), chunk_h, tuple(cca))
        return (logits, cache, shares) if return_cca_attention else (logits, cache)

    def _encode(self, neighbours: jax.Array, decoder_h: jax.Array,
                dropout_rng: jax.Array | None = None):
        """neighbours int32 `[B, L, k, 2m]` -> (encoded `[B, L, k, 2m, w]`,
        mask `[B, L, k, 2m]`)."""
        tokens = select_neighbour_parts(neighbours, self.cfg.neighbour_parts, self.cfg.chunk_len)
        mask = tokens != PAD_ID
        encoded = self.encoder(self.neighbour_embedding(tokens), mask, decoder_h, dropout_rng)
        return encoded, mask

    def neighbour_embedding(self, tokens: jax.Array) -> jax.Array:
        """Neighbour tokens int32 `[...]` -> the encoder's input `[..., d]`.

        `model.encoder_embedding`: "input" reads the decoder's token embedding (the paper).
        "output" reads each token's column of the output projection, scaled by sqrt(d) to the
        embedding's unit scale (with tied embeddings the two are the same table). A
        neighbour token then enters the encoder as the direction that raises its own logit,
        so carrying it through CCA into the decoder's prediction is close to an identity map
        from the first step: copying forms in far fewer steps
        (docs/notes/retrieval_learning.md).
        """
        if self.cfg.encoder_embedding == "output":
            table = self.output_weights().T * (self.cfg.d_model ** 0.5)  # [V, d]
            return jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
        return self.embed(tokens)

    def output_weights(self) -> jax.Array:
        """The output projection `[d, V]` (compute dtype), the 1/sqrt(d) of tying included."""
        if self.output is None:
            w = self.embed.embedding[...].T * (self.cfg.d_model ** -0.5)
        else:
            w = self.output.kernel[...]
        return w.astype(self.cfg.compute_dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """`[B, n, d] -> float32 [B, n, V]`."""
        logits = row_matmul(h.astype(self.cfg.compute_dtype), self.output_weights(),
                            preferred_element_type=jnp.float32)
        return shard(logits, ("batch", "length", "vocab"))

    # ------------------------------------------------------------------ helpers
    def _remat(self, fn, static_argnums=()):
        """`fn` under `nnx.remat` with the configured policy (identity for "none")."""
        if self.cfg.remat == "none":
            return fn
        policy = (jax.checkpoint_policies.checkpoint_dots if self.cfg.remat == "dots"
                  else None)
        return nnx.remat(fn, policy=policy, static_argnums=static_argnums)


__all__ = ["Attention", "DecodeCache", "DecoderBlock", "KVCache", "NeighbourKV", "Retro",
           "init_model", "retrofit_filter"]


def init_model(cfg: RetroConfig, seed: int = 0) -> Retro:
    """`Retro(cfg, rngs=nnx.Rngs(seed))` built by one compiled program.

    Eager construction runs every initializer op by op (slow on CPU); under `nnx.jit` it is
    one XLA computation. The result is the same module with the same values.
    """
    return nnx.jit(lambda: Retro(cfg, rngs=nnx.Rngs(seed)))()
