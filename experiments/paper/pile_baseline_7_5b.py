"""The baseline (RETRO's decoder without CCA or encoder) 7.5B on the Pile (`*.jsonl.zst` with `meta.pile_set_name`), deduplicated against evaluation documents (13-gram Jaccard >= 0.8).

On a Cloud TPU v5p-128 slice (scripts/launch_tpu_pod.sh creates it and runs the same command on
every worker):

    W=gs://YOUR_BUCKET/runs/pile_baseline_7_5b
    retro-jax build-db --config experiments/paper/pile_baseline_7_5b.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/pile
    retro-jax train --config experiments/paper/pile_baseline_7_5b.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/pile
    retro-jax eval --config experiments/paper/pile_baseline_7_5b.py --workdir $W --split test --retrieval off

Target: the baseline row of the same comparison (bits per byte per Pile subset).

`:runlocal` shrinks it to a CPU run of minutes on the embedded corpus (or on
--config.corpus.path when given):

    retro-jax train --config experiments/paper/pile_baseline_7_5b.py:runlocal --workdir runs/pile_baseline_7_5b
"""

from retro_jax.configs.paper import paper_config, runlocal, variant


def get_config(arg=None):
    c = paper_config("7.5B", "pile", retrieval=False)
    if "runlocal" in variant(arg, ("runlocal",), __file__):
        c = runlocal(c)
    return c
