"""`model.scan_layers`: the decoder as a few runs of repeated layer groups, each one scan.

A decoder layer is one of three kinds: `PLAIN` (self-attention, feed-forward), `CCA` (with
chunked cross-attention) or `CCA_ENCODER` (the first CCA layer, which also runs the encoder
on its post-self-attention activations). The paper's placement (CCA every 3rd layer from 6, or
from 9 past 15 layers) makes a decoder a run of plain layers, the encoder layer, then the group
[plain, plain, CCA] repeated, possibly a plain tail:

    12 layers, CCA 6, 9, 12:        P x5 | E | (P P C) x2                      5 layer bodies
    24 layers, CCA 9, 12, ..., 24:  P x8 | E | (P P C) x5                      5 layer bodies
    32 layers, CCA 9, 12, ..., 30:  P x8 | E | P x2 | (C P P) x7               6 layer bodies
    baseline (no CCA):              P xN                                       1 layer body

`decoder_runs(cfg)` finds such a decomposition for any `cca_layers` (CCA everywhere, only at
the top, in the middle, ...): the one with the fewest distinct layer bodies in the compiled
program, then the fewest runs (dynamic programming over the layer list). A `Run` of R > 1
repeats is one `jax.lax.scan` over parameters stacked on a leading "layers" axis, so the size
of the compiled program and its compile time depend on the number of runs, not on the depth.
Without `scan_layers` every layer is its own run of one.

Parameter layouts (the paths of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`):

    unrolled (scan_layers=False): blocks/{l-1}/...            per layer l (1-based)
    scanned  (scan_layers=True):  stacked_blocks/{s}/{j}/...  [R_s, ...]: run s, position j of
                                  its group; row r holds layer first_s + r * p_s + j

`unstack_params` / `stack_params` convert between them (pure functions of the tree and the
config); `convert_params` gives either layout from either. A scanned model built with seed s
has exactly the parameters of the unrolled model with seed s, stacked: the blocks are created
layer by layer in the same order, then stacked (`stack_blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

PLAIN, CCA, CCA_ENCODER = "plain", "cca", "cca+encoder"
# The logical axis name of the leading axis of stacked parameters (mapped to no mesh axis, so
# each layer's slice keeps the FSDP / tensor sharding of the unrolled parameter).
LAYERS_AXIS = "layers"
UNROLLED_KEY, STACKED_KEY = "blocks", "stacked_blocks"


class Run(NamedTuple):
    """`repeats` consecutive copies of the layer group `unit`, from 1-based layer `first`."""

    first: int
    unit: tuple[str, ...]
    repeats: int

    @property
    def period(self) -> int:
        return len(self.unit)

    def layers(self, position: int) -> tuple[int, ...]:
        """The 1-based layers at `position` of the group, one per repeat (the stacking order)."""
        return tuple(self.first + r * self.period + position for r in range(self.repeats))


def layer_kinds(num_layers: int, cca_layers: Sequence[int]) -> tuple[str, ...]:
    """The kind of each decoder layer, in depth order."""
    cca = set(cca_layers)
    first = min(cca) if cca else None
    return tuple(CCA_ENCODER if layer == first else CCA if layer in cca else PLAIN
                 for layer in range(1, num_layers + 1))


@functools.cache
def plan_runs(kinds: tuple[str, ...]) -> tuple[Run, ...]:
    """The decomposition of `kinds` into runs with the fewest distinct layer bodies (the sum
    of the runs' group lengths), then the fewest runs.

    Dynamic programming over suffixes: best[i] covers kinds[i:]; a run starting at i takes a
    group of any length p and any number of exact repeats of it. O(n^2 log n) for n layers.
    """
    n = len(kinds)
    best: list[tuple[tuple[int, int], tuple[Run, ...]] | None] = [None] * (n + 1)
    best[n] = ((0, 0), ())
    for i in range(n - 1, -1, -1):
        for p in range(1, n - i + 1):
            unit = kinds[i:i + p]
            most = 1
            while kinds[i + most * p:i + (most + 1) * p] == unit:
                most += 1
            for repeats in range(most, 0, -1):
                (bodies, runs), tail = best[i + repeats * p]
                cost = (bodies + p, runs + 1)
                if best[i] is None or cost < best[i][0]:
                    best[i] = (cost, (Run(i + 1, unit, repeats),) + tail)
    return best[0][1]


def decoder_runs(cfg) -> tuple[Run, ...]:
    """The runs of `cfg`'s decoder (a `RetroConfig`): `plan_runs` with `cfg.scan_layers`, one
    run per layer without."""
    kinds = layer_kinds(cfg.num_layers, cfg.cca_layers)
    if not cfg.scan_layers:
        return tuple(Run(layer, (kind,), 1) for layer, kind in enumerate(kinds, start=1))
    return plan_runs(kinds)


def describe_runs(runs: Sequence[Run]) -> str:
    """'P x5 | E | (P P C) x2': the runs, for logs and docs."""
    letters = {PLAIN: "P", CCA: "C", CCA_ENCODER: "E"}
    parts = []
    for run in runs:
        unit = " ".join(letters[k] for k in run.unit)
        unit = f"({unit})" if run.period > 1 else unit
        parts.append(unit if run.repeats == 1 else f"{unit} x{run.repeats}")
    return " | ".join(parts)


# ----------------------------------------------------------------------- modules
def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module like `blocks[0]` whose parameters are those of `blocks`, stacked on a new
    leading axis named `LAYERS_AXIS` (the blocks must have the same structure)."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.state(block) for block in blocks[1:]]
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Variable):
            names = variable.get_metadata().get("out_sharding")
            if names:
                variable.set_metadata(out_sharding=(LAYERS_AXIS,) + tuple(names))
    return stacked


def slice_block(stacked: nnx.Module, index) -> nnx.Module:
    """Row `index` (int or traced) of a stacked module: a module like one of the blocks that
    `stack_blocks` stacked (under jit, the slices are views the compiler fuses or copies)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))


