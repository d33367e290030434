"""The CPU demo: a small RETRO and its baseline on the embedded default corpus.

    retro-jax demo --workdir runs/demo          # what `make demo` runs: every stage
    retro-jax build-db --config experiments/demo.py --workdir runs/demo/retro
    retro-jax train    --config experiments/demo.py --workdir runs/demo/retro

The embedded corpus is this interpreter's standard library sources and pydoc topics
(offline, on every machine with Python). Expected: RETRO[ON] reaches a lower bits-per-byte
than the baseline on held-out files, because library files share licence headers, idioms and
near-copies that retrieval finds.

Variants: `:baseline` (the same decoder without CCA or encoder), `:retrofit` (the trained
baseline's decoder, frozen, plus CCA and encoder trained on the same tokens: paper section 4.2;
the demo points train.init_from at W/baseline/checkpoints, alone pass
--config.train.init_from=W/baseline/checkpoints), `:quick` (fewer chunks and steps, as CI
runs it); `:runlocal` is accepted and changes nothing (the demo is CPU-sized already: the
"small" size of retro_jax/configs/small.py, the one every `:runlocal` uses).
"""

from retro_jax.configs.base import get_base_config
from retro_jax.configs.paper import variant
from retro_jax.configs.small import shrink


def get_config(arg=None):
    c = get_base_config()
    c.name = "demo-retro"
    c.corpus.kind = "stdlib"
    c.model.size = "demo"
    # The :runlocal size (d 128, 4 layers, CCA at 2 and 4) with a one-layer encoder, and a longer
    # run than :runlocal's (more chunks, 200 steps), so that retrieval's gain shows.
    c = shrink(c, "small", {
        "corpus.max_documents": -1,
        "tokenizer.train_sample_bytes": 4_000_000,
        "database.max_chunks": 4000, "database.shard_chunks": 2000,
        "model.encoder_layers": 1,
        "train.num_steps": 200, "train.learning_rate": 2e-3, "train.warmup_steps": 20,
        "train.log_every": 20, "train.checkpoint_every": 100,
        "eval.num_neighbours": 2, "eval.max_documents": 40,
        "eval.knn_lm_k": 1024,  # Khandelwal et al.'s k, the base config's
    })
    # Sample the library broadly: the first 8 chunks (imports, docstrings, first definitions)
    # of ~500 files, rather than all of the first 20 files in alphabetical order.
    c.database.max_document_chunks = 8
    c.database.eval_splits = ("validation",)  # the demo evaluates on validation only
    c.database.max_eval_chunks = 500

    c.sample.max_tokens = 64
    c.sample.temperature = 0.0

    variants = variant(arg, ("runlocal", "baseline", "retrofit", "quick"), __file__)
    if "baseline" in variants:
        c.name = "demo-baseline"
        c.model.retrieval = False
    if "retrofit" in variants:
        # As many steps as the baseline had: its decoder stays bit-identical, so RETRO[OFF] of
        # this run is the baseline and ON - OFF is what retrieval alone is worth.
        c.name = "demo-retrofit"
        c.train.retrofit = True
    if "quick" in variants:
        c.database.max_chunks = 600
        c.database.shard_chunks = 300
        c.database.max_eval_chunks = 150
        c.corpus.max_documents = 300
        c.tokenizer.vocab_size = 512
        c.model.vocab_size = 512
        c.tokenizer.train_sample_bytes = 1_000_000
        c.train.num_steps = 20
        c.train.checkpoint_every = 10
        c.eval.max_documents = 4
    return c
