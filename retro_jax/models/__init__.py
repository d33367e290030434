"""retro_jax.models."""
