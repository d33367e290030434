"""Ablation: The neighbour encoder does not cross-attend to the decoder chunk H_u.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/no_query_conditioning.py --workdir W
    retro-jax train --config experiments/ablations/no_query_conditioning.py:runlocal --workdir runs/no_query_conditioning

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-no-query-conditioning"
    c.model.encoder_query_conditioning = False
    return c
