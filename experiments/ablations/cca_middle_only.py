"""Ablation: CCA only in one middle decoder layer.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/cca_middle_only.py --workdir W
    retro-jax train --config experiments/ablations/cca_middle_only.py:runlocal --workdir runs/cca_middle_only

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-cca-middle-only"
    c.model.cca_layers = (c.model.num_layers // 2,)
    return c
