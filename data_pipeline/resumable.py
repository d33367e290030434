"""Resumable units of work and the runners that execute them: shared by every build stage
(chunks, keys, index shards, BM25 candidates) and by precomputed neighbours.

A stage is a set of independent units. A unit writes its outputs (files or directories
relative to the database being written) under temporary names that are renamed into place,
and its done-marker `<root>/.build/done/<unit name>.json` = {inputs: fingerprint of what it is
computed from, outputs: checksum and size of each output, ...}. A unit is done when its
marker matches its inputs and its outputs are intact; running it again writes the same bytes
(every unit is deterministic), so a rerun after a crash, a retried Beam bundle or a second
worker on the same unit never changes the result.

    class Keys(Stage):                         # one class per kind of work
        def setup(self, root): ...             # once per worker: load a model
        def run(self, unit, root): ...         # write unit.outputs; return marker fields
    markers = runner.run(Keys(...), units, root)   # LocalRunner() or BeamRunner(options)

`LocalRunner` runs the units in this process, in order. `data_pipeline.beam_runner.BeamRunner`
runs them as an Apache Beam pipeline (DirectRunner on one machine, Dataflow, Flink, Spark):
the stages do not know which. A `FanOutStage` is a unit split into parts whose results are
merged (each query block searched against every index shard): Beam computes the parts in
parallel and merges them with a combiner.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.fileio import file_sha256, write_json_atomic
from data_pipeline.progress import progress
from data_pipeline.shards import temporary_path, write_npy_atomic

log = logging.getLogger("data_pipeline.build")
STATE_DIR = ".build"
# Test hook: the build SIGKILLs itself when it reaches this event (see event()).
KILL_ENV = "RETRO_JAX_BUILD_KILL_AT"
# With this set too, the whole process group is killed (a Beam driver and its workers).
KILL_GROUP_ENV = "RETRO_JAX_BUILD_KILL_GROUP"


def fingerprint(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (the inputs of a unit of work)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def event(name: str) -> None:
    """Crash-test hook: `RETRO_JAX_BUILD_KILL_AT=<name>` kills the process here (SIGKILL), or
    its process group when `RETRO_JAX_BUILD_KILL_GROUP=1`."""
    log.debug("build event %s", name)
    if os.environ.get(KILL_ENV) == name:
        if os.environ.get(KILL_GROUP_ENV):
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


class Markers:
    """Done-markers under `<partial>/.build/done/`: JSON {inputs, outputs, ...}. (The rest
    of `.build/` holds the units' staging files.)"""

    def __init__(self, root: Path):
        self.root = Path(root) / STATE_DIR / "done"
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


# ---------------------------------------------------------------------------- outputs
def describe_output(path: Path) -> dict:
    """{"sha256", "files": {relative name: [bytes, mtime_ns]}} of a file or a directory (for
    a file the one name is "")."""
    if path.is_dir():
        from data_pipeline.fileio import dir_sha256

        files = {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(path.rglob("*")) if p.is_file()}
        return {"sha256": dir_sha256(path), "files": files}
    stat = path.stat()
    return {"sha256": file_sha256(path), "files": {"": [stat.st_size, stat.st_mtime_ns]}}


def output_intact(path: Path, recorded: Mapping) -> bool:
    """Whether `path` still holds what its marker recorded: the same files and sizes, and
    either the same modification times or (touched since) the same sha256."""
    try:
        if path.is_dir():
            files = {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns]
                     for p in sorted(path.rglob("*")) if p.is_file()}
        elif path.is_file():
            stat = path.stat()
            files = {"": [stat.st_size, stat.st_mtime_ns]}
        else:
            return False
    except OSError:
        return False
    want = recorded.get("files", {})
    if files.keys() != want.keys() or any(files[k][0] != want[k][0] for k in files):
        return False
    if all(files[k][1] == want[k][1] for k in files):
        return True
    return describe_output(path)["sha256"] == recorded.get("sha256")


# ---------------------------------------------------------------------------- units, stages
@dataclasses.dataclass(frozen=True)
class Unit:
    """One independent piece of work of a stage.

    name: unique in the build; its marker is `.build/done/<name>.json` (slashes make folders).
    inputs: fingerprint of everything the outputs are computed from.
    outputs: files or directories it writes, relative to the root.
    args: what `Stage.run` needs to do it (small, picklable).
    size: work units for progress (chunks).
    """

    name: str
    inputs: str
    outputs: tuple[str, ...]
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    size: int = 1


class Stage(abc.ABC):
    """A kind of work. Instances hold settings only (they are pickled to Beam workers);
    `setup` loads what the units need, once per worker."""

    name: str = "stage"
    unit_label: str = "chunk"
    # Run in the driver even under Beam: one step that needs the whole input (a tokenizer
    # trained on a sample, an in-memory BM25 index).
    in_driver: bool = False

    def setup(self, root: Path) -> None:  # noqa: B027 (optional hook)
        """Load models or tables (called once per process before its first unit runs)."""

    @abc.abstractmethod
    def run(self, unit: Unit, root: Path) -> dict | None:
        """Do the unit: write `unit.outputs` under `root` (temporary name, then rename);
        return extra marker fields (counts, parameters)."""