def stacked_axes(path: Sequence[Any]) -> int:
    """1 if the parameter at key `path` (a tuple of names or pytree keys) is stacked on a
    leading layers axis, else 0: what `decay_mask` subtracts to find matrices."""
    names = {str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path}
    return int(STACKED_KEY in names)


# -------------------------------------------------------------- parameter trees
def _layer_paths(cfg) -> dict[tuple[int, int], tuple[int, ...]]:
    """(run s, group position j) -> the 1-based layers stacked there, in row order."""
    runs = decoder_runs(dataclasses.replace(cfg, scan_layers=True))
    return {(s, j): run.layers(j) for s, run in enumerate(runs) for j in range(run.period)}


def _key(k) -> int:
    return int(k)  # nnx.to_pure_dict gives int list indices; orbax metadata gives strings


def unstack_params(params: Mapping, cfg) -> dict:
    """The scanned layout -> the unrolled one: `stacked_blocks/{s}/{j}/x [R, ...]` becomes
    `blocks/{l-1}/x` for each of the R layers l stacked there. Other keys are kept.

    `params` is a nested dict (`nnx.to_pure_dict`, a checkpoint's params), possibly partial
    (only some parameters, e.g. the frozen ones); `cfg` is the model's `RetroConfig`.
    """
    out = {k: v for k, v in params.items() if k != STACKED_KEY}
    if STACKED_KEY not in params:
        return out
    layers = _layer_paths(cfg)
    blocks: dict[int, Any] = {}
    for s, run in params[STACKED_KEY].items():
        for j, subtree in run.items():
            rows = layers[(_key(s), _key(j))]
            for r, layer in enumerate(rows):
                blocks[layer - 1] = jax.tree.map(lambda x, r=r: x[r], subtree)
    out[UNROLLED_KEY] = dict(sorted(blocks.items()))
    return out


def stack_params(params: Mapping, cfg) -> dict:
    """The unrolled layout -> the scanned one (the inverse of `unstack_params`): the layers
    of each run position are stacked in row order. Every layer of a stacked position must be
    present."""
    out = {k: v for k, v in params.items() if k != UNROLLED_KEY}
    if UNROLLED_KEY not in params:
        return out
    blocks = {_key(k): v for k, v in params[UNROLLED_KEY].items()}
    stacked: dict[int, dict[int, Any]] = {}
    for (s, j), rows in _layer_paths(cfg).items():
        present = [layer - 1 in blocks for layer in rows]
        if not any(present):
            continue
        if not all(present):
            missing = [layer for layer, ok in zip(rows, present) if not ok]
            raise ValueError(f"stack_params: layers {missing} (1-based) are missing; run {s} "
                             f"stacks layers {rows} at its position {j}")
        subtrees = [blocks[layer - 1] for layer in rows]
        stacked.setdefault(s, {})[j] = jax.tree.map(lambda *xs: jnp.stack(xs), *subtrees)
    out[STACKED_KEY] = stacked
    return out


def params_layout(params: Mapping) -> bool | None:
    """True for a scanned tree, False for an unrolled one, None if it has no decoder blocks."""
    if STACKED_KEY in params:
        return True
    if UNROLLED_KEY in params:
        return False
    return None


def convert_params(params: Mapping, cfg, *, scan_layers: bool) -> dict:
    """`params` (either layout, detected from its keys) in the layout `scan_layers` asks for."""
    if params_layout(params) is None or params_layout(params) == scan_layers:
        return dict(params)
    return stack_params(params, cfg) if scan_layers else unstack_params(params, cfg)
