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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.attention import Attention, dot_product_attention
from retro_jax.models.cca import ChunkedCrossAttention
from retro_jax.models.config import RetroConfig
from retro_jax.models.encoder import NeighbourEncoder, select_neighbour_parts
from retro_jax.models.layers import DenseGeneral, Embed, FeedForward, RMSNorm, rotary, row_matmul
from retro_jax.models.sharding import shard

ACT_NAMES = ("batch", "length", "embed")
PAD_ID = 0

# nnx filter: the parameters retrofitting trains (every CCA and the encoder); the rest of the
# model (embedding, decoder self-attention and FFW, output) stays frozen.
# `cca_norm` (the CCA pre-norm) is listed on its own: PathContains matches whole path parts.
retrofit_filter = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("cca"),
                                             nnx.PathContains("cca_norm"),
                                             nnx.PathContains("encoder")))


class DecoderBlock(nnx.Module):
    """One decoder layer; `cca` is None at layers without chunked cross-attention."""

    def __init__(self, cfg: RetroConfig, has_cca: bool, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        d = cfg.d_model
        self.rope_base = cfg.rope_base
        self.attention_norm = RMSNorm(d, dtype=dtype, rngs=rngs)
        self.attention = Attention(d, d, cfg.num_heads, cfg.head_dim, d, dtype=dtype, rngs=rngs)
        self.cca_norm = RMSNorm(d, dtype=dtype, rngs=rngs) if has_cca else None
        self.cca = ChunkedCrossAttention(cfg, rngs=rngs) if has_cca else None
        self.ffw_norm = RMSNorm(d, dtype=dtype, rngs=rngs)
        self.ffw = FeedForward(d, cfg.ffw_dim, cfg.activation, dtype=dtype, rngs=rngs)

    def self_attention(self, x: jax.Array) -> jax.Array:
        """`x + CausalSelfAttn(norm(x))`, rotary on positions 0..n-1: `[B, n, d] -> [B, n, d]`."""
        pos = jnp.arange(x.shape[1])
        h = self.attention_norm(x)
        q = rotary(self.attention.project_query(h), pos, self.rope_base)
        k, v = self.attention.project_key_value(h)
        k = rotary(k, pos, self.rope_base)
        ctx = dot_product_attention(q, k, v, is_causal=True)
        return shard(x + self.attention.project_output(ctx), ACT_NAMES)

    def chunked_cross_attention(self, x: jax.Array, encoded: jax.Array,
                                neighbour_mask: jax.Array, return_attention: bool = False):
        """`x + CCA(norm(x), encoded)`; also the per-neighbour attention shares if asked."""
        delta, shares = self.cca(self.cca_norm(x), encoded, neighbour_mask,
                                 return_attention=return_attention)
        return shard(x + delta, ACT_NAMES), shares

    def feed_forward(self, x: jax.Array) -> jax.Array:
        return shard(x + self.ffw(self.ffw_norm(x)), ACT_NAMES)


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
                 return_cca_attention: bool = False):
        """inputs int32 `[B, n]`, neighbours int32 `[B, L, k, 2m]` | None ->
        logits float32 `[B, n, V]`; with `return_cca_attention`, also a dict
        {1-based CCA layer: share of attention per neighbour `[B, L, k]`}."""
        if return_cca_attention:
            h, shares = self.hidden_states(inputs, neighbours, return_cca_attention=True)
            return self.logits(h), shares
        return self.logits(self.hidden_states(inputs, neighbours))

    def hidden_states(self, inputs: jax.Array, neighbours: jax.Array | None = None, *,
                      return_cca_attention: bool = False):
        """The final-normed activations `[B, n, d]` (before the output projection).

        Training computes the loss from these in sequence blocks
        (`loss.chunked_cross_entropy`) so the `[B, n, V]` logits never exist at once.
        """
        cfg = self.cfg
        if neighbours is not None and not cfg.retrieval:
            raise ValueError("this is the baseline (model.retrieval=False, no CCA): "
                             "pass neighbours=None")
        x = shard(self.embed(inputs), ACT_NAMES)
        encoded = neighbour_mask = None
        shares: dict[int, jax.Array] = {}
        remat = self._remat
        for layer, block in enumerate(self.blocks, start=1):
            x = remat(DecoderBlock.self_attention)(block, x)
            if layer == cfg.first_cca_layer and neighbours is not None:
                encoded, neighbour_mask = remat(Retro._encode)(self, neighbours, x)
            if block.cca is not None and encoded is not None:
                x, share = remat(DecoderBlock.chunked_cross_attention, static_argnums=(4,))(
                    block, x, encoded, neighbour_mask, return_cca_attention)
                if return_cca_attention:
                    shares[layer] = share
            x = remat(DecoderBlock.feed_forward)(block, x)
        h = self.final_norm(x)
        return (h, shares) if return_cca_attention else h

    def _encode(self, neighbours: jax.Array, decoder_h: jax.Array):
        """neighbours int32 `[B, L, k, 2m]` -> (encoded `[B, L, k, 2m, w]`,
        mask `[B, L, k, 2m]`)."""
        tokens = select_neighbour_parts(neighbours, self.cfg.neighbour_parts, self.cfg.chunk_len)
        mask = tokens != PAD_ID
        encoded = self.encoder(self.embed(tokens), mask, decoder_h)
        return encoded, mask

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


__all__ = ["Attention", "DecoderBlock", "Retro", "init_model", "retrofit_filter"]


def init_model(cfg: RetroConfig, seed: int = 0) -> Retro:
    """`Retro(cfg, rngs=nnx.Rngs(seed))` built by one compiled program.

    Eager construction runs every initializer op by op (slow on CPU); under `nnx.jit` it is
    one XLA computation. The result is the same module with the same values.
    """
    return nnx.jit(lambda: Retro(cfg, rngs=nnx.Rngs(seed)))()
