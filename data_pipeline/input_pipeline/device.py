"""Per-host numpy batches -> global jax.Arrays sharded over the batch axis, prefetched.

A background thread pulls host batches from the dataset, assembles each field into a global
array with `jax.make_array_from_process_local_data` (every host passes its own rows; the
global batch is the concatenation over hosts in process order) and keeps up to `prefetch`
of them in a bounded queue, so the host-to-device copy of step s+1 overlaps step s.
The consumer's time blocked in `next()` is summed in `.wait_seconds`: the trainer divides it
by the wall time to report the input-wait fraction.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# What the model step consumes; ids (doc_ids, chunk_ids, neighbour_ids) stay on the host
# (they are int64 and the model never reads them).
DEVICE_FIELDS = ("inputs", "targets", "neighbours", "score_mask")
_END = object()


class DeviceBatchIterator(Iterator[dict[str, jax.Array]]):
    """Iterator of global batches; see `device_batches`.

    Attributes:
      wait_seconds: total time `__next__` waited for a batch (input-bound time).
      batches: batches handed out so far.
    """

    def __init__(self, host_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, *,
                 prefetch: int, batch_partition_spec: PartitionSpec,
                 fields: Sequence[str] | None):
        self._sharding = NamedSharding(mesh, batch_partition_spec)
        self._fields = tuple(fields) if fields is not None else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self.batches = 0
        self._source = iter(host_batches)
        self._thread = threading.Thread(target=self._fill, name="device_batches", daemon=True)
        self._thread.start()

    def _to_global(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        out = {}
        for name, value in batch.items():
            if self._fields is not None and name not in self._fields:
                continue
            local = np.asarray(value)
            out[name] = jax.make_array_from_process_local_data(self._sharding, local)
        return out

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self._source:
                if not self._put(self._to_global(batch)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __next__(self) -> dict[str, jax.Array]:
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.batches += 1
        return item

    def close(self) -> None:
        """Stop the background thread (batches already fetched are dropped)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> DeviceBatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_batches(dataset: Iterable[dict[str, np.ndarray]], mesh: Mesh, *, prefetch: int = 2,
                   batch_partition_spec: PartitionSpec | None = None,
                   fields: Sequence[str] | None = DEVICE_FIELDS) -> DeviceBatchIterator:
    """Global batches from per-host batches.

    Args:
      dataset: a tf.data.Dataset from `make_dataset` (read with `as_numpy_iterator`) or any
        iterable of dicts of numpy arrays with the host's rows [B_host, ...].
      mesh: the device mesh.
      prefetch: batches assembled ahead of the consumer.
      batch_partition_spec: sharding of the leading (batch) axis; default
        PartitionSpec(("data", "fsdp")), the "batch" logical rule; later axes replicated.
      fields: keys to transfer (default: what the model consumes); None = all keys.
    Returns:
      an iterator of dicts of jax.Array [B_host * process_count, ...] with `.wait_seconds`.
    """
    if batch_partition_spec is None:
        batch_partition_spec = PartitionSpec(("data", "fsdp"))
    source = dataset.as_numpy_iterator() if hasattr(dataset, "as_numpy_iterator") else dataset
    return DeviceBatchIterator(source, mesh, prefetch=prefetch,
                               batch_partition_spec=batch_partition_spec, fields=fields)
