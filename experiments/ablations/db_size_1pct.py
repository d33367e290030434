"""Ablation: A database of 1% of the training corpus.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/db_size_1pct.py --workdir W
    retro-jax train --config experiments/ablations/db_size_1pct.py:runlocal --workdir runs/db_size_1pct

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-db-size-1pct"
    c.database.fraction = 0.01
    return c
