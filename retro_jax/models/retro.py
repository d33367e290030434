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

Layer scan (`cfg.scan_layers`, retro_jax/models/scan_layers.py): the decoder layers are
grouped into runs of a repeated group (e.g. [plain, plain, CCA] x 5); the blocks of a run are
stored stacked (`stacked_blocks`, a leading "layers" axis) and a run of more than one repeat
is one `jax.lax.scan` whose body applies the group with the same block methods, remat policy
and dropout keys as the unrolled loop. Without it, `blocks` holds one block per layer and
every layer is its own run. `decode_step` reads the stacked blocks layer by layer (slices),
so the `DecodeCache` has the same per-layer form in both layouts.
"""

from __future__ import annotations

import functools
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
from retro_jax.models.scan_layers import (
    CCA_ENCODER,
    PLAIN,
    Run,
    decoder_runs,
    layer_kinds,
    slice_block,
    stack_blocks,
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
        # Blocks are created layer by layer in both layouts (the same initial parameters
        # for the same seed), then stacked per run position for the scanned layout.
        blocks = [DecoderBlock(cfg, kind != PLAIN, rngs=rngs)
                  for kind in layer_kinds(cfg.num_layers, cfg.cca_layers)]
        if cfg.scan_layers:
            self.blocks = None
            self.stacked_blocks = nnx.List([
                nnx.List([stack_blocks([blocks[layer - 1] for layer in run.layers(j)])
                          for j in range(run.period)])
                for run in decoder_runs(cfg)])
        else:
            self.blocks = nnx.List(blocks)
            self.stacked_blocks = None
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
                      return_cca_attention: bool = False, return_cca_norms: bool = False,
                      dropout_rng: jax.Array | None = None):
        """The final-normed activations `[B, n, d]` (before the output projection).

        Training computes the loss from these in sequence blocks
        (`loss.chunked_cross_entropy`) so the `[B, n, V]` logits never exist at once.
        `dropout_rng`: as in `__call__` (ignored when `cfg.dropout` is 0: nothing random is
        traced). After h come, in this order, what was asked for: `return_cca_attention`'s
        {layer: shares `[B, L, k]`} and `return_cca_norms`'s {layer: `cca_norm_ratio`, a
        float32 scalar}, both keyed by the 1-based CCA layer.
        """
        cfg = self.cfg
        rng = dropout_rng if cfg.dropout > 0 else None
        if neighbours is not None and not cfg.retrieval:
            raise ValueError("this is the baseline (model.retrieval=False, no CCA): "
                             "pass neighbours=None")
        x = shard(self.embed(inputs), ACT_NAMES)
        encoded = neighbour_mask = None
        shares: dict[int, jax.Array] = {}
        norms: dict[int, jax.Array] = {}
        asked = (return_cca_attention, return_cca_norms)
        for run, blocks in zip(decoder_runs(cfg), self._run_blocks(), strict=True):
            if run.repeats == 1:
                x, encoded, neighbour_mask, (unit_shares, unit_norms) = self._apply_group(
                    blocks, run.unit, run.first, x, encoded, neighbour_mask, neighbours, rng,
                    *asked)
                shares.update({run.first + j: share for j, share in unit_shares.items()})
                norms.update({run.first + j: norm for j, norm in unit_norms.items()})
            else:
                x, (unit_shares, unit_norms) = self._scan_run(
                    blocks, run, x, encoded, neighbour_mask, rng, *asked)
                for j, stacked in unit_shares.items():  # [R, B, L, k] per group position
                    shares.update(zip(run.layers(j), stacked))
                for j, stacked in unit_norms.items():  # [R] per group position
                    norms.update(zip(run.layers(j), stacked))
        h = self.final_norm(x)
        extra = [dict(sorted(d.items())) for d, want in zip((shares, norms), asked) if want]
        return (h, *extra) if extra else h

    def _apply_group(self, blocks, unit: tuple[str, ...], first_layer, x, encoded,
                     neighbour_mask, neighbours, rng, return_cca_attention: bool,
                     return_cca_norms: bool = False, in_scan: bool = False):
        """The decoder layers first_layer, first_layer + 1, ... (kinds `unit`, blocks
        `blocks`) on x `[B, n, d]`: the one layer loop of both layouts.

        `first_layer` is an int, or a traced int32 inside a scan (only the dropout keys use
        it: layer l drops with fold_in(rng, l) in both layouts). At the `CCA_ENCODER` layer the
        encoder runs on the activations after its self-attention. Returns (x, encoded,
        neighbour_mask, ({group position: CCA attention shares `[B, L, k]`},
        {group position: `cca_norm_ratio`})), each dict empty unless asked for.
        """
        remat = functools.partial(self._remat, prevent_cse=not in_scan)
        shares, norms = {}, {}
        for j, (block, kind) in enumerate(zip(blocks, unit, strict=True)):
            layer_rng = fold_in(rng, first_layer + j)
            x = remat(DecoderBlock.self_attention)(block, x, dropout_rng=layer_rng)
            if kind == CCA_ENCODER and neighbours is not None:
                encoded, neighbour_mask = remat(Retro._encode)(self, neighbours, x,
                                                               fold_in(rng, ENCODER_RNG))
            if kind != PLAIN and encoded is not None:
                before = x
                x, share = remat(DecoderBlock.chunked_cross_attention, static_argnums=(4,))(
                    block, x, encoded, neighbour_mask, return_cca_attention,
                    dropout_rng=layer_rng)
                if return_cca_attention:
                    shares[j] = share
                if return_cca_norms:
                    norms[j] = cca_norm_ratio(before, x, self.cfg.chunk_len)
            x = remat(DecoderBlock.feed_forward)(block, x, layer_rng)
        return x, encoded, neighbour_mask, (shares, norms)

    def _scan_run(self, stacked: nnx.List, run: Run, x, encoded, neighbour_mask, rng,
                  return_cca_attention: bool, return_cca_norms: bool = False):
        """A run of R > 1 repeats as one `jax.lax.scan` over the stacked blocks `[R, ...]`.

        Carry: x `[B, n, d]`; per step: the group's parameters (row r) and its first layer.
        The encoder never runs here (its layer is unique, so its run has one repeat); the
        encoded neighbours are loop-invariant. The remat policy applies inside the body, to
        the same branches as unrolled (prevent_cse off: the loop already keeps the
        recomputation from being merged with the forward). Returns (x, ({group position:
        shares `[R, B, L, k]`}, {group position: norm ratios `[R]`})).
        """
        graphdef, params = nnx.split(stacked)
        first_layers = run.first + run.period * jnp.arange(run.repeats, dtype=jnp.int32)

        def body(x, xs):
            params, first_layer = xs
            blocks = list(nnx.merge(graphdef, params))
            x, _, _, outputs = self._apply_group(blocks, run.unit, first_layer, x, encoded,
                                                 neighbour_mask, None, rng,
                                                 return_cca_attention, return_cca_norms,
                                                 in_scan=True)
            return x, outputs

        return jax.lax.scan(body, x, (params, first_layers))

    def _run_blocks(self) -> list[list[DecoderBlock]]:
        """Per run of `decoder_runs(cfg)`, the blocks of its group: stacked `[R, ...]` for a
        run that is scanned, plain (row 0 of a stacked run of one) for one that is not."""
        if self.stacked_blocks is None:
            return [[block] for block in self.blocks]
        return [list(stacked) if run.repeats > 1 else [slice_block(b, 0) for b in stacked]
                for run, stacked in zip(decoder_runs(self.cfg), self.stacked_blocks,
                                        strict=True)]

    def layer_blocks(self) -> list[tuple[int, str, DecoderBlock]]:
        """(1-based layer, kind, its block) for every decoder layer in depth order, in either
        layout (a scanned model's blocks are slices of its stacked ones)."""
        if self.stacked_blocks is None:
            kinds = layer_kinds(self.cfg.num_layers, self.cfg.cca_layers)
            return [(layer, kinds[layer - 1], block)
                    for layer, block in enumerate(self.blocks, start=1)]
        out = []
        for run, stacked in zip(decoder_runs(self.cfg), self.stacked_blocks, strict=True):
            for r in range(run.repeats):
                for j, (kind, block) in enumerate(zip(run.unit, stacked, strict=True)):
                    out.append((run.first + r * run.period + j, kind, slice_block(block, r)))
        return out

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
        for layer, kind, block in self.layer_blocks():
            x, layers[layer - 1] = block.self_attention(x, positions, layers[layer - 1])
            if kind == CCA_ENCODER:
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
    def _remat(self, fn, static_argnums=(), prevent_cse: bool = True):
        """`fn` under `nnx.remat` with the configured policy (identity for "none")."""
        if self.cfg.remat == "none":
            return fn
        policy = (jax.checkpoint_policies.checkpoint_dots if self.cfg.remat == "dots"
                  else None)
        return nnx.remat(fn, policy=policy, static_argnums=static_argnums,
                         prevent_cse=prevent_cse)


__all__ = ["Attention", "DecodeCache", "DecoderBlock", "KVCache", "NeighbourKV", "Retro",
           "init_model", "retrofit_filter"]


def cca_norm_ratio(before: jax.Array, after: jax.Array, chunk_len: int) -> jax.Array:
    """How much a CCA layer adds to the residual stream: the mean over the batch and the
    positions that attend to neighbours (m-1 onwards) of |after - before| / |before| (L2 over
    d), float32. ~0 for a CCA layer the model has learnt to silence."""
    delta = jnp.linalg.norm((after - before).astype(jnp.float32), axis=-1)[:, chunk_len - 1:]
    base = jnp.linalg.norm(before.astype(jnp.float32), axis=-1)[:, chunk_len - 1:]
    return jnp.mean(delta / jnp.maximum(base, 1e-6))


def init_model(cfg: RetroConfig, seed: int = 0) -> Retro:
    """`Retro(cfg, rngs=nnx.Rngs(seed))` built by one compiled program.

    Eager construction runs every initializer op by op (slow on CPU); under `nnx.jit` it is
    one XLA computation. The result is the same module with the same values.
    """
    return nnx.jit(lambda: Retro(cfg, rngs=nnx.Rngs(seed)))()
