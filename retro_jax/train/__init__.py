"""retro_jax.train."""
