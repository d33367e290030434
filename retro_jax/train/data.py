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
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BatchFactory = Callable[[int], Iterator[dict]]


def run_database_path(config, workdir: str | Path) -> Path:
    """`database.path`, else `<workdir>/db`."""
    return Path(config.database.path) if config.database.path else Path(workdir) / "db"


def retriever_from_config(config, *, embedder: Any = None, block_rows: int | None = None):
    """The `database.retriever` of `config` with its settings (embedder and index sections);
    `embedder` (an object with name, dim, embed) replaces the configured frozen BERT;
    `block_rows`: chunks per resumable block of the retriever's per-chunk arrays."""
    from data_pipeline.retrieval import EmbedderSettings, make_retriever

    e = config.embedder
    settings = EmbedderSettings(name=str(e.name), path=str(e.path), batch_size=int(e.batch_size),
                                max_wordpieces=int(e.max_wordpieces), dtype=str(e.dtype))
    return make_retriever(str(config.database.retriever),
                          embedder=embedder if embedder is not None else settings,
                          index=config.index.to_dict(), block_rows=block_rows)


def open_run_database(config, workdir: str | Path, *, retriever: Any = None):
    """The run's retrieval database, checked against the config's chunk length and retriever
    kind (and `retriever`'s settings, e.g. its embedder, when a Retriever is given); a
    DataError says to build it first. Training, evaluation and sampling all open it here."""
    from data_pipeline.database import RetrievalDatabase
    from data_pipeline.errors import DataError

    path = run_database_path(config, workdir)
    if not (path / "manifest.json").is_file():
        raise DataError(f"no retrieval database at {path} (manifest.json missing): run "
                        f"`retro-jax build-db --config ... --workdir {workdir}` first, or set "
                        "database.path")
    db = RetrievalDatabase.open(path, expect_chunk_len=config.database.chunk_len,
                                retriever=retriever if retriever is not None
                                else str(config.database.retriever))
    check_corpus(db, config.corpus)
    return db


def check_corpus(db, corpus_cfg) -> None:
    """DataError when the database was built from another corpus than the config names: a
    result must never carry the name of data it was not computed on."""
    from data_pipeline.errors import DataError

    built = db.manifest.get("corpus", {})
    kind, path = str(corpus_cfg.kind), str(corpus_cfg.path)
    found_kind, found_path = built.get("kind"), built.get("path")
    if found_kind in (None, "", "synthetic"):  # written by hand (tests, benchmarks)
        return
    if found_kind != kind or (found_path is not None and found_path != path):
        raise DataError(
            f"{db.path / 'manifest.json'}: the database was built from corpus.kind="
            f"{found_kind!r} corpus.path={found_path!r} ({built.get('description', '')}), "
            f"the config reads corpus.kind={kind!r} corpus.path={path!r}; pass the database's "
            f"corpus (--config.corpus.kind / --config.corpus.path), or rebuild the database "
            "for this corpus: retro-jax build-db ... --force (or point database.path elsewhere)")


def pipeline_batches(config, db, mesh, rules, split: str = "train", *, shuffle: bool = True,
                     repeat: bool = True) -> BatchFactory:
    """factory(start_step) -> device batch iterator over `split` (the real input pipeline)."""
    import jax

    from data_pipeline.input_pipeline import device_batches, make_dataset
    from retro_jax.models.sharding import logical_to_spec
    from retro_jax.train.copy_warmup import with_copy_warmup

    retrieval = bool(config.model.retrieval)
    spec = logical_to_spec(("batch",), rules)
    precomputed = None
    if retrieval and config.data.precomputed_neighbours:
        precomputed = ensure_precomputed_neighbours(config, db, split)

    # Copy warm-up and mixing (retro_jax/train/copy_warmup.py): training only, RETRO only.
    copying = retrieval and split == "train"
    warmup = int(config.train.copy_warmup_steps) if copying else 0
    mix = float(config.train.copy_mix) if copying else 0.0
    rows = config.train.batch_size // jax.process_count()

    def factory(start_step: int):
        dataset = make_dataset(
            db, split, seq_len=config.data.seq_len, batch_size=rows,
            num_neighbours=config.data.num_neighbours if retrieval else 0,
            overfetch=config.data.overfetch, packing=config.data.packing,
            seed=config.data.shuffle_seed, shuffle=shuffle, repeat=repeat,
            start_step=max(start_step - warmup, 0), process_index=jax.process_index(),
            process_count=jax.process_count(), exclude_same_document=True,
            precomputed_dir=precomputed, align_max_shift=config.data.align_max_shift,
            expect_chunk_len=config.database.chunk_len)
        if start_step < warmup or mix > 0:
            dataset = with_copy_warmup(
                dataset.as_numpy_iterator(), start_step=start_step, warmup_steps=warmup,
                rows=rows, row_offset=rows * jax.process_index(), mix=mix,
                seed=config.train.seed,
                batch_size=config.train.batch_size, seq_len=config.data.seq_len,
                chunk_len=config.database.chunk_len, num_neighbours=config.data.num_neighbours,
                vocab_size=config.model.vocab_size)
        return device_batches(dataset, mesh, prefetch=config.data.prefetch,
                              batch_partition_spec=spec)

    return factory


