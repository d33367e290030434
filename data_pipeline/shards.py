"""Arrays stored as row shards of bounded size, read back as one array.

A per-chunk array of N rows (tokens, doc ids, keys, candidate ids) is stored as `.npy` files
of at most `shard_rows` rows each: shard i holds rows [i * shard_rows, min(N, (i + 1) *
shard_rows)). Many workers write shards in parallel, each file under a temporary name that is
renamed into place (a file that exists is complete), and a reader memory-maps only the shards
it touches.

    ranges = shard_ranges(num_rows, shard_rows)        # [(first_row, num_rows), ...]
    write_npy_atomic(path, array)                      # unique temporary name, then rename
    array = open_rows(files, rows, dtype, row_shape)   # np.memmap (one shard) or ShardedArray
    array[10:20], array[[3, 700]], np.asarray(array)   # ShardedArray reads like an ndarray
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Rows per shard unless a config says otherwise (database.shard_chunks): 1 GB of tokens at
# m = 64, 6 GB of 384-d keys, and one ScaNN index shard (~10 ms per query batch).
DEFAULT_SHARD_ROWS = 4_000_000


def shard_ranges(num_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of each shard of `num_rows` rows cut every `shard_rows` rows; no
    shard for zero rows."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, found {shard_rows}")
    return [(first, min(shard_rows, num_rows - first)) for first in range(0, num_rows, shard_rows)]


def shard_file(name: str, index: int) -> str:
    """File name of shard `index` of the array `name` (e.g. tokens-00003.npy)."""
    return f"{name}-{index:05d}.npy"


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique sibling of `path` to write before renaming onto it: two attempts at the same
    file (a retried bundle, a speculative worker) never write into each other's file."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def remove_temporaries(root: str | os.PathLike) -> int:
    """Delete every file under `root` named by `temporary_path`: once all of a job's units
    are done, such a file was left by a writer killed before its rename. Returns how many."""
    stale = [p for p in Path(root).rglob("*.tmp-*") if p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """np.save under a temporary name, fsync, rename onto `path`. The bytes depend only on the
    array (dtype, shape, values), so a rewrite by a retried worker is identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data bytes expected) from an .npy header, without mapping the data.
    ValueError / OSError when the file is not a readable .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise ValueError("Fortran-ordered array")
        offset = f.tell()
    data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) < offset + data_bytes:
        raise ValueError(f"file holds {os.path.getsize(path) - offset} data bytes, the header "
                         f"says {data_bytes}")
    return tuple(int(s) for s in shape), dtype, data_bytes


def open_rows(files: Sequence[str | os.PathLike], rows: Sequence[int], dtype,
              row_shape: tuple[int, ...]) -> np.ndarray | ShardedArray:
    """The rows of `files` (one shard each, `rows[i]` rows) as one array: the memory map
    itself when there is one shard, an empty array for none, else a ShardedArray."""
    if not files:
        return np.zeros((0, *row_shape), dtype)
    if len(files) == 1:
        return np.load(files[0], mmap_mode="r", allow_pickle=False)
    return ShardedArray(files, rows, dtype, row_shape)


class ShardedArray(np.lib.mixins.NDArrayOperatorsMixin):
    """Several .npy row shards read as one array [sum(rows), *row_shape].

    Indexing along the first axis (ints, slices, integer or boolean arrays, then further axes
    as a tuple) reads only the shards holding the rows asked for, memory-mapped on first use;
    a slice inside one shard is a view of its memory map. `np.asarray(a)` reads every row;
    arithmetic and comparisons go through numpy (the array is read first).
    """

    def __init__(self, files: Sequence[str | os.PathLike], rows: Sequence[int], dtype,
                 row_shape: tuple[int, ...]):
        if len(files) != len(rows):
            raise ValueError(f"{len(files)} files but {len(rows)} row counts")
        self.files = [Path(f) for f in files]
        self.rows = [int(r) for r in rows]
        self.starts = np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)])
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.shape = (int(self.starts[-1]), *self.row_shape)
        self._maps: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ array protocol
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"ShardedArray({self.dtype.name} {list(self.shape)}, {len(self.files)} shards "
                f"in {self.files[0].parent if self.files else '-'})")

    def shard(self, index: int) -> np.ndarray:
        """The memory map of shard `index` (opened on first use)."""
        array = self._maps.get(index)
        if array is None:
            array = np.load(self.files[index], mmap_mode="r", allow_pickle=False)
            if array.shape != (self.rows[index], *self.row_shape) or array.dtype != self.dtype:
                raise ValueError(f"{self.files[index]}: {array.dtype} {list(array.shape)}, "
                                 f"expected {self.dtype} {[self.rows[index], *self.row_shape]}")
            self._maps[index] = array
        return array

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        out = np.array(out, copy=True) if isinstance(out, np.memmap) else np.asarray(out)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(isinstance(x, ShardedArray) for x in kwargs.get("out", ())):
            return NotImplemented
        inputs = tuple(np.asarray(x) if isinstance(x, ShardedArray) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __iter__(self):
        for index in range(len(self.files)):
            yield from self.shard(index)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def tolist(self) -> list:
        return np.asarray(self).tolist()

    def reshape(self, *shape) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    # ------------------------------------------------------------------ indexing
    def _shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right")) - 1

    def __getitem__(self, index):
        if isinstance(index, tuple):
            if not index:
                return np.asarray(self)
            head, rest = index[0], index[1:]
            if head is Ellipsis or head is None:
                return np.asarray(self)[index]
            out = self[head]
            if not rest:
                return out
            if isinstance(head, int | np.integer):
                return out[rest]
            lead = 1 if isinstance(head, slice) else np.ndim(head)
            return out[(slice(None),) * lead + rest]
        n = len(self)
        if isinstance(index, int | np.integer):
            row = int(index) + (n if index < 0 else 0)
            if not 0 <= row < n:
                raise IndexError(f"index {int(index)} is out of bounds for axis 0 with size {n}")
            shard = self._shard_of(row)
            return self.shard(shard)[row - int(self.starts[shard])]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            if stop <= start:
                return np.empty((0, *self.row_shape), self.dtype)
            first, last = self._shard_of(start), self._shard_of(stop - 1)
            if first == last:
                offset = int(self.starts[first])
                return self.shard(first)[start - offset:stop - offset]
            parts = []
            for shard in range(first, last + 1):
                lo, hi = int(self.starts[shard]), int(self.starts[shard + 1])
                parts.append(self.shard(shard)[max(start, lo) - lo:min(stop, hi) - lo])
            return np.concatenate(parts)
        ids = np.asarray(index)
        if ids.dtype == bool:
            if ids.shape != (n,):
                raise IndexError(f"boolean index of shape {ids.shape} for {n} rows")
            ids = np.flatnonzero(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise IndexError(f"only integers, slices and integer or boolean arrays are valid "
                             f"indices, found {ids.dtype}")
        flat = ids.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of bounds for axis 0 with size {n}")
        out = np.empty((flat.size, *self.row_shape), self.dtype)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        for shard in np.unique(shard_of):
            where = shard_of == shard
            out[where] = self.shard(int(shard))[flat[where] - self.starts[shard]]
        return out.reshape(ids.shape + self.row_shape)
