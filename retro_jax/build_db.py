"""`retro-jax build-db`: a config's corpus, tokenizer, database, embedder and index sections
mapped onto `data_pipeline.database.build_database`.

    retro-jax build-db --config EXP.py[:ARG] --workdir W [--force] [--config.KEY=VALUE ...]

The database goes to `database.path`, or `<workdir>/db`. Training, evaluation and sampling
open it with `retro_jax.train.data.open_run_database`, which checks it against the same
config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retro_jax.train.data import retriever_from_config, run_database_path


def build_run_database(config, db_path: str | Path, *, force: bool = False, corpus: Any = None,
                       embedder: Any = None, block_rows: int | None = None):
    """Build (or resume) the retrieval database `config` describes at `db_path`.

    Args:
      corpus: a Corpus to read instead of opening `config.corpus` (tests).
      embedder: an embedder object instead of the configured frozen BERT (tests).
      block_rows: chunks per resumable block of the retriever's per-chunk arrays.
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
                               eval_splits=tuple(str(s) for s in db.eval_splits)),
        dedup=(DedupSettings(threshold=float(db.dedup_threshold), ngram=int(db.dedup_ngram),
                             num_perm=int(db.dedup_num_perm))
               if db.dedup_against_eval else None),
        force=force)


def run_build_db(args) -> int:
    """CLI: `retro-jax build-db --config EXP --workdir W [--force]`."""
    from retro_jax.configs import config_from_args

    config = config_from_args(args)
    build_run_database(config, run_database_path(config, args.workdir),
                       force=bool(getattr(args, "force", False)))
    return 0
