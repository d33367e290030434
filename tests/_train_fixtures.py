"""Shared pieces of the training tests: tiny configs, synthetic batches, a subprocess runner.

Synthetic data: a deterministic "language" where token t+1 follows from token t (a fixed
random permutation, with noise), so a tiny model's loss falls fast. Batches depend only on the
step index (and the process index for multi-host), which makes resumption exact.

Run as a script, it trains in a subprocess (what the kill -9 / SIGTERM / multi-host tests do):

    python tests/_train_fixtures.py --workdir W [--processes 2 --process-id 0 --port P]
        [--config.train.num_steps=20 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
CHUNK = 8


def tiny_config(**overrides):
    """A validated config small enough to compile and train in seconds on CPU: the "tiny"
    size of retro_jax/configs/small.py, then `overrides` (dotted key -> value, as on the
    command line)."""
    from retro_jax.configs import get_base_config, validate_config
    from retro_jax.configs.loader import parse_override
    from retro_jax.configs.small import shrink

    c = shrink(get_base_config(), "tiny")
    c.name = "tiny"
    for key, value in overrides.items():
        parse_override(c, f"{key}={value}")
    return validate_config(c)


def synthetic_batch(step: int, batch_size: int, seq_len: int, num_neighbours: int,
                    chunk_len: int = CHUNK, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The global batch of `step`: inputs/targets [B, n], neighbours [B, L, k, 2m] int32."""
    perm = np.random.default_rng(1234).permutation(np.arange(4, VOCAB))
    successor = np.zeros(VOCAB, np.int64)
    successor[4:] = perm
    successor[:4] = perm[:4]
    rng = np.random.default_rng([seed, step])
    tokens = np.zeros((batch_size, seq_len + 1), np.int64)
    tokens[:, 0] = rng.integers(4, VOCAB, batch_size)
    for t in range(1, seq_len + 1):
        noise = rng.random(batch_size) < 0.1
        tokens[:, t] = np.where(noise, rng.integers(4, VOCAB, batch_size),
                                successor[tokens[:, t - 1]])
    num_chunks = seq_len // chunk_len
    neighbours = rng.integers(4, VOCAB, (batch_size, num_chunks, num_neighbours, 2 * chunk_len))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "neighbours": neighbours.astype(np.int32)}


def synthetic_batches(config, *, seed: int = 0):
    """A `batches` factory for `train()`: start_step -> iterator of host-local batches."""
    import jax

    def factory(start_step: int) -> Iterator[dict[str, np.ndarray]]:
        count, index = jax.process_count(), jax.process_index()
        rows = config.train.batch_size // count
        step = start_step
        while True:
            batch = synthetic_batch(step, config.train.batch_size, config.data.seq_len,
                                    config.data.num_neighbours, config.database.chunk_len,
                                    seed=seed)
            yield {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
            step += 1

    return factory


def read_metrics(workdir: Path) -> list[dict]:
    import json

    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line being written when we read
            out.append(json.loads(line))
    return out


def losses_by_step(workdir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in read_metrics(workdir):
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def subprocess_env(num_devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def script_command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir), *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, _, value = item.removeprefix("--config.").partition("=")
        overrides[key] = value

    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes,
                                   process_id=args.process_id)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from retro_jax.train.loop import train

    config = tiny_config(**overrides)
    train(config, args.workdir, batches=synthetic_batches(config), tokens_per_byte=0.25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
