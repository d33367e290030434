"""Ablation: BM25 keys in place of frozen-BERT keys for retrieval (the classical retriever).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/bm25_keys.py --workdir W
    retro-jax build-db --config experiments/ablations/bm25_keys.py:runlocal --workdir runs/bm25_keys
    retro-jax train --config experiments/ablations/bm25_keys.py:runlocal --workdir runs/bm25_keys

The database gets no BERT keys and no ScaNN index: build-db indexes the train chunks' text
with bm25s and stores, for every chunk of every split, its index.num_neighbours (10) best
train chunks outside its own document (data_pipeline/retrieval/bm25.py); the input pipeline
gathers those rows in-graph and applies the usual filters, and `retro-jax sample` queries the
saved BM25 index with each generated chunk's text. The database is its own (a sweep does not
share it with BERT-keyed experiments: database.retriever is part of the database sections).

Read against experiments/ablations/base.py (bits per byte on Pile test). Runlocal on 2 CPU
cores: the BM25 stages of build-db take ~3 s for 2,000 train + 3,857 evaluation chunks.
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-bm25-keys"
    c.database.retriever = "bm25"
    return c
