"""Validation of a config against the base config, once, at the edge.

Every check raises `ConfigError` with the key's dotted name, the value found, what is
allowed and where the config came from, before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

from data_pipeline.corpora.factory import KINDS as CORPUS_KINDS
from data_pipeline.retrieval import retriever_kinds
from retro_jax.configs.base import get_base_config


class ConfigError(ValueError):
    """A config key is unknown, mistyped or inconsistent with another key."""


# Keys whose value must be one of a fixed set.
CHOICES = {
    "corpus.kind": CORPUS_KINDS,
    "corpus_fallback": ("", "stdlib"),
    "corpus.wikitext_variant": ("raw", "tokens"),
    "model.encoder_embedding": ("input", "output"),
    "tokenizer.model_type": ("unigram", "bpe"),
    "database.retriever": retriever_kinds(),
    "embedder.dtype": ("float32", "bfloat16"),
    "model.activation": ("gelu", "relu", "silu", "swiglu", "geglu"),
    "model.neighbour_parts": ("both", "neighbours", "continuations"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "data.packing": ("packed", "document"),
    "eval.split": ("train", "validation", "test"),
    "eval.metric": ("bpb", "word_ppl"),
}

# Keys that must be >= the given minimum.
MINIMUMS = {
    "tokenizer.vocab_size": 8,
    "database.chunk_len": 1,
    "database.shard_chunks": 1,
    "database.max_eval_chunks": -1,
    "database.max_document_chunks": -1,
    "embedder.batch_size": 1,
    "embedder.max_wordpieces": 8,
    "index.num_neighbours": 1,
    "index.recall_sample": 1,
    "model.vocab_size": 8,
    "model.d_model": 1,
    "model.num_layers": 1,
    "model.num_heads": 1,
    "model.head_dim": 1,
    "model.ffw_dim": 1,
    "model.encoder_width": 1,
    "model.encoder_layers": 1,
    "model.encoder_heads": 1,
    "model.encoder_head_dim": 1,
    "model.encoder_ffw_dim": 1,
    "data.seq_len": 1,
    "data.num_neighbours": 1,
    "data.overfetch": 1,
    "train.batch_size": 1,
    "train.num_steps": 0,
    "train.grad_accum": 1,
    "train.warmup_steps": 0,
    "train.copy_warmup_steps": 0,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "train.checkpoint_every": 1,
    "train.keep_last": 1,
    "train.keep_every": 0,
    "eval.num_neighbours": 1,
    "eval.stride": 1,
    "eval.batch_size": 1,
    "eval.leakage_neighbours": 1,
    "eval.knn_lm_k": 1,
    "eval.knn_lm_max_entries": 1,
    "sample.max_tokens": 1,
    "sample.top_k": 0,
    "sample.num_neighbours": 1,
}


# Corpus kinds read from corpus.path (stdlib is embedded; tfds names a prepared dataset).
FILE_KINDS = ("wikitext103", "pile", "textdir", "jsonl")


def resolve_corpus_fallback(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Apply `corpus_fallback` (the one place it is decided; validate_config calls it).

    When the config reads files (corpus.kind in FILE_KINDS) but corpus.path is empty and a
    fallback is set, the run reads the fallback corpus instead and its name says so:
    `wikitext103-retro-172m` becomes `wikitext103-retro-172m-on-stdlib`. With a path, nothing
    changes. Idempotent: a resolved config (a saved config.json) stays as it is.
    """
    fallback = config.corpus_fallback
    if fallback and not config.corpus.path and config.corpus.kind in FILE_KINDS:
        config.corpus.kind = fallback
        config.name = f"{config.name}-on-{fallback}"
    return config


def default_cca_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's CCA placement (1-based): every 3rd layer from 6, or from 9 past 15 layers."""
    start = 9 if num_layers > 15 else 6
    return tuple(range(start, num_layers + 1, 3))


