"""retro_jax.models: the RETRO decoder, neighbour encoder, chunked cross-attention, sharding.

    from retro_jax.models import Retro, RetroConfig, make_mesh, logical_axis_rules
    cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    model = Retro(cfg, rngs=nnx.Rngs(0))
    logits = model(inputs, neighbours)          # [B, n] , [B, L, k, 2m] | None -> [B, n, V]
"""

from retro_jax.models.config import RetroConfig
from retro_jax.models.loss import chunked_cross_entropy, cross_entropy
from retro_jax.models.retro import DecoderBlock, Retro, init_model, retrofit_filter
from retro_jax.models.scan_layers import (
    convert_params,
    decoder_runs,
    stack_params,
    unstack_params,
)
from retro_jax.models.sharding import (
    axis_rules,
    batch_sharding,
    logical_axis_rules,
    logical_to_spec,
    make_mesh,
    shard,
    state_partition_specs,
    state_shardings,
)

__all__ = [
    "DecoderBlock", "Retro", "RetroConfig", "axis_rules", "batch_sharding",
    "chunked_cross_entropy", "convert_params", "cross_entropy", "decoder_runs", "init_model",
    "logical_axis_rules", "logical_to_spec", "make_mesh", "retrofit_filter", "shard",
    "stack_params", "state_partition_specs", "state_shardings", "unstack_params",
]