def held_out_batches(config, db, mesh, rules) -> BatchFactory:
    """factory(0) -> the periodic evaluation's batches of `eval.split`, the same every time.

    Sequences are drawn in the pipeline's seeded shuffle (`data.shuffle_seed`), not in split
    order: the first batches of a split in order hold its first few documents only, so the
    held-out loss and the retrieval diagnostics would describe those documents, not the split.
    """
    return pipeline_batches(config, db, mesh, rules, config.eval.split, shuffle=True,
                            repeat=True)


def precomputed_dir(config, db, split: str) -> Path:
    """Where the precomputed neighbours of `split` live: `<db>/precomputed/<split>-k<k>x<o>`."""
    k, overfetch = config.data.num_neighbours, config.data.overfetch
    return Path(db.path) / "precomputed" / f"{split}-k{k}x{overfetch}"


def _precomputed_problem(config, db, split: str) -> str | None:
    """Why the precomputed neighbours of `split` cannot be used as they are (None: they can)."""
    from data_pipeline.errors import DataError
    from data_pipeline.input_pipeline.precompute import (
        check_precomputed,
        database_fingerprint,
        precompute_settings,
    )

    directory = precomputed_dir(config, db, split)
    settings = precompute_settings(db, num_neighbours=config.data.num_neighbours,
                                   overfetch=config.data.overfetch, exclude_same_document=True,
                                   exclude_doc_ids=None)
    try:
        check_precomputed(directory, split=split,
                          num_chunks=int(db.manifest["splits"][split]["num_chunks"]),
                          settings=settings,
                          fingerprint=database_fingerprint(
                              db, int(db.manifest["splits"]["train"]["num_chunks"])))
    except DataError as e:
        return str(e)
    return None


def write_precomputed_neighbours(config, db, split: str, *, runner: Any = None,
                                 force: bool = False) -> Path:
    """Retrieve the neighbours of every chunk of `split` once (`runner`: LocalRunner or a
    BeamRunner) into `precomputed_dir`, unless matching ones are there (or `force`)."""
    from data_pipeline.input_pipeline import precompute_neighbours

    directory = precomputed_dir(config, db, split)
    problem = _precomputed_problem(config, db, split)
    if problem is None and not force:
        log.info("precomputed neighbours of the %s split are in %s", split, directory)
        return directory
    log.info("precomputing the neighbours of the %s split into %s", split, directory)
    return precompute_neighbours(db, split, directory, num_neighbours=config.data.num_neighbours,
                                 overfetch=config.data.overfetch, exclude_same_document=True,
                                 runner=runner)


def ensure_precomputed_neighbours(config, db, split: str) -> Path:
    """`precomputed_dir`: neighbour ids of every chunk of `split`, retrieved once (process 0,
    the first time, in this process) instead of inline in every epoch; written ahead of
    training at scale with `retro-jax precompute-neighbours --runner beam`, in which case
    training reads them and never opens the index."""
    import jax

    from retro_jax.train.multihost import sync

    if jax.process_index() == 0:
        write_precomputed_neighbours(config, db, split)
    sync(f"precomputed-{split}")
    return precomputed_dir(config, db, split)


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
