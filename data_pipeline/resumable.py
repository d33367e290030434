"""Resumable units of work shared by the database build stages (chunks, retriever files):
fingerprints, done-markers, the kill -9 test hook, and the block-by-block writer of per-chunk
arrays.

A stage's unit of work (a key block, a BM25 candidate block, an index shard) leaves a marker
`<db>.partial/.build/<name>.json` = {inputs: fingerprint of what it was computed from,
sha256 of what it wrote, ...}. A rerun skips a unit whose marker matches its inputs and whose
output still has that sha256, and redoes the rest; since every unit is deterministic, the
result is byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.fileio import write_json_atomic
from data_pipeline.progress import progress

log = logging.getLogger("data_pipeline.build")
STATE_DIR = ".build"
# Test hook: the build SIGKILLs itself when it reaches this event (see event()).
KILL_ENV = "RETRO_JAX_BUILD_KILL_AT"


def fingerprint(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (the inputs of a unit of work)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def event(name: str) -> None:
    """Crash-test hook: `RETRO_JAX_BUILD_KILL_AT=<name>` kills the process here (SIGKILL)."""
    log.debug("build event %s", name)
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Markers:
    """Done-markers under `<partial>/.build/`: JSON {inputs, outputs, ...}."""

    def __init__(self, root: Path):
        self.root = root / STATE_DIR
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, inputs: str) -> dict | None:
        path = self.root / f"{name}.json"
        if not path.is_file():
            return None
        try:
            marker = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return marker if marker.get("inputs") == inputs else None

    def put(self, name: str, inputs: str, **fields) -> dict:
        path = self.root / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = {"inputs": inputs, **fields}
        write_json_atomic(path, marker)
        return marker


def write_row_blocks(path: Path, *, shape: tuple[int, ...], dtype, inputs: str,
                     block_rows: int, markers: Markers, name: str, event_prefix: str,
                     compute: Callable[[slice], np.ndarray], desc: str) -> str:
    """Fill the .npy array at `path` block by block, resumably.

    Rows [b * block_rows, (b + 1) * block_rows) are block b: computed by `compute(rows)` (an
    array of shape [rows, *shape[1:]]), written into the memory map, flushed, then marked
    done as `<name>/block_XXXXX` with the block's sha256. A rerun keeps blocks whose marker
    matches `inputs` and the bytes on disk. Test event after each block:
    `<event_prefix>/block_XXXXX/written` (e.g. keys/train/block_00003/written).

    Returns:
      the array's fingerprint: sha256 over `inputs` and the block checksums.
    """
    n = shape[0]
    array = None
    if path.is_file():
        try:
            array = np.load(path, mmap_mode="r+")
            if array.shape != shape or array.dtype != dtype:
                array = None
        except (ValueError, OSError):
            array = None
    if array is None:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    num_blocks = -(-n // block_rows)
    block_shas: list[str | None] = []
    todo = []
    for b in range(num_blocks):
        rows = slice(b * block_rows, min(n, (b + 1) * block_rows))
        marker = markers.get(f"{name}/block_{b:05d}", inputs)
        if marker and hashlib.sha256(array[rows].tobytes()).hexdigest() == marker["sha256"]:
            block_shas.append(marker["sha256"])
        else:
            block_shas.append(None)
            todo.append(b)
    if todo:
        bar = progress(sum(min(n, (b + 1) * block_rows) - b * block_rows for b in todo), desc,
                       "chunk")
        for b in todo:
            rows = slice(b * block_rows, min(n, (b + 1) * block_rows))
            block = np.asarray(compute(rows), dtype=dtype)
            want = (rows.stop - rows.start, *shape[1:])
            if block.shape != want:
                raise RuntimeError(f"{desc}: block {b} has shape {block.shape}, expected {want}")
            array[rows] = block
            array.flush()
            event(f"{event_prefix}/block_{b:05d}/written")
            sha = hashlib.sha256(array[rows].tobytes()).hexdigest()
            markers.put(f"{name}/block_{b:05d}", inputs, sha256=sha)
            block_shas[b] = sha
            bar.update(want[0])
        bar.close()
    del array
    return fingerprint([inputs, block_shas])
