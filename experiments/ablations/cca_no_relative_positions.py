"""Ablation: Chunked cross-attention without relative positions.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/cca_no_relative_positions.py --workdir W
    retro-jax train --config experiments/ablations/cca_no_relative_positions.py:runlocal --workdir runs/cca_no_relative_positions

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-cca-no-relative-positions"
    c.model.cca_relative_positions = False
    return c
