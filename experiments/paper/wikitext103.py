"""RETRO and its baseline on Wikitext-103 (`wiki.{train,valid,test}.raw`) at the paper's sizes; the database is built from the training split, so validation and test articles are never retrieved.

Variants, comma-separated: one size, `172m` (the default when none is given), `425m`, `1.5b` or
`7.5b`; `baseline` (RETRO's decoder without CCA or encoder); `runlocal` (below). Run names:
`wikitext103-retro-7_5b`, `wikitext103-baseline-172m`, ...

| size | Table 2 (non-embedding) | TPU slice | mesh fsdp x tensor, remat, batch (micro-batches) | paper figure |
|---|---|---|---|---|
| 172m | 172M, 12 layers, d 896 | v5p-32 | 1 x 1, dots, 256 (2) | none at this size |
| 425m | 425M, 12 layers, d 1536 | v5p-32 | 4 x 1, dots, 256 (2) | none at this size |
| 1.5b | 1.5B, 24 layers, d 2048 | v5p-64 | 8 x 1, dots, 256 (2) | none at this size |
| 7.5b | 7.5B, 32 layers, d 4096 | v5p-128 | 16 x 4, full, 1024 (4) | Table 4 (below) |

Each row's mesh, remat and micro-batches fit its slice's HBM with margin when the step is
compiled ahead of time (32-68% per chip; docs/benchmarks.md, "Ahead-of-time compilation").
After changing one, check it before paying for the slice:
`retro-jax compile --config experiments/paper/wikitext103.py:7.5b --topology v5p:4x4x4` (v5p-32 is
`v5p:2x2x4`, v5p-64 `v5p:2x4x4`; `make tpu-env` first).

Target: word-level perplexity on Wikitext103 valid/test. The paper's Table 4 gives one figure
per method, for its largest model (7.5B), not one per size: baseline transformer 21.53/22.96,
kNN-LM 18.52/19.54, RETRO with a Wikipedia database 18.46/18.97. At 172m, 425m and 1.5b the
paper has no Wikitext103 figure: the target there is RETRO below its own baseline of the same
size, trained on the same split.

On a Cloud TPU slice of the size's type (scripts/launch_tpu_pod.sh creates it and runs the same
command on every worker), with D=gs://YOUR_BUCKET/wikitext-103-raw:

    # 172m on a v5p-32 slice
    W=gs://YOUR_BUCKET/runs/wikitext103-retro-172m
    retro-jax build-db --config experiments/paper/wikitext103.py:172m --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:172m --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:172m --workdir $W --config.corpus.path=$D --split test
    W=gs://YOUR_BUCKET/runs/wikitext103-baseline-172m
    retro-jax build-db --config experiments/paper/wikitext103.py:172m,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:172m,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:172m,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 425m on a v5p-32 slice
    W=gs://YOUR_BUCKET/runs/wikitext103-retro-425m
    retro-jax build-db --config experiments/paper/wikitext103.py:425m --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:425m --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:425m --workdir $W --config.corpus.path=$D --split test
    W=gs://YOUR_BUCKET/runs/wikitext103-baseline-425m
    retro-jax build-db --config experiments/paper/wikitext103.py:425m,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:425m,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:425m,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 1.5b on a v5p-64 slice
    W=gs://YOUR_BUCKET/runs/wikitext103-retro-1_5b
    retro-jax build-db --config experiments/paper/wikitext103.py:1.5b --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:1.5b --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:1.5b --workdir $W --config.corpus.path=$D --split test
    W=gs://YOUR_BUCKET/runs/wikitext103-baseline-1_5b
    retro-jax build-db --config experiments/paper/wikitext103.py:1.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:1.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:1.5b,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 7.5b on a v5p-128 slice
    W=gs://YOUR_BUCKET/runs/wikitext103-retro-7_5b
    retro-jax build-db --config experiments/paper/wikitext103.py:7.5b --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:7.5b --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:7.5b --workdir $W --config.corpus.path=$D --split test
    W=gs://YOUR_BUCKET/runs/wikitext103-baseline-7_5b
    retro-jax build-db --config experiments/paper/wikitext103.py:7.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/wikitext103.py:7.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/wikitext103.py:7.5b,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

`:runlocal` shrinks any of them to a CPU run of minutes (retro_jax/configs/small.py "small")
on --config.corpus.path when given; without it, on the embedded corpus, and the run's name
then ends in `-on-stdlib` (`wikitext103-retro-172m-on-stdlib`):

    retro-jax build-db --config experiments/paper/wikitext103.py:runlocal --workdir runs/wikitext103 --config.corpus.path=DIR
    retro-jax train --config experiments/paper/wikitext103.py:runlocal --workdir runs/wikitext103 --config.corpus.path=DIR
    retro-jax eval --config experiments/paper/wikitext103.py:runlocal --workdir runs/wikitext103 --config.corpus.path=DIR
"""

from retro_jax.configs.paper import paper_config, paper_variants, runlocal


def get_config(arg=None):
    v = paper_variants(arg, __file__)
    c = paper_config(v.size, "wikitext103", retrieval=v.retrieval)
    return runlocal(c) if v.runlocal else c
