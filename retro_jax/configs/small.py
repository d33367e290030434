"""The one recipe for small configs: `:runlocal`, the CPU demo and the unit tests.

`shrink(config, size)` sets a config's model, tokenizer, database, data, mesh, train and eval
sizes to a named small size and keeps what makes the config that experiment:

- retrieval on/off, k in training, the corpus, the metric and every ablation switch are left
  as they are;
- CCA layers keep their position relative to depth: the paper default (`model.cca_layers` =
  ()) becomes the size's stand-in (CCA at 2 and 4 of 4 layers), explicit layers are re-mapped
  by relative depth (layer l of L -> ceil(l * L' / L)); the encoder's cross-attending layers
  likewise;
- a few values are caps rather than settings (`CAPS`): an encoder, an evaluation k or a kNN-LM
  k that is already smaller stays as it is.

Values in `overrides` (dotted keys, e.g. {"model.num_layers": 4}) are set last, as given: the
demo sets its budget and the model tests their shapes through them. An experiment's own
choices that come after (an ablation setting CCA from `model.num_layers`) see the small depth.

    from retro_jax.configs.small import shrink
    c = shrink(get_base_config(), "tiny")            # what tests/_train_fixtures.py trains
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

# Model shape keys (the rest of a size is its budget).
_SMALL_MODEL = {
    "tokenizer.vocab_size": 2048,
    "model.vocab_size": 2048,
    "model.d_model": 128, "model.num_heads": 4, "model.head_dim": 32, "model.ffw_dim": 512,
    "model.num_layers": 4,
    "model.encoder_width": 128, "model.encoder_heads": 4, "model.encoder_head_dim": 32,
    "model.encoder_ffw_dim": 512,
    "model.dtype": "float32", "model.remat": "none",
    "data.seq_len": 256,
    "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1,
}

SIZES: dict[str, dict[str, Any]] = {
    # Every experiment's :runlocal (and, with its own budget, the demo): d 128, 4 layers, CCA at
    # 2 and 4, a 2-layer encoder; a CPU run of minutes on 2 cores.
    "small": {
        **_SMALL_MODEL,
        "corpus.max_documents": 400,
        "tokenizer.train_sample_bytes": 2_000_000,
        "database.max_chunks": 2000, "database.shard_chunks": 1000,
        "database.dedup_against_eval": False,
        "embedder.max_wordpieces": 128,
        "train.batch_size": 8, "train.grad_accum": 1, "train.num_steps": 60,
        "train.learning_rate": 1e-3, "train.warmup_steps": 10, "train.log_every": 10,
        "train.checkpoint_every": 30, "train.eval_every": 0, "train.keep_every": 0,
        "eval.stride": 256, "eval.batch_size": 8, "eval.max_documents": 10,
    },
    # The unit tests (tests/_train_fixtures.py, tests/_model_fixtures.py): d 32, 2 layers,
    # 8-token chunks, 32-token sequences; compiles and trains in seconds.
    "tiny": {
        "tokenizer.vocab_size": 64,
        "model.vocab_size": 64,
        "database.chunk_len": 8,
        "model.d_model": 32, "model.num_heads": 2, "model.head_dim": 16, "model.ffw_dim": 64,
        "model.num_layers": 2,
        "model.encoder_width": 32, "model.encoder_heads": 2, "model.encoder_head_dim": 16,
        "model.encoder_ffw_dim": 64,
        "model.dtype": "float32",
        "data.seq_len": 32,
        "mesh.data": -1,
        "train.batch_size": 8, "train.num_steps": 12, "train.learning_rate": 3e-3,
        "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 0,
        "train.eval_batches": 2, "train.checkpoint_every": 4, "train.keep_last": 2,
        "train.keep_every": 0,
        "eval.stride": 32,
    },
}

# Per size: CCA layers standing in for the paper default (every 3rd layer from 6, which is
# empty below 6 layers).
DEFAULT_CCA = {"small": (2, 4), "tiny": (2,)}

# Per size: upper bounds; a config already below one keeps its value.
CAPS: dict[str, dict[str, int]] = {
    "small": {"model.encoder_layers": 2, "eval.num_neighbours": 4, "eval.knn_lm_k": 64},
    "tiny": {"model.encoder_layers": 1},
}


def _remap(layers: tuple[int, ...], old_depth: int, new_depth: int) -> tuple[int, ...]:
    """1-based layers moved to the same relative depth: l of L -> ceil(l * L' / L)."""
    return tuple(sorted({max(1, math.ceil(layer * new_depth / old_depth)) for layer in layers}))


def _node(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise KeyError(f"shrink: config key {key!r} does not exist "
                       "(see retro_jax/configs/base.py)")
    return node, leaf


def _get(config, key: str):
    node, leaf = _node(config, key)
    return node[leaf]


def _set(config, key: str, value) -> None:
    node, leaf = _node(config, key)
    node[leaf] = value


def shrink(config: ml_collections.ConfigDict, size: str = "small",
           overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`config` (changed in place and returned) at the named small size.

    Args:
      config: a config with every key of the base config (an experiment's, or the base).
      size: a key of SIZES: "small" (:runlocal, the demo) or "tiny" (unit tests).
      overrides: dotted key -> value, set as given in place of the size's value or cap; CCA
        and encoder cross-attention layers are re-mapped onto the overridden depths unless
        they are overridden too.
    """
    if size not in SIZES:
        raise ValueError(f"shrink: size {size!r}: expected one of {', '.join(SIZES)}")
    overrides = dict(overrides or {})
    m = config.model
    old_layers, old_encoder = int(m.num_layers), int(m.encoder_layers)
    cca, encoder_cross = tuple(m.cca_layers), tuple(m.encoder_cross_attend_layers)
    for key, cap in CAPS[size].items():
        _set(config, key, min(_get(config, key), cap))
    for key, value in {**SIZES[size], **overrides}.items():
        _set(config, key, value)
    if "model.cca_layers" not in overrides:
        m.cca_layers = _remap(cca, old_layers, m.num_layers) if cca else DEFAULT_CCA[size]
    if "model.encoder_cross_attend_layers" not in overrides:
        m.encoder_cross_attend_layers = _remap(encoder_cross, old_encoder, m.encoder_layers)
    return config
