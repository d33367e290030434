"""Build stages (data_pipeline/resumable.py) run as Apache Beam pipelines.

    runner = BeamRunner("--runner=DirectRunner --direct_num_workers=2 "
                        "--direct_running_mode=multi_processing")
    markers = runner.run(stage, units, root)        # the same call as LocalRunner's

Beam runs the same pipeline on one machine (DirectRunner) or on Dataflow, Flink or Spark; the
options string is passed to Beam as they are (`PipelineOptions(shlex.split(options))`). Each
stage is one pipeline: the units not yet done are spread over the workers (`Reshuffle`), and a
`DoFn` calls the stage's `setup` once per worker (a model is loaded once, JAX and TensorFlow
are imported there, not in the driver's pickle) and `execute`s each unit: a unit already done
is skipped, a retried bundle rewrites the same bytes under a new temporary name. A
`FanOutStage` computes its (part, units) elements in parallel and merges each unit's partial
results with a combiner before the unit is finished.

Beam is an optional dependency (`pip install -e ".[beam]"`); it is imported when a runner is
made. The workers must import this package: on one machine that is the driver's environment,
elsewhere ship it as Beam documents (`--setup_file`, `--requirements_file` or a container).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.resumable import (
    FanOutStage,
    LocalRunner,
    Markers,
    Stage,
    Unit,
    completed,
    execute,
    record,
)

log = logging.getLogger("data_pipeline.build")
INSTALL_HINT = "pip install -e '.[beam]' (apache-beam)"

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as _error:
    raise DataError(f"--runner beam needs Apache Beam, which is not installed ({_error}); "
                    f"install it: {INSTALL_HINT}") from _error


class BeamRunner:
    """Runs each stage as one Beam pipeline with the given pipeline options.

    Args:
      options: Beam pipeline options as one string (split like a shell command line) or a
        list, e.g. "--runner=DirectRunner --direct_num_workers=2
        --direct_running_mode=multi_processing"; empty = Beam's default DirectRunner.
      units_per_element, parts_per_element: a FanOutStage's element is this many units
        (query blocks) times this many parts (index shards): its worker loads each part once,
        computes it for every unit, and merges the element's parts before the shuffle, so
        the shuffle carries units x parts / parts_per_element partial results and the parts
        are loaded units / units_per_element times each.
    """

    parallel = True

    def __init__(self, options: str | Sequence[str] = "", *, units_per_element: int = 16,
                 parts_per_element: int = 1):
        self.flags = shlex.split(options) if isinstance(options, str) else list(options)
        try:
            PipelineOptions(self.flags).get_all_options(retain_unknown_options=False)
        except SystemExit as e:  # argparse rejects a malformed known option
            raise DataError(f"--beam-options {' '.join(self.flags)!r}: Beam could not parse "
                            "these pipeline options") from e
        self.units_per_element = max(1, int(units_per_element))
        self.parts_per_element = max(1, int(parts_per_element))

    def __repr__(self) -> str:
        return f"BeamRunner({' '.join(self.flags)!r})"

    def run(self, stage: Stage, units: Sequence[Unit], root: Path) -> dict[str, dict]:
        """Run the units not yet done; returns {unit name: marker} for every unit."""
        root = Path(root)
        markers = Markers(root)
        todo = [u for u in units if completed(u, root, markers) is None]
        if todo:
            if stage.in_driver:
                LocalRunner().run(stage, todo, root)
            else:
                log.info("%s: %d of %d units on Beam (%s)", stage.name, len(todo), len(units),
                         " ".join(self.flags) or "DirectRunner")
                self._pipeline(stage, todo, root)
        out, missing = {}, []
        for unit in units:
            marker = completed(unit, root, markers)
            if marker is None:
                missing.append(unit.name)
            out[unit.name] = marker
        if missing:
            raise DataError(f"Beam stage {stage.name!r} finished without completing "
                            f"{len(missing)} unit(s) ({', '.join(missing[:5])}); rerun the "
                            "same command to resume")
        return out

    def _pipeline(self, stage: Stage, todo: Sequence[Unit], root: Path) -> None:
        options = PipelineOptions(self.flags)
        with beam.Pipeline(options=options) as pipeline:
            if isinstance(stage, FanOutStage):
                # Units with the same parts (in order) are grouped; each element is a block of
                # units times a block of parts.
                groups: dict[tuple, list[Unit]] = {}
                for unit in todo:
                    groups.setdefault(tuple(stage.parts(unit)), []).append(unit)
                u, q = self.units_per_element, self.parts_per_element
                elements = [(parts[j:j + q], tuple(units[i:i + u]))
                            for parts, units in groups.items()
                            for i in range(0, len(units), u)
                            for j in range(0, len(parts), q)]
                merged = (pipeline
                          | f"{stage.name}: parts" >> beam.Create(elements)
                          | f"{stage.name}: spread" >> beam.Reshuffle()
                          | f"{stage.name}: compute" >> beam.ParDo(_ComputeParts(stage, root))
                          | f"{stage.name}: merge" >> beam.CombinePerKey(_Merge(stage)))
                _ = merged | f"{stage.name}: finish" >> beam.ParDo(
                    _FinishUnits(stage, root, {u.name: u for u in todo}))
            else:
                _ = (pipeline
                     | f"{stage.name}: units" >> beam.Create(list(todo))
                     | f"{stage.name}: spread" >> beam.Reshuffle()
                     | f"{stage.name}: run" >> beam.ParDo(_RunUnits(stage, root)))


class _RunUnits(beam.DoFn):
    """Executes units of a stage (setup once per worker)."""

    def __init__(self, stage: Stage, root: Path):
        self.stage, self.root = stage, Path(root)
        self._ready = False

    def setup(self):
        self._ready = False

    def process(self, unit: Unit):
        if completed(unit, self.root) is None:
            if not self._ready:
                self.stage.setup(self.root)
                self._ready = True
            execute(self.stage, unit, self.root)
        yield unit.name


class _ComputeParts(beam.DoFn):
    """(parts, units) -> (unit name, the unit's partial result merged over the parts) for
    each unit; each part is computed for every unit before the next part."""

    def __init__(self, stage: FanOutStage, root: Path):
        self.stage, self.root = stage, Path(root)
        self._ready = False

    def setup(self):
        self._ready = False

    def process(self, element):
        parts, units = element
        if not self._ready:
            self.stage.setup(self.root)
            self._ready = True
        merged: dict[str, Any] = {}
        for part in parts:
            for unit in units:
                result = self.stage.compute(unit, part, self.root)
                merged[unit.name] = (result if unit.name not in merged
                                     else self.stage.merge(merged[unit.name], result))
        yield from merged.items()


class _Merge(beam.CombineFn):
    def __init__(self, stage: FanOutStage):
        self.stage = stage

    def create_accumulator(self):
        return None

    def _merge(self, a, b):
        if a is None:
            return b
        return a if b is None else self.stage.merge(a, b)

    def add_input(self, accumulator, value):
        return self._merge(accumulator, value)

    def merge_accumulators(self, accumulators):
        out = None
        for accumulator in accumulators:
            out = self._merge(out, accumulator)
        return out

    def extract_output(self, accumulator):
        return accumulator


class _FinishUnits(beam.DoFn):
    """(unit name, merged result) -> the unit's outputs and marker."""

    def __init__(self, stage: FanOutStage, root: Path, units: dict[str, Unit]):
        self.stage, self.root, self.units = stage, Path(root), units
        self._ready = False

    def setup(self):
        self._ready = False

    def process(self, element):
        name, merged = element
        unit = self.units[name]
        if completed(unit, self.root) is None:
            if not self._ready:
                self.stage.setup(self.root)
                self._ready = True
            record(unit, self.root, self.stage.finish(unit, merged, self.root))
        yield name
