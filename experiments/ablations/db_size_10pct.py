"""Ablation: A database of 10% of the training corpus.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/db_size_10pct.py --workdir W
    retro-jax train --config experiments/ablations/db_size_10pct.py:runlocal --workdir runs/db_size_10pct

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-db-size-10pct"
    c.database.fraction = 0.1
    return c
