"""Ablation: CCA every 3rd layer from layer 1 (the base: every 3rd from 6).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/cca_every3_from1.py --workdir W
    retro-jax train --config experiments/ablations/cca_every3_from1.py:runlocal --workdir runs/cca_every3_from1

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-cca-every3-from1"
    c.model.cca_layers = tuple(range(1, c.model.num_layers + 1, 3))
    return c
