"""Ablation: BM25 keys in place of frozen-BERT keys for retrieval (the classical retriever).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/bm25_keys.py --workdir W
    retro-jax train --config experiments/ablations/bm25_keys.py:runlocal --workdir runs/bm25_keys

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-bm25-keys"
    c.database.retriever = "bm25"
    return c