def resolved_cca_layers(model: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`model.cca_layers`, or the paper default when it is empty; () for the baseline."""
    if not model.retrieval:
        return ()
    return tuple(model.cca_layers) or default_cca_layers(model.num_layers)


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _type_name(value) -> str:
    return type(value).__name__


def _type_ok(default, value) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return default is None or isinstance(value, type(default))


def _fail(source: str, key: str, value, allowed: str) -> ConfigError:
    where = f" (from {source})" if source else ""
    return ConfigError(f"config key '{key}'{where}: found {value!r}; {allowed}")


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    source: str = "",
) -> ml_collections.ConfigDict:
    """Check `config` against the base config and its own consistency; return it.

    The corpus fallback (`resolve_corpus_fallback`) is applied here, once, so every validated
    config names the corpus it reads.

    Args:
      config: the experiment config.
      num_devices: when given, the mesh must cover exactly this many devices.
      source: where the config came from (an experiment file), quoted in errors.
    """
    base = _flatten(get_base_config())
    found = _flatten(config)
    for key, value in found.items():
        if key not in base:
            close = [k for k in base if k.split(".")[-1] == key.split(".")[-1]]
            hint = f"did you mean {close[0]!r}?" if close else "see retro_jax/configs/base.py"
            raise _fail(source, key, value, f"this key does not exist; {hint}")
        default = base[key]
        if not _type_ok(default, value):
            raise _fail(
                source, key, value,
                f"expected {_type_name(default)} (like the default {default!r}), "
                f"got {_type_name(value)}",
            )
    missing = [k for k in base if k not in found]
    if missing:
        raise _fail(source, missing[0], None, "key missing: start from get_base_config()")

    for key, allowed in CHOICES.items():
        if found[key] not in allowed:
            raise _fail(source, key, found[key],
                        f"allowed: {', '.join(a or repr(a) for a in allowed)}")
    resolve_corpus_fallback(config)  # after the command line's overrides
    found = _flatten(config)
    for key, minimum in MINIMUMS.items():
        if found[key] < minimum:
            raise _fail(source, key, found[key], f"must be >= {minimum}")

    def positive(key):
        if not found[key] > 0:
            raise _fail(source, key, found[key], "must be > 0")

    for key in ("train.learning_rate", "train.warmup_init_lr", "tokenizer.train_sample_bytes",
                "model.rope_base", "eval.knn_lm_temperature", "sample.top_p"):
        positive(key)
    for key in ("database.fraction", "database.dedup_threshold", "index.recall_floor",
                "train.min_lr_ratio", "eval.knn_lm_lambda", "sample.top_p"):
        if not 0.0 <= found[key] <= 1.0:
            raise _fail(source, key, found[key], "must be between 0 and 1")
    if found["database.max_document_chunks"] == 0:
        raise _fail(source, "database.max_document_chunks", 0, "must be -1 (all) or >= 1")
    if found["database.fraction"] == 0.0:
        raise _fail(source, "database.fraction", 0.0, "must be > 0 (share of train documents)")

    m = found["database.chunk_len"]
    if found["data.seq_len"] % m:
        raise _fail(
            source, "data.seq_len", found["data.seq_len"],
            f"must be a multiple of database.chunk_len={m} "
            f"(e.g. {max(1, found['data.seq_len'] // m) * m})",
        )
    if found["eval.stride"] > found["data.seq_len"] or found["eval.stride"] % m:
        raise _fail(source, "eval.stride", found["eval.stride"],
                    f"must be a multiple of database.chunk_len={m} and <= "
                    f"data.seq_len={found['data.seq_len']} (windows stay on the chunk grid)")
    vocab = found["tokenizer.vocab_size"]
    if found["model.vocab_size"] < vocab and not found["tokenizer.model_path"]:
        raise _fail(
            source, "model.vocab_size", found["model.vocab_size"],
            f"must be >= tokenizer.vocab_size={vocab}",
        )

    n_layers = found["model.num_layers"]
    cca = tuple(found["model.cca_layers"])
    for layer in cca:
        if not isinstance(layer, int) or not 1 <= layer <= n_layers:
            raise _fail(source, "model.cca_layers", cca,
                        f"each layer must be an int in [1, model.num_layers={n_layers}] (1-based)")
    if len(set(cca)) != len(cca):
        raise _fail(source, "model.cca_layers", cca, "layers must not repeat")
    if found["model.retrieval"] and not resolved_cca_layers(config.model):
        raise _fail(
            source, "model.cca_layers", cca,
            f"the paper default (every 3rd layer from 6) is empty for a {n_layers}-layer decoder; "
            "list the CCA layers explicitly, e.g. (2, 4)",
        )
    enc = tuple(found["model.encoder_cross_attend_layers"])
    for layer in enc:
        if not isinstance(layer, int) or not 1 <= layer <= found["model.encoder_layers"]:
            raise _fail(source, "model.encoder_cross_attend_layers", enc,
                        f"each layer must be in [1, model.encoder_layers="
                        f"{found['model.encoder_layers']}] (1-based)")
    for key in ("database.eval_splits",):
        for split in found[key]:
            if split not in ("validation", "test"):
                raise _fail(source, key, found[key], "allowed entries: validation, test")
    for alpha in found["eval.alphas"]:
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise _fail(source, "eval.alphas", found["eval.alphas"], "each alpha in [0, 1]")

    if found["train.batch_size"] % found["train.grad_accum"]:
        raise _fail(source, "train.batch_size", found["train.batch_size"],
                    f"must be a multiple of train.grad_accum={found['train.grad_accum']}")
    if not 0 <= found["data.align_max_shift"] < found["database.chunk_len"]:
        raise _fail(source, "data.align_max_shift", found["data.align_max_shift"],
                    f"must be in [0, database.chunk_len={found['database.chunk_len']})")
    for key in ("train.copy_warmup_steps", "train.copy_mix"):
        if found[key] and not found["model.retrieval"]:
            raise _fail(source, key, found[key], "copy batches train reading neighbours; they "
                        "need model.retrieval=True (set it to 0 for a baseline)")
    if not 0.0 <= found["train.copy_mix"] < 1.0:
        raise _fail(source, "train.copy_mix", found["train.copy_mix"], "a share in [0, 1)")
    if 0 < found["train.num_steps"] <= found["train.copy_warmup_steps"]:
        raise _fail(source, "train.copy_warmup_steps", found["train.copy_warmup_steps"],
                    f"must be below train.num_steps={found['train.num_steps']} (the warm-up "
                    "steps are part of the run)")
    if found["train.retrofit"] and not found["model.retrieval"]:
        raise _fail(source, "train.retrofit", True,
                    "retrofitting trains CCA + encoder; it needs model.retrieval=True")

    _validate_mesh(found, num_devices, source)
    _validate_axis_rules(found["mesh.axis_rules"], source)
    return config


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes with a -1 resolved against `num_devices` (validated first)."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    return {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}


def _validate_mesh(found: dict, num_devices: int | None, source: str) -> None:
    sizes = {k: found[f"mesh.{k}"] for k in ("data", "fsdp", "tensor")}
    fills = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise _fail(source, f"mesh.{k}", v, "must be a positive size or -1 (fill)")
    if len(fills) > 1:
        raise _fail(source, f"mesh.{fills[1]}", -1, "only one mesh axis may be -1")
    if num_devices is None:
        return
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fills:
        if num_devices % fixed:
            raise _fail(source, f"mesh.{fills[0]}", -1,
                        f"the other axes multiply to {fixed}, which does not divide the "
                        f"{num_devices} devices")
    elif fixed != num_devices:
        raise _fail(source, "mesh", sizes,
                    f"the mesh has {fixed} devices but {num_devices} are available; "
                    "set one axis to -1 or make the sizes multiply to the device count")


def _validate_axis_rules(rules, source: str) -> None:
    axes = {"data", "fsdp", "tensor", None}
    for rule in rules:
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            raise _fail(source, "mesh.axis_rules", rule,
                        "each rule is (logical_name, mesh_axis | (mesh_axes...) | None)")
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for axis in targets:
            if axis not in axes:
                raise _fail(source, "mesh.axis_rules", rule,
                            "mesh axes are 'data', 'fsdp', 'tensor' or None")
