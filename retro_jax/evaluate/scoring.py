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
[b, ...] with the same b everywhere) and gets its own rows back; `BatchPlacement` says how the
global batch [P x b, ...] is laid out so that every device computes what it would in one
process.
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
            inputs, neighbours, targets = placement.put(
                np.asarray(inputs, np.int32),
                None if neighbours is None else np.asarray(neighbours, np.int32),
                np.asarray(targets, np.int32))
            log_probs, hidden = forward(state, inputs, neighbours, targets)
            return placement.get(log_probs), placement.get(hidden)

    return scorer


class BatchPlacement:
    """Host rows [b, ...] <-> global batch arrays on `mesh` (see the module docstring).

    `put` places one process's rows (several arrays of the same batch at once); `get` returns
    this process's rows of a result whose leading axis is the global batch. With one process:
    `jax.device_put` and `np.asarray`.

    With several processes the global batch is [P x b, ...]. Two placements:
      - local: when the batch sharding gives each process one contiguous block of rows and
        each device one row, a process's rows go straight to its devices
        (`jax.make_array_from_process_local_data`) and come back from its addressable shards.
        Every device then computes one window with the program one process would run.
      - gathered, in one process's order: otherwise (a device holds several rows, or the
        batch is replicated across processes), the rows of all processes are all-gathered and
        laid out as one process would batch them (make_eval_windows deals windows round robin,
        so process p's row r is global row r x P + p); each process takes its rows back.
        Every device then sees exactly the rows, in the order, of a one-process run, so the
        log-probabilities are bit-identical to it.
    """

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self.rows: slice | None = None  # this process's rows of the global batch last put
        self._layouts: dict[tuple, tuple[int | None, int]] = {}

    def put(self, *arrays):
        """Place each array (None passes through); returns them as a tuple."""
        if self.mesh is None:
            return arrays
        count, index = jax.process_count(), jax.process_index()
        if count == 1:
            return tuple(None if x is None else jax.device_put(
                x, _batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0])) for x in arrays)
        present = [x for x in arrays if x is not None]
        b = present[0].shape[0]
        shardings, local = [], True
        for x in present:
            global_shape = (b * count, *x.shape[1:])
            sharding = _batch_sharding(self.mesh, self.rules, x.ndim, global_shape[0])
            key = (global_shape, sharding.spec)
            if key not in self._layouts:
                self._layouts[key] = process_row_layout(sharding, global_shape)
            start, rows_per_device = self._layouts[key]
            local = local and start is not None and rows_per_device == 1
            shardings.append((sharding, global_shape, start))
        placed = []
        if local:
            start = shardings[0][2]
            self.rows = slice(start, start + b)
            placed = [jax.make_array_from_process_local_data(sharding, x, global_shape)
                      for x, (sharding, global_shape, _) in zip(present, shardings)]
        else:
            from retro_jax.train.multihost import allgather_host_arrays

            gathered = allgather_host_arrays({str(i): x for i, x in enumerate(present)})
            self.rows = slice(index, None, count)
            for i, (sharding, global_shape, _) in enumerate(shardings):
                full = np.swapaxes(gathered[str(i)], 0, 1).reshape(global_shape)  # r*P + p
                placed.append(jax.make_array_from_callback(
                    global_shape, sharding, lambda idx, full=full: full[idx]))
        it = iter(placed)
        return tuple(None if x is None else next(it) for x in arrays)

    def get(self, y):
        if y is None:
            return None
        if self.mesh is None or jax.process_count() == 1:
            return np.asarray(y)
        rows = self.rows
        if rows.step in (None, 1):  # a contiguous block: from the addressable shards
            lo, hi = rows.start, rows.stop
            out = np.empty((hi - lo, *y.shape[1:]), y.dtype)
            covered = np.zeros(hi - lo, bool)
            for shard in y.addressable_shards:
                first, *rest = shard.index
                if any(r.indices(n) != (0, n, 1) for r, n in zip(rest, y.shape[1:])):
                    break  # sharded beyond the batch axis: gather instead
                start, stop, _ = first.indices(y.shape[0])
                a, z = max(start, lo), min(stop, hi)
                if a < z:
                    out[a - lo:z - lo] = np.asarray(shard.data)[a - start:z - start]
                    covered[a - lo:z - lo] = True
            else:
                if covered.all():
                    return out
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(y, tiled=True))[rows]


def process_row_layout(sharding, global_shape) -> tuple[int | None, int]:
    """(first global row of this process's block, rows per device) of a batch sharding.

    The first element is None unless every process holds one contiguous block of
    global_shape[0] / process_count rows, disjoint from the others'.
    """
    count = jax.process_count()
    per = global_shape[0] // count
    rows_by_process: dict[int, set[int]] = {}
    rows_per_device = 0
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, step = index[0].indices(global_shape[0]) if index else (0, 1, 1)
        if step != 1:
            return None, global_shape[0]
        rows_per_device = max(rows_per_device, stop - start)
        rows_by_process.setdefault(device.process_index, set()).update(range(start, stop))
    starts = {}
    for process, rows in rows_by_process.items():
        lo = min(rows)
        if len(rows) != per or max(rows) != lo + per - 1:
            return None, rows_per_device
        starts[process] = lo
    if len(set(starts.values())) != count:
        return None, rows_per_device
    return starts.get(jax.process_index()), rows_per_device


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
