"""The train state as a pytree, its shardings, and the jitted train and eval steps.

The NNX model is split once into a static `graphdef` and pytrees of variables:

    state = {
      "step":      int32 []              updates applied so far
      "rng":       PRNG key []           the dropout base key (from train.seed); step s,
                                         micro-batch i drops with fold_in(fold_in(rng, s), i)
      "params":    nnx.State             trainable parameters (all, or CCA + encoder when
                                         retrofitting)
      "frozen":    nnx.State             frozen parameters (the decoder when retrofitting;
                                         empty otherwise): no gradients, no optimiser moments
      "rest":      nnx.State             non-parameter variables (RNG keys and counts)
      "opt_state": optax state           AdamW moments of "params" only
    }

so `jax.jit` sees plain pytrees: every leaf gets an explicit `NamedSharding` (parameters from
their logical axis names through the rule table, optimiser moments like their parameter,
scalars replicated), and the state argument is donated, so a step updates it in place.
Inside the step the model is rebuilt with `nnx.merge` (free: it only wraps the arrays).

Dropout keys are a pure function of (rng, step, micro-batch): nothing random is carried from
step to step, so a run resumed from a checkpoint (which stores rng and step) draws the same
masks as an uninterrupted one. With `model.dropout` 0 the step derives no key at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax.models.loss import chunked_cross_entropy
from retro_jax.models.sharding import Rules, axis_rules, batch_sharding, state_partition_specs

BATCH_KEYS = ("inputs", "targets", "neighbours")
ModelFn = Callable[[nnx.Rngs], nnx.Module]
# loss_fn(model, batch, dropout_rng=None): the train step passes a key when dropout is on.
LossFn = Callable[..., tuple[jax.Array, jax.Array]]
# The dropout base key is fold_in(init key, DROPOUT_STREAM): nnx.Rngs(init key) draws the
# initializers' keys as fold_in(init key, 0, 1, 2, ...), far below this tag.
DROPOUT_STREAM = 0x44524F50  # "DROP"


def model_loss(model: nnx.Module, batch: dict, dropout_rng: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLL in nats, number of scored tokens) of `batch`; padding not scored.

    Uses the model's final hidden states and output matrix with the blockwise
    `chunked_cross_entropy`, so the `[B, n, V]` logits never exist at once.
    `dropout_rng`: training mode (dropout on, at the model's rate).
    """
    hidden = model.hidden_states(batch["inputs"], batch.get("neighbours"),
                                 dropout_rng=dropout_rng)
    return chunked_cross_entropy(hidden, model.output_weights(), batch["targets"])


