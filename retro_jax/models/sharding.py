"""Logical axis names -> mesh axes: the one rule table, the mesh, and shardings.

Every parameter carries logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`)
and the main activations are constrained with `shard(x, ("batch", "length", "embed"))`. One
ordered rule table (`config.mesh.axis_rules`) maps the names to the mesh axes
`('data', 'fsdp', 'tensor')`. Resolution follows Flax linen / MaxText: for each dimension the
first rule naming its logical axis whose mesh axes are not already used by an earlier dimension
of the same array wins; a dimension that the chosen mesh axes do not divide stays replicated
(tiny test models on 8 devices), so any config runs on any mesh.

Usage (what retro_jax/train does):

    mesh = make_mesh(config.mesh)
    rules = logical_axis_rules(config.mesh)
    with jax.set_mesh(mesh), axis_rules(rules):
        model = Retro(cfg, rngs=nnx.Rngs(0))                 # params created unsharded ...
        shardings = state_shardings(nnx.state(model), mesh, rules)
        state = jax.device_put(nnx.state(model), shardings)  # ... then placed
        step = jax.jit(train_step, in_shardings=..., out_shardings=..., donate_argnums=...)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax.configs import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "neighbours",
                "chunks", "layers")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "retro_axis_rules", default=None)


def logical_axis_rules(mesh_cfg) -> Rules:
    """The rule table of `config.mesh` as a tuple of (logical name, mesh axes | None)."""
    rules = []
    for name, target in mesh_cfg.axis_rules:
        if isinstance(target, list):
            target = tuple(target)
        rules.append((str(name), target))
    return tuple(rules)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with axes ('data', 'fsdp', 'tensor').

    Axis sizes come from `config.mesh` (one may be -1: filled with the remaining devices);
    axis types are Auto, so the logical rules drive the sharding (GSPMD propagation).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh {sizes} needs {math.prod(shape)} devices, "
                         f"found {len(devices)}; set one axis to -1 to fill")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[Rules]:
    """Activate `rules` for `shard()` calls (traced code reads them at trace time)."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
    return _ACTIVE_RULES.get()


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh_sizes: dict[str, int] | None = None,
) -> PartitionSpec:
    """Resolve logical `names` (one per dimension) to a PartitionSpec with `rules`.

    With `shape` and `mesh_sizes`, a dimension the mesh axes do not divide is replicated.
    """
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(names):
        chosen = None
        for rule_name, target in rules:
            if rule_name != name:
                continue
            axes = () if target is None else (target if isinstance(target, tuple) else (target,))
            if used.intersection(axes):
                continue
            if shape is not None and mesh_sizes is not None and axes:
                size = math.prod(mesh_sizes.get(a, 1) for a in axes)
                if shape[dim] % size:
                    continue
            chosen = axes
            break
        if chosen:
            used.update(chosen)
            out.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            out.append(None)
    return PartitionSpec(*out)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes")
                    else mesh.devices.shape))


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` to the sharding of its logical axis `names`.

    A no-op outside `jax.set_mesh(...)` + `axis_rules(...)` (single-device tests, eager use).
    """
    rules = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, rules, x.shape, _mesh_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None if it has none)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_partition_specs(state, rules: Rules, mesh_sizes: dict[str, int] | None = None):
    """A tree like `state` (nnx.State) with a PartitionSpec per variable."""

    def spec(v):
        names = variable_names(v) if isinstance(v, nnx.Variable) else None
        if names is None:
            return PartitionSpec()
        return logical_to_spec(names, rules, tuple(v.get_value().shape), mesh_sizes)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh, rules: Rules):
    """A tree like `state` with a NamedSharding per variable (for device_put / jit)."""
    specs = state_partition_specs(state, rules, _mesh_sizes(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """The sharding of a batch array `[batch, ...]` (batch split, the rest replicated)."""
    names = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules))
