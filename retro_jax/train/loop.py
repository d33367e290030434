"""`retro-jax train`: the training loop.

    retro-jax build-db --config experiments/demo.py --workdir runs/demo/retro
    retro-jax train    --config experiments/demo.py --workdir runs/demo/retro

Sections of `train()`: set-up (mesh, model, optimiser, shardings), state (resume from the
latest checkpoint, else initialise, optionally from a baseline for retrofitting), data (the
tf.data pipeline over the retrieval database, resumed at the next step), the loop (jitted
sharded step with donated state; metrics buffered on device and fetched at log and checkpoint
steps), and shutdown. Robustness:

- resume: `<workdir>/checkpoints` holds params, optimiser state, RNG, step and data position;
  a relaunch continues exactly where the last checkpoint left off;
- SIGTERM (preemption): the current step finishes, a checkpoint is written, exit code 0;
- NaN/Inf loss or gradient norm: `TrainingDiverged` names the step; the bad state is never
  saved, the last good checkpoint stays the latest.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retro_jax.train.data import (
    BatchFactory,
    held_out_batches,
    open_run_database,
    pipeline_batches,
    to_global,
)
from retro_jax.train.multihost import maybe_initialize_distributed, sync

log = logging.getLogger(__name__)

class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


def run_train(args) -> int:
    """CLI entry: `retro-jax train --config EXP --workdir W [--config.k=v ...]`."""
    maybe_initialize_distributed()
    import jax

    from retro_jax.configs import config_from_args

    if not getattr(args, "verbose", False):
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
    config = config_from_args(args, num_devices=jax.device_count())
    try:
        train(config, args.workdir)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 1
    return 0


# ---------------------------------------------------------------- preemption
class _StopRequest:
    """Set by SIGTERM/SIGINT; the loop stops after the current step and saves."""

    def __init__(self):
        self.reason: str | None = None
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM,):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving", self.reason)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes agree, so all save)."""
        import jax

        local = self.reason is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([int(local)], np.int32))
        return bool(np.max(flags))


