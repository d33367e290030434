"""`retro-jax compile --config EXP --topology v5p:4x4x4`: the train step compiled ahead of time.

Compiles the real, sharded training step for a named TPU topology on any machine (a CPU
laptop included), as MaxText's train_compile does: `jax.experimental.topologies` describes the
topology's devices, a Mesh is laid over them from `config.mesh`, and
`jax.jit(step).lower(ShapeDtypeStructs with shardings).compile()` runs XLA's TPU compiler.
Nothing is allocated. It reports, per device:

  - bytes: parameters and optimiser state (their shards), and from the compiled program's
    `memory_analysis()` arguments, outputs, temporaries and the total, against the chip's HBM;
  - FLOPs per step from XLA's `cost_analysis()` (the partitioned program: per device), and
    the analytic model FLOPs (retro_jax/train/metrics.py `model_flops_per_token`);
  - the compile time on this machine;
  - the step time and MFU the cost analysis predicts at the chip's peak: a roofline,
    max(XLA FLOPs / peak FLOP/s, XLA bytes accessed / HBM bandwidth), so an optimistic bound
    (no collective or host time), and MFU = model FLOPs / (chips x peak x that time).

    retro-jax compile --config experiments/paper/pile.py:172m --topology v5p:2x2x4
    retro-jax compile --config ... --topology v5p:4x4x4 --json     # the JSON line only

The chips' figures are in CHIPS (one table, with its source). It exits 1, saying what to
change, when the step does not fit (XLA refuses it, or its total exceeds the HBM), 2 when
libtpu is missing or the topology is unknown. `--topology cpu` compiles for this process's
CPU devices instead (no libtpu; for tests and to read a CPU step's memory).

It needs libtpu, which comes with `pip install "jax[tpu]==0.10.2"`: `make tpu-env` makes
`.venv-tpu`, the project plus jax[tpu] (libtpu warns that no TPU is attached, harmlessly).
`model.dtype="auto"` compiles in bfloat16, as it would run on the TPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = ('ahead-of-time TPU compilation needs libtpu: `make tpu-env` (.venv-tpu: the '
                'project plus jax[tpu]==0.10.2), or pip install "jax[tpu]==0.10.2" in an '
                "environment of its own; it works on a CPU-only machine (libtpu warns that no "
                "TPU is attached, harmlessly)")

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (one jax device per chip on v4, v5e, v5p, v6e)."""

    name: str
    peak_flops: float | None  # dense bf16 FLOP/s
    hbm_bytes: int | None
    hbm_bandwidth: float | None = None  # bytes/s


# Source: Google Cloud TPU system architecture pages, per chip (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e), as of 2026: v4 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s; v5e 197
# TFLOP/s, 16 GiB at 819 GB/s; v5p 459 TFLOP/s, 95 GiB HBM2e at 2,765 GB/s; v6e 918 TFLOP/s,
# 32 GiB at 1,640 GB/s. (XLA's TPU compiler reports 95.74 GiB usable on v5p in its
# out-of-memory errors; 95 GiB here is the conservative figure.) The peaks agree with
# PEAK_FLOPS_BY_DEVICE_KIND in retro_jax/train/metrics.py, which the training loop uses.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9),
    "v6e": Chip("TPU v6e", 918e12, 32 * GIB, 1640e9),
}
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}


class TopologyUnavailable(RuntimeError):
    """libtpu is missing or the topology name is unknown."""


def chip_for(topology: str) -> Chip | None:
    """The CHIPS entry of a topology name ('v5p:2x2x4' -> v5p), or None (cpu, unknown)."""
    generation = topology.split(":", 1)[0].strip().lower()
    return CHIPS.get(CHIP_ALIASES.get(generation, generation))


def topology_chips(topology: str) -> int | None:
    """Chips of a topology name ('v5p:4x4x4' -> 64), or None when it has no AxBxC part."""
    _, _, shape = topology.partition(":")
    try:
        return math.prod(int(x) for x in shape.split("x")) if shape else None
    except ValueError:
        return None


def topology_devices(topology: str) -> list:
    """The devices of a named TPU topology ('v5p:2x2x2', 'v4:2x2x1', 'v5e:4x4'...), or
    this process's CPU devices for 'cpu'."""
    if topology.strip().lower() == "cpu":
        import jax

        return list(jax.devices("cpu"))
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
        if "lockfile" in str(e):
            raise TopologyUnavailable(
                f"libtpu is in use by another process ({e}): it admits one process at a time "
                "(/tmp/libtpu_lockfile); wait for the other compile to end") from e
        raise TopologyUnavailable(f"cannot describe TPU topology {topology!r}: {e}. "
                                  "Names look like v5p:2x2x4 (v5p-32), v4:2x2x2, v5e:4x4") from e
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


