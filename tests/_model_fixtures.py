"""Tiny RETRO configs and jitted helpers shared by the tests/test_model*.py files."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.configs import get_base_config
from retro_jax.configs.small import shrink
from retro_jax.models.config import RetroConfig
from retro_jax.models.loss import cross_entropy
from retro_jax.models.retro import Retro

CHUNK = 4
CHUNKS = 4
SEQ = CHUNK * CHUNKS
K = 2


def tiny_config(**overrides) -> RetroConfig:
    """4 decoder layers, CCA at 2 and 4, an encoder narrower than the decoder (bridged): the
    "tiny" size of retro_jax/configs/small.py with these shapes, then `overrides` (RetroConfig
    fields)."""
    config = shrink(get_base_config(), "tiny", {
        "database.chunk_len": CHUNK,
        "model.num_layers": 4, "model.num_heads": 4, "model.head_dim": 8,
        "model.cca_layers": (2, 4),
        "model.encoder_width": 16, "model.encoder_layers": 2, "model.encoder_heads": 2,
        "model.encoder_head_dim": 8, "model.encoder_ffw_dim": 32,
        "model.encoder_cross_attend_layers": (1, 2),
    })
    base = RetroConfig.from_config(config.model, config.database.chunk_len)
    return dataclasses.replace(base, **overrides)


def make_batch(batch: int = 2, seed: int = 0, k: int = K, vocab: int = 64):
    """(inputs [B, n], targets [B, n], neighbours [B, L, k, 2m]) int32, no padding."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, vocab, size=(batch, SEQ + 1), dtype=np.int32)
    neighbours = rng.integers(1, vocab, size=(batch, CHUNKS, k, 2 * CHUNK), dtype=np.int32)
    return (jnp.asarray(inputs[:, :-1]), jnp.asarray(inputs[:, 1:]), jnp.asarray(neighbours))


def new_model(cfg: RetroConfig | None = None, seed: int = 0) -> Retro:
    """A model from RBG keys: its initializers compile several times faster on CPU than
    threefry's (tests build many small models; compile time dominates them)."""
    return Retro(cfg or tiny_config(), rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, inputs, neighbours):
    return nnx.merge(graphdef, state)(inputs, neighbours)


def forward(model: Retro, inputs, neighbours=None) -> jax.Array:
    """Jitted `model(inputs, neighbours)` (one compile per graph and input structure)."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, inputs, neighbours)


def loss_fn(model: Retro, inputs, targets, neighbours) -> jax.Array:
    logits = model(inputs, neighbours)
    total, count = cross_entropy(logits, targets)
    return total / count


def save_untrained_run(config, workdir) -> Retro:
    """A run directory holding `config` and a step-1 checkpoint of a fresh model (seed 0), as
    `retro-jax sample` / `eval` expect after training; returns the model."""
    from retro_jax.configs import save_config
    from retro_jax.train.checkpoint import Checkpointer

    save_config(config, workdir)
    model = new_model(RetroConfig.from_config(config.model, config.database.chunk_len), seed=0)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(1, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
              train={"step": np.int32(1)}, meta={"next_step": 1})
    ckpt.wait()
    ckpt.close()
    return model
