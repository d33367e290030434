"""RETRO and its baseline on the Pile (`*.jsonl.zst` with `meta.pile_set_name`; train/, val/, test/) at the paper's sizes, deduplicated against evaluation documents (13-gram Jaccard >= 0.8).

Variants, comma-separated: one size, `172m` (the default when none is given), `425m`, `1.5b` or
`7.5b`; `baseline` (RETRO's decoder without CCA or encoder); `runlocal` (below). Run names:
`pile-retro-7_5b`, `pile-baseline-172m`, ...

| size | Table 2 (non-embedding) | TPU slice | mesh fsdp x tensor, remat, batch (micro-batches) | paper figure |
|---|---|---|---|---|
| 172m | 172M, 12 layers, d 896 | v5p-32 | 1 x 1, dots, 256 (2) | none per subset at this size |
| 425m | 425M, 12 layers, d 1536 | v5p-32 | 4 x 1, dots, 256 (2) | none per subset at this size |
| 1.5b | 1.5B, 24 layers, d 2048 | v5p-64 | 8 x 1, dots, 256 (2) | none per subset at this size |
| 7.5b | 7.5B, 32 layers, d 4096 | v5p-128 | 16 x 4, full, 1024 (4) | Figure 4 / Table 3 (below) |

Each row's mesh, remat and micro-batches fit its slice's HBM with margin when the step is
compiled ahead of time (32-68% per chip; docs/benchmarks.md, "Ahead-of-time compilation").
After changing one, check it before paying for the slice:
`retro-jax compile --config experiments/paper/pile.py:7.5b --topology v5p:4x4x4` (v5p-32 is
`v5p:2x2x4`, v5p-64 `v5p:2x4x4`; `make tpu-env` first).

Target: bits per byte per Pile subset. The paper's per-subset comparison (Figure 4 / Table 3) is
at its largest size: RETRO 7.5B is better than its baseline on every subset, most on GitHub,
Wikipedia and arXiv. At 172m, 425m and 1.5b the target is the same ordering against the
baseline of the same size: RETRO below it on every subset.

On a Cloud TPU slice of the size's type (scripts/launch_tpu_pod.sh creates it and runs the same
command on every worker), with D=gs://YOUR_BUCKET/pile:

    # 172m on a v5p-32 slice
    W=gs://YOUR_BUCKET/runs/pile-retro-172m
    retro-jax build-db --config experiments/paper/pile.py:172m --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:172m --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:172m --workdir $W --config.corpus.path=$D --split test --leakage
    W=gs://YOUR_BUCKET/runs/pile-baseline-172m
    retro-jax build-db --config experiments/paper/pile.py:172m,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:172m,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:172m,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 425m on a v5p-32 slice
    W=gs://YOUR_BUCKET/runs/pile-retro-425m
    retro-jax build-db --config experiments/paper/pile.py:425m --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:425m --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:425m --workdir $W --config.corpus.path=$D --split test --leakage
    W=gs://YOUR_BUCKET/runs/pile-baseline-425m
    retro-jax build-db --config experiments/paper/pile.py:425m,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:425m,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:425m,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 1.5b on a v5p-64 slice
    W=gs://YOUR_BUCKET/runs/pile-retro-1_5b
    retro-jax build-db --config experiments/paper/pile.py:1.5b --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:1.5b --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:1.5b --workdir $W --config.corpus.path=$D --split test --leakage
    W=gs://YOUR_BUCKET/runs/pile-baseline-1_5b
    retro-jax build-db --config experiments/paper/pile.py:1.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:1.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:1.5b,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

    # 7.5b on a v5p-128 slice
    W=gs://YOUR_BUCKET/runs/pile-retro-7_5b
    retro-jax build-db --config experiments/paper/pile.py:7.5b --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:7.5b --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:7.5b --workdir $W --config.corpus.path=$D --split test --leakage
    W=gs://YOUR_BUCKET/runs/pile-baseline-7_5b
    retro-jax build-db --config experiments/paper/pile.py:7.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax train --config experiments/paper/pile.py:7.5b,baseline --workdir $W --config.corpus.path=$D
    retro-jax eval --config experiments/paper/pile.py:7.5b,baseline --workdir $W --config.corpus.path=$D --split test --retrieval off

`:runlocal` shrinks any of them to a CPU run of minutes (retro_jax/configs/small.py "small")
on --config.corpus.path when given; without it, on the embedded corpus, and the run's name
then ends in `-on-stdlib` (`pile-retro-172m-on-stdlib`):

    retro-jax build-db --config experiments/paper/pile.py:runlocal --workdir runs/pile --config.corpus.path=DIR
    retro-jax train --config experiments/paper/pile.py:runlocal --workdir runs/pile --config.corpus.path=DIR
    retro-jax eval --config experiments/paper/pile.py:runlocal --workdir runs/pile --config.corpus.path=DIR --leakage
"""

from retro_jax.configs.paper import paper_config, paper_variants, runlocal


def get_config(arg=None):
    v = paper_variants(arg, __file__)
    c = paper_config(v.size, "pile", retrieval=v.retrieval)
    return runlocal(c) if v.runlocal else c
