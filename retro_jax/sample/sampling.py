"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Mask logits outside the top-k and outside the smallest set with mass >= top_p.

    Args:
      logits: float [batch, vocab].
      top_k: keep the k largest logits per row; 0 keeps all.
      top_p: keep the most likely tokens whose probabilities sum to >= top_p; 1.0 keeps all.
    Returns:
      float [batch, vocab] with removed entries set to -inf (at least one entry always kept).
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each token: a token is kept while that mass is < top_p, so the
        # most likely token is always kept.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def choose_tokens(
    logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The next token per row: argmax when temperature == 0, else a filtered sample.

    Args:
      logits: float [batch, vocab] for the next position.
      rng: a PRNG key.
    Returns:
      int32 [batch].
    """
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
