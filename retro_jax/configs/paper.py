"""The paper's configurations (Borgeaud et al. 2021, Table 2 and section 4), as config builders.

Experiment files under experiments/paper/ (one per data set) read their variants with
`paper_variants(arg)` (a size, `baseline`, `runlocal`), call `paper_config(...)` and hold the
commands and the paper's figures in their docstrings; `runlocal(config)` shrinks any config to a
CPU-sized run that keeps what makes it that experiment (retrieval on/off, CCA pattern relative
to depth, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from retro_jax.configs.base import PAPER_SIZES, get_base_config
from retro_jax.configs.small import shrink
from retro_jax.configs.validate import ConfigError

# Per size: the Cloud TPU slice its experiment docstrings target (v5p-N has N/2 chips).
TPU_SLICE = {"172M": "v5p-32", "425M": "v5p-32", "1.5B": "v5p-64", "7.5B": "v5p-128"}

# Per size: mesh (fsdp, tensor) for its pod slice, remat, global batch, gradient-accumulation
# micro-batches, max learning rate. Each fits its slice's HBM with margin when compiled ahead
# of time (docs/benchmarks.md, "Ahead-of-time compilation": benchmarks/compile_paper.py).
_POD = {
    "172M": dict(fsdp=1, tensor=1, remat="dots", batch=256, grad_accum=2, lr=2e-4),
    "425M": dict(fsdp=4, tensor=1, remat="dots", batch=256, grad_accum=2, lr=2e-4),
    "1.5B": dict(fsdp=8, tensor=1, remat="dots", batch=256, grad_accum=2, lr=2e-4),
    "7.5B": dict(fsdp=16, tensor=4, remat="full", batch=1024, grad_accum=4, lr=1e-4),
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
    # The decoder as scans over its repeated layer groups (P x5 | E | (P P C) x2 at 12 layers):
    # the step compiles in the time of ~5 layers at every depth. `runlocal` keeps it: its 4
    # layers (P E P C) have no repeat, and compile to the unrolled program.
    c.model.scan_layers = True
    c.mesh.fsdp, c.mesh.tensor = pod["fsdp"], pod["tensor"]
    c.train.batch_size = pod["batch"]
    c.train.grad_accum = pod["grad_accum"]
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

    The size is retro_jax/configs/small.py's "small" (CCA and encoder cross-attention re-mapped
    by relative depth, so an ablation applied after this call still means the same thing).
    The corpus stays the experiment's: with --config.corpus.path the run reads that data set;
    without one it reads the embedded corpus and its name ends in "-on-stdlib" (decided after
    the overrides, by validate_config's resolve_corpus_fallback).
    """
    c = shrink(c, "small")
    c.corpus_fallback = "stdlib"
    return c


def variant(arg: str | None, allowed: tuple[str, ...], source: str) -> set[str]:
    """The comma-separated variants of an experiment's ':ARG', checked against `allowed`."""
    if not arg:
        return set()
    chosen = {v.strip() for v in arg.split(",") if v.strip()}
    unknown = chosen - set(allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown variant(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    return chosen


# The size variants of experiments/paper/*.py -> PAPER_SIZES keys.
SIZE_VARIANTS = {"172m": "172M", "425m": "425M", "1.5b": "1.5B", "7.5b": "7.5B"}
DEFAULT_SIZE = "172m"


class PaperVariant(NamedTuple):
    size: str  # a PAPER_SIZES key
    retrieval: bool  # False with `baseline`
    runlocal: bool


def paper_variants(arg: str | None, source: str) -> PaperVariant:
    """A paper experiment's ':ARG': at most one size (172m when none), `baseline`, `runlocal`."""
    chosen = variant(arg, (*SIZE_VARIANTS, "baseline", "runlocal"), source)
    sizes = [v for v in SIZE_VARIANTS if v in chosen]
    if len(sizes) > 1:
        raise ConfigError(f"{source}: variants {sizes} name {len(sizes)} sizes; give at most one "
                         f"of {', '.join(SIZE_VARIANTS)} (default {DEFAULT_SIZE})")
    return PaperVariant(size=SIZE_VARIANTS[sizes[0] if sizes else DEFAULT_SIZE],
                        retrieval="baseline" not in chosen, runlocal="runlocal" in chosen)
