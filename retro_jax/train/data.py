"""The trainer's data: the retrieval database, the input pipeline, host -> device batches.

    factory = pipeline_batches(config, db, mesh, rules)   # start_step -> device batches
    batch = to_global(host_batch, setup, keys)             # numpy rows -> sharded jax.Arrays

`train()` takes any `factory(start_step)` (tests inject synthetic batches); this is the default
one, the tf.data pipeline over `<workdir>/db` resumed at the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BatchFactory = Callable[[int], Iterator[dict]]


def open_run_database(config, workdir: Path, embedder_name: str | None = None):
    """The run's retrieval database (`database.path`, else `<workdir>/db`), checked against
    the config's chunk length and retriever (and embedder, when given); a DataError says to
    build it first.
    Training, evaluation and sampling all open it here."""
    from data_pipeline.database import RetrievalDatabase
    from data_pipeline.errors import DataError

    path = Path(config.database.path) if config.database.path else Path(workdir) / "db"
    if not (path / "manifest.json").is_file():
        raise DataError(f"no retrieval database at {path} (manifest.json missing): run "
                        f"`retro-jax build-db --config ... --workdir {workdir}` first, or set "
                        "database.path")
    return RetrievalDatabase.open(path, expect_chunk_len=config.database.chunk_len,
                                  expect_embedder=embedder_name,
                                  expect_retriever=str(config.database.retriever))


def pipeline_batches(config, db, mesh, rules, split: str = "train", *, shuffle: bool = True,
                     repeat: bool = True) -> BatchFactory:
    """factory(start_step) -> device batch iterator over `split` (the real input pipeline)."""
    import jax

    from data_pipeline.input_pipeline import device_batches, make_dataset
    from retro_jax.models.sharding import logical_to_spec

    retrieval = bool(config.model.retrieval)
    spec = logical_to_spec(("batch",), rules)
    precomputed = None
    if retrieval and config.data.precomputed_neighbours:
        precomputed = ensure_precomputed_neighbours(config, db, split)

    def factory(start_step: int):
        dataset = make_dataset(
            db, split, seq_len=config.data.seq_len,
            batch_size=config.train.batch_size // jax.process_count(),
            num_neighbours=config.data.num_neighbours if retrieval else 0,
            overfetch=config.data.overfetch, packing=config.data.packing,
            seed=config.data.shuffle_seed, shuffle=shuffle, repeat=repeat,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(), exclude_same_document=True,
            precomputed_dir=precomputed,
            expect_chunk_len=config.database.chunk_len)
        return device_batches(dataset, mesh, prefetch=config.data.prefetch,
                              batch_partition_spec=spec)

    return factory


def ensure_precomputed_neighbours(config, db, split: str) -> Path:
    """`<db>/precomputed/<split>-k<k>x<overfetch>`: neighbour ids of every chunk of `split`,
    retrieved once (process 0, the first time) instead of inline in every epoch."""
    import jax

    from data_pipeline.input_pipeline import precompute_neighbours
    from retro_jax.train.multihost import sync

    k, overfetch = config.data.num_neighbours, config.data.overfetch
    directory = Path(db.path) / "precomputed" / f"{split}-k{k}x{overfetch}"
    if jax.process_index() == 0 and not (directory / "DONE").is_file():
        log.info("precomputing the neighbours of the %s split into %s", split, directory)
        precompute_neighbours(db, split, directory, num_neighbours=k, overfetch=overfetch,
                              exclude_same_document=True)
        (directory / "DONE").write_text("ok\n")
    sync(f"precomputed-{split}")
    return directory


def to_global(batch: dict, setup, keys: tuple[str, ...]) -> dict:
    """Host-local numpy rows -> global jax.Arrays in the batch sharding (arrays pass).

    Only `keys` are kept (the baseline takes no neighbours).
    """
    import jax

    out = {}
    for name, value in batch.items():
        if name not in keys:
            continue
        if isinstance(value, jax.Array):
            out[name] = value
        else:
            sharding = setup.batch_shardings({name: value})[name]
            out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
