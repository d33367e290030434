"""Incremental RETRO decoding: one compiled call per token, with a preallocated cache.

Two decoders with one interface, `feed(tokens, pos, neighbours=None) -> next tokens`:

- `CachedDecoder`: each token is one `Retro.decode_step` (the model's own blocks, each reading
  and updating its part of a `DecodeCache`): per decoder layer the rotated keys and the values
  of every past position (`[B, T, H, D]`, T = max_len, written at `pos`); the decoder
  activations H at the first CCA layer of the current chunk (`[B, m, d]`, what the encoder of
  the chunk attends to once it completes); per CCA layer the projected (rotated) keys/values
  of the encoded neighbours of every completed chunk (`[B, T/m, k*2m, H, D]`), so the m
  tokens that attend to chunk u's neighbours reuse them. Next to the cache it keeps, per
  position, the share of CCA attention each neighbour got (`[B, T, k]`, averaged over heads
  and CCA layers) for attribution.
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

from retro_jax.models.attention import KVCache
from retro_jax.models.cca import NeighbourKV
from retro_jax.models.retro import DecodeCache, Retro
from retro_jax.sample.sampling import choose_tokens


def init_cache(model: Retro, batch: int, max_len: int, num_neighbours: int) -> DecodeCache:
    """A zeroed `DecodeCache` for `batch` sequences of up to `max_len` tokens.

    Shapes: per decoder layer a `KVCache` k, v `[B, T, H, D]`; with retrieval also chunk_h
    `[B, m, d]` (the current chunk's activations at the first CCA layer, written at pos % m)
    and per CCA layer a `NeighbourKV` k, v `[B, T/m, k*2m, H, D]`, mask bool `[B, T/m, k*2m]`.
    """
    cfg = model.cfg
    dtype = cfg.compute_dtype
    m = cfg.chunk_len
    if max_len % m:
        raise ValueError(f"max_len={max_len} must be a multiple of the chunk length {m}")
    heads = (cfg.num_heads, cfg.head_dim)
    layers = tuple(KVCache(jnp.zeros((batch, max_len) + heads, dtype),
                           jnp.zeros((batch, max_len) + heads, dtype))
                   for _ in range(cfg.num_layers))
    if not cfg.retrieval:
        return DecodeCache(layers, None, ())
    kr, n_chunks = num_neighbours * 2 * m, max_len // m
    cca = tuple(NeighbourKV(jnp.zeros((batch, n_chunks, kr) + heads, dtype),
                            jnp.zeros((batch, n_chunks, kr) + heads, dtype),
                            jnp.zeros((batch, n_chunks, kr), bool))
                for _ in cfg.cca_layers)
    return DecodeCache(layers, jnp.zeros((batch, m, cfg.d_model), dtype), cca)


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
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _cached_step(graphdef, settings: SamplingSettings, state, cache: DecodeCache, shares,
                 tokens, pos, base_key, neighbours):
    """One `decode_step` and the choice of the next tokens; `shares` f32 `[B, T, k]` (None
    for the baseline) gets this position's CCA attention shares, averaged over CCA layers."""
    model = nnx.merge(graphdef, state)
    if shares is None:
        logits, cache = model.decode_step(tokens, pos, cache, neighbours)
    else:
        logits, cache, per_layer = model.decode_step(tokens, pos, cache, neighbours,
                                                     return_cca_attention=True)
        mean_share = jnp.mean(jnp.stack(list(per_layer.values())), axis=0)[:, None, :]
        shares = jax.lax.dynamic_update_slice(shares, mean_share, (0, pos, 0))
    return settings.choose(logits, base_key, pos), logits, cache, shares


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
        self.shares = (jnp.zeros((self.batch, self.max_len, self.num_neighbours), jnp.float32)
                       if self.cfg.retrieval else None)

    def feed(self, tokens: Any, pos: int, neighbours: Any | None = None, *,
             need_output: bool = True) -> jax.Array:
        """Feed int32 `[B]` at `pos` (< max_len); returns the chosen next tokens int32 `[B]`
        (every position updates the cache, so `need_output` is ignored)."""
        del need_output
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} outside the cache [0, {self.max_len})")
        if neighbours is not None:
            neighbours = jnp.asarray(neighbours, jnp.int32)
        next_tokens, self.last_logits, self.cache, self.shares = _cached_step(
            self._graphdef, self._settings, self._state, self.cache, self.shares,
            jnp.asarray(tokens, jnp.int32), jnp.int32(pos), self._base_key, neighbours)
        return next_tokens

    def attention_shares(self, length: int) -> np.ndarray:
        """f32 `[B, L, k]`: for attending chunk u (positions u*m+m-1 .. u*m+2m-2, cut at
        `length`), the mean over its tokens of each neighbour of chunk u's share of CCA
        attention (summed over the neighbour's 2m tokens, averaged over heads and CCA layers).
        Rows of chunks without neighbours (or without attending tokens yet) are zero."""
        return _shares_from_positions(np.asarray(self.shares), self.cfg.chunk_len, length)


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