# ----------------------------------------------------------------------- loop
def train(config, workdir: str | Path, *, batches: BatchFactory | None = None,
          eval_batches: Callable[[], Iterator[dict]] | None = None, database: Any = None,
          tokens_per_byte: float | None = None, mesh=None, progress: str = "auto",
          tensorboard: bool = True) -> dict:
    """Train (or resume) the run in `workdir` as `config` says; return the last metrics.

    Args:
      config: a validated config.
      workdir: run directory (config.json, checkpoints/, metrics.jsonl, tensorboard/).
      batches: factory(start_step) -> iterator of batches (dicts with inputs, targets
        [B, n] and neighbours [B, L, k, 2m]: host-local numpy rows, or global jax.Arrays);
        default: the tf.data pipeline over the database's train split.
      eval_batches: factory() -> iterator of validation batches; default: the pipeline over
        the validation split (when no `batches` is injected).
      database: an open RetrievalDatabase (default: database.path or <workdir>/db).
      tokens_per_byte: for bits per byte (default: the train split's ratio in the manifest).
      mesh: device mesh (default: make_mesh(config.mesh) over all devices).
      progress: "auto" (tqdm on a terminal), "bar", "log" or "none".
    Raises:
      TrainingDiverged: NaN/Inf loss; the last good checkpoint is kept.
    """
    maybe_initialize_distributed()
    import jax
    from flax import nnx

    from retro_jax.configs import save_config
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro, retrofit_filter
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train import diagnostics
    from retro_jax.train import metrics as metrics_lib
    from retro_jax.train.checkpoint import Checkpointer
    from retro_jax.train.optimizer import make_optimizer, schedule_from_config
    from retro_jax.train.restore import init_from_baseline, restore_state, save_state
    from retro_jax.train.state import TrainSetup

    workdir = Path(workdir)
    tc = config.train
    is_main = jax.process_index() == 0
    if is_main:
        save_config(config, workdir)

    # ------------------------------------------------------------------ set-up
    mesh = mesh or make_mesh(config.mesh)
    rules = logical_axis_rules(config.mesh)
    _check_batch_divides_mesh(config, mesh, rules)
    db = database
    if batches is None:  # fail fast, before any compilation, when the database is missing
        db = db or open_run_database(config, workdir)
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    trainable = retrofit_filter if tc.retrofit else nnx.Param
    setup = TrainSetup.create(lambda rngs: Retro(model_cfg, rngs=rngs), make_optimizer(tc),
                              mesh, rules, trainable=trainable)
    schedule = schedule_from_config(tc)
    train_step = setup.make_train_step(grad_accum=tc.grad_accum, schedule=schedule)
    eval_step = setup.make_eval_step()
    # Retrieval diagnostics at every evaluation: one held-out batch under real, no, random and
    # oracle neighbours (retro_jax/train/diagnostics.py).
    diagnostics_step = (setup.make_eval_step(diagnostics.variant_losses)
                        if model_cfg.retrieval else None)
    batch_keys = ("inputs", "targets") + (("neighbours",) if model_cfg.retrieval else ())
    log.info("mesh %s; %s trainable / %s total parameters", dict(mesh.shape),
             f"{_count(setup.abstract_state['params']):,}",
             f"{_count(setup.abstract_state['params']) + _count(setup.abstract_state['frozen']):,}")

    # ------------------------------------------------------------------- state
    ckpt = Checkpointer(workdir / "checkpoints", keep_last=tc.keep_last,
                        keep_every=tc.keep_every)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = restore_state(ckpt, setup, latest)
        start_step = int(meta["next_step"])
        log.info("resumed from %s/%d (next step %d)", ckpt.directory, latest, start_step)
    else:
        state = setup.init(tc.seed)
        start_step = 0
        if tc.init_from:
            state = init_from_baseline(setup, state, tc.init_from, require_frozen=tc.retrofit)

    # -------------------------------------------------------------------- data
    if batches is None:
        batches = pipeline_batches(config, db, mesh, rules)
        if eval_batches is None and tc.eval_every:
            eval_factory = held_out_batches(config, db, mesh, rules)
            eval_batches = lambda: eval_factory(0)  # noqa: E731
    if tokens_per_byte is None and db is not None:
        tokens_per_byte = metrics_lib.tokens_per_byte_from_manifest(db.manifest)
    if tc.eval_every and eval_batches is None:
        log.warning("train.eval_every=%d but no evaluation batches: no periodic evaluation",
                    tc.eval_every)

    flops_per_token = metrics_lib.model_flops_per_token(
        model_cfg, seq_len=config.data.seq_len,
        num_neighbours=config.data.num_neighbours if model_cfg.retrieval else 0,
        chunk_len=config.database.chunk_len)
    peak, peak_source = metrics_lib.peak_flops_per_device()
    log.info("%.3g model FLOPs/token; peak %.3g FLOP/s per device (%s)", flops_per_token, peak,
             peak_source)
    tokens_per_step = tc.batch_size * config.data.seq_len

    writer = metrics_lib.MetricWriter(workdir, total_steps=tc.num_steps, start_step=start_step,
                                      enabled=is_main, tensorboard=tensorboard, progress=progress)
    stop = _StopRequest()
    stop.install()
    source = iterator = batches(start_step)
    if jax.process_count() > 1 and start_step < tc.num_steps:
        # Compile before the first collective and wait for every process: XLA's CPU (gloo)
        # collectives give up after 30 s, and compile times differ between hosts.
        first = next(iterator)
        train_step.lower(state, to_global(first, setup, batch_keys)).compile()
        sync("train-step-compiled")
        iterator = itertools.chain([first], iterator)
    held_out = None  # the retrieval diagnostics' batch, fetched at the first evaluation
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
    window = {"steps": 0, "wait": 0.0, "start": None}
    last: dict = {}
    step = start_step
    stopping = False

    def fetch_pending() -> list[tuple[int, dict]]:
        """Host values of the buffered metrics; TrainingDiverged at the first bad step."""
        rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
        pending.clear()
        for s, m in rows:
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise TrainingDiverged(
                    f"loss {m['loss']} / gradient norm {m['grad_norm']} at step {s} "
                    f"(update {s} of {tc.num_steps}): training stopped without saving; the last "
                    f"good checkpoint is {ckpt.latest_step()} in {ckpt.directory}. Lower "
                    "train.learning_rate or raise train.warmup_steps, then relaunch to resume.")
        return rows

    def log_window(rows: list[tuple[int, dict]], now: float) -> dict:
        elapsed = now - window["start"] if window["start"] is not None else float("nan")
        loss = float(np.mean([m["loss"] for _, m in rows]))
        out = {"loss": loss, "perplexity": metrics_lib.perplexity(loss),
               "lr": rows[-1][1]["lr"],
               "grad_norm": float(np.mean([m["grad_norm"] for _, m in rows]))}
        if tokens_per_byte:
            out["bits_per_byte"] = metrics_lib.bits_per_byte(loss, tokens_per_byte)
        if window["steps"] and elapsed > 0:
            tokens_per_s = window["steps"] * tokens_per_step / elapsed
            out.update(tokens_per_s=tokens_per_s, steps_per_s=window["steps"] / elapsed,
                       mfu=flops_per_token * tokens_per_s / (peak * jax.device_count()),
                       input_wait=min(window["wait"] / elapsed, 1.0))
        return out

    try:
        while step < tc.num_steps:
            # ------------------------------------------------------------ step
            wait_before = getattr(iterator, "wait_seconds", None)
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                log.warning("the data ran out at step %d", step)
                break
            waited = (iterator.wait_seconds - wait_before if wait_before is not None
                      else time.perf_counter() - t0)
            state, step_metrics = train_step(state, to_global(batch, setup, batch_keys))
            pending.append((step + 1, step_metrics))
            step += 1
            if window["start"] is None:
                # The first step includes compilation: throughput windows start after it.
                jax.block_until_ready(step_metrics)
                window.update(steps=0, wait=0.0, start=time.perf_counter())
            else:
                window["steps"] += 1
                window["wait"] += waited

            stopping = stop.agreed()
            save_now = step % tc.checkpoint_every == 0 or step == tc.num_steps or stopping
            log_now = step % tc.log_every == 0 or step == tc.num_steps or stopping
            eval_now = bool(tc.eval_every and eval_batches and step % tc.eval_every == 0)
            if not (save_now or log_now or eval_now):
                continue
            rows = fetch_pending()  # raises TrainingDiverged before anything is saved
            now = time.perf_counter()
            if log_now and rows:
                last = log_window(rows, now)
                writer.write(step, last)
                writer.progress(step, last)
                window.update(steps=0, wait=0.0, start=now)
            if eval_now:
                eval_start = time.perf_counter()
                place = lambda b: to_global(b, setup, batch_keys)  # noqa: E731
                evaluated = _evaluate(eval_step, state, eval_batches(), tc.eval_batches,
                                      place, tokens_per_byte)
                if diagnostics_step is not None:
                    if held_out is None:  # the first held-out batch, the same every time
                        held_out = place(_first_batch(eval_batches()))
                    out = diagnostics_step(state, held_out)
                    evaluated.update(diagnostics.summarize(out["nll_sum"], out["tokens"],
                                                           tokens_per_byte))
                writer.write(step, evaluated)
                last.update(evaluated)
                log.info("step %d eval %s", step,
                         " ".join(f"{k}={v:.4g}" for k, v in evaluated.items()))
                # Evaluation time is not training time.
                window["start"] += time.perf_counter() - eval_start
            if save_now:
                save_state(ckpt, setup, state, next_step=step, config=config)
            if stopping:
                log.warning("stopped at step %d (%s); checkpoint written, relaunch to resume",
                            step, stop.reason or "another process was signalled")
                break
        else:
            if step == start_step:
                log.info("nothing to do: step %d >= train.num_steps=%d", step, tc.num_steps)
    finally:
        stop.restore()
        writer.close()
        if hasattr(source, "close"):
            source.close()
        ckpt.wait()
        ckpt.close()
    # `preempted`: stopped by a signal before train.num_steps; callers that chain stages after
    # training (demo, sweep) stop too, so the whole job exits and resumes on relaunch.
    return {"step": step, "preempted": bool(stopping), **last}


