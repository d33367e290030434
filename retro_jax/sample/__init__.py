"""retro_jax.sample."""
