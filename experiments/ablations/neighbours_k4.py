"""Ablation: Train with k=4 neighbours per chunk (the base uses 2).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/neighbours_k4.py --workdir W
    retro-jax train --config experiments/ablations/neighbours_k4.py:runlocal --workdir runs/neighbours_k4

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-neighbours-k4"
    c.data.num_neighbours = 4
    return c
