"""Ablation: Train with k=1 neighbour per chunk (the base uses 2).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/neighbours_k1.py --workdir W
    retro-jax train --config experiments/ablations/neighbours_k1.py:runlocal --workdir runs/neighbours_k1

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-neighbours-k1"
    c.data.num_neighbours = 1
    return c
