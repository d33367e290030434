"""Neighbours retrieved once, ahead of training, into sharded `.npy` files, and read back.

What is stored: the candidate ids of every chunk of a split, int64 [N, K] (K = k * overfetch,
capped by the database), already filtered by what depends on the chunk alone (its own
document, excluded documents), best first, -1 padded. They do not depend on the sequence the
chunk lands in, so one file set serves every seed, packing, sequence length and host count;
the pipeline applies the sequence's document filter and keeps the first k, then gathers the
neighbour tokens exactly as inline retrieval does, which makes the two modes yield identical
batches. Storage is 8K bytes per chunk (64 B at k=2, overfetch 4) instead of the key (1.5 KB
at d=384): training with precomputed neighbours loads no keys and never opens the index.

How they are computed: a fan-out (data_pipeline/resumable.py `FanOutStage`). Each unit is a
block of `shard_rows` query chunks; each part is one part of the database's search (one
ScaNN index shard, `Retriever.search_parts`); a part's top-K lists (ids, distances) of the
block are merged by distance (ties to the earlier part, then the better rank: the in-graph
search's merge), filtered, and written. On one machine (`LocalRunner`) the units run in
order; on Apache Beam (`BeamRunner`) each worker holds one index shard at a time, searches
blocks with it, and a combiner merges the blocks' lists, so the index never has to fit one
machine.

Layout of `out_dir` (written into `<out_dir>.partial/` and renamed into place):
    manifest.json            format_version, split, num_chunks, settings (num_candidates,
                             filters), database (fingerprint of the database it was computed
                             from), shard_rows, shards [{first_chunk, num_chunks, file, sha256}],
                             complete: true
    candidates-XXXXX.npy     int64 [n_i, K]: chunks [i * shard_rows, i * shard_rows + n_i)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.fileio import write_json_atomic
from data_pipeline.input_pipeline.checks import tokenizer_sha256
from data_pipeline.resumable import (
    STATE_DIR,
    FanOutStage,
    LocalRunner,
    Unit,
    fingerprint,
    output_sha256,
)
from data_pipeline.shards import (
    open_rows,
    remove_temporaries,
    shard_file,
    shard_ranges,
    write_npy_atomic,
)

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CANDIDATES = "candidates"
DEFAULT_SHARD_ROWS = 262_144  # 2 MB of ids per file at K = 8; a fan-out element's result


def database_fingerprint(db: Any, num_db_chunks: int) -> dict:
    """What the stored ids are valid for: the database's chunk ids and its retriever's files
    (every manifest section but the per-split counts, corpus and dedup information)."""
    manifest = getattr(db, "manifest", None) or {}
    fingerprint = {"chunk_len": int(db.chunk_len), "tokenizer_sha256": tokenizer_sha256(db),
                   "num_train_chunks": int(num_db_chunks)}
    skip = {"splits", "corpus", "dedup", "complete", "format_version", "tokenizer", "chunk_len"}
    fingerprint.update({key: value for key, value in manifest.items() if key not in skip})
    return fingerprint


def precompute_settings(db: Any, *, num_neighbours: int, overfetch: int,
                        exclude_same_document: bool,
                        exclude_doc_ids: Collection[int] | None) -> dict:
    """What determines the stored candidates; equal to the `NeighbourRetriever.settings` of a
    dataset with the same arguments (which `read_precomputed` compares)."""
    num_train = int(db.manifest["splits"]["train"]["num_chunks"])
    k = min(int(num_neighbours) * max(1, int(overfetch)), num_train)
    limit = db.retriever_class.candidate_limit(db.manifest)
    if limit is not None:
        k = min(k, int(limit))
    excluded = np.unique(np.asarray(list(exclude_doc_ids or ()), np.int64))
    return {"num_candidates": k, "exclude_same_document": bool(exclude_same_document),
            "exclude_doc_ids": excluded.tolist()}


# ---------------------------------------------------------------------------- merge, filter
def part_candidates(ids: np.ndarray, dists: np.ndarray, part: int) -> dict[str, np.ndarray]:
    """One part's top-K lists as a mergeable partial result."""
    ids = np.asarray(ids, np.int64)
    return {"ids": ids, "dists": np.asarray(dists, np.float32),
            "part": np.full(ids.shape, part, np.int32),
            "rank": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()}


def merge_candidates(a: dict, b: dict, k: int) -> dict[str, np.ndarray]:
    """The k best of two partial results by (distance, part, rank): associative and
    commutative, so any merge order gives the in-graph search's top-k (concatenation in part
    order, smallest distances first, ties to the lower position)."""
    merged = {key: np.concatenate([a[key], b[key]], axis=1) for key in a}
    order = np.lexsort((merged["rank"], merged["part"], merged["dists"]), axis=1)[:, :k]
    return {key: np.take_along_axis(value, order, 1) for key, value in merged.items()}