def _first_cost(cost):
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0] if cost else None
    return cost or {}


# XLA's two wordings of "does not fit": "... 112.5G of 95.74G hbm ..." and "the total memory
# required for HLO temporaries (124.88G) exceeds available HBM (95.74G)"; its G is GiB.
_OOM = re.compile(r"([\d.]+)([KMGT])i?B? of ([\d.]+)([KMGT])i?B? hbm"
                  r"|\(([\d.]+)([KMGT])i?B?\) exceeds available hbm", re.IGNORECASE)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def needed_bytes(message: str) -> int | None:
    """The bytes per device XLA's out-of-memory `message` says the program needs, or None."""
    found = _OOM.search(message)
    if not found:
        return None
    amount, unit = (found[1], found[2]) if found[1] else (found[5], found[6])
    return int(float(amount) * _UNIT[unit.upper()])


def compile_train_step(config, devices: list, *, chip: Chip | None = None) -> dict:
    """Compile the train step of `config` for `devices`; per-device memory, FLOPs, timing
    and, with `chip`, the fit against its HBM and the predicted step time and MFU."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro, retrofit_filter
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train import metrics as metrics_lib
    from retro_jax.train.optimizer import make_optimizer, schedule_from_config
    from retro_jax.train.state import TrainSetup

    t_start = time.perf_counter()
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
    flops_per_token = metrics_lib.model_flops_per_token(
        model_cfg, seq_len=n, num_neighbours=k if model_cfg.retrieval else 0, chunk_len=m)
    tokens_per_step = int(tc.batch_size) * int(n)
    report = {
        "devices": len(devices),
        "device_kind": getattr(devices[0], "device_kind", "?"),
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "model_dtype": jnp.dtype(model_cfg.compute_dtype).name,
        "remat": str(model_cfg.remat),
        "batch_size": int(tc.batch_size), "grad_accum": int(tc.grad_accum), "seq_len": int(n),
        "tokens_per_step": tokens_per_step,
        "params_total": int(sum(math.prod(x.shape) for x in
                                jax.tree.leaves((state["params"], state["frozen"])))),
        "bytes_params_per_device": _bytes_per_device((state["params"], state["frozen"])),
        "bytes_optimizer_per_device": _bytes_per_device(state["opt_state"]),
        "model_flops_per_token": flops_per_token,
        "model_flops_per_step": flops_per_token * tokens_per_step,
    }
    if chip is not None:
        report["chip"] = chip.name
        for key, value in (("hbm_bytes_per_device", chip.hbm_bytes),
                           ("peak_flops_per_device", chip.peak_flops),
                           ("hbm_bandwidth_per_device", chip.hbm_bandwidth)):
            if value is not None:
                report[key] = value
    t_lower = time.perf_counter()
    lowered = step.lower(state, batch)
    t_compile, cpu_compile = time.perf_counter(), time.process_time()
    report["lower_seconds"] = t_compile - t_lower
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA reports "does not fit" as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["compile_seconds"] = time.perf_counter() - t_compile
        report["compile_cpu_seconds"] = time.process_time() - cpu_compile
        report["total_seconds"] = time.perf_counter() - t_start
        report["fits"] = False
        report["error"] = _oom_summary(str(e))
        needed = needed_bytes(str(e))
        if needed is not None:
            report["bytes_needed_per_device"] = needed
        return report
    report["compile_seconds"] = time.perf_counter() - t_compile
    report["compile_cpu_seconds"] = time.process_time() - cpu_compile  # all threads
    report["total_seconds"] = time.perf_counter() - t_start
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            report[f"bytes_{name.removesuffix('_size_in_bytes')}_per_device"] = int(
                getattr(memory, name, 0))
        report["bytes_total_per_device"] = (
            report["bytes_argument_per_device"] + report["bytes_output_per_device"]
            + report["bytes_temp_per_device"] - report["bytes_alias_per_device"])
    cost = _first_cost(compiled.cost_analysis())
    if "flops" in cost:
        report["xla_flops_per_device"] = float(cost["flops"])
    if "bytes accessed" in cost:
        report["xla_bytes_accessed_per_device"] = float(cost["bytes accessed"])
    report["fits"] = True
    if chip is not None and chip.hbm_bytes and "bytes_total_per_device" in report:
        report["hbm_fraction"] = report["bytes_total_per_device"] / chip.hbm_bytes
        report["fits"] = report["bytes_total_per_device"] <= chip.hbm_bytes
        if not report["fits"]:
            report["error"] = (f"XLA compiled it, but {_gib(report['bytes_total_per_device'])} "
                               f"per device > {_gib(chip.hbm_bytes)} of {chip.name} HBM (no "
                               "headroom for the runtime)")
    if chip is not None:
        report.update(predict_step(report, chip))
    return report


# FLOPs executed per model FLOP by remat policy: "full" recomputes the forward pass in the
# backward one (forward 2N + backward 4N + forward again 2N per token, against the model's 6N);
# "dots" keeps the matmul outputs, so only elementwise work is recomputed.
RECOMPUTE_FACTOR = {"none": 1.0, "dots": 1.0, "full": 4.0 / 3.0}


def predict_step(report: dict, chip: Chip) -> dict:
    """The step time and MFU the cost analysis predicts at the chip's peak (a roofline: the
    larger of compute time and HBM traffic time; collectives and the host are not counted,
    so the time is a lower bound and the MFU an upper bound).

    XLA's cost analysis counts a while loop's body once, not once per trip (the layer scan,
    grad_accum's scan, the blockwise loss's scan), so under loops its FLOPs fall below the
    model's. The FLOPs executed are then estimated as model FLOPs x the remat policy's
    recompute factor, and XLA's bytes accessed are scaled by the same undercount (the loop
    bodies hold nearly all of both)."""
    xla_flops = report.get("xla_flops_per_device")
    if not xla_flops or not chip.peak_flops:
        return {}
    devices = report["devices"]
    model_flops = report["model_flops_per_step"] / devices
    executed = model_flops * RECOMPUTE_FACTOR.get(report.get("remat", "none"), 1.0)
    undercount = max(executed / xla_flops, 1.0)
    flops = xla_flops * undercount
    compute_s = flops / chip.peak_flops
    memory_s = 0.0
    if chip.hbm_bandwidth:
        memory_s = (report.get("xla_bytes_accessed_per_device", 0.0) * undercount
                    / chip.hbm_bandwidth)
    step_s = max(compute_s, memory_s)
    return {
        "predicted_step_seconds": step_s,
        "predicted_bound": "compute" if compute_s >= memory_s else "hbm bandwidth",
        "predicted_compute_seconds": compute_s, "predicted_hbm_seconds": memory_s,
        "predicted_flops_per_device": flops,
        "predicted_flops_source": "xla" if undercount == 1.0 else "model x remat recompute",
        "predicted_mfu": model_flops / (chip.peak_flops * step_s),
        "predicted_tokens_per_second": report["tokens_per_step"] / step_s,
        # model FLOPs / XLA FLOPs: below 1 with rematerialisation (forward recomputed);
        # above 1 when XLA counts a loop body once.
        "model_to_xla_flops": model_flops / xla_flops,
    }


def _oom_summary(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if "RESOURCE_EXHAUSTED" in line or " hbm" in line.lower()]
    return " ".join(keep[:3] or lines[:1])[:600]


def what_to_change(report: dict, config) -> str:
    """Advice when the step does not fit: the knobs, ordered by what dominates the bytes."""
    per_device_batch = report["batch_size"] // max(
        report["mesh"].get("data", 1) * report["mesh"].get("fsdp", 1), 1)
    state = report["bytes_params_per_device"] + report["bytes_optimizer_per_device"]
    hbm = report.get("hbm_bytes_per_device")
    tips = []
    if hbm and state > 0.5 * hbm:
        tips.append(f"shard the state more: parameters + optimiser take {_gib(state)} per "
                    f"device; raise mesh.fsdp (now {config.mesh.fsdp}) or mesh.tensor (now "
                    f"{config.mesh.tensor}), or use a larger topology")
    micro = per_device_batch // max(report["grad_accum"], 1)
    tips.append(f"activations scale with the micro-batch ({micro} sequence(s) of "
                f"{report['seq_len']} per device): raise train.grad_accum (now "
                f"{report['grad_accum']})")
    if report["remat"] != "full":
        tips.append(f"recompute activations: model.remat=dots or full (now {report['remat']})")
    if not (hbm and state > 0.5 * hbm):
        tips.append(f"shard more: mesh.fsdp (now {config.mesh.fsdp}) / mesh.tensor (now "
                    f"{config.mesh.tensor}), or a larger topology")
    return "; ".join(tips)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def format_report(report: dict) -> str:
    """A readable summary of a compile report."""
    lines = [f"{report.get('config', '?')} on {report.get('topology', '?')}: "
             f"{report['devices']} x {report.get('chip', report['device_kind'])}, mesh "
             + " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
             + f", {report['model_dtype']}, remat {report['remat']}, batch "
             f"{report['batch_size']} x {report['seq_len']} (grad_accum {report['grad_accum']})",
             f"  parameters        {report['params_total'] / 1e6:,.1f}M"]
    hbm = report.get("hbm_bytes_per_device")
    for key, label in (("params", "parameters"), ("optimizer", "optimiser state"),
                       ("argument", "arguments"), ("output", "outputs"),
                       ("temp", "temporaries"), ("alias", "aliased (donated)"),
                       ("total", "total"), ("needed", "needed (XLA)")):
        value = report.get(f"bytes_{key}_per_device")
        if value is None:
            continue
        text = f"  {label:18s}{_gib(value):>12s} per device"
        if key in ("total", "needed") and hbm:
            text += f"  ({100 * value / hbm:.1f}% of {_gib(hbm)} HBM)"
        lines.append(text)
    if "xla_flops_per_device" in report:
        lines.append(f"  XLA FLOPs/step    {report['xla_flops_per_device']:.4g} per device; "
                     f"model FLOPs/step {report['model_flops_per_step']:.4g} in all "
                     f"(model/XLA {report.get('model_to_xla_flops', float('nan')):.2f})")
    if "predicted_step_seconds" in report:
        if report.get("predicted_flops_source", "xla") != "xla":
            lines.append(f"  executed FLOPs    {report['predicted_flops_per_device']:.4g} per "
                         "device, estimated as model FLOPs x the remat recompute factor "
                         "(XLA counts a loop body once)")
        lines.append(f"  predicted at peak {1e3 * report['predicted_step_seconds']:.1f} ms/step "
                     f"({report['predicted_bound']}-bound), "
                     f"{report['predicted_tokens_per_second']:,.0f} tokens/s, "
                     f"MFU {100 * report['predicted_mfu']:.1f}% (an upper bound: no "
                     "collectives)")
    lines.append(f"  compile time      {report.get('compile_seconds', 0):.1f} s wall, "
                 f"{report.get('compile_cpu_seconds', 0):.1f} s CPU (lowering "
                 f"{report.get('lower_seconds', 0):.1f} s) on this machine")
    lines.append("  fits: " + ("yes" if report["fits"] else f"NO: {report.get('error', '')}"))
    return "\n".join(lines)


def run_compile(args) -> int:
    """CLI entry: compile the train step for `args.topology`; print the report."""
    import ml_collections

    from retro_jax.configs import config_from_args

    topology = args.topology
    try:
        devices = topology_devices(topology)
    except TopologyUnavailable as e:
        print(f"retro-jax compile: {e}", file=sys.stderr)
        return 2
    chip = chip_for(topology)
    overrides = {"peak_flops": getattr(args, "peak_tflops", None),
                 "hbm_bytes": getattr(args, "hbm_gib", None)}
    if any(v is not None for v in overrides.values()):
        base = chip or Chip(f"{topology} device", None, None, None)
        chip = dataclasses.replace(
            base, **({"peak_flops": overrides["peak_flops"] * 1e12}
                     if overrides["peak_flops"] is not None else {}),
            **({"hbm_bytes": int(overrides["hbm_bytes"] * GIB)}
               if overrides["hbm_bytes"] is not None else {}))
    if chip is None and topology.lower() != "cpu":
        log.warning("no chip figures for %r (known: %s): no HBM check or prediction; give "
                    "--hbm-gib and --peak-tflops", topology, ", ".join(CHIPS))
    config = config_from_args(args, num_devices=len(devices))
    if config.model.dtype == "auto" and topology.lower() != "cpu":
        # "auto" resolves on this host's backend: use the TPU's
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.dtype = "bfloat16"
    log.info("compiling %s for %s (%d devices)", args.config, topology, len(devices))
    report = compile_train_step(config, devices, chip=chip)
    report = {"config": args.config, "topology": topology, **report}
    if not report["fits"]:
        report["what_to_change"] = what_to_change(report, config)
    if not getattr(args, "json", False):
        print(format_report(report))
    print(json.dumps(report))
    if not report["fits"]:
        print(f"retro-jax compile: the train step of {args.config} does not fit on {topology}: "
              f"{report.get('error', '')}. What to change: {report['what_to_change']}.",
              file=sys.stderr)
        return 1
    return 0
