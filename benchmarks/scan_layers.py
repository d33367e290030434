"""`model.scan_layers`: compile time and compiled size of the train step against depth, and the
step time, unrolled vs scanned.

The model is the demo's (experiments/demo.py: d 128, 4 heads x 32, FFW 512, vocabulary 2048,
a one-layer encoder, m 64, n 256, k 2, batch 8, fp32, AdamW) at several depths, with the paper's
CCA placement where it has one (12 layers: 6, 9, 12; 24 layers: 9, 12, ..., 24) and the demo's
(2, 4) at 4 layers. The step is `TrainSetup.make_train_step` (forward, blockwise loss,
backward, clipping, AdamW), lowered for abstract inputs and compiled for one CPU device.
One JSON line per (depth, layout):

    .venv/bin/python benchmarks/scan_layers.py [--layers 4 12 24] [--steps 5] [--remat none]
    .venv/bin/python benchmarks/scan_layers.py --topology v5p:2x2x1   # XLA:TPU, ahead of time

`--topology` compiles for a TPU topology on this machine (needs libtpu, see `retro-jax
compile`; nothing runs): XLA:CPU compiles an identical kernel once however many layers repeat
it, so its unrolled compile time grows more slowly than the program (figures in
docs/benchmarks.md); this option measures the compiler the paper configs target.

  lower_s, compile_s   tracing + lowering, and XLA compilation (seconds)
  hlo_chars, hlo_ops   len(compiled.as_text()), and its instruction count (lines with " = ")
  temp_mib             XLA's temporary buffers (compiled.memory_analysis())
  runs                 the decoder's runs ('P x5 | E | (P P C) x2'; unrolled: one per layer)
  step_s               median of --steps timed steps after one warm-up (--steps 0: skipped)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(num_layers: int, scan: bool, steps: int, remat: str, topology: str = "") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from retro_jax.configs.loader import load_config
    from retro_jax.configs.validate import default_cca_layers
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro
    from retro_jax.models.scan_layers import decoder_runs, describe_runs
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.optimizer import make_optimizer, schedule_from_config
    from retro_jax.train.state import TrainSetup

    cca = default_cca_layers(num_layers) or (2, 4)
    root = Path(__file__).resolve().parent.parent
    config = load_config(str(root / "experiments" / "demo.py"), [
        f"model.num_layers={num_layers}", f"model.cca_layers={cca}",
        f"model.scan_layers={scan}", f"model.remat={remat}"])
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    if topology:
        from retro_jax.train.aot import topology_devices

        devices = topology_devices(topology)
    else:
        devices = jax.devices()[:1]
    mesh = make_mesh(config.mesh, devices=devices)
    setup = TrainSetup.create(lambda rngs: Retro(model_cfg, rngs=rngs),
                              make_optimizer(config.train), mesh, logical_axis_rules(config.mesh))
    step = setup.make_train_step(grad_accum=1, schedule=schedule_from_config(config.train))
    b, n, m = config.train.batch_size, config.data.seq_len, config.database.chunk_len
    k = config.data.num_neighbours
    shapes = {"inputs": (b, n), "targets": (b, n), "neighbours": (b, n // m, k, 2 * m)}
    abstract = {key: jax.ShapeDtypeStruct(s, jnp.int32) for key, s in shapes.items()}
    abstract = {key: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
                for (key, s), sharding in zip(abstract.items(),
                                              setup.batch_shardings(abstract).values())}

    start = time.perf_counter()
    lowered = step.lower(setup.abstract_state, abstract)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    out = {"backend": topology or "cpu", "layers": num_layers, "cca_layers": list(cca),
           "scan_layers": scan, "remat": remat,
           "runs": describe_runs(decoder_runs(model_cfg)), "lower_s": round(lower_s, 2),
           "compile_s": round(compile_s, 2), "hlo_chars": len(text),
           "hlo_ops": sum(" = " in line for line in text.splitlines()),
           "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None}
    if steps:
        rng = np.random.default_rng(0)
        batch = {key: rng.integers(1, config.model.vocab_size, s).astype(np.int32)
                 for key, s in shapes.items()}
        state = setup.init(0)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        out["step_s"] = round(statistics.median(times), 3)
        out["loss"] = round(float(metrics["loss"]), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12, 24])
    ap.add_argument("--steps", type=int, default=0, help="timed train steps (0: compile only)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--layout", choices=("both", "unrolled", "scanned"), default="both")
    ap.add_argument("--topology", default="", help="compile for this TPU topology, e.g. "
                    "v5p:2x2x1 (no steps are run)")
    args = ap.parse_args()
    if args.topology:
        args.steps = 0
    layouts = {"both": (False, True), "unrolled": (False,), "scanned": (True,)}[args.layout]
    for num_layers in args.layers:
        for scan in layouts:
            print(json.dumps(measure(num_layers, scan, args.steps, args.remat, args.topology)),
                  flush=True)


if __name__ == "__main__":
    main()
