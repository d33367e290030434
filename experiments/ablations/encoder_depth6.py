"""Ablation: A 6-layer neighbour encoder (the base has 2).

    retro-jax sweep experiments/ablations/base.py experiments/ablations/encoder_depth6.py --workdir W
    retro-jax train --config experiments/ablations/encoder_depth6.py:runlocal --workdir runs/encoder_depth6

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-encoder-depth6"
    c.model.encoder_layers = 6
    return c
