"""The "cpu-small" training-step workload, shared by our benchmark and the peer's.

numpy and the standard library only, so that the peer's PyTorch virtualenv can import it too:
both sides build the same model size, train on the same token ids and print the same JSON
record, which `table.py` sets side by side.

cpu-small: vocab 32,000; decoder width 512, 8 layers, CCA at layers 5 and 8 (1-based); 8 heads
of 64; encoder width 512, 2 layers, both cross-attending to the decoder chunk; feed-forward
4 x width with GELU; chunk 64, sequence 512 (8 chunks); 2 neighbours of 128 tokens (chunk +
continuation); batch 8. One step = forward + loss + backward + AdamW (lr 1e-4, betas 0.9 and
0.999, eps 1e-8, weight decay 0.01 on every parameter: PyTorch's defaults; optax's default
weight decay differs, so it is passed explicitly). 2 warm-up steps, then timed steps.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str = "cpu-small"
    vocab: int = 32_000
    width: int = 512
    layers: int = 8
    cca_layers: tuple[int, ...] = (5, 8)  # 1-based
    heads: int = 8
    head_dim: int = 64
    encoder_width: int = 512
    encoder_layers: int = 2
    ffw_multiple: int = 4
    chunk: int = 64
    seq_len: int = 512
    neighbours: int = 2
    batch: int = 8
    learning_rate: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    data_seed: int = 1234
    warmup_steps: int = 2

    @property
    def chunks(self) -> int:
        return self.seq_len // self.chunk

    @property
    def tokens_per_step(self) -> int:
        """Decoder tokens per step (retrieved tokens not counted)."""
        return self.batch * self.seq_len

    def batch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The step's token ids, int64, drawn from [1, vocab) (no padding id 0):
        sequence [batch, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:]) and
        neighbours [batch, chunks, neighbours, 2 * chunk]."""
        rng = np.random.default_rng(self.data_seed)
        sequence = rng.integers(1, self.vocab, size=(self.batch, self.seq_len + 1),
                                dtype=np.int64)
        neighbours = rng.integers(1, self.vocab,
                                  size=(self.batch, self.chunks, self.neighbours,
                                        2 * self.chunk), dtype=np.int64)
        return sequence, neighbours


CPU_SMALL = Workload()


def time_steps(step: Callable[[], float], workload: Workload, steps: int
               ) -> tuple[list[float], list[float], dict]:
    """Warm-up, then `steps` timed calls of `step()` (which must block until done and return
    the loss). Returns (seconds per timed step, losses of every call, CPU statistics: median
    user and system seconds and minor page faults per step)."""
    losses = [step() for _ in range(workload.warmup_steps)]
    seconds, user, system, faults = [], [], [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user.append(after.ru_utime - before.ru_utime)
        system.append(after.ru_stime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    cpu = {"cpu_user_s_median": round(statistics.median(user), 3),
           "cpu_sys_s_median": round(statistics.median(system), 3),
           "minor_faults_per_step_median": int(statistics.median(faults))}
    return seconds, losses, cpu


def record(impl: str, workload: Workload, params: int, seconds: list[float],
           **extra) -> dict:
    """One JSON-able result: tokens/s from the median step, peak RSS, the machine."""
    median = statistics.median(seconds)
    out = {"impl": impl, "config": workload.name, "params": int(params),
           "tokens_per_s": round(workload.tokens_per_step / median, 2),
           "step_s_median": round(median, 4), "step_s_min": round(min(seconds), 4),
           "step_s_max": round(max(seconds), 4), "steps": len(seconds),
           "warmup_steps": workload.warmup_steps, "tokens_per_step": workload.tokens_per_step,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "python": platform.python_version(), "machine": platform.machine()}
    out.update(extra)
    return out


def emit(result: dict, json_out: str | None = None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")
