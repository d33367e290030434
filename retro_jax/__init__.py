"""retro-jax: RETRO, the Retrieval-Enhanced Transformer, in JAX/Flax."""

__version__ = "0.1.0"
