"""Incremental RETRO decoding: one compiled call per token, with a preallocated cache.

Two decoders with one interface, `feed(tokens, pos, neighbours=None) -> next tokens`:

- `CachedDecoder`: per decoder layer the rotated keys and the values of every past position
  (`[B, T, H, D]`, T = max_len, written at `pos` with `dynamic_update_slice`); the decoder
  activations H at the first CCA layer of the current chunk (`[B, m, d]`, what the encoder
  of the chunk attends to once it completes); per CCA layer the projected (rotated)
  keys/values of the encoded neighbours of every completed chunk (`[B, T/m, k*2m, H, D]`),
  so the m tokens that attend to chunk u's neighbours reuse them; and per position the
  share of CCA attention each neighbour got (`[B, T, k]`, averaged over heads and CCA
  layers) for attribution.
- `UncachedDecoder`: the whole model forward over the padded `[B, T]` sequence every token
  (the reference the cached decoder must agree with, and the `--no-cache` baseline).

Timing of retrieval (the CCA shift): the neighbours of chunk u (positions u*m .. u*m+m-1)
are first attended to by its last token, position u*m+m-1. So the step that feeds that token
gets the chunk's neighbour tokens: it runs the layers up to the first CCA layer's
self-attention (which completes H_u), encodes the neighbours conditioned on H_u, projects
their keys/values for every CCA layer into the cache, and carries on. Tokens at positions
< m-1 attend to nothing. Both step programs have static shapes: `pos` and the chunk index
are traced scalars, so each token is one call of one of two compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.models.attention import attention_weights, dot_product_attention
from retro_jax.models.encoder import select_neighbour_parts
from retro_jax.models.layers import rotary
from retro_jax.models.retro import Retro
from retro_jax.sample.sampling import choose_tokens

PAD_ID = 0
Cache = dict[str, jax.Array]


def init_cache(model: Retro, batch: int, max_len: int, num_neighbours: int) -> Cache:
    """Zeroed cache buffers for `batch` sequences of up to `max_len` tokens.

    Shapes: k, v `[layers, B, T, H, D]`; with retrieval also h `[B, m, d]` (the current
    chunk's activations at the first CCA layer, written at pos % m), cca_k, cca_v
    `[cca layers, B, T/m, k*2m, H, D]`, cca_mask bool `[B, T/m, k*2m]`, share f32 `[B, T, k]`.
    """
    cfg = model.cfg
    dtype = cfg.compute_dtype
    m = cfg.chunk_len
    if max_len % m:
        raise ValueError(f"max_len={max_len} must be a multiple of the chunk length {m}")
    cache: Cache = {
        "k": jnp.zeros((cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim), dtype),
        "v": jnp.zeros((cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim), dtype),
    }
    if cfg.retrieval:
        kr = num_neighbours * 2 * m
        n_cca, n_chunks = len(cfg.cca_layers), max_len // m
        cache.update(
            h=jnp.zeros((batch, m, cfg.d_model), dtype),
            cca_k=jnp.zeros((n_cca, batch, n_chunks, kr, cfg.num_heads, cfg.head_dim), dtype),
            cca_v=jnp.zeros((n_cca, batch, n_chunks, kr, cfg.num_heads, cfg.head_dim), dtype),
            cca_mask=jnp.zeros((batch, n_chunks, kr), bool),
            share=jnp.zeros((batch, max_len, num_neighbours), jnp.float32),
        )
    return cache


def _self_attention_step(block, x, k_cache, v_cache, pos):
    """x `[B, 1, d]` at position `pos`; caches `[B, T, H, D]` -> (x, k_cache, v_cache)."""
    positions = pos[None]
    h = block.attention_norm(x)
    q = rotary(block.attention.project_query(h), positions, block.rope_base)
    k, v = block.attention.project_key_value(h)
    k = rotary(k, positions, block.rope_base)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
    mask = (jnp.arange(k_cache.shape[1]) <= pos)[None, None, None, :]  # replaces is_causal
    ctx = dot_product_attention(q, k_cache, v_cache, mask=mask)
    return x + block.attention.project_output(ctx), k_cache, v_cache


def _encode_chunk(model: Retro, neighbours, chunk_h, cache: Cache, u) -> Cache:
    """Encode one chunk's neighbours and cache their CCA keys/values at chunk index `u`.

    neighbours: int32 `[B, k, 2m]`; chunk_h: `[B, m, d]` (H_u at the first CCA layer).
    """
    cfg = model.cfg
    b, k, r = neighbours.shape
    tokens = select_neighbour_parts(neighbours[:, None], cfg.neighbour_parts, cfg.chunk_len)
    mask = tokens != PAD_ID  # [B, 1, k, r]
    encoded = model.encoder(model.embed(tokens), mask, chunk_h)  # [B, 1, k, r, w]
    encoded = encoded.reshape(b, 1, k * r, -1)
    cca_k, cca_v = cache["cca_k"], cache["cca_v"]
    cca_blocks = [block for block in model.blocks if block.cca is not None]
    for j, block in enumerate(cca_blocks):
        kk, vv = block.cca.attention.project_key_value(encoded)  # [B, 1, k*r, H, D]
        if block.cca.relative_positions:
            kk = rotary(kk, jnp.tile(jnp.arange(r), k), block.cca.rope_base)
        at = (j, 0, u, 0, 0, 0)
        cca_k = jax.lax.dynamic_update_slice(cca_k, kk[None].astype(cca_k.dtype), at)
        cca_v = jax.lax.dynamic_update_slice(cca_v, vv[None].astype(cca_v.dtype), at)
    cca_mask = jax.lax.dynamic_update_slice(cache["cca_mask"], mask.reshape(b, 1, k * r),
                                            (0, u, 0))
    return {**cache, "cca_k": cca_k, "cca_v": cca_v, "cca_mask": cca_mask}


def _cca_step(block, x, cca_k, cca_v, cca_mask, pos, num_neighbours: int):
    """CCA of the token at `pos` to the cached neighbours of chunk (pos - (m-1)) // m.

    x `[B, 1, d]`; cca_k/v `[B, T/m, k*r, H, D]`; cca_mask `[B, T/m, k*r]`.
    Returns (x, share `[B, k]` of attention per neighbour, averaged over heads).
    """
    cca = block.cca
    m = cca.chunk_len
    offset = pos - (m - 1)
    u = jnp.maximum(offset, 0) // m
    q = cca.attention.project_query(block.cca_norm(x))  # [B, 1, H, D]
    if cca.relative_positions:
        # Query i of the attending chunk sits at offset m-1+i from the start of chunk u.
        q = rotary(q, (m - 1 + jnp.maximum(offset, 0) % m)[None], cca.rope_base)
    keys = jax.lax.dynamic_index_in_dim(cca_k, u, axis=1, keepdims=False)  # [B, k*r, H, D]
    values = jax.lax.dynamic_index_in_dim(cca_v, u, axis=1, keepdims=False)
    mask = jax.lax.dynamic_index_in_dim(cca_mask, u, axis=1, keepdims=False) & (offset >= 0)
    key_mask = mask[:, None, None, :]  # [B, 1, 1, k*r]
    ctx = dot_product_attention(q, keys, values, mask=key_mask)
    has_any = key_mask.any(axis=-1, keepdims=True)
    ctx = jnp.where(has_any, ctx, jnp.zeros((), ctx.dtype))
    x = x + cca.attention.project_output(ctx)
    weights = attention_weights(q, keys, key_mask)  # [B, H, 1, k*r], zero rows when masked
    b, heads = weights.shape[:2]
    share = weights.reshape(b, heads, num_neighbours, -1).sum(-1).mean(1)  # [B, k]
    return x, share


def decode_step(model: Retro, cache: Cache, tokens: jax.Array, pos: jax.Array,
                neighbours: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Feed `tokens` int32 `[B]` at position `pos`; returns (logits f32 `[B, V]`, cache).

    `neighbours` int32 `[B, k, 2m]`: the neighbours of the chunk that `pos` completes
    (pos = u*m + m-1); None at every other position.
    """
    cfg = model.cfg
    x = model.embed(tokens[:, None])  # [B, 1, d]
    ks, vs = cache["k"], cache["v"]
    cca_index = 0
    shares = []
    for layer, block in enumerate(model.blocks, start=1):
        x, k_l, v_l = _self_attention_step(block, x, ks[layer - 1], vs[layer - 1], pos)
        ks, vs = ks.at[layer - 1].set(k_l), vs.at[layer - 1].set(v_l)
        if cfg.retrieval and layer == cfg.first_cca_layer:
            # H of the current chunk; complete (H_u) when pos is its last token.
            chunk_h = jax.lax.dynamic_update_slice(
                cache["h"], x.astype(cache["h"].dtype), (0, pos % cfg.chunk_len, 0))
            cache = {**cache, "h": chunk_h}
            if neighbours is not None:
                cache = _encode_chunk(model, neighbours, chunk_h, cache, pos // cfg.chunk_len)
        if block.cca is not None:
            x, share = _cca_step(block, x, cache["cca_k"][cca_index], cache["cca_v"][cca_index],
                                 cache["cca_mask"], pos, cache["share"].shape[-1])
            shares.append(share)
            cca_index += 1
        x = block.feed_forward(x)
    cache = {**cache, "k": ks, "v": vs}
    if shares:
        mean_share = jnp.mean(jnp.stack(shares), axis=0)[:, None, :]  # [B, 1, k]
        cache["share"] = jax.lax.dynamic_update_slice(cache["share"], mean_share, (0, pos, 0))
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, cache


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen (static in the compiled steps: hashable)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def choose(self, logits: jax.Array, base_key: jax.Array, pos: jax.Array) -> jax.Array:
        # One key per position: cached and uncached decoding draw the same random numbers.
        rng = jax.random.fold_in(base_key, pos)
        return choose_tokens(logits, rng, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p)


# Module-level compiled steps, keyed by (graph, settings, shapes): decoders of the same model
# and sizes share the compiled programs.
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _cached_step(graphdef, settings: SamplingSettings, state, cache, tokens, pos, base_key,
                 neighbours):
    model = nnx.merge(graphdef, state)
    logits, cache = decode_step(model, cache, tokens, pos, neighbours)
    return settings.choose(logits, base_key, pos), logits, cache


@functools.partial(jax.jit, static_argnums=0)
def _choose(settings: SamplingSettings, logits, base_key, pos):
    return settings.choose(logits, base_key, pos)


class _Decoder:
    """What both decoders hold: the model split for jit, the sampling settings and key."""

    def __init__(self, model: Retro, *, batch: int, max_len: int, num_neighbours: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        self.cfg = model.cfg
        self.max_len = max_len
        self.num_neighbours = num_neighbours
        self.batch = batch
        self._model = model
        self._graphdef, self._state = nnx.split(model)
        self._settings = SamplingSettings(float(temperature), int(top_k), float(top_p))
        self._base_key = jax.random.key(seed)
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError


class CachedDecoder(_Decoder):
    """Token-by-token decoding with a KV cache; each `feed` is one compiled call.

    decoder = CachedDecoder(model, batch=1, max_len=256, num_neighbours=2, temperature=0)
    next_tokens = decoder.feed(tokens [B], pos, neighbours [B, k, 2m] | None)
    """

    def reset(self) -> None:
        self.cache = init_cache(self._model, self.batch, self.max_len, self.num_neighbours)

    def feed(self, tokens: Any, pos: int, neighbours: Any | None = None, *,
             need_output: bool = True) -> jax.Array:
        """Feed int32 `[B]` at `pos` (< max_len); returns the chosen next tokens int32 `[B]`
        (every position updates the cache, so `need_output` is ignored)."""
        del need_output
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} outside the cache [0, {self.max_len})")
        if neighbours is not None:
            neighbours = jnp.asarray(neighbours, jnp.int32)
        next_tokens, self.last_logits, self.cache = _cached_step(
            self._graphdef, self._settings, self._state, self.cache,
            jnp.asarray(tokens, jnp.int32), jnp.int32(pos), self._base_key, neighbours)
        return next_tokens

    def attention_shares(self, length: int) -> np.ndarray:
        """f32 `[B, L, k]`: for attending chunk u (positions u*m+m-1 .. u*m+2m-2, cut at
        `length`), the mean over its tokens of each neighbour of chunk u's share of CCA
        attention (summed over the neighbour's 2m tokens, averaged over heads and CCA layers).
        Rows of chunks without neighbours (or without attending tokens yet) are zero."""
        return _shares_from_positions(np.asarray(self.cache["share"]), self.cfg.chunk_len,
                                      length)


def _shares_from_positions(per_position: np.ndarray, m: int, length: int) -> np.ndarray:
    b, _, k = per_position.shape
    n_chunks = max(0, -(-(length - (m - 1)) // m))
    out = np.zeros((b, n_chunks, k), np.float32)
    for u in range(n_chunks):
        first, last = u * m + m - 1, min(u * m + 2 * m - 1, length)
        out[:, u] = per_position[:, first:last].mean(axis=1)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens, neighbours):
    model = nnx.merge(graphdef, state)
    if neighbours is None:
        return model(tokens), {}
    return model(tokens, neighbours, return_cca_attention=True)


class UncachedDecoder(_Decoder):
    """The reference: the full model forward over the padded sequence `[B, T]` every token.

    Causal masking makes padding after `pos` invisible to positions <= pos, and chunks not yet
    completed have no neighbours (all-padding rows, CCA output zero), so the logits at `pos`
    equal those of a forward over exactly the tokens fed so far.
    """

    def reset(self) -> None:
        m = self.cfg.chunk_len
        self.tokens = np.zeros((self.batch, self.max_len), np.int32)
        self.neighbours = (np.zeros((self.batch, self.max_len // m, self.num_neighbours, 2 * m),
                                    np.int32) if self.cfg.retrieval else None)
        self._shares: dict[int, np.ndarray] = {}

    def feed(self, tokens: Any, pos: int, neighbours: Any | None = None, *,
             need_output: bool = True) -> jax.Array | None:
        """As `CachedDecoder.feed`; with `need_output=False` (prompt tokens before the last)
        only records the token and neighbours (no forward) and returns None."""
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} outside [0, {self.max_len})")
        self.tokens[:, pos] = np.asarray(tokens)
        if neighbours is not None:
            self.neighbours[:, pos // self.cfg.chunk_len] = np.asarray(neighbours)
        if not need_output:
            return None
        logits, shares = _full_forward(self._graphdef, self._state, jnp.asarray(self.tokens),
                                       None if self.neighbours is None
                                       else jnp.asarray(self.neighbours))
        self._shares = shares
        self.last_logits = logits[:, pos]
        return _choose(self._settings, self.last_logits, self._base_key, jnp.int32(pos))

    def attention_shares(self, length: int) -> np.ndarray:
        """As `CachedDecoder.attention_shares`, from the model's own CCA attention of the last
        forward (exact for complete attending chunks; the last, partial one also counts
        its not-yet-fed padding queries)."""
        m = self.cfg.chunk_len
        n_chunks = max(0, -(-(length - (m - 1)) // m))
        if not self._shares:
            return np.zeros((self.batch, n_chunks, self.num_neighbours), np.float32)
        mean = np.mean([np.asarray(s) for s in self._shares.values()], axis=0)
        return mean[:, :n_chunks]