class FanOutStage(Stage):
    """Units whose work splits into parts computed separately and merged (map-reduce): a
    query block is searched against each index shard and the per-shard top-k are merged.
    `merge` must be associative and commutative (Beam merges in any order)."""

    @abc.abstractmethod
    def parts(self, unit: Unit) -> Sequence[Any]:
        """The parts of a unit (picklable)."""

    @abc.abstractmethod
    def compute(self, unit: Unit, part: Any, root: Path) -> Any:
        """One part's partial result."""

    @abc.abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Two partial results merged."""

    @abc.abstractmethod
    def finish(self, unit: Unit, merged: Any, root: Path) -> dict | None:
        """Write the unit's outputs from the merged result; return marker fields."""

    def run(self, unit: Unit, root: Path) -> dict | None:
        merged = None
        for part in self.parts(unit):
            result = self.compute(unit, part, root)
            merged = result if merged is None else self.merge(merged, result)
        return self.finish(unit, merged, root)


def completed(unit: Unit, root: Path, markers: Markers | None = None) -> dict | None:
    """The unit's marker when the unit is done (inputs match, outputs intact), else None."""
    markers = markers or Markers(root)
    marker = markers.get(unit.name, unit.inputs)
    if marker is None:
        return None
    recorded = marker.get("outputs", {})
    if set(recorded) != set(unit.outputs):
        return None
    if all(output_intact(root / rel, recorded[rel]) for rel in unit.outputs):
        return marker
    return None


def record(unit: Unit, root: Path, fields: Mapping | None) -> dict:
    """Write the unit's done-marker after its outputs are in place."""
    outputs = {rel: describe_output(root / rel) for rel in unit.outputs}
    marker = Markers(root).put(unit.name, unit.inputs, outputs=outputs, **dict(fields or {}))
    event(f"{unit.name}/done")
    return marker


def execute(stage: Stage, unit: Unit, root: Path) -> dict:
    """Run one unit unless it is done; returns its marker (what every worker runs)."""
    marker = completed(unit, root)
    if marker is not None:
        return marker
    return record(unit, root, stage.run(unit, root))


def output_sha256(marker: Mapping, rel: str) -> str:
    """The sha256 a unit's marker recorded for output `rel`."""
    return marker["outputs"][rel]["sha256"]


class LocalRunner:
    """Runs a stage's units one after another in this process (the single-process build)."""

    parallel = False

    def __repr__(self) -> str:
        return "LocalRunner()"

    def run(self, stage: Stage, units: Sequence[Unit], root: Path) -> dict[str, dict]:
        """Run the units not yet done; returns {unit name: marker} for every unit."""
        root = Path(root)
        markers = Markers(root)
        done = {u.name: completed(u, root, markers) for u in units}
        todo = [u for u in units if done[u.name] is None]
        if todo:
            stage.setup(root)
            bar = (progress(sum(u.size for u in todo), stage.name, stage.unit_label)
                   if len(todo) > 1 or todo[0].size > 1 else None)
            for unit in todo:
                done[unit.name] = record(unit, root, stage.run(unit, root))
                if bar is not None:
                    bar.update(unit.size)
            if bar is not None:
                bar.close()
        return done


def staging_dir(root: Path, unit: Unit) -> Path:
    """Where a unit keeps its partial results (named after its inputs)."""
    return Path(root) / STATE_DIR / "staging" / f"{unit.name}-{unit.inputs[:16]}"


def remove_staging(path: Path) -> None:
    """Remove a staging directory (temporary files of units that are done)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- blocked rows
def write_blocked_rows(path: Path, *, num_rows: int, row_shape: tuple[int, ...], dtype,
                       block_rows: int, staging: Path, event_prefix: str,
                       compute: Callable[[int, int], np.ndarray]) -> None:
    """Write the .npy array at `path` (rows [0, num_rows)) from blocks computed one by one.

    Block b = rows [b * block_rows, (b + 1) * block_rows) is `compute(first, count)`, saved
    into `staging/block_XXXXX.npy` (temporary name, then rename), so a rerun keeps the blocks
    already done; the blocks are then copied into `path` (temporary name, then rename) and
    `staging` is removed. `staging` must be named after the inputs (a change of input must
    not find old blocks). Test event after each block: `<event_prefix>/block_XXXXX/written`.
    """
    dtype = np.dtype(dtype)
    staging.mkdir(parents=True, exist_ok=True)
    blocks = []
    for b, first in enumerate(range(0, num_rows, block_rows)):
        count = min(block_rows, num_rows - first)
        file = staging / f"block_{b:05d}.npy"
        if file.is_file():
            try:
                block = np.load(file, mmap_mode="r", allow_pickle=False)
                if block.shape == (count, *row_shape) and block.dtype == dtype:
                    blocks.append(file)
                    continue
            except (ValueError, OSError):
                pass
        block = np.asarray(compute(first, count), dtype=dtype)
        if block.shape != (count, *row_shape):
            raise RuntimeError(f"{path}: block {b} has shape {block.shape}, expected "
                               f"{(count, *row_shape)}")
        write_npy_atomic(file, block)
        event(f"{event_prefix}/block_{b:05d}/written")
        blocks.append(file)
    tmp = temporary_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num_rows, *row_shape))
        first = 0
        for file in blocks:
            block = np.load(file, mmap_mode="r", allow_pickle=False)
            out[first:first + block.shape[0]] = block
            first += block.shape[0]
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    remove_staging(staging)
