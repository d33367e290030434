"""Training-step MFU and tokens/s of a 425M-class RETRO on one accelerator, as one JSON line.

The device check of the project: the real training step (retro_jax/train/state.py
`TrainSetup.make_train_step`: forward, blockwise loss, backward, clipping, AdamW, the state
donated) of experiments/paper/pile.py:425m's model at n = 2048 in bfloat16, on one chip with a
batch that fits it (8 sequences by default, grad_accum 1), synthetic tokens and neighbours.
After `--warmup` steps (the first compiles) it times `--steps` steps and prints

    {"benchmark": "device_mfu", "mfu": ..., "tokens_per_second": ..., "step_seconds": ...}

MFU = model FLOPs per token (retro_jax/train/metrics.py `model_flops_per_token`: 6 x the
parameters a token touches + attention, the PaLM count, no rematerialisation counted) x
tokens per second / the chip's peak (`peak_flops_per_device`: NVIDIA H200 989 TFLOP/s dense
bf16, TPU v5p 459; RETRO_JAX_PEAK_FLOPS overrides). Goal: MFU >= 0.40 on an H200.

    python benchmarks/device_mfu.py --expect-backend gpu            # on the GPU machine
    python benchmarks/device_mfu.py --batch 16 --steps 20           # other batch / length
    python benchmarks/device_mfu.py --smoke                         # CPU: tiny model, 2 steps

`--smoke` (what CI runs, tests/test_device_mfu.py) keeps the code path and shrinks the model
to retro_jax/configs/small.py's "tiny" size, n = 64, batch 2, float32, 1 warm-up + 2 steps: it
checks that the script runs, not a speed. Without an accelerator and without `--smoke` the
script says so and runs the smoke configuration (so `make bench` stays cheap on a laptop);
`--expect-backend gpu|tpu` makes that an error instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_MFU = 0.40


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/paper/pile.py:425m",
                    help="experiment whose model and optimiser are timed")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (one chip)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (n)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    ap.add_argument("--dtype", default="bfloat16", help="model.dtype (compute dtype)")
    ap.add_argument("--remat", default=None, choices=("none", "dots", "full"),
                    help="model.remat (default: the config's)")
    ap.add_argument("--devices", type=int, default=1, help="devices in the mesh (data axis)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model, n 64, batch 2, float32, 2 steps: a CPU check")
    ap.add_argument("--expect-backend", default=None, choices=("gpu", "tpu", "cpu"),
                    help="exit 2 unless jax's default backend is this one")
    ap.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    return ap.parse_args(argv)


def build_config(args):
    """The validated config of the run: the experiment with the benchmark's overrides."""
    from retro_jax.configs import load_config, validate_config
    from retro_jax.configs.small import shrink

    shape = {"data.seq_len": args.seq_len, "eval.stride": args.seq_len,
             "train.batch_size": args.batch}
    overrides = ["train.grad_accum=1", f"model.dtype={args.dtype}",
                 f"mesh.data={args.devices}", "mesh.fsdp=1", "mesh.tensor=1"]
    if args.remat:
        overrides.append(f"model.remat={args.remat}")
    if not args.smoke:
        overrides += [f"{key}={value}" for key, value in shape.items()]
    config = load_config(args.config, overrides)
    if args.smoke:
        config = validate_config(shrink(config, "tiny", shape))
    return config


