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
runs it).
"""

from retro_jax.configs.base import get_base_config
from retro_jax.configs.paper import variant


def get_config(arg=None):
    c = get_base_config()
    c.name = "demo-retro"
    c.corpus.kind = "stdlib"
    c.tokenizer.vocab_size = 2048
    c.tokenizer.train_sample_bytes = 4_000_000
    c.database.max_chunks = 4000
    # Sample the library broadly: the first 8 chunks (imports, docstrings, first definitions)
    # of ~500 files, rather than all of the first 20 files in alphabetical order.
    c.database.max_document_chunks = 8
    c.database.shard_chunks = 2000
    c.database.eval_splits = ("validation",)  # the demo evaluates on validation only
    c.database.max_eval_chunks = 500
    c.embedder.batch_size = 64
    c.embedder.max_wordpieces = 128
    c.index.brute_force_below = 20_000

    c.model.size = "demo"
    c.model.vocab_size = 2048
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.head_dim = 32
    c.model.ffw_dim = 512
    c.model.cca_layers = (2, 4)
    c.model.encoder_width = 128
    c.model.encoder_layers = 1
    c.model.encoder_heads = 4
    c.model.encoder_head_dim = 32
    c.model.encoder_ffw_dim = 512
    c.model.dtype = "float32"

    c.data.seq_len = 256
    c.data.num_neighbours = 2

    c.train.batch_size = 8
    c.train.num_steps = 200
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.1
    c.train.log_every = 20
    c.train.eval_every = 0
    c.train.checkpoint_every = 100
    c.train.keep_every = 0

    c.eval.num_neighbours = 2
    c.eval.stride = 256
    c.eval.batch_size = 8
    c.eval.max_documents = 40

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
