"""Ablation: Retrofitting (paper section 4.2): freeze a trained baseline, train only CCA + encoder.

`retro-jax sweep` points train.init_from at the sweep's retrieval_off run; alone, pass
--config.train.init_from=RUNS/retrieval_off/checkpoints.

    retro-jax sweep experiments/ablations/base.py experiments/ablations/retrofit.py --workdir W
    retro-jax train --config experiments/ablations/retrofit.py:runlocal --workdir runs/retrofit

Read against experiments/ablations/base.py (bits per byte on Pile test).
"""

from experiments.ablations import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.name = "ablation-retrofit"
    c.train.retrofit = True
    c.train.num_steps = max(1, c.train.num_steps * 3 // 100)  # ~3% of pretraining
    return c
