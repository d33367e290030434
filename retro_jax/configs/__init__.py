"""Configs: the base config (every key), experiment loading, validation."""

from retro_jax.configs.base import PAPER_SIZES, get_base_config
from retro_jax.configs.loader import (
    config_from_args,
    load_config,
    load_saved_config,
    save_config,
)
from retro_jax.configs.validate import (
    ConfigError,
    default_cca_layers,
    mesh_shape,
    resolved_cca_layers,
    validate_config,
)

__all__ = [
    "PAPER_SIZES", "ConfigError", "config_from_args", "default_cca_layers", "get_base_config",
    "load_config", "load_saved_config", "mesh_shape", "resolved_cca_layers", "save_config",
    "validate_config",
]