def select_candidates(ids: np.ndarray, candidate_docs: np.ndarray, own_docs: np.ndarray | None,
                      excluded: np.ndarray, keep: int) -> np.ndarray:
    """numpy twin of `NeighbourRetriever.select` with each query's own document as context:
    the first `keep` candidates whose document is neither the query's own (when `own_docs`
    is given) nor excluded, in candidate order; -1 where fewer."""
    valid = ids >= 0
    if own_docs is not None:
        valid &= ~((candidate_docs == own_docs[:, None]) & (own_docs[:, None] >= 0))
    if excluded.size:
        valid &= ~np.isin(candidate_docs, excluded)
    order = np.argsort(~valid, axis=1, kind="stable")
    chosen = np.take_along_axis(ids, order, 1)[:, :keep]
    chosen_valid = np.take_along_axis(valid, order, 1)[:, :keep]
    out = np.full((ids.shape[0], keep), -1, np.int64)
    out[:, :chosen.shape[1]] = np.where(chosen_valid, chosen, -1)
    return out


# ---------------------------------------------------------------------------- the stage
class PrecomputeStage(FanOutStage):
    """Units: blocks of query chunks; parts: the database's search parts (index shards)."""

    name = "neighbours"

    def __init__(self, db_path: str, split: str, split_db_path: str | None, settings: dict,
                 parts: list):
        self.db_path, self.split, self.split_db_path = db_path, split, split_db_path
        self.settings, self.search_parts = settings, parts
        self._loaded: dict[str, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_loaded": {}}

    def setup(self, root: Path) -> None:
        from data_pipeline.database import RetrievalDatabase

        if not self._loaded:
            db = RetrievalDatabase.open(self.db_path)
            source = RetrievalDatabase.open(self.split_db_path) if self.split_db_path else db
            self._loaded = {"db": db, "split": source.split(self.split), "searchers": {},
                            "train_doc_ids": db.split("train").doc_ids}

    def parts(self, unit: Unit) -> list[int]:
        return list(range(len(self.search_parts)))

    def _searcher(self, part: int):
        searchers = self._loaded["searchers"]
        if part not in searchers:
            if not self._loaded.get("keep_all"):
                searchers.clear()  # a Beam worker holds one index shard at a time
            searchers[part] = self.search_parts[part].load(self._loaded["db"])
        return searchers[part]

    def compute(self, unit: Unit, part: int, root: Path) -> dict:
        first, count = int(unit.args["first"]), int(unit.args["count"])
        rows = np.asarray(self._loaded["split"].queries[first:first + count])
        ids, dists = self._searcher(part).search(rows, int(self.settings["num_candidates"]))
        return part_candidates(ids, dists, part)

    def merge(self, a: dict, b: dict) -> dict:
        return merge_candidates(a, b, int(self.settings["num_candidates"]))

    def finish(self, unit: Unit, merged: dict, root: Path) -> dict:
        first, count = int(unit.args["first"]), int(unit.args["count"])
        ids = merged["ids"]
        valid = ids >= 0
        train_doc_ids = self._loaded["train_doc_ids"]
        docs = np.full(ids.shape, -1, np.int64)
        if valid.any():
            docs[valid] = train_doc_ids[ids[valid]]
        own = None
        if self.settings["exclude_same_document"]:
            own = np.asarray(self._loaded["split"].doc_ids[first:first + count], np.int64)
        kept = select_candidates(ids, docs, own,
                                 np.asarray(self.settings["exclude_doc_ids"], np.int64),
                                 int(self.settings["num_candidates"]))
        write_npy_atomic(Path(root) / unit.outputs[0], kept)
        return {}

    def run(self, unit: Unit, root: Path) -> dict:
        self._loaded["keep_all"] = True  # one process runs every unit: load each shard once
        return super().run(unit, root)


# ---------------------------------------------------------------------------- write, read
def write_precomputed(db: Any, split: str, out_dir: str | os.PathLike, *, settings: dict,
                      split_db: Any | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                      runner=None) -> Path:
    """Compute and write the candidates of every chunk of `split` (see the module docstring);
    resumable: a rerun keeps the blocks already written to `<out_dir>.partial/`."""
    out_dir = Path(out_dir)
    runner = runner if runner is not None else LocalRunner()
    source = split_db if split_db is not None else db
    num_chunks = int(source.manifest["splits"][split]["num_chunks"])
    fp = database_fingerprint(db, int(db.manifest["splits"]["train"]["num_chunks"]))
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    split_fp = fingerprint({"db": str(db_path_of(source)), "split": split,
                            "shards": source.manifest["splits"][split].get("shards")})
    common = fingerprint({"settings": settings, "database": fp, "split": split_fp})
    units = [Unit(name=f"neighbours/{split}/shard_{i:05d}",
                  inputs=fingerprint({"common": common, "first": first, "count": count}),
                  outputs=(shard_file(CANDIDATES, i),),
                  args={"first": first, "count": count}, size=count)
             for i, (first, count) in enumerate(shard_ranges(num_chunks, shard_rows))]
    stage = PrecomputeStage(str(db_path_of(db)), split,
                            None if split_db is None or split_db is db
                            else str(db_path_of(split_db)),
                            settings, db.retriever_class.from_settings().search_parts(db))
    markers = runner.run(stage, units, partial)
    remove_temporaries(partial)
    manifest = {"format_version": FORMAT_VERSION, "split": split, "num_chunks": num_chunks,
                "settings": settings, "database": fp, "shard_rows": int(shard_rows),
                "shards": [{"first_chunk": u.args["first"], "num_chunks": u.args["count"],
                            "file": u.outputs[0],
                            "sha256": output_sha256(markers[u.name], u.outputs[0])}
                           for u in units],
                "complete": True}
    write_json_atomic(partial / MANIFEST, manifest)
    shutil.rmtree(partial / STATE_DIR, ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def db_path_of(db: Any) -> Path:
    return Path(getattr(db, "path", "<database>"))


def check_precomputed(out_dir: str | os.PathLike, *, split: str, num_chunks: int,
                      settings: dict, fingerprint: dict) -> dict:
    """The manifest of precomputed neighbours that match the request; DataError otherwise."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    rerun = ("rerun retro-jax precompute-neighbours --config <experiment> --workdir <workdir> "
             f"(or data_pipeline.input_pipeline.precompute_neighbours(db, {split!r}, "
             f"{str(out_dir)!r}, ...)) with the same settings as the dataset")
    if not manifest_path.is_file():
        raise DataError(f"no precomputed neighbours at {out_dir} ({manifest_path} is missing); "
                        f"{rerun}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path} is not valid JSON ({e}); {rerun}") from e
    if manifest.get("format_version") == 1:
        raise DataError(f"{manifest_path}: precomputed neighbours in the TFRecord format of "
                        f"format_version 1; this version reads sharded .npy files "
                        f"(format_version {FORMAT_VERSION}): {rerun}")
    found = {"format_version": manifest.get("format_version"), "split": manifest.get("split"),
             "num_chunks": manifest.get("num_chunks"), "settings": manifest.get("settings"),
             "database": manifest.get("database"), "complete": manifest.get("complete")}
    wanted = {"format_version": FORMAT_VERSION, "split": split, "num_chunks": num_chunks,
              "settings": settings, "database": json.loads(json.dumps(fingerprint)),
              "complete": True}
    for key, value in wanted.items():
        if found[key] != value:
            raise DataError(f"{manifest_path}: {key} is {found[key]!r}, the dataset needs "
                            f"{value!r}; {rerun}")
    return manifest


def read_precomputed(out_dir: str | os.PathLike, *, split: str, num_chunks: int, settings: dict,
                     fingerprint: dict) -> np.ndarray:
    """candidate ids int64 [num_chunks, K]; DataError when the files do not match the request."""
    out_dir = Path(out_dir)
    manifest = check_precomputed(out_dir, split=split, num_chunks=num_chunks, settings=settings,
                                 fingerprint=fingerprint)
    k = int(settings["num_candidates"])
    shards = manifest["shards"]
    if sum(int(s["num_chunks"]) for s in shards) != num_chunks:
        raise DataError(f"{out_dir / MANIFEST}: the shards hold "
                        f"{sum(int(s['num_chunks']) for s in shards)} chunks, the split has "
                        f"{num_chunks}; rerun retro-jax precompute-neighbours")
    for shard in shards:
        file = out_dir / shard["file"]
        try:
            found = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{file} is missing or corrupt ({e}); rerun retro-jax "
                            "precompute-neighbours") from e
        if found.shape != (int(shard["num_chunks"]), k) or found.dtype != np.int64:
            raise DataError(f"{file}: {found.dtype} {list(found.shape)}, expected int64 "
                            f"[{shard['num_chunks']}, {k}]; rerun retro-jax "
                            "precompute-neighbours")
    ids = open_rows([out_dir / s["file"] for s in shards], [int(s["num_chunks"]) for s in shards],
                    np.int64, (k,))
    return np.array(ids, np.int64)
