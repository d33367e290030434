"""Multi-host start-up: `jax.distributed.initialize()` when, and only when, it is needed.

A TPU pod slice runs the same command on every host (scripts/launch_tpu_pod.sh). Each host is
one JAX process; `jax.distributed.initialize()` connects them before any computation so that
`jax.devices()` lists every chip of the slice. It is called when:

  - JAX_COORDINATOR_ADDRESS is set (any platform; with JAX_NUM_PROCESSES and JAX_PROCESS_ID,
    e.g. JAX_COORDINATOR_ADDRESS=10.0.0.2:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=0), or
  - a multi-host TPU slice is detected from the TPU VM environment: TPU_WORKER_HOSTNAMES
    (set by the TPU VM runtime) lists more than one host, or MEGASCALE_COORDINATOR_ADDRESS is
    set (multi-slice); jax then discovers coordinator, process count and id itself, or
  - SLURM (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1) launched several tasks
    (jax's cluster auto-detection).

On a single host none of these holds and nothing is done. Call it before anything touches a
device (the train command does so first thing).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

_INITIALIZED = False


def multi_process_requested(env: dict[str, str] | None = None) -> str | None:
    """Why the environment asks for a multi-process run (a short reason), or None."""
    env = dict(os.environ if env is None else env)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES ({len(hosts)} hosts)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS (multi-slice)"
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return var
        except ValueError:
            pass
    return None


def maybe_initialize_distributed() -> bool:
    """Initialise jax.distributed if the environment asks for it; True if it did (or had)."""
    global _INITIALIZED
    if _INITIALIZED:
        return True
    import jax

    if jax.distributed.is_initialized():
        _INITIALIZED = True
        return True
    reason = multi_process_requested()
    if reason is None:
        return False
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    log.info("multi-process run requested by %s: jax.distributed.initialize(%s)", reason,
             ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def sync(name: str, timeout_s: int = 3600) -> None:
    """A barrier across processes (no-op with one process).

    Uses the coordination service's barrier (no device collective, so no collective timeout
    while another process is still compiling), else a device all-gather.
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = getattr(distributed.global_state, "client", None)
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(f"retro_jax:{name}", timeout_s * 1000)
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def allgather_host_arrays(arrays: dict[str, Any]) -> dict[str, Any]:
    """Every process's host arrays, bit for bit: {name: [process_count, *shape]}.

    Each process passes arrays of the same names, shapes and dtypes (checked first: a
    ValueError lists them when they differ). Values of any dtype travel as raw bytes, so
    float64 and int64 survive exactly whatever `jax_enable_x64` says (a plain
    `process_allgather` would cast them to 32 bits). Rows are in process order. One process:
    each array with a leading axis of 1, no communication.
    """
    import jax
    import numpy as np

    arrays = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    count = jax.process_count()
    if count == 1:
        return {name: value[None] for name, value in arrays.items()}
    from jax.experimental import multihost_utils

    names = sorted(arrays)
    layout = ";".join(f"{n}:{arrays[n].dtype.str}:{arrays[n].shape}" for n in names)
    digest = np.frombuffer(hashlib.sha256(layout.encode()).digest()[:8], np.uint8)
    sizes = np.array([sum(arrays[n].nbytes for n in names)], np.int32)
    seen = multihost_utils.process_allgather(np.concatenate([digest.astype(np.int32), sizes]))
    if not (seen == seen[0]).all():
        raise ValueError(f"allgather_host_arrays: process {jax.process_index()} has "
                         f"{layout!r}; the processes' arrays differ in name, dtype or shape "
                         f"({len(np.unique(seen, axis=0))} distinct layouts)")
    if int(sizes[0]) == 0:
        return {n: np.empty((count, *arrays[n].shape), arrays[n].dtype) for n in names}
    raw = np.concatenate([arrays[n].reshape(-1).view(np.uint8) for n in names])
    gathered = np.asarray(multihost_utils.process_allgather(raw))  # [P, nbytes] uint8
    out, offset = {}, 0
    for n in names:
        nbytes = arrays[n].nbytes
        block = np.ascontiguousarray(gathered[:, offset:offset + nbytes])
        out[n] = block.view(arrays[n].dtype).reshape((count, *arrays[n].shape))
        offset += nbytes
    return out


def process_share(num_items: int) -> slice:
    """This process's contiguous share of `num_items` (ceil(num_items / processes) each; the
    last shares may be short or empty): concatenating the shares in process order restores
    the items' order."""
    import jax

    per = -(-num_items // jax.process_count())
    start = min(jax.process_index() * per, num_items)
    return slice(start, min(start + per, num_items))


def gather_shares(local, num_items: int):
    """The inverse of `process_share`: every process's share of a per-item array [share, ...],
    concatenated in process order into [num_items, ...] (on every process)."""
    import jax
    import numpy as np

    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    per = -(-num_items // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    gathered = allgather_host_arrays({"share": padded})["share"]
    return gathered.reshape((-1, *local.shape[1:]))[:num_items]
