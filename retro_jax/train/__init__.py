"""retro_jax.train: the training loop, optimiser, checkpoints, metrics, AOT compilation.

    from retro_jax.train import train, load_trained_model

Attributes are imported lazily so that `import retro_jax.train.plot` does not load JAX.
"""

from __future__ import annotations

_EXPORTS = {
    "train": "retro_jax.train.loop",
    "run_train": "retro_jax.train.loop",
    "TrainingDiverged": "retro_jax.train.loop",
    "load_trained_model": "retro_jax.train.restore",
    "Checkpointer": "retro_jax.train.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retro_jax.train' has no attribute {name!r}")
