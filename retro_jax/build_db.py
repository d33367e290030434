"""`retro-jax build-db` and `retro-jax precompute-neighbours`: a config's corpus, tokenizer,
database, embedder and index sections mapped onto `data_pipeline.database.build_database`, and
its data section onto `data_pipeline.input_pipeline.precompute_neighbours`.

    retro-jax build-db --config EXP.py[:ARG] --workdir W [--force] [--config.KEY=VALUE ...]
        [--runner beam --beam-options="--runner=DirectRunner --direct_num_workers=2 ..."]
    retro-jax precompute-neighbours --config EXP.py[:ARG] --workdir W [--split train]
        [--runner beam --beam-options="..."]

The database goes to `database.path`, or `<workdir>/db`. Training, evaluation and sampling
open it with `retro_jax.train.data.open_run_database`, which checks it against the same
config. `--runner local` (the default) runs every stage in this process; `--runner beam` runs
them as Apache Beam pipelines with the given pipeline options (DirectRunner on this machine,
or Dataflow, Flink, Spark). Both write the same bytes, and either resumes the other's build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retro_jax.train.data import retriever_from_config, run_database_path


def make_runner(runner: str = "local", beam_options: str = "", fanout: str = ""):
    """The stage runner named on the command line: "local" or "beam" (with Beam pipeline
    options as one string; `fanout` "UxP": a fan-out element of U query blocks x P index
    shards, see data_pipeline.beam_runner.BeamRunner)."""
    from data_pipeline.errors import DataError
    from data_pipeline.resumable import LocalRunner

    if runner == "local":
        if beam_options:
            raise DataError("--beam-options is for --runner beam")
        return LocalRunner()
    if runner == "beam":
        from data_pipeline.beam_runner import BeamRunner

        units, parts = 16, 1
        if fanout:
            try:
                units, parts = (int(x) for x in fanout.lower().split("x"))
            except ValueError as e:
                raise DataError(f"--fanout {fanout!r}: expected UNITSxPARTS, e.g. 256x16") from e
        return BeamRunner(beam_options, units_per_element=units, parts_per_element=parts)
    raise DataError(f"--runner {runner!r}: expected local or beam")


def build_run_database(config, db_path: str | Path, *, force: bool = False, corpus: Any = None,
                       embedder: Any = None, block_rows: int | None = None, runner: Any = None):
    """Build (or resume) the retrieval database `config` describes at `db_path`.

    Args:
      corpus: a Corpus to read instead of opening `config.corpus` (tests).
      embedder: an embedder object instead of the configured frozen BERT (tests).
      block_rows: chunks per resumable block of the retriever's per-chunk arrays.
      runner: LocalRunner (default) or BeamRunner (`make_runner`).
    Returns:
      the opened RetrievalDatabase.
    """
    from data_pipeline.corpora import open_corpus
    from data_pipeline.database import (
        ChunkSettings,
        DedupSettings,
        TokenizerSettings,
        build_database,
    )
    db = config.database
    retriever = retriever_from_config(config, embedder=embedder, block_rows=block_rows)
    corpus_settings = config.corpus.to_dict()
    t = config.tokenizer
    return build_database(
        db_path,
        corpus=corpus if corpus is not None else open_corpus(**corpus_settings),
        corpus_settings=corpus_settings,
        corpus_kind=str(config.corpus.kind), corpus_path=str(config.corpus.path),
        retriever=retriever,
        tokenizer=TokenizerSettings(model_path=str(t.model_path), vocab_size=int(t.vocab_size),
                                    train_sample_bytes=int(t.train_sample_bytes),
                                    model_type=str(t.model_type)),
        chunking=ChunkSettings(chunk_len=int(db.chunk_len), max_chunks=int(db.max_chunks),
                               max_eval_chunks=int(db.max_eval_chunks),
                               max_document_chunks=int(db.max_document_chunks),
                               fraction=float(db.fraction),
                               eval_splits=tuple(str(s) for s in db.eval_splits),
                               shard_chunks=int(db.shard_chunks)),
        dedup=(DedupSettings(threshold=float(db.dedup_threshold), ngram=int(db.dedup_ngram),
                             num_perm=int(db.dedup_num_perm))
               if db.dedup_against_eval else None),
        force=force, runner=runner)


def run_build_db(args) -> int:
    """CLI: `retro-jax build-db --config EXP --workdir W [--force] [--runner beam ...]`."""
    from retro_jax.configs import config_from_args

    config = config_from_args(args)
    runner = make_runner(getattr(args, "runner", "local"), getattr(args, "beam_options", ""))
    build_run_database(config, run_database_path(config, args.workdir),
                       force=bool(getattr(args, "force", False)), runner=runner)
    return 0


def run_precompute_neighbours(args) -> int:
    """CLI: `retro-jax precompute-neighbours --config EXP --workdir W [--split S]
    [--runner beam --beam-options ...]`: the neighbours `data.precomputed_neighbours = true`
    training reads, written where it looks for them."""
    from retro_jax.configs import config_from_args
    from retro_jax.train.data import open_run_database, write_precomputed_neighbours

    config = config_from_args(args)
    runner = make_runner(getattr(args, "runner", "local"), getattr(args, "beam_options", ""),
                         getattr(args, "fanout", ""))
    db = open_run_database(config, args.workdir)
    directory = write_precomputed_neighbours(config, db, args.split or "train", runner=runner,
                                             force=bool(getattr(args, "force", False)))
    print(f"precomputed neighbours of the {args.split or 'train'} split: {directory}",
          flush=True)
    return 0