def _mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def variable_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A tree with the structure of `abstract_state` and a NamedSharding per leaf."""
    specs = state_partition_specs(abstract_state, rules, _mesh_sizes(mesh))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    treedef = jax.tree.structure(abstract_state)
    if len(flat_specs) != treedef.num_leaves:
        raise AssertionError("one PartitionSpec per variable expected")
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in flat_specs])


def _with_sharding(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


@dataclasses.dataclass
class TrainSetup:
    """Everything static about a training run's state: structure, shardings, functions.

    Attributes:
      graphdef: the model's static structure (nnx.merge(graphdef, params, frozen, rest)).
      abstract_state: the train state as ShapeDtypeStructs carrying their shardings.
      state_shardings: the same tree of NamedShardings (jit in/out shardings).
      filters: the split filters (trainable, other parameters, everything else).
      dropout: the model's dropout rate (`model.cfg.dropout`, 0 for a model without one);
        the train step derives dropout keys only when it is > 0.
    """

    model_fn: ModelFn
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: Rules
    filters: tuple
    graphdef: Any
    abstract_state: dict
    state_shardings: dict
    dropout: float = 0.0

    @classmethod
    def create(cls, model_fn: ModelFn, optimizer: optax.GradientTransformation, mesh: Mesh,
               rules: Rules, *, trainable: Any = nnx.Param) -> TrainSetup:
        """Trace the model abstractly (no allocation) and derive every sharding."""
        filters = (trainable, nnx.Param, ...)
        abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
        graphdef, params, frozen, rest = nnx.split(abstract_model, *filters)
        var_shardings = {k: variable_shardings(s, mesh, rules)
                         for k, s in (("params", params), ("frozen", frozen), ("rest", rest))}
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(optimizer.init, params)
        # Optimiser moments are sharded like their parameter; counters are replicated.
        opt_shardings = optax.tree_map_params(
            optimizer, lambda _, s: s, abstract_opt, var_shardings["params"],
            transform_non_params=lambda _: replicated,
        )
        shardings = {"step": replicated, "rng": replicated, **var_shardings,
                     "opt_state": opt_shardings}
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                    "rng": jax.eval_shape(lambda: jax.random.key(0)), "params": params,
                    "frozen": frozen, "rest": rest, "opt_state": abstract_opt}
        abstract = _with_sharding(abstract, shardings)
        dropout = float(getattr(getattr(abstract_model, "cfg", None), "dropout", 0.0))
        return cls(model_fn, optimizer, mesh, rules, filters, graphdef, abstract, shardings,
                   dropout)

    # ------------------------------------------------------------------ init
    def init(self, seed: int) -> dict:
        """A fresh train state, created directly in its shardings (no host copy)."""

        def init_fn(key):
            model = self.model_fn(nnx.Rngs(key))
            _, params, frozen, rest = nnx.split(model, *self.filters)
            return {"step": jnp.zeros((), jnp.int32),
                    "rng": jax.random.fold_in(key, DROPOUT_STREAM), "params": params,
                    "frozen": frozen, "rest": rest, "opt_state": self.optimizer.init(params)}

        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return jax.jit(init_fn, out_shardings=self.state_shardings)(
                jax.random.key(seed))

    # ------------------------------------------------------- batch shardings
    def batch_shardings(self, batch: dict) -> dict:
        return {k: batch_sharding(self.mesh, self.rules, np.ndim(v)) for k, v in batch.items()}

    def merge_model(self, state: dict) -> nnx.Module:
        """The NNX model of `state` (shares its arrays)."""
        return nnx.merge(self.graphdef, state["params"], state["frozen"], state["rest"])

    def full_params(self, state: dict) -> nnx.State:
        """Trainable and frozen parameters in one State (what a checkpoint's params hold)."""
        return nnx.merge_state(state["params"], state["frozen"])

    # ------------------------------------------------------------ the steps
    def make_train_step(self, *, grad_accum: int, schedule: optax.Schedule,
                        loss_fn: LossFn = model_loss) -> Callable:
        """jit(train_step)(state, batch) -> (state, metrics); the state is donated.

        batch: inputs/targets int32 [B, n], neighbours int32 [B, L, k, 2m] (optional).
        With grad_accum = A the batch is cut into A micro-batches of B/A rows (row i goes to
        micro-batch i mod A, so each device keeps its own rows) scanned with lax.scan; the
        gradient is that of the mean NLL over all scored tokens of the whole batch, the same
        as without accumulation.
        Dropout (when `self.dropout` > 0): micro-batch i of step s uses the key
        fold_in(fold_in(state["rng"], s), i).
        metrics: loss (mean nats/token), grad_norm (before clipping), lr, tokens.
        """
        graphdef, filters, optimizer = self.graphdef, self.filters, self.optimizer
        use_dropout = self.dropout > 0

        def forward_sum(params, frozen, rest, micro, rng):
            model = nnx.merge(graphdef, params, frozen, rest)
            nll_sum, tokens = (loss_fn(model, micro, dropout_rng=rng) if use_dropout
                               else loss_fn(model, micro))
            new_rest = nnx.split(model, *filters)[3]
            return nll_sum, (tokens, new_rest)

        value_grad_fn = jax.value_and_grad(forward_sum, has_aux=True)

        def train_step(state, batch):
            batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
            total_tokens = jnp.maximum(jnp.sum(batch["targets"] != 0), 1).astype(jnp.float32)
            params, frozen = state["params"], state["frozen"]
            # With dropout 0 no key is derived: the program has no random-number ops.
            step_rng = jax.random.fold_in(state["rng"], state["step"]) if use_dropout else None

            def micro_rng(i):
                return None if step_rng is None else jax.random.fold_in(step_rng, i)

            def scaled(p, f, r, micro, rng):
                # d(sum_nll / total_tokens) = gradient of the whole batch's mean NLL.
                (nll, (tok, new_r)), g = value_grad_fn(p, f, r, micro, rng)
                return nll, tok, new_r, jax.tree.map(lambda x: x / total_tokens, g)

            if grad_accum == 1:
                nll_sum, _, rest, grads = scaled(params, frozen, state["rest"], batch,
                                                 micro_rng(0))
            else:
                def split(x):  # [B, ...] -> [A, B/A, ...], row i -> micro-batch i % A
                    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
                    return jnp.swapaxes(x, 0, 1)

                micro_batches = jax.tree.map(split, batch)
                indices = jnp.arange(grad_accum) if use_dropout else None

                def body(carry, xs):
                    acc_grads, acc_nll, rest = carry
                    micro, i = xs
                    nll, _, rest, g = scaled(params, frozen, rest, micro,
                                             None if i is None else micro_rng(i))
                    acc_grads = jax.tree.map(jnp.add, acc_grads, g)
                    return (acc_grads, acc_nll + nll, rest), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                (grads, nll_sum, rest), _ = jax.lax.scan(
                    body, (zeros, jnp.zeros((), jnp.float32), state["rest"]),
                    (micro_batches, indices))

            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            new_state = {
                "step": state["step"] + 1,
                "rng": state["rng"],
                "params": optax.apply_updates(params, updates),
                "frozen": frozen,
                "rest": rest,
                "opt_state": opt_state,
            }
            metrics = {"loss": nll_sum / total_tokens, "grad_norm": grad_norm,
                       "lr": schedule(state["step"]), "tokens": total_tokens}
            return new_state, metrics

        return self._jit(train_step, donate=True)

    def make_eval_step(self, loss_fn: LossFn = model_loss) -> Callable:
        """jit(eval_step)(state, batch) -> {"nll_sum", "tokens"} (no state change)."""

        def eval_step(state, batch):
            model = self.merge_model(state)
            nll_sum, tokens = loss_fn(model, batch)
            return {"nll_sum": nll_sum, "tokens": tokens}

        return self._jit(eval_step, donate=False)

    def _jit(self, fn: Callable, *, donate: bool) -> Callable:
        """jit with the state's shardings in (and out when the state is returned)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        cache: dict[tuple, Callable] = {}

        def jitted(batch):
            batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
            key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
            if key not in cache:
                out = (self.state_shardings, replicated) if donate else replicated
                cache[key] = jax.jit(
                    fn,
                    in_shardings=(self.state_shardings, self.batch_shardings(batch)),
                    out_shardings=out,
                    donate_argnums=(0,) if donate else (),
                )
            return cache[key], batch

        def call(state, batch):
            step_fn, batch = jitted(batch)
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                return step_fn(state, batch)

        def lower(state, batch):
            """Lower for abstract inputs (ShapeDtypeStructs), e.g. for a TPU topology."""
            step_fn, batch = jitted(batch)
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                return step_fn.lower(state, batch)

        call.lower = lower
        return call
