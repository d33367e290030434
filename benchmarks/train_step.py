"""RETRO training-step benchmark on the "cpu-small" workload, side by side with the peer.

One step = forward + loss + backward + AdamW update, as benchmarks/peer/workload.py defines it
for both implementations (the same model size, the same seeded batch, the same JSON record),
plus MFU against the machine's fp32 matmul peak measured in the same run (a 2048x2048 jnp
matmul) and the step's FLOPs from XLA's cost analysis.

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--quick] [--json-out FILE]
    benchmarks/peer/run_side_by_side.sh --steps 5     # the peer (retro-pytorch), then this

cpu-small: vocab 32000, decoder 512 x 8 layers, CCA at 5 and 8, 8 heads x 64, encoder 512 x 2
(both layers cross-attend to H_u), FFW 4x GELU, m 64, n 512, k 2 neighbours of 128 tokens,
batch 8. Our model differs from the peer's where the paper says so: rotary relative positions
(no absolute position table) and RMSNorm; no biases.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peer"))
from workload import CPU_SMALL, emit, record, time_steps  # noqa: E402

# XLA:CPU's default "concurrency optimized" scheduler orders ops for inter-op parallelism and
# keeps far more buffers alive; the memory-minimising scheduler cuts the step's temporaries
# from 7.4 GB to 5.2 GB here (compiled.memory_analysis()). Must be set before jax starts.
CPU_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# XLA:CPU mallocs each step's large temporaries afresh; glibc serves them with new mmaps, so
# every step faults in ~9 GB of 4 KiB pages (2.2M minor faults, seconds of kernel time).
# With glibc's hugetlb tunable, malloc asks for transparent huge pages (2 MiB) instead.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


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

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.loss import chunked_cross_entropy, cross_entropy
    from retro_jax.models.retro import Retro
    from retro_jax.train.metrics import measure_cpu_matmul_flops

    w = CPU_SMALL
    cfg = RetroConfig(
        vocab_size=w.vocab, d_model=w.width, num_layers=w.layers, num_heads=w.heads,
        head_dim=w.head_dim, ffw_dim=w.ffw_multiple * w.width, chunk_len=w.chunk,
        activation="gelu", tie_embeddings=False, cca_layers=w.cca_layers,
        encoder_width=w.encoder_width, encoder_layers=w.encoder_layers, encoder_heads=w.heads,
        encoder_head_dim=w.head_dim, encoder_ffw_dim=w.ffw_multiple * w.encoder_width,
        encoder_cross_attend_layers=tuple(range(1, w.encoder_layers + 1)), dtype="float32",
        remat=args.remat)

    seq, retrieved = w.batch_arrays()
    inputs = jnp.asarray(seq[:, :-1], jnp.int32)
    targets = jnp.asarray(seq[:, 1:], jnp.int32)
    neighbours = jnp.asarray(retrieved, jnp.int32)

    model = nnx.jit(lambda: Retro(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(w.learning_rate, b1=w.adam_b1, b2=w.adam_b2, eps=w.adam_eps,
                     weight_decay=w.weight_decay)
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
    n_blocks = 1 if args.full_logits or w.seq_len % args.loss_block else (
        w.seq_len // args.loss_block)
    block_rows = w.batch * w.seq_len // n_blocks
    loss_scan_flops = (n_blocks - 1) * 3 * 2 * block_rows * w.width * w.vocab
    memory = compiled.memory_analysis()
    temp_gb = round(memory.temp_size_in_bytes / 2**30, 2) if memory else None

    state = {"params": params, "opt": opt_state}

    def step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"])
        return float(loss)  # blocks until the step is done

    times, losses, cpu_stats = time_steps(step, w, steps)
    peak = measure_cpu_matmul_flops(2048) / 1e9  # the machine's practical fp32 peak
    med = sorted(times)[len(times) // 2]
    achieved = flops / med / 1e9 if flops else 0.0
    achieved_all = (flops + loss_scan_flops) / med / 1e9 if flops else 0.0
    rec = record(
        "retro-jax", w, n_params, times,
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
    emit(rec, args.json_out)


if __name__ == "__main__":
    main()
