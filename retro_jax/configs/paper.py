"""The paper's configurations (Borgeaud et al. 2021, Table 2 and section 4), as config builders.

Experiment files under experiments/paper/ call `paper_config(...)` and hold the command and the
target figure in their docstrings; `runlocal(config)` shrinks any config to a CPU-sized run that
keeps what makes it that experiment (retrieval on/off, CCA pattern relative to depth, ...).
"""

from __future__ import annotations

import ml_collections

from retro_jax.configs.base import PAPER_SIZES, get_base_config

# Per size: mesh (fsdp, tensor) for a pod slice, remat, global batch, max learning rate.
_POD = {
    "172M": dict(fsdp=1, tensor=1, remat="none", batch=256, lr=2e-4),
    "425M": dict(fsdp=4, tensor=1, remat="none", batch=256, lr=2e-4),
    "1.5B": dict(fsdp=8, tensor=1, remat="dots", batch=256, lr=2e-4),
    "7.5B": dict(fsdp=16, tensor=4, remat="full", batch=1024, lr=1e-4),
}

# Wikitext103: ~103M training tokens; 4000 steps of 256 x 2048 tokens is ~20 epochs.
# The Pile: the paper's 419B training tokens at 256 x 2048 per step.
_STEPS = {"wikitext103": 4_000, "pile": 800_000}


def paper_config(size: str, dataset: str, *, retrieval: bool = True) -> ml_collections.ConfigDict:
    """RETRO (or its baseline) at a paper size, for 'wikitext103' or 'pile'."""
    if size not in PAPER_SIZES:
        raise ValueError(f"size {size!r}: expected one of {sorted(PAPER_SIZES)}")
    if dataset not in _STEPS:
        raise ValueError(f"dataset {dataset!r}: expected one of {sorted(_STEPS)}")
    c = get_base_config()
    arch, pod = PAPER_SIZES[size], _POD[size]
    tag = size.lower().replace(".", "_")
    c.name = f"{dataset}-{'retro' if retrieval else 'baseline'}-{tag}"
    c.model.size = size
    for key, value in arch.items():
        c.model[key] = value
    c.model.retrieval = retrieval
    c.model.remat = pod["remat"]
    c.mesh.fsdp, c.mesh.tensor = pod["fsdp"], pod["tensor"]
    c.train.batch_size = pod["batch"]
    c.train.learning_rate = pod["lr"]
    c.train.num_steps = _STEPS[dataset]
    c.corpus.kind = dataset
    if dataset == "wikitext103":
        # Perplexity per word of the original text; the database is the training split, so
        # validation and test articles are never retrieved.
        c.eval.metric = "word_ppl"
        c.eval.num_neighbours = 10
        c.data.packing = "document"
    else:
        c.eval.metric = "bpb"
        c.eval.num_neighbours = 2
        c.database.dedup_against_eval = True
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a CPU run of minutes, keeping its experimental choices.

    CCA layers and encoder cross-attention are re-mapped onto the small depth by their relative
    position, so an ablation applied after this call still means the same thing.
    """
    if not c.corpus.path:
        c.corpus.kind = "stdlib"  # the embedded corpus: no data set to download
    c.corpus.max_documents = 400
    c.tokenizer.vocab_size = 2048
    c.tokenizer.train_sample_bytes = 2_000_000
    c.database.max_chunks = 2000
    c.database.shard_chunks = 1000
    c.database.dedup_against_eval = False
    c.embedder.max_wordpieces = 128
    m = c.model
    m.vocab_size = 2048
    m.d_model, m.num_heads, m.head_dim, m.ffw_dim = 128, 4, 32, 512
    m.num_layers = 4
    m.cca_layers = (2, 4)
    m.encoder_width, m.encoder_heads, m.encoder_head_dim, m.encoder_ffw_dim = 128, 4, 32, 512
    m.encoder_layers = min(m.encoder_layers, 2)
    m.encoder_cross_attend_layers = (1,)
    m.dtype = "float32"
    m.remat = "none"
    c.data.seq_len = 256
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    t = c.train
    t.batch_size, t.num_steps, t.learning_rate = 8, 60, 1e-3
    t.warmup_steps, t.log_every, t.checkpoint_every = 10, 10, 30
    t.eval_every, t.keep_every = 0, 0
    c.eval.stride = 256
    c.eval.batch_size = 8
    c.eval.max_documents = 10
    c.eval.num_neighbours = min(c.eval.num_neighbours, 4)
    c.eval.knn_lm_k = 64
    return c


def variant(arg: str | None, allowed: tuple[str, ...], source: str) -> set[str]:
    """The comma-separated variants of an experiment's ':ARG', checked against `allowed`."""
    if not arg:
        return set()
    chosen = {v.strip() for v in arg.split(",") if v.strip()}
    unknown = chosen - set(allowed)
    if unknown:
        raise ValueError(f"{source}: unknown variant(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    return chosen
