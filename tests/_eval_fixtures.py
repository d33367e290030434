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
    """A validated tiny config (tests/_db_fixtures.py's tiny database and model) reading
    `corpus_path`: 16-token chunks, 64-token sequences scored in 32-token strides."""
    from retro_jax.configs.loader import parse_override
    from retro_jax.configs.validate import validate_config
    from tests._db_fixtures import tiny_config

    c = tiny_config(**{
        "corpus.kind": corpus_kind, "corpus.path": str(corpus_path),
        "corpus.wikitext_variant": "tokens", "corpus.validation_percent": 1.0,
        "corpus.test_percent": 1.0, "database.shard_chunks": 4096,
        "embedder.max_wordpieces": 256, "index.recall_sample": 32,
        "index.brute_force_below": 100_000, "index.recall_floor": 0.5, "model.size": "tiny",
        "model.retrieval": retrieval, "model.cca_layers": (2,) if retrieval else (),
        "train.num_steps": 3, "train.warmup_steps": 1, "train.checkpoint_every": 3,
        "eval.metric": "word_ppl" if corpus_kind == "wikitext103" else "bpb",
        "eval.num_neighbours": 2, "eval.stride": 32, "eval.batch_size": 4,
        "eval.leakage_neighbours": 4, "eval.knn_lm_k": 16})
    c = validate_config(c.copy_and_resolve_references())
    c.name = f"tiny-{corpus_kind}-{'retro' if retrieval else 'baseline'}"
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
