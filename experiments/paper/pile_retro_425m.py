"""RETRO 425M on the Pile (`*.jsonl.zst` with `meta.pile_set_name`), deduplicated against evaluation documents (13-gram Jaccard >= 0.8).

On a Cloud TPU v5p-32 slice (scripts/launch_tpu_pod.sh creates it and runs the same command on
every worker):

    W=gs://YOUR_BUCKET/runs/pile_retro_425m
    retro-jax build-db --config experiments/paper/pile_retro_425m.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/pile
    retro-jax train --config experiments/paper/pile_retro_425m.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/pile
    retro-jax eval --config experiments/paper/pile_retro_425m.py --workdir $W --split test --leakage

Target: bits per byte per Pile subset (the paper's Figure 4 / Table 3: RETRO improves on its baseline on every subset, most on GitHub, Wikipedia and arXiv).

`:runlocal` shrinks it to a CPU run of minutes on the embedded corpus (or on
--config.corpus.path when given):

    retro-jax train --config experiments/paper/pile_retro_425m.py:runlocal --workdir runs/pile_retro_425m
"""

from retro_jax.configs.paper import paper_config, runlocal, variant


def get_config(arg=None):
    c = paper_config("425M", "pile", retrieval=True)
    if "runlocal" in variant(arg, ("runlocal",), __file__):
        c = runlocal(c)
    return c
