"""Ablation: CCA in every decoder layer.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/cca_every_layer.py --workdir W
    retro-jax train --config experiments/ablations/cca_every_layer.py:runlocal --workdir runs/cca_every_layer

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-cca-every-layer"
    c.model.cca_layers = tuple(range(1, c.model.num_layers + 1))
    return c
