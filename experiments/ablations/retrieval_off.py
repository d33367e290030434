"""Ablation: Retrieval off: the same decoder trained without CCA or encoder (the baseline).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/retrieval_off.py --workdir W
    retro-jax train --config experiments/ablations/retrieval_off.py:runlocal --workdir runs/retrieval_off

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-retrieval-off"
    c.model.retrieval = False
    return c
