"""`retro-jax compile --config EXP --topology v5p:4x4x4`: the train step compiled ahead of time.

Compiles the real, sharded training step for a named TPU topology on any machine (a CPU
laptop included), as MaxText's train_compile does: `jax.experimental.topologies` describes the
topology's devices, a Mesh is laid over them from `config.mesh`, and
`jax.jit(step).lower(ShapeDtypeStructs with shardings).compile()` runs XLA's TPU compiler.
Nothing is allocated; the compiled program's `memory_analysis()` gives the per-device bytes,
printed with the parameters' and optimiser state's own shares:

    retro-jax compile --config experiments/paper/pile.py:172m --topology v5p:2x2x2

It needs libtpu, which comes with `pip install "jax[tpu]==0.10.2"` (the TPU extra of this
package: `pip install -e ".[tpu]"`); without it the command stops with that instruction.
`model.dtype="auto"` compiles in bfloat16, as it would run on the TPU.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = ('ahead-of-time TPU compilation needs libtpu: pip install "jax[tpu]==0.10.2" '
                '(or pip install -e ".[tpu]"), in this environment or a separate one; it works '
                "on a CPU-only machine (libtpu warns that no TPU is attached, harmlessly)")


class TopologyUnavailable(RuntimeError):
    """libtpu is missing or the topology name is unknown."""


def topology_devices(topology: str) -> list:
    """The devices of a named TPU topology ('v5p:2x2x2', 'v4:2x2x1', 'v5e:4x4'...)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise TopologyUnavailable(f"jax.experimental.topologies unavailable: {e}") from e
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise TopologyUnavailable(f"libtpu is not installed. {INSTALL_HINT}") from e
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # the TPU plugin raises RuntimeError/ValueError/XlaRuntimeError
        raise TopologyUnavailable(f"cannot describe TPU topology {topology!r}: {e}. "
                                  "Names look like v5p:2x2x2, v4:2x2x2, v5e:4x4") from e
    return list(desc.devices)


def _bytes_per_device(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_train_step(config, devices: list) -> dict:
    """Compile the train step of `config` for `devices`; per-device memory and FLOPs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro, retrofit_filter
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train import metrics as metrics_lib
    from retro_jax.train.optimizer import make_optimizer, schedule_from_config
    from retro_jax.train.state import TrainSetup

    mesh = make_mesh(config.mesh, devices=devices)
    rules = logical_axis_rules(config.mesh)
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    tc = config.train
    setup = TrainSetup.create(lambda rngs: Retro(model_cfg, rngs=rngs), make_optimizer(tc),
                              mesh, rules,
                              trainable=retrofit_filter if tc.retrofit else nnx.Param)
    step = setup.make_train_step(grad_accum=tc.grad_accum, schedule=schedule_from_config(tc))
    n, m, k = config.data.seq_len, config.database.chunk_len, config.data.num_neighbours
    batch = {"inputs": jax.ShapeDtypeStruct((tc.batch_size, n), jnp.int32),
             "targets": jax.ShapeDtypeStruct((tc.batch_size, n), jnp.int32)}
    if model_cfg.retrieval:
        batch["neighbours"] = jax.ShapeDtypeStruct((tc.batch_size, n // m, k, 2 * m), jnp.int32)
    shardings = setup.batch_shardings(batch)
    batch = {key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[key])
             for key, v in batch.items()}
    state = setup.abstract_state
    report = {
        "devices": len(devices),
        "device_kind": getattr(devices[0], "device_kind", "?"),
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "model_dtype": jnp.dtype(model_cfg.compute_dtype).name,
        "params_total": int(sum(math.prod(x.shape) for x in
                                jax.tree.leaves((state["params"], state["frozen"])))),
        "bytes_params_per_device": _bytes_per_device((state["params"], state["frozen"])),
        "bytes_optimizer_per_device": _bytes_per_device(state["opt_state"]),
        "model_flops_per_token": metrics_lib.model_flops_per_token(
            model_cfg, seq_len=n, num_neighbours=k if model_cfg.retrieval else 0, chunk_len=m),
    }
    try:
        compiled = step.lower(state, batch).compile()
    except Exception as e:  # XLA reports "does not fit" as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["fits"] = False
        report["error"] = str(e).splitlines()[0]
        return report
    report["fits"] = True
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            report[f"bytes_{name.removesuffix('_size_in_bytes')}_per_device"] = int(
                getattr(memory, name, 0))
        report["bytes_total_per_device"] = (
            report["bytes_argument_per_device"] + report["bytes_output_per_device"]
            + report["bytes_temp_per_device"] - report["bytes_alias_per_device"])
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        report["xla_flops_per_device"] = float(cost["flops"])
    return report


def _gib(x: int) -> str:
    return f"{x / 2**30:8.3f} GiB"


def run_compile(args) -> int:
    """CLI entry: compile the train step for `args.topology`; print per-device memory."""
    import ml_collections

    from retro_jax.configs import config_from_args

    try:
        devices = topology_devices(args.topology)
    except TopologyUnavailable as e:
        print(f"retro-jax compile: {e}", file=sys.stderr)
        return 2
    config = config_from_args(args, num_devices=len(devices))
    if config.model.dtype == "auto":  # "auto" resolves on this host's backend: use the TPU's
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.dtype = "bfloat16"
    log.info("compiling %s for %s (%d devices)", args.config, args.topology, len(devices))
    report = compile_train_step(config, devices)
    report = {"config": args.config, "topology": args.topology, **report}
    for key, value in report.items():
        if key.startswith("bytes_"):
            print(f"{key.removeprefix('bytes_'):34s} {_gib(value)}")
    print(json.dumps(report))
    if not report["fits"]:
        print(f"retro-jax compile: the train step does not fit on {args.topology}: "
              f"{report['error']}. Raise train.grad_accum, set model.remat=dots|full, "
              "shard more (mesh.fsdp / mesh.tensor) or use a larger topology.", file=sys.stderr)
        return 1
    return 0
