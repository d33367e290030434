"""On-disk form of a ScaNN TF-op searcher: its state tensors as plain files, byte-deterministic.

ScaNN's own persistence (`tf.saved_model.save(searcher.serialize_to_module())`) writes a
SavedModel whose bytes change from run to run: a random fingerprint, uninitialised scalar
placeholders for absent fields, and TF's per-process function counters in the graph. A resumed
build could then not be checked against a clean one by checksums. This module writes the same
state, the nine tensors of ScaNN's `scann_to_tensors` op, as files whose bytes depend only on
the searcher:

    scann_config.binpb            serialized ScannConfig proto (bytes)
    serialized_partitioner.binpb  k-means tree (bytes; absent for brute force)
    datapoint_to_token.npy        int32 [n]        leaf of each key (absent for brute force)
    ah_codebook.binpb             AH centres (bytes; absent for brute force)
    hashed_dataset.npy            uint8 [n, blocks] 4-bit AH codes
    int8_dataset.npy, int8_multipliers.npy, dp_norms.npy   (absent: we re-order in float32)
    dataset.npy                   float32 [n, d]   the keys, for exact re-ordering / brute force

and reads them back into a TF-op searcher with ScaNN's `tensors_to_scann` op, so search stays
a TensorFlow op (no Python in a tf.data map). Arrays go through `np.save` / `np.load` with
`allow_pickle=False`; the listing (dtype, shape, bytes per field; null when absent) goes into
the shard's JSON by the caller.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from scann.scann_ops.py import scann_ops

from data_pipeline.errors import DataError

# (field, numpy dtype or None for a serialized proto), in the order of ScaNN's
# `scann_to_tensors` outputs (= `ScannState`'s constructor arguments).
STATE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("scann_config", None),
    ("serialized_partitioner", None),
    ("datapoint_to_token", np.int32),
    ("ah_codebook", None),
    ("hashed_dataset", np.uint8),
    ("int8_dataset", np.int8),
    ("int8_multipliers", np.float32),
    ("dp_norms", np.float32),
    ("dataset", np.float32),
)
PROTO_SUFFIX = ".binpb"


def _file_name(field: str, dtype: Any) -> str:
    return field + (PROTO_SUFFIX if dtype is None else ".npy")


def write_state(searcher: scann_ops.ScannSearcher, directory: str | os.PathLike
                ) -> dict[str, dict[str, Any] | None]:
    """Writes the searcher's state tensors into `directory`; returns the listing.

    listing: {field: {"file", "dtype", "shape", "num_bytes"} or None when ScaNN reports the
    field absent (a rank-0 placeholder, whose bytes are uninitialised memory: not written).
    """
    directory = Path(directory)
    tensors = scann_ops.scann_to_tensors(searcher.searcher_handle)
    listing: dict[str, dict[str, Any] | None] = {}
    for (field, dtype), tensor in zip(STATE_FIELDS, tensors):
        if tensor.shape.rank == 0:
            listing[field] = None
            continue
        path = directory / _file_name(field, dtype)
        if dtype is None:  # a string tensor of shape [1] holding one serialized proto
            values = tensor.numpy().reshape(-1)
            if values.size != 1:
                raise DataError(f"ScaNN state field {field}: expected one serialized proto, "
                                f"found shape {tensor.shape}; unsupported ScaNN version?")
            path.write_bytes(bytes(values[0]))
        else:
            array = tensor.numpy()
            if array.dtype != dtype:
                raise DataError(f"ScaNN state field {field}: expected {np.dtype(dtype)}, found "
                                f"{array.dtype}; unsupported ScaNN version?")
            np.save(path, array, allow_pickle=False)
        listing[field] = {"file": path.name, "dtype": "bytes" if dtype is None else
                          np.dtype(dtype).name, "shape": list(tensor.shape),
                          "num_bytes": path.stat().st_size}
    return listing


def _read_field(directory: Path, field: str, dtype: Any, entry: dict[str, Any] | None,
                where: Path) -> tf.Tensor:
    """One state tensor: the file's contents, or ScaNN's rank-0 "absent" placeholder."""
    if entry is None:
        return tf.constant(b"") if dtype is None else tf.zeros([], tf.as_dtype(dtype))
    path = directory / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["num_bytes"]:
        found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
        raise DataError(f"index shard {directory}: {path.name} should have "
                        f"{entry['num_bytes']} bytes ({where.name}), found {found} (truncated "
                        "or interrupted copy?); re-run `retro-jax build-db` to rebuild it")
    if dtype is None:
        return tf.constant([path.read_bytes()], dtype=tf.string)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"index shard {directory}: {path.name} is not a readable .npy file "
                        f"({err}); re-run `retro-jax build-db` to rebuild it") from err
    if array.dtype != dtype or list(array.shape) != entry["shape"]:
        raise DataError(f"index shard {directory}: {path.name} is {array.dtype} "
                        f"{list(array.shape)}, {where.name} says {entry['dtype']} "
                        f"{entry['shape']}; re-run `retro-jax build-db` to rebuild it")
    return tf.convert_to_tensor(array)


def read_state(directory: str | os.PathLike, listing: dict[str, Any], *, where: Path
               ) -> scann_ops.ScannSearcher:
    """Rebuilds the TF-op searcher from the files `write_state` wrote (DataError if damaged).

    `where` is the JSON file the listing came from (named in error messages).
    """
    directory = Path(directory)
    missing = [field for field, _ in STATE_FIELDS if field not in listing]
    if missing:
        raise DataError(f"{where}: the state listing lacks {', '.join(missing)}; "
                        "re-run `retro-jax build-db` to rebuild the shard")
    state = {field: _read_field(directory, field, dtype, listing[field], where)
             for field, dtype in STATE_FIELDS}
    # Eager resource ops are cached per attributes: a fresh shared_name gives each loaded
    # shard its own ScaNN resource (an empty one would hand back the first shard loaded).
    handle = scann_ops.tensors_to_scann(
        x=state.pop("dataset"), shared_name=f"retro-scann-{uuid.uuid4()}", **state)
    return scann_ops.ScannSearcher(handle)
