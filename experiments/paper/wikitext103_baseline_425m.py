"""The baseline (RETRO's decoder without CCA or encoder) 425M on Wikitext-103 (`wiki.{train,valid,test}.raw`); the database is built from the training split.

On a Cloud TPU v5p-32 slice (scripts/launch_tpu_pod.sh creates it and runs the same command on
every worker):

    W=gs://YOUR_BUCKET/runs/wikitext103_baseline_425m
    retro-jax build-db --config experiments/paper/wikitext103_baseline_425m.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/wikitext-103-raw
    retro-jax train --config experiments/paper/wikitext103_baseline_425m.py --workdir $W \
        --config.corpus.path=gs://YOUR_BUCKET/wikitext-103-raw
    retro-jax eval --config experiments/paper/wikitext103_baseline_425m.py --workdir $W --split test --retrieval off

Target: word-level perplexity on Wikitext103 valid/test. Paper (Table 4, models pretrained on MassiveText): baseline 21.53/22.96, kNN-LM 18.52/19.54. Training on Wikitext103 alone gives higher perplexities; compare RETRO against this baseline.

`:runlocal` shrinks it to a CPU run of minutes on the embedded corpus (or on
--config.corpus.path when given):

    retro-jax train --config experiments/paper/wikitext103_baseline_425m.py:runlocal --workdir runs/wikitext103_baseline_425m
"""

from retro_jax.configs.paper import paper_config, runlocal, variant


def get_config(arg=None):
    c = paper_config("425M", "wikitext103", retrieval=False)
    if "runlocal" in variant(arg, ("runlocal",), __file__):
        c = runlocal(c)
    return c
