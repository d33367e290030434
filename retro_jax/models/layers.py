"""Building blocks: parameters with logical axis names, dense, RMSNorm, embedding, FFW, rotary.

Parameters are fp32; compute casts them to the compute dtype at use (mixed precision), and
norms and softmax statistics stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.config import GATED_ACTIVATIONS
from retro_jax.models.sharding import shard

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
) -> nnx.Param:
    """An fp32 `nnx.Param` with logical axis `names` (one per dimension) as sharding metadata.

    Eager sharding is off: the model is built unsharded (or abstractly with nnx.eval_shape)
    and placed with `sharding.state_shardings`, so building needs no mesh.
    """
    if len(names) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, "
                         f"got {tuple(names)}")
    value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def fan_in_init(fan_in: int) -> Initializer:
    """Truncated normal with std 1/sqrt(fan_in) (shape-agnostic: fan_in given explicitly)."""
    std = fan_in ** -0.5

    def init(key, shape, dtype):
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


class DenseGeneral(nnx.Module):
    """y = einsum(x, W) with W of shape `in_shape + out_shape` and logical names.

    `x [..., *in_shape] -> y [..., *out_shape]`; no bias (as in modern LM stacks).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        names: Sequence[str | None],
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        init_scale: float = 1.0,
    ):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.dtype = dtype
        fan_in = 1
        for d in self.in_shape:
            fan_in *= d
        base = fan_in_init(fan_in)
        init = (lambda k, s, d: init_scale * base(k, s, d)) if init_scale != 1.0 else base
        self.kernel = make_param(rngs, init, self.in_shape + self.out_shape, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        return row_matmul(x, self.kernel[...].astype(self.dtype), len(self.in_shape))


def row_matmul(x: jax.Array, kernel: jax.Array, n_in: int = 1,
               preferred_element_type=None) -> jax.Array:
    """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` with x's leading dims flattened.

    The leading ("row") dims of x are merged into one before the contraction (a free
    reshape, row-major). This matters for the backward pass, not the forward: the weight
    gradient `einsum(x, dy)` contracts over every row dim, and with two or more of them
    (`[B, n, d]`) XLA canonicalises the dot by physically transposing `dy` into
    `[out, B*n]` first (a strided copy of the largest activation, fused into the preceding
    elementwise op); with a single row dim the dot takes its operands as they are. On
    XLA:CPU that copy cost as much as the matmuls of the FFW's backward pass.
    Sharding is unaffected: only the leading (batch) dim of the rows is ever sharded, and it
    stays the major part of the merged dim.
    """
    rows = x.shape[: x.ndim - n_in]
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    letters = "abcdefghijklmnopqrstuvw"
    ins = letters[:n_in]
    outs = "xyz"[: len(out_shape)]
    flat = x.astype(kernel.dtype).reshape((-1,) + tuple(in_shape))
    y = jnp.einsum(f"N{ins},{ins}{outs}->N{outs}", flat, kernel,
                   preferred_element_type=preferred_element_type)
    return y.reshape(rows + tuple(out_shape))


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, statistics in fp32: `[..., d] -> [..., d]`."""

    def __init__(self, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, eps: float = 1e-6):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",),
                               eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * self.scale[...]).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding `[vocab, d]`; `attend` gives logits for a tied output layer."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(
            rngs, lambda k, s, d: jax.random.normal(k, s, d), (vocab_size, dim),
            ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """`tokens int32 [...] -> [..., d]` in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """`x [..., d] -> logits float32 [..., vocab]` (scaled by 1/sqrt(d) to keep unit scale)."""
        w = self.embedding[...].astype(self.dtype)
        rows = x.astype(self.dtype).reshape(-1, x.shape[-1])  # one row dim: see row_matmul
        logits = jnp.einsum("td,vd->tv", rows, w, preferred_element_type=jnp.float32)
        return logits.reshape(x.shape[:-1] + (w.shape[0],)) * (x.shape[-1] ** -0.5)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu,
            "swiglu": jax.nn.silu, "geglu": jax.nn.gelu}[name]


class FeedForward(nnx.Module):
    """`[..., d] -> [..., d]`: gelu|relu|silu, or gated swiglu|geglu (two input projections)."""

    def __init__(self, dim: int, hidden: int, activation: str, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs, activation_names: Sequence[str] = ("batch", "length", "mlp")):
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.activation_names = tuple(activation_names)
        self.wi = DenseGeneral((dim,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.wg = (DenseGeneral((dim,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
                   if self.gated else None)
        self.wo = DenseGeneral((hidden,), (dim,), ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _activation(self.activation)
        h = act(self.wi(x))
        if self.wg is not None:
            h = h * self.wg(x)
        if h.ndim == len(self.activation_names):
            h = shard(h, self.activation_names)
        return self.wo(h)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: each element zeroed with probability `rate`, the rest scaled by
    1/(1 - rate), so the expectation is unchanged and evaluation needs no rescaling.

    The identity (no random numbers drawn, nothing traced) when `rng` is None (evaluation,
    sampling) or `rate` is 0.
    """
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def fold_in(rng: jax.Array | None, *tags: int) -> jax.Array | None:
    """`rng` folded with each of `tags` in turn (a key per dropout site); None stays None."""
    if rng is None:
        return None
    for tag in tags:
        rng = jax.random.fold_in(rng, tag)
    return rng


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (RoFormer), rotate-half form, computed in fp32.

    x: `[..., T, heads, head_dim]`; positions: `[T]` or broadcastable to `x.shape[:-2]`
    (int or float). The dot product of a rotated query at position p and a rotated key at
    position q depends only on p - q: a relative position encoding.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freq  # [..., T, half]
    sin = jnp.sin(angles)[..., None, :]
    cos = jnp.cos(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half: 2 * half]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if head_dim % 2:
        rotated.append(x32[..., 2 * half:])
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)
