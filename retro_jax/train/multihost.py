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

import logging
import os

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