def synthetic_batch(config, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    b, n = int(config.train.batch_size), int(config.data.seq_len)
    m, k, v = int(config.database.chunk_len), int(config.data.num_neighbours), int(
        config.model.vocab_size)
    tokens = rng.integers(4, v, (b, n + 1), dtype=np.int64).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if config.model.retrieval:
        batch["neighbours"] = rng.integers(4, v, (b, n // m, k, 2 * m)).astype(np.int32)
    return batch


def run(args) -> dict:
    import jax
    import numpy as np

    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.metrics import model_flops_per_token, peak_flops_per_device
    from retro_jax.train.optimizer import make_optimizer, schedule_from_config
    from retro_jax.train.state import TrainSetup

    config = build_config(args)
    devices = jax.devices()[:args.devices]
    mesh = make_mesh(config.mesh, devices=devices)
    rules = logical_axis_rules(config.mesh)
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    tc = config.train
    setup = TrainSetup.create(lambda rngs: Retro(model_cfg, rngs=rngs), make_optimizer(tc),
                              mesh, rules)
    train_step = setup.make_train_step(grad_accum=1, schedule=schedule_from_config(tc))
    params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        setup.abstract_state["params"])))

    t0 = time.perf_counter()
    state = setup.init(tc.seed)
    shardings = setup.batch_shardings(synthetic_batch(config))
    batches = [{k: jax.device_put(v, shardings[k]) for k, v in synthetic_batch(config, s).items()}
               for s in range(2)]
    jax.block_until_ready((state, batches))
    init_s = time.perf_counter() - t0

    losses, times = [], []
    compile_s = None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = train_step(state, batches[i % 2])
        loss = float(metrics["loss"])  # waits for the step
        elapsed = time.perf_counter() - t
        if i == 0:
            compile_s = elapsed
        if i >= args.warmup:
            times.append(elapsed)
        losses.append(loss)
    if not all(np.isfinite(losses)):
        raise SystemExit(f"device_mfu: non-finite loss {losses}")

    n, m = int(config.data.seq_len), int(config.database.chunk_len)
    k = int(config.data.num_neighbours) if model_cfg.retrieval else 0
    flops_per_token = model_flops_per_token(model_cfg, seq_len=n, num_neighbours=k,
                                            chunk_len=m)
    tokens = int(tc.batch_size) * n
    median = float(np.median(times))
    peak, peak_source = peak_flops_per_device(devices[0])
    achieved = flops_per_token * tokens / median
    mfu = achieved / (peak * len(devices)) if peak and np.isfinite(peak) else None
    memory = {}
    try:
        stats = devices[0].memory_stats() or {}
        memory = {"peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                  "bytes_limit": stats.get("bytes_limit")}
    except Exception:  # noqa: BLE001 (CPU devices have no memory stats)
        pass
    return {
        "benchmark": "device_mfu", "mode": "smoke" if args.smoke else "full",
        "config": args.config,
        "model_size": "tiny (smoke)" if args.smoke else str(config.model.size),
        "retrieval": bool(model_cfg.retrieval), "params_trainable": params,
        "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
        "devices": len(devices), "jax": jax.__version__,
        "batch": int(tc.batch_size), "seq_len": n, "num_neighbours": k, "grad_accum": 1,
        "dtype": np.dtype(model_cfg.compute_dtype).name,
        "remat": str(model_cfg.remat),
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "init_seconds": round(init_s, 3), "first_step_seconds": round(compile_s, 3),
        "step_seconds": median, "step_seconds_all": [round(t, 5) for t in times],
        "tokens_per_second": tokens / median,
        "model_flops_per_token": flops_per_token, "achieved_flops_per_second": achieved,
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "mfu": mfu, "goal_mfu": GOAL_MFU,
        "meets_goal": None if mfu is None or args.smoke else bool(mfu >= GOAL_MFU),
        "loss_first": losses[0], "loss_last": losses[-1],
        **{f"memory_{k}": v for k, v in memory.items() if v is not None},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    path, sep, variant = args.config.partition(":")
    if not Path(path).exists() and (REPO / path).exists():  # relative to the repository
        args.config = f"{REPO / path}{sep}{variant}"
    import jax

    backend = jax.default_backend()
    if args.expect_backend and backend != args.expect_backend:
        print(f"device_mfu: expected the {args.expect_backend} backend, jax has {backend} "
              f"({jax.devices()[0].device_kind}); install jax with that plugin "
              "(e.g. pip install -e '.[cuda]')", file=sys.stderr)
        return 2
    if backend == "cpu" and not args.smoke:
        print("device_mfu: no accelerator (jax backend cpu): running the --smoke configuration "
              "instead; the MFU figure needs a GPU or TPU", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        args.batch = 2 if args.batch == 8 else args.batch
        args.seq_len = 64 if args.seq_len == 2048 else args.seq_len
        args.dtype = "float32" if args.dtype == "bfloat16" else args.dtype
        args.steps = 2 if args.steps == 10 else args.steps
        args.warmup = 1 if args.warmup == 2 else args.warmup
    record = run(args)
    line = json.dumps(record)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
