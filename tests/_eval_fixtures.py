"""Evaluation test fixtures: tiny corpora in the Wikitext103 and Pile formats, a tiny config,
and a tiny trained run (real build + real trainer) to evaluate.

    corpus_dir = write_wikitext103(tmp_path / "wt103")
    config = eval_config("wikitext103", corpus_dir)
    workdir = build_and_train(config, tmp_path / "run", steps=3)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests._db_fixtures import HashEmbedder, generated_documents

PILE_SETS = ("Pile-CC", "Github", "Wikipedia (en)")


def _article(title: str, body: str) -> str:
    # Wikitext103 layout: " = Title = " heading, blank lines, " = = Section = = ", paragraphs.
    lines = body.strip("\n").split("\n")
    half = max(1, len(lines) // 2)
    para1 = " " + " ".join(lines[:half]) + " \n"
    para2 = " " + " ".join(lines[half:]) + " \n" if lines[half:] else ""
    return (f" = {title} = \n \n{para1} \n = = Section = = \n \n{para2}" if para2
            else f" = {title} = \n \n{para1}")


def write_wikitext103(directory: Path, *, train_docs: int = 24, eval_docs: int = 3,
                      seed: int = 0) -> Path:
    """wiki.{train,valid,test}.tokens with generated articles sharing one sentence pool."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, name, count in (("train", "train", train_docs), ("validation", "valid", eval_docs),
                               ("test", "test", eval_docs)):
        docs = generated_documents(count, seed=seed, split=split)
        text = " \n" + "".join(_article(f"{split.title()} article {i}", d.text)
                               for i, d in enumerate(docs))
        (directory / f"wiki.{name}.tokens").write_text(text, encoding="utf-8")
    return directory


def write_pile(directory: Path, *, train_docs: int = 24, eval_docs: int = 4,
               seed: int = 0) -> Path:
    """The Pile's layout: train/, val/, test/ with JSONL records carrying meta.pile_set_name."""
    directory = Path(directory)
    rng = random.Random(seed)
    for split, sub, count in (("train", "train", train_docs), ("validation", "val", eval_docs),
                              ("test", "test", eval_docs)):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        with open(directory / sub / "00.jsonl", "w", encoding="utf-8") as f:
            for i, doc in enumerate(generated_documents(count, seed=seed, split=split)):
                subset = PILE_SETS[i % len(PILE_SETS)] if split != "train" else rng.choice(
                    PILE_SETS)
                text = doc.text if i % 2 else doc.text.replace("e", "é")  # multi-byte UTF-8
                f.write(json.dumps({"text": text, "meta": {"pile_set_name": subset}}) + "\n")
    return directory


def eval_config(corpus_kind: str, corpus_path: Path | str, *, retrieval: bool = True,
                **overrides: Any):
    """A validated tiny config: 16-token chunks, 64-token windows, a 2-layer model."""
    from retro_jax.configs import get_base_config, validate_config
    from retro_jax.configs.loader import parse_override

    c = get_base_config()
    c.name = f"tiny-{corpus_kind}-{'retro' if retrieval else 'baseline'}"
    c.corpus.kind = corpus_kind
    c.corpus.path = str(corpus_path)
    c.corpus.wikitext_variant = "tokens"
    c.tokenizer.vocab_size = 320
    c.tokenizer.train_sample_bytes = 200_000
    c.database.chunk_len = 16
    c.database.shard_chunks = 4096
    c.embedder.batch_size = 32
    c.index.recall_sample = 32
    c.index.brute_force_below = 100_000
    c.index.recall_floor = 0.5
    m = c.model
    m.size = "tiny"
    m.vocab_size = 320
    m.d_model, m.num_layers, m.num_heads, m.head_dim, m.ffw_dim = 32, 2, 2, 16, 64
    m.cca_layers = (2,) if retrieval else ()
    m.retrieval = retrieval
    m.encoder_width, m.encoder_layers, m.encoder_heads = 32, 1, 2
    m.encoder_head_dim, m.encoder_ffw_dim = 16, 64
    m.dtype = "float32"
    c.data.seq_len = 64
    c.data.num_neighbours = 2
    c.train.batch_size = 8
    c.train.num_steps = 3
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 3
    c.train.keep_every = 0
    c.eval.metric = "word_ppl" if corpus_kind == "wikitext103" else "bpb"
    c.eval.num_neighbours = 2
    c.eval.stride = 32
    c.eval.batch_size = 4
    c.eval.leakage_neighbours = 4
    c.eval.knn_lm_k = 16
    for key, value in overrides.items():
        parse_override(c, f"{key}={value}")
    return validate_config(c)


def build_and_train(config, workdir: Path) -> Path:
    """Build the database (hash-trigram keys, real build) unless it exists, then train.

    The database is `database.path` when set (shared by several runs), else `<workdir>/db`.
    """
    from retro_jax.build_db import build_run_database
    from retro_jax.train.loop import train

    workdir = Path(workdir)
    db_path = Path(config.database.path) if config.database.path else workdir / "db"
    if not (db_path / "manifest.json").is_file():
        build_run_database(config, db_path, embedder=HashEmbedder())
    train(config, workdir, progress="none", tensorboard=False)
    return workdir


EXPERIMENT_TEMPLATE = """# A tiny evaluation test experiment (written by tests/_eval_fixtures.py).
from tests._eval_fixtures import eval_config


def get_config(arg=None):
    return eval_config({kind!r}, {path!r}, retrieval={retrieval!r}, **{overrides!r})
"""


def write_experiment(path: Path, kind: str, corpus_path: Path, *, retrieval: bool = True,
                     **overrides: Any) -> Path:
    """An experiment file whose get_config() is `eval_config(...)` (for CLI tests)."""
    path = Path(path)
    path.write_text(EXPERIMENT_TEMPLATE.format(kind=kind, path=str(corpus_path),
                                               retrieval=retrieval, overrides=overrides))
    return path
