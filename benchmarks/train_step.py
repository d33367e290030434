"""RETRO training-step benchmark on the peer's "cpu-small" config, side by side with the peer.

One step = forward + loss + backward + AdamW update (lr 1e-4, b1 0.9, b2 0.999, eps 1e-8,
weight decay 0.01 on every parameter), the peer's exact definition
(/work/shared/peer/peer_train_step.py). Same config, same seeded batch, same JSON record
(bench_common.result_record), plus MFU against the machine's fp32 matmul peak measured in the
same run (a 2048x2048 jnp matmul) and the step's FLOPs from XLA's cost analysis.

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--quick] [--json-out FILE]
    ../shared/peer/run_side_by_side.sh .venv/bin/python benchmarks/train_step.py --steps 5

cpu-small: vocab 32000, decoder 512 x 8 layers, CCA at 5 and 8, 8 heads x 64, encoder 512 x 2
(both layers cross-attend to H_u), FFW 4x GELU, m 64, n 512, k 2 neighbours of 128 tokens,
batch 8. Our model differs from the peer's where the paper says so: rotary relative positions
(no absolute position table) and RMSNorm; no biases.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

PEER_DIR = Path(os.environ.get("RETRO_PEER_DIR", "/work/shared/peer"))

# XLA:CPU's default "concurrency optimized" scheduler orders ops for inter-op parallelism and
# keeps far more buffers alive; the memory-minimising scheduler cuts the step's temporaries
# from 7.4 GB to 5.2 GB here (compiled.memory_analysis()). Must be set before jax starts.
CPU_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# XLA:CPU mallocs each step's large temporaries afresh; glibc serves them with new mmaps, so
# every step faults in ~9 GB of 4 KiB pages (2.2M minor faults, seconds of kernel time).
# With glibc's hugetlb tunable, malloc asks for transparent huge pages (2 MiB) instead.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def _bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", PEER_DIR / "bench_common.py")
    if spec is None or not (PEER_DIR / "bench_common.py").is_file():
        sys.exit(f"benchmarks/train_step.py: {PEER_DIR}/bench_common.py not found; "
                 "set RETRO_PEER_DIR to the directory holding the peer's bench_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    ap.add_argument("--quick", action="store_true", help="1 timed step (a smoke run)")
    ap.add_argument("--full-logits", action="store_true",
                    help="compute the loss from full [B, n, V] logits instead of blockwise")
    ap.add_argument("--loss-block", type=int, default=128,
                    help="tokens per block of the blockwise cross-entropy (default 128)")
    ap.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                    help="rematerialisation policy per block (model.remat)")
    ap.add_argument("--default-xla-scheduler", action="store_true",
                    help=f"do not add {CPU_XLA_FLAGS} to XLA_FLAGS")
    ap.add_argument("--small-pages", action="store_true",
                    help=f"do not set GLIBC_TUNABLES={MALLOC_TUNABLE}")
    args = ap.parse_args()
    steps = 1 if args.quick else args.steps
    if not args.small_pages and MALLOC_TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
        # glibc reads its tunables at process start: re-exec once with them set.
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLE]))
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": tunables})
    if not args.default_xla_scheduler and CPU_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_XLA_FLAGS).strip()

    bc = _bench_common()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.loss import chunked_cross_entropy, cross_entropy
    from retro_jax.models.retro import Retro
    from retro_jax.train.metrics import measure_cpu_matmul_flops

    c = bc.CPU_SMALL
    cfg = RetroConfig(
        vocab_size=c["vocab"], d_model=c["dec_dim"], num_layers=c["dec_depth"],
        num_heads=c["heads"], head_dim=c["dim_head"], ffw_dim=c["ff_mult"] * c["dec_dim"],
        chunk_len=c["chunk_size"], activation="gelu", tie_embeddings=False,
        cca_layers=tuple(c["cca_layers_1based"]), encoder_width=c["enc_dim"],
        encoder_layers=c["enc_depth"], encoder_heads=c["heads"], encoder_head_dim=c["dim_head"],
        encoder_ffw_dim=c["ff_mult"] * c["enc_dim"],
        encoder_cross_attend_layers=tuple(range(1, c["enc_depth"] + 1)), dtype="float32",
        remat=args.remat)

    seq, retrieved = bc.make_batch(c)
    inputs = jnp.asarray(seq[:, :-1], jnp.int32)
    targets = jnp.asarray(seq[:, 1:], jnp.int32)
    neighbours = jnp.asarray(retrieved, jnp.int32)

    model = nnx.jit(lambda: Retro(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(c["lr"], b1=c["adam_b1"], b2=c["adam_b2"], eps=c["adam_eps"],
                     weight_decay=c["weight_decay"])
    opt_state = tx.init(params)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        if args.full_logits:
            total, count = cross_entropy(model(inputs, neighbours), targets)
        else:
            h = model.hidden_states(inputs, neighbours)
            total, count = chunked_cross_entropy(h, model.output_weights(), targets,
                                                 block_len=args.loss_block)
        return total / count

    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_jit = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step_jit.lower(params, opt_state).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    # XLA's cost analysis counts a while loop's body once: the blockwise loss's scan runs
    # n/block times, each block with 3 matmuls [B*block, d] x [d, V] (logits, dh, dW; see
    # models/loss.py), so (n/block - 1) blocks' matmuls are missing from `flops`.
    n_blocks = 1 if args.full_logits or c["seq_len"] % args.loss_block else (
        c["seq_len"] // args.loss_block)
    block_rows = c["batch_size"] * c["seq_len"] // n_blocks
    loss_scan_flops = (n_blocks - 1) * 3 * 2 * block_rows * c["dec_dim"] * c["vocab"]
    memory = compiled.memory_analysis()
    temp_gb = round(memory.temp_size_in_bytes / 2**30, 2) if memory else None

    state = {"params": params, "opt": opt_state}

    def step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"])
        return float(loss)  # blocks until the step is done

    cpu_stats: dict = {}
    times, losses = bc.time_steps(step, steps, cpu_stats=cpu_stats)
    peak = measure_cpu_matmul_flops(2048) / 1e9  # the machine's practical fp32 peak
    med = sorted(times)[len(times) // 2]
    achieved = flops / med / 1e9 if flops else 0.0
    achieved_all = (flops + loss_scan_flops) / med / 1e9 if flops else 0.0
    rec = bc.result_record(
        "retro-jax", n_params, times, c,
        jax_version=jax.__version__, backend=jax.default_backend(),
        threads=os.cpu_count(), loss=("full-logits" if args.full_logits
                                      else f"blockwise-{args.loss_block}"),
        compile_s=round(compile_s, 2), remat=args.remat, xla_temp_gib=temp_gb,
        flops_per_step=int(flops),
        achieved_gflops=round(achieved, 1), matmul_peak_gflops=round(peak, 1),
        mfu=round(achieved / peak, 3) if peak else None,
        loss_scan_flops_uncounted=int(loss_scan_flops),
        achieved_gflops_incl_loss_scan=round(achieved_all, 1),
        loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
        step_s_all=[round(t, 4) for t in times], xla_flags=os.environ.get("XLA_FLAGS", ""),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        **cpu_stats)
    bc.emit(rec, args.json_out)


if __name__ == "__main__":
    main()