def _check_batch_divides_mesh(config, mesh, rules) -> None:
    """The (micro-)batch must split evenly over the mesh axes the batch is sharded on."""
    from retro_jax.configs import ConfigError
    from retro_jax.models.sharding import logical_to_spec

    spec = logical_to_spec(("batch",), rules)[0]
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    shards = int(np.prod([dict(zip(mesh.axis_names, mesh.devices.shape))[a] for a in axes]))
    micro = config.train.batch_size // config.train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"config key 'train.batch_size': found {config.train.batch_size} "
            f"(micro-batch {micro} with train.grad_accum={config.train.grad_accum}); the batch "
            f"is split over mesh axes {axes} = {shards} shards, so the micro-batch must be a "
            f"multiple of {shards}")


def _first_batch(iterator):
    """The first batch of an evaluation iterator, which is then closed (its prefetch thread
    stopped)."""
    try:
        return next(iterator)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def _evaluate(eval_step, state, iterator, num_batches: int, place, tokens_per_byte) -> dict:
    """Mean NLL over `num_batches` validation batches: eval_loss, eval_perplexity, eval_bpb."""
    import jax

    from retro_jax.train import metrics as metrics_lib

    sums = []
    for _ in range(num_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        sums.append(eval_step(state, place(batch)))
    if hasattr(iterator, "close"):
        iterator.close()
    if not sums:
        return {}
    sums = jax.device_get(sums)
    nll = sum(float(s["nll_sum"]) for s in sums)
    tokens = max(sum(float(s["tokens"]) for s in sums), 1.0)
    loss = nll / tokens
    out = {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss)}
    if tokens_per_byte:
        out["eval_bits_per_byte"] = metrics_lib.bits_per_byte(loss, tokens_per_byte)
    return out


def _count(state) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
