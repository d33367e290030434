"""Ablation: The encoder sees only the retrieved chunks, not their continuations.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/neighbours_only.py --workdir W
    retro-jax train --config experiments/ablations/neighbours_only.py:runlocal --workdir runs/neighbours_only

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-neighbours-only"
    c.model.neighbour_parts = "neighbours"
    return c
