"""Training metrics: derived quantities (perplexity, bits per byte, MFU) and their writers.

Written by process 0 only:
  <workdir>/metrics.jsonl     one JSON object per logged step ({"step", "loss", ...});
                              a resumed run appends, so a step may appear twice: readers keep
                              the last line of each step (`read_metrics`)
  <workdir>/tensorboard/      tf.summary scalars (same names)
and a progress bar with ETA on a terminal (tqdm), plain log lines otherwise.

Model FLOPs per token (`model_flops_per_token`) are counted analytically from the config, the
PaLM way (appendix B): 6 x (parameters a token's computation touches) for the matmuls, forward
and backward, plus 6 x the attention score/value products (12 x layers x width x context).
Embedding lookups cost nothing; the output projection counts. RETRO adds per decoder token the
CCA layers (queries attend k x 2m encoded neighbour tokens) and the encoder, which runs over
k x 2m neighbour tokens per chunk of m decoder tokens, that is 2k encoder tokens per decoder
token. Full (not causal-halved) attention windows, as PaLM and MaxText count them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

LN2 = math.log(2.0)

# Peak dense bf16 FLOP/s per chip (per jax device) by `device_kind` prefix.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v2": 45e12 / 2,      # per core (jax device)
    "TPU v3": 123e12 / 2,     # per core
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,    # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,    # v6e (Trillium)
    "TPU7x": 2307e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}
PEAK_FLOPS_ENV = "RETRO_JAX_PEAK_FLOPS"  # per-device peak FLOP/s, overrides the table


# ----------------------------------------------------------------- derived metrics
def perplexity(nats_per_token: float) -> float:
    return math.exp(min(nats_per_token, 700.0))


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """nats/token -> bits/byte: / ln 2 x tokens per UTF-8 byte of the text."""
    return nats_per_token / LN2 * tokens_per_byte


def tokens_per_byte_from_manifest(manifest: Mapping, split: str = "train") -> float | None:
    """splits.<split>.num_tokens / num_bytes of a database manifest (None if unknown)."""
    info = manifest.get("splits", {}).get(split, {})
    tokens, nbytes = info.get("num_tokens"), info.get("num_bytes")
    if not tokens or not nbytes:
        return None
    return float(tokens) / float(nbytes)


def model_flops_per_token(model_cfg, *, seq_len: int, num_neighbours: int,
                          chunk_len: int) -> float:
    """Training FLOPs (forward + backward) per decoder token of a RetroConfig.

    See the module docstring for what is counted.
    """
    c = model_cfg
    gated = c.activation in ("swiglu", "geglu")
    ffw_mats = 3 if gated else 2
    d, attn = c.d_model, c.num_heads * c.head_dim
    decoder = c.num_layers * (4 * d * attn + ffw_mats * d * c.ffw_dim) + d * c.vocab_size
    attention = c.num_layers * 2 * seq_len * attn  # QK^T and AV, per token, forward
    if c.cca_layers:
        w = c.encoder_width
        enc_attn = c.encoder_heads * c.encoder_head_dim
        neighbour_len = 2 * chunk_len
        cca = len(c.cca_layers) * (2 * d * attn + 2 * w * attn)
        decoder += cca
        attention += len(c.cca_layers) * 2 * num_neighbours * neighbour_len * attn
        enc_ffw = 3 if gated else 2
        cross = len(c.encoder_cross_attend_layers)
        encoder = (c.encoder_layers * (4 * w * enc_attn + enc_ffw * w * c.encoder_ffw_dim)
                   + cross * (2 * w * enc_attn + 2 * d * enc_attn))
        encoder_attention = (c.encoder_layers * 2 * neighbour_len * enc_attn
                             + cross * 2 * chunk_len * enc_attn)
        enc_tokens = 2 * num_neighbours  # encoder tokens per decoder token
        decoder += enc_tokens * encoder
        attention += enc_tokens * encoder_attention
    return 6.0 * decoder + 3.0 * 2.0 * attention


def peak_flops_per_device(device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from).

    Order: the RETRO_JAX_PEAK_FLOPS environment variable, the table above by device_kind,
    and on CPU a measured float32 matmul rate (divided among the CPU devices sharing the
    host's cores).
    """
    import jax

    device = device or jax.devices()[0]
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV]), f"${PEAK_FLOPS_ENV}"
    kind = getattr(device, "device_kind", "")
    for prefix, value in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return value, f"table ({kind})"
    if device.platform == "cpu":
        return measure_cpu_matmul_flops() / max(jax.local_device_count(), 1), "measured (cpu)"
    return float("nan"), f"unknown device kind {kind!r}; set ${PEAK_FLOPS_ENV}"


@functools.cache
def measure_cpu_matmul_flops(size: int = 512, repeats: int = 5, *, rows: int | None = None,
                             cols: int | None = None) -> float:
    """Best-of FLOP/s of a jitted float32 matmul on the first CPU device (cached per shape):
    [rows, size] x [size, cols], square [size, size] by default. The training loop's CPU peak
    uses 512, the benchmarks' 2048; benchmarks/embed.py times the encoder's own shapes."""
    import jax
    import jax.numpy as jnp

    rows, cols = rows or size, cols or size
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((rows, size), jnp.float32), cpu)
    b = jax.device_put(jnp.ones((size, cols), jnp.float32), cpu)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * rows * size * cols / max(best, 1e-9)


# ------------------------------------------------------------------------ writers
class MetricWriter:
    """metrics.jsonl + TensorBoard + progress, on process 0 (a no-op elsewhere).

    Args:
      workdir: the run directory.
      total_steps: for the progress bar's ETA.
      start_step: where this run (re)starts.
      enabled: False on processes other than 0.
      tensorboard: write tf.summary event files (imports TensorFlow).
      progress: "auto" (tqdm on a terminal, log lines otherwise), "bar", "log", or "none".
    """

    def __init__(self, workdir: Path, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = True, progress: str = "auto"):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        cut = _ends_without_newline(path)
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if cut:  # a killed run left half a line: end it, so the next record stays readable
            self._jsonl.write("\n")
        if tensorboard:
            self._tb = _tensorboard_writer(self.workdir / "tensorboard")
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "log"
        self._progress = progress
        if progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One record for `step` (the number of updates applied)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            self._tb.write(step, scalars)

    def progress(self, step: int, scalars: Mapping[str, float]) -> None:
        """Advance the bar to `step`, or log a line."""
        if not self.enabled:
            return
        shown = {k: scalars[k] for k in ("loss", "lr", "tokens_per_s", "mfu", "eval_loss")
                 if k in scalars}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif self._progress == "log":
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            log.info("step %d %s", step, text)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _ends_without_newline(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class _TensorBoard:
    def __init__(self, writer, tf):
        self._writer, self._tf = writer, tf

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        with self._writer.as_default(step=int(step)):
            for name, value in scalars.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tf.summary.scalar(name, float(value))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _tensorboard_writer(logdir: Path) -> _TensorBoard | None:
    try:
        import tensorflow as tf
    except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
        log.warning("tensorflow is not installed: no TensorBoard events (metrics.jsonl only)")
        return None
    tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory from JAX
    return _TensorBoard(tf.summary.create_file_writer(str(logdir)), tf)


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str)) else value
    except (TypeError, ValueError):
        return str(value)


def read_metrics(workdir: Path) -> list[dict]:
    """The rows of `<workdir>/metrics.jsonl`, the last one of each step, in step order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a training run directory?")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            by_step.setdefault(int(row["step"]), {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
