"""`RetroConfig`: the model's hyper-parameters, resolved once from `config.model`.

Functions below the config edge take this frozen dataclass, never the whole ConfigDict, so a
model can be built in a test or a notebook from keyword arguments alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from retro_jax.configs import resolved_cca_layers

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
NEIGHBOUR_PARTS = ("both", "neighbours", "continuations")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RetroConfig:
    """Every number the model needs. Layer indices are 1-based, as in the paper.

    `cca_layers` is resolved (the paper default applied); `()` is the baseline (no CCA, no
    encoder parameters at all). `dropout` is the drop probability on every residual branch
    (decoder self-attention, CCA and FFW; encoder self-attention, cross-attention and FFW),
    applied only when the forward pass is given a `dropout_rng` (training). `scan_layers`
    runs the decoder as scans over repeated layer groups (`retro_jax.models.scan_layers`);
    it changes the parameter layout and the compiled program, not the function.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    ffw_dim: int
    chunk_len: int
    activation: str = "gelu"
    tie_embeddings: bool = False
    rope_base: float = 10_000.0
    cca_layers: tuple[int, ...] = ()
    cca_relative_positions: bool = True
    neighbour_parts: str = "both"
    encoder_width: int = 896
    encoder_layers: int = 2
    encoder_heads: int = 14
    encoder_head_dim: int = 64
    encoder_ffw_dim: int = 3584
    encoder_cross_attend_layers: tuple[int, ...] = (1,)
    encoder_query_conditioning: bool = True
    encoder_embedding: str = "input"
    dropout: float = 0.0
    dtype: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("activation", self.activation, ACTIVATIONS),
            ("neighbour_parts", self.neighbour_parts, NEIGHBOUR_PARTS),
            ("encoder_embedding", self.encoder_embedding, ("input", "output")),
            ("remat", self.remat, REMAT_POLICIES),
            ("dtype", self.dtype, ("auto", "float32", "bfloat16")),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"RetroConfig.{name}={value!r}: allowed {allowed} "
                                 f"(config key model.{name})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RetroConfig.dropout={self.dropout!r}: a drop probability in "
                             "[0, 1) (config key model.dropout)")
        for layer in self.cca_layers:
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"RetroConfig.cca_layers={self.cca_layers}: layer {layer} is "
                                 f"outside [1, {self.num_layers}] (1-based, model.cca_layers)")
        for layer in self.encoder_cross_attend_layers:
            if not 1 <= layer <= self.encoder_layers:
                raise ValueError(
                    f"RetroConfig.encoder_cross_attend_layers={self.encoder_cross_attend_layers}:"
                    f" layer {layer} is outside [1, {self.encoder_layers}] (1-based)")

    @classmethod
    def from_config(cls, model_cfg, chunk_len: int) -> RetroConfig:
        """From a validated `config.model` and `config.database.chunk_len` (m)."""
        return cls(
            vocab_size=int(model_cfg.vocab_size),
            d_model=int(model_cfg.d_model),
            num_layers=int(model_cfg.num_layers),
            num_heads=int(model_cfg.num_heads),
            head_dim=int(model_cfg.head_dim),
            ffw_dim=int(model_cfg.ffw_dim),
            chunk_len=int(chunk_len),
            activation=str(model_cfg.activation),
            tie_embeddings=bool(model_cfg.tie_embeddings),
            rope_base=float(model_cfg.rope_base),
            cca_layers=tuple(int(x) for x in resolved_cca_layers(model_cfg)),
            cca_relative_positions=bool(model_cfg.cca_relative_positions),
            neighbour_parts=str(model_cfg.neighbour_parts),
            encoder_width=int(model_cfg.encoder_width),
            encoder_layers=int(model_cfg.encoder_layers),
            encoder_heads=int(model_cfg.encoder_heads),
            encoder_head_dim=int(model_cfg.encoder_head_dim),
            encoder_ffw_dim=int(model_cfg.encoder_ffw_dim),
            encoder_cross_attend_layers=tuple(int(x)
                                              for x in model_cfg.encoder_cross_attend_layers),
            encoder_query_conditioning=bool(model_cfg.encoder_query_conditioning),
            encoder_embedding=str(model_cfg.encoder_embedding),
            dropout=float(model_cfg.dropout),
            dtype=str(model_cfg.dtype),
            remat=str(model_cfg.remat),
            scan_layers=bool(model_cfg.scan_layers),
        )

    @property
    def retrieval(self) -> bool:
        """False for the baseline: no CCA layers and no encoder."""
        return bool(self.cca_layers)

    @property
    def first_cca_layer(self) -> int | None:
        """The 1-based decoder layer whose post-attention activations the encoder attends to."""
        return min(self.cca_layers) if self.cca_layers else None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """bf16 on TPU/GPU and fp32 on CPU for "auto"; parameters are always fp32."""
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.dtype)
