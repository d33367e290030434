"""retro_jax.evaluate."""
