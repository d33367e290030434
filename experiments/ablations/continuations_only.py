"""Ablation: The encoder sees only the continuations, not the retrieved chunks.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/continuations_only.py --workdir W
    retro-jax train --config experiments/ablations/continuations_only.py:runlocal --workdir runs/continuations_only

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-continuations-only"
    c.model.neighbour_parts = "continuations"
    return c
