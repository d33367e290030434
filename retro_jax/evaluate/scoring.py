"""The jitted forward pass of evaluation: log-probability of every target token.

    scorer = make_scorer(model, mesh=mesh, rules=rules, with_hidden=False)
    log_probs, hidden = scorer(inputs [B, n], neighbours [B, L, k, 2m] | None, targets [B, n])

`log_probs` float32 [B, n] is log p(targets[t] | inputs[<= t]) (0 where the target is 0, i.e.
padding); `hidden` is the model's final-normed hidden state [B, n, d] (the vector the output
projection reads; the kNN-LM key), or None. The output projection is applied in sequence
blocks so the [B, n, V] logits (8 GB at B=8, n=2048, V=128k in fp32) never exist at once.

The model is split once into graphdef + state; the jitted function merges them back inside
the trace (free). Batches are placed on the mesh with the batch dimension sharded as the rule
table says when the mesh divides it, else replicated.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID = 0
DEFAULT_BLOCK_LEN = 256

Scorer = Callable[[np.ndarray, np.ndarray | None, np.ndarray],
                  tuple[np.ndarray, np.ndarray | None]]


def blockwise_target_log_probs(hidden: jax.Array, output_weights: jax.Array,
                               targets: jax.Array, block_len: int = DEFAULT_BLOCK_LEN
                               ) -> jax.Array:
    """log softmax(hidden @ output_weights)[targets], computed block by block along n.

    Args:
      hidden: [B, n, d] final hidden states.
      output_weights: [d, V].
      targets: int [B, n].
    Returns:
      float32 [B, n]; 0 where targets == PAD_ID.
    """
    b, n, d = hidden.shape
    if n % block_len:
        block_len = n
    blocks = n // block_len
    h = hidden.reshape(b, blocks, block_len, d).swapaxes(0, 1)  # [blocks, B, blk, d]
    t = targets.reshape(b, blocks, block_len).swapaxes(0, 1).astype(jnp.int32)

    def one_block(args):
        h_blk, t_blk = args
        logits = jnp.einsum("bnd,dv->bnv", h_blk, output_weights,
                            preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_blk[..., None], axis=-1)[..., 0]
        return jnp.where(t_blk != PAD_ID, target_logit - log_z, 0.0)

    out = jax.lax.map(one_block, (h, t))  # [blocks, B, blk]
    return out.swapaxes(0, 1).reshape(b, n)


def make_scorer(model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                with_hidden: bool = False, block_len: int = DEFAULT_BLOCK_LEN) -> Scorer:
    """A function (inputs, neighbours | None, targets) -> (log_probs, hidden | None), numpy.

    `model` needs `hidden_states(inputs, neighbours)` and `output_weights()` (retro_jax's
    Retro). One compilation per (batch shape, neighbours present or not). Scorers are cached
    per model object and settings, so evaluating one model several times (ON, OFF, kNN-LM)
    compiles once per shape; the model's parameters are read when the scorer is first made
    (evaluation never changes them).
    """
    key = (bool(with_hidden), int(block_len), id(mesh), None if rules is None else tuple(rules))
    try:
        cache = _SCORERS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    if key not in cache:
        cache[key] = _new_scorer(model, mesh=mesh, rules=rules, with_hidden=with_hidden,
                                 block_len=block_len)
    return cache[key]


_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _new_scorer(model, *, mesh, rules, with_hidden: bool, block_len: int) -> Scorer:
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs, neighbours, targets):
        m = nnx.merge(graphdef, state)
        hidden = m.hidden_states(inputs, neighbours)
        log_probs = blockwise_target_log_probs(hidden, m.output_weights(), targets, block_len)
        return log_probs, (hidden.astype(jnp.float32) if with_hidden else None)

    def context():
        if mesh is None:
            return contextlib.nullcontext()
        from retro_jax.models.sharding import axis_rules

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(mesh))
        if rules is not None:
            stack.enter_context(axis_rules(rules))
        return stack

    def place(x):
        if x is None or mesh is None:
            return x
        return jax.device_put(x, _batch_sharding(mesh, rules, np.ndim(x), np.shape(x)[0]))

    def scorer(inputs, neighbours, targets):
        with context():
            log_probs, hidden = forward(state, place(np.asarray(inputs, np.int32)),
                                        place(None if neighbours is None
                                              else np.asarray(neighbours, np.int32)),
                                        place(np.asarray(targets, np.int32)))
            return (np.asarray(log_probs),
                    None if hidden is None else np.asarray(hidden))

    return scorer


def _batch_sharding(mesh, rules, ndim: int, batch: int):
    from jax.sharding import NamedSharding, PartitionSpec

    if rules is not None:
        from retro_jax.models.sharding import batch_sharding

        sharding = batch_sharding(mesh, rules, ndim)
        axes = sharding.spec[0] if len(sharding.spec) else None
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if batch % size == 0:
            return sharding
    return NamedSharding(mesh, PartitionSpec())


def count_parameters(model: nnx.Module) -> dict[str, int]:
    """{"total", "non_embedding"} parameter counts (the paper reports non-embedding sizes:
    the token embedding and an untied output projection are excluded)."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    embedding = 0
    embed = getattr(model, "embed", None)
    if embed is not None:
        embedding += sum(int(np.prod(x.shape))
                         for x in jax.tree.leaves(nnx.state(embed, nnx.Param)))
    output = getattr(model, "output", None)
    if output is not None:
        embedding += sum(int(np.prod(x.shape))
                         for x in jax.tree.leaves(nnx.state(output, nnx.Param)))
    return {"total": total, "non_embedding": total - embedding}
