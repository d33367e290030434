"""The ablation base: RETRO-172M on the Pile (k=2, CCA at 6/9/12, encoder 2 x 896, BERT keys).

Every file in experiments/ablations/ imports this one and changes only what it ablates, so a
sweep over them compares like with like (the paper's Table 13 and appendix ablations):

    retro-jax sweep experiments/ablations/*.py --workdir gs://YOUR_BUCKET/ablations \\
        --config.corpus.path=gs://YOUR_BUCKET/pile
    retro-jax sweep experiments/ablations/base.py:runlocal \\
        experiments/ablations/cca_top_only.py:runlocal --workdir runs/ablations   # on a CPU

Target: bits per byte on Pile test, RETRO[ON]; each ablation is read against this row.
"""

from retro_jax.configs.paper import paper_config, runlocal, variant


def get_config(arg=None):
    c = paper_config("172M", "pile", retrieval=True)
    c.name = "ablation-base"
    if "runlocal" in variant(arg, ("runlocal",), __file__):
        c = runlocal(c)
    return c
