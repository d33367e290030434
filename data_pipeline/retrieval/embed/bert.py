"""A BERT encoder in Flax NNX, the architecture of Hugging Face's `BertModel` (post-LN).

Shapes: B = batch, L = padded WordPiece length, D = hidden size, H = heads, K = head dim
(D = H * K), F = feed-forward width.

    embeddings   word[ids] + position[0..L) + token_type[0]  -> LayerNorm        [B, L, D]
    layer x N    h = LN(h + Wo · attention(Wqkv · h))     (scanned, stacked)    [B, L, D]
                 h = LN(h + W2 · gelu_erf(W1 · h))
    output       last-layer hidden states (no pooler: keys mean-pool these)      [B, L, D]

The query, key and value projections are one fused [D, 3D] matmul (one weight read, one
kernel launch); `weights.py` concatenates Hugging Face's three matrices into it.
Only inference is needed (the retriever is frozen), so there is no dropout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from data_pipeline.errors import DataError


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT `config.json` the encoder reads."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Reads `config.json`; DataError names the file and the missing or odd key."""
        try:
            raw: dict[str, Any] = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(
                f"{path}: no config.json; a BERT embedder directory needs config.json, "
                "model.safetensors and tokenizer.json or vocab.txt"
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise DataError(f"{path}: model_type is {model_type!r}; expected 'bert'")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in raw
        )
        if missing:
            raise DataError(f"{path}: missing keys {missing} (a Hugging Face BERT config.json)")
        cfg = cls(**{k: v for k, v in raw.items() if k in fields})
        if cfg.hidden_act not in ("gelu", "gelu_python"):
            raise DataError(
                f"{path}: hidden_act is {cfg.hidden_act!r}; this encoder implements the exact "
                "(erf) 'gelu' of BERT only"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise DataError(
                f"{path}: position_embedding_type is {raw['position_embedding_type']!r}; "
                "only 'absolute' is implemented"
            )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise DataError(
                f"{path}: hidden_size {cfg.hidden_size} is not a multiple of "
                f"num_attention_heads {cfg.num_attention_heads}"
            )
        return cfg


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it: E[x^2]-E[x]^2 loses digits the reference keeps.
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class BertLayer(nnx.Module):
    """One post-LN transformer layer: self-attention, then a GELU feed-forward."""

    def __init__(self, cfg: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.qkv = linear(d, 3 * d)
        self.attention_out = linear(d, d)
        self.attention_norm = _layer_norm(cfg, rngs)
        self.intermediate = linear(d, f)
        self.output = linear(f, d)
        self.output_norm = _layer_norm(cfg, rngs)

    def __call__(self, hidden: jax.Array, attention_bias: jax.Array) -> jax.Array:
        """hidden [B, L, D]; attention_bias [B, 1, 1, L] (0 for tokens, -large for padding)."""
        batch, length, _ = hidden.shape
        qkv = self.qkv(hidden).reshape(batch, length, 3, self.num_heads, self.head_dim)
        # Heads-major [3, B, H, L, K]: both attention matmuls then run as plain batched
        # matmuls over (B, H) without the per-head strided reads XLA:CPU is slow at.
        qkv = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        query = qkv[0] * jnp.asarray(self.head_dim**-0.5, qkv.dtype)
        key, value = qkv[1], qkv[2]
        # Scores and softmax in float32 even on the bfloat16 path: padding biases need range.
        scores = jnp.einsum("bhqk,bhsk->bhqs", query, key, preferred_element_type=jnp.float32)
        scores = scores + attention_bias
        # Softmax with the division after the second matmul: [B, H, L, K] divisions, not
        # [B, H, L, L] (same result up to rounding).
        weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        context = jnp.einsum("bhqs,bhsk->bhqk", weights.astype(value.dtype), value)
        context = context / weights.sum(axis=-1, keepdims=True).astype(context.dtype)
        context = jnp.transpose(context, (0, 2, 1, 3)).reshape(batch, length, -1)
        hidden = self.attention_norm(hidden + self.attention_out(context).astype(hidden.dtype))
        inner = jax.nn.gelu(self.intermediate(hidden), approximate=False)
        return self.output_norm(hidden + self.output(inner).astype(hidden.dtype))


class BertEncoder(nnx.Module):
    """BERT without the pooler: token ids -> last-layer hidden states.

    Residuals and LayerNorms stay in float32; `dtype` is the matmul compute dtype
    (float32, or bfloat16 for the fast path).
    """

    def __init__(self, cfg: BertConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        self.word_embeddings = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.embedding_norm = _layer_norm(cfg, rngs)

        # The layers are stacked (every parameter gets a leading [N] axis) and applied with
        # a scan: XLA compiles one layer instead of N, so each length bucket compiles N times
        # faster, at no run-time cost worth measuring.
        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs: nnx.Rngs) -> BertLayer:
            return BertLayer(cfg, dtype=dtype, rngs=rngs)

        self.layers = stacked_layers(rngs)

    def __call__(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """token_ids int32 [B, L], mask bool [B, L] (True = real token) -> float32 [B, L, D]."""
        length = token_ids.shape[1]
        # Every chunk is one segment: token type 0 everywhere, as sentence-transformers sends.
        hidden = (
            self.word_embeddings(token_ids)
            + self.position_embeddings.embedding[None, :length]
            + self.token_type_embeddings.embedding[None, None, 0]
        )
        hidden = self.embedding_norm(hidden)
        big_negative = jnp.finfo(jnp.float32).min
        attention_bias = jnp.where(mask, 0.0, big_negative)[:, None, None, :]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def apply_layer(hidden: jax.Array, layer: BertLayer) -> jax.Array:
            return layer(hidden, attention_bias)

        return apply_layer(hidden, self.layers)


def forward_flops(cfg: BertConfig, num_tokens: int) -> float:
    """Model FLOPs of the encoder over one text of `num_tokens` WordPieces (no padding):
    per layer the Q, K, V and output projections, the feed-forward pair and the two
    attention products; embedding lookups, norms and softmax not counted."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, num_tokens
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
    return float(cfg.num_hidden_layers * per_layer)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens, as sentence-transformers' Pooling(mean) does.

    hidden [B, L, D], mask bool [B, L] -> float32 [B, D]. Rows with no token (batch padding)
    come out as zeros instead of NaN (the count is clamped like the reference's 1e-9).
    """
    weights = mask.astype(jnp.float32)
    total = jnp.einsum("bld,bl->bd", hidden.astype(jnp.float32), weights)
    count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
    return total / count
