"""Units of work (data_pipeline/resumable.py): a retried unit rewrites the same bytes and
leaves no temporary file, a damaged output is redone, and the fan-out merge of precomputed
neighbours gives the same top-K in any order (what a Beam combiner may do)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from data_pipeline.input_pipeline.precompute import (
    merge_candidates,
    part_candidates,
    select_candidates,
)
from data_pipeline.resumable import LocalRunner, Markers, Stage, Unit, completed, execute
from data_pipeline.shards import write_npy_atomic


class Squares(Stage):
    name = "squares"

    def __init__(self):
        self.runs = 0

    def run(self, unit: Unit, root: Path) -> dict:
        self.runs += 1
        n = unit.args["n"]
        write_npy_atomic(root / unit.outputs[0], np.arange(n, dtype=np.int64) ** 2)
        return {"n": n}


def _units(count=3):
    return [Unit(name=f"squares/shard_{i:05d}", inputs=f"in{i}", outputs=(f"sq-{i:05d}.npy",),
                 args={"n": 10 + i}) for i in range(count)]


def test_a_retried_unit_rewrites_the_same_bytes(tmp_path):
    stage, units = Squares(), _units()
    markers = LocalRunner().run(stage, units, tmp_path)
    assert stage.runs == 3 and markers[units[1].name]["n"] == 11
    first = {u.name: (tmp_path / u.outputs[0]).read_bytes() for u in units}
    # Done units are skipped.
    LocalRunner().run(stage, units, tmp_path)
    assert stage.runs == 3
    # A retry (its marker lost, as after a worker died between the rename and the marker).
    (Markers(tmp_path).root / f"{units[1].name}.json").unlink()
    execute(stage, units[1], tmp_path)
    assert stage.runs == 4
    assert {u.name: (tmp_path / u.outputs[0]).read_bytes() for u in units} == first
    assert not list(tmp_path.glob("*.tmp-*"))  # temporary names are renamed or removed


def test_damaged_or_changed_outputs_are_redone(tmp_path):
    stage, units = Squares(), _units(2)
    LocalRunner().run(stage, units, tmp_path)
    good = (tmp_path / units[0].outputs[0]).read_bytes()
    path = tmp_path / units[0].outputs[0]
    path.write_bytes(good[:-8])  # truncated
    assert completed(units[0], tmp_path) is None
    data = bytearray(good)
    data[-1] ^= 1  # same size, other bytes, new mtime: the sha256 decides
    path.write_bytes(bytes(data))
    assert completed(units[0], tmp_path) is None
    assert completed(units[1], tmp_path) is not None
    changed = Unit(units[1].name, "other inputs", units[1].outputs, units[1].args)
    assert completed(changed, tmp_path) is None  # inputs changed
    LocalRunner().run(stage, units, tmp_path)
    assert path.read_bytes() == good and stage.runs == 3
    marker = json.loads((Markers(tmp_path).root / f"{units[0].name}.json").read_text())
    assert set(marker["outputs"]) == {units[0].outputs[0]}


def test_fan_out_merge_is_order_free_and_equals_the_in_graph_merge():
    rng = np.random.default_rng(0)
    q, k, parts = 50, 6, 4
    partials = []
    for p in range(parts):
        # Coarse distances: many ties inside and across parts; -1 / inf padding at the end.
        d = np.sort(rng.integers(0, 5, size=(q, k)).astype(np.float32), axis=1)
        ids = rng.integers(0, 1000, size=(q, k)) + 1000 * p
        d[:, -1] = np.inf
        ids[:, -1] = -1
        partials.append(part_candidates(ids, d, p))
    # The in-graph merge: concatenation in part order, smallest distance first, ties to the
    # lower position (tf.math.top_k of the negated distances).
    all_ids = np.concatenate([x["ids"] for x in partials], axis=1)
    all_d = np.concatenate([x["dists"] for x in partials], axis=1)
    want = np.take_along_axis(all_ids, np.argsort(all_d, axis=1, kind="stable")[:, :k], 1)
    for order in itertools.permutations(range(parts)):
        merged = partials[order[0]]
        for p in order[1:]:
            merged = merge_candidates(merged, partials[p], k)
        np.testing.assert_array_equal(merged["ids"], want, err_msg=str(order))
    tree = merge_candidates(merge_candidates(partials[2], partials[0], k),
                            merge_candidates(partials[3], partials[1], k), k)
    np.testing.assert_array_equal(tree["ids"], want)


def test_select_candidates_keeps_survivors_in_order():
    ids = np.array([[5, 7, 9, -1], [1, 2, 3, 4]])
    docs = np.array([[50, 70, 90, -1], [10, 20, 10, 40]])
    out = select_candidates(ids, docs, np.array([70, 10]), np.array([40]), keep=3)
    np.testing.assert_array_equal(out, [[5, 9, -1], [2, -1, -1]])
    out = select_candidates(ids, docs, None, np.zeros(0, np.int64), keep=5)
    np.testing.assert_array_equal(out, [[5, 7, 9, -1, -1], [1, 2, 3, 4, -1]])
