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

Several processes (a pod slice): each process passes its own rows (its share of the windows,
[b, ...] with the same b everywhere) and gets its own rows back. The global batch is the
processes' rows side by side ([P x b, ...]); when the batch sharding gives every process one
contiguous block of rows (the rule table's batch axes span the processes, as with the default
(data, fsdp)), each process's rows go straight to its devices
(`jax.make_array_from_process_local_data`) and come back from its addressable shards;
otherwise (a batch replicated across processes) the rows are all-gathered first and every
process feeds the whole batch.
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

    placement = BatchPlacement(mesh, rules)

    def scorer(inputs, neighbours, targets):
        with context():
            log_probs, hidden = forward(state, placement.put(np.asarray(inputs, np.int32)),
                                        placement.put(None if neighbours is None
                                                      else np.asarray(neighbours, np.int32)),
                                        placement.put(np.asarray(targets, np.int32)))
            return placement.get(log_probs), placement.get(hidden)

    return scorer


class BatchPlacement:
    """Host rows [b, ...] <-> global batch arrays on `mesh` (see the module docstring).

    `put` places one process's rows; `get` returns this process's rows of a result whose
    leading axis is the global batch. With one process: `jax.device_put` and `np.asarray`.
    """

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self.rows: tuple[int, int] | None = None  # this process's rows of the last batch put
        self._layouts: dict[tuple, int | None] = {}

    def put(self, x):
        if x is None or self.mesh is None:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, _batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0]))
        count, index = jax.process_count(), jax.process_index()
        b = x.shape[0]
        global_shape = (b * count, *x.shape[1:])
        sharding = _batch_sharding(self.mesh, self.rules, x.ndim, global_shape[0])
        key = (global_shape, sharding.spec)
        if key not in self._layouts:
            self._layouts[key] = process_row_start(sharding, global_shape)
        start = self._layouts[key]
        if start is not None:
            self.rows = (start, start + b)
            return jax.make_array_from_process_local_data(sharding, x, global_shape)
        from retro_jax.train.multihost import allgather_host_arrays

        full = allgather_host_arrays({"x": x})["x"].reshape(global_shape)
        self.rows = (index * b, (index + 1) * b)
        return jax.make_array_from_callback(global_shape, sharding, lambda idx: full[idx])

    def get(self, y):
        if y is None:
            return None
        if self.mesh is None or jax.process_count() == 1:
            return np.asarray(y)
        lo, hi = self.rows
        out = np.empty((hi - lo, *y.shape[1:]), y.dtype)
        covered = np.zeros(hi - lo, bool)
        for shard in y.addressable_shards:
            rows, *rest = shard.index
            if any(r != slice(None) and r.indices(n) != (0, n, 1)
                   for r, n in zip(rest, y.shape[1:])):
                break  # sharded beyond the batch axis: gather instead
            start, stop, _ = rows.indices(y.shape[0])
            a, z = max(start, lo), min(stop, hi)
            if a < z:
                out[a - lo:z - lo] = np.asarray(shard.data)[a - start:z - start]
                covered[a - lo:z - lo] = True
        else:
            if covered.all():
                return out
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(y, tiled=True))[lo:hi]


def process_row_start(sharding, global_shape) -> int | None:
    """The first global row of this process's block when `sharding` gives every process one
    contiguous block of global_shape[0] / process_count rows (disjoint), else None."""
    count = jax.process_count()
    per = global_shape[0] // count
    rows_by_process: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, step = index[0].indices(global_shape[0]) if index else (0, 1, 1)
        if step != 1:
            return None
        rows_by_process.setdefault(device.process_index, set()).update(range(start, stop))
    starts = {}
    for process, rows in rows_by_process.items():
        lo = min(rows)
        if len(rows) != per or max(rows) != lo + per - 1:
            return None
        starts[process] = lo
    if len(set(starts.values())) != count:
        return None
    return starts.get(jax.process_index())


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
