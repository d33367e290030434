"""`retro-jax params`: parameter counts without allocating a single weight.

The model is built with `nnx.eval_shape` (shapes only), then its parameters are grouped:

- embedding: the token embedding and the (untied) output projection;
- decoder: self-attention, feed-forward and norms of every decoder layer, the final norm;
- CCA: chunked cross-attention (and its norm) of the CCA layers;
- encoder: the neighbour encoder (including its cross-attention to H_u).

The paper's Table 2 lists non-embedding parameters (decoder + CCA + encoder for RETRO):
132M/368M/1,309M/6,982M for the baselines and 172M/425M/1,451M/7,532M for RETRO. Our
counts come out 8-10% lower at every size because rotary positions have no parameters,
while the paper's Transformer-XL relative attention adds a position projection W_r
(d x heads*head_dim) to every attention layer (one matrix more per four, about 1/13 of a
layer).
"""

from __future__ import annotations

import math

from flax import nnx

from retro_jax.models.config import RetroConfig
from retro_jax.models.retro import Retro

# Table 2 of arXiv 2112.04426: size name -> (baseline, RETRO) non-embedding parameters.
PAPER_TABLE2 = {
    "172M": (132_000_000, 172_000_000),
    "425M": (368_000_000, 425_000_000),
    "1.5B": (1_309_000_000, 1_451_000_000),
    "7.5B": (6_982_000_000, 7_532_000_000),
}

GROUPS = ("embedding", "decoder", "cca", "encoder")


def _group(path: tuple) -> str:
    keys = [str(p) for p in path]
    if keys[0] in ("embed", "output"):
        return "embedding"
    if keys[0] == "encoder":
        return "encoder"
    if "cca" in keys or "cca_norm" in keys:
        return "cca"
    return "decoder"


def count_params(cfg: RetroConfig) -> dict[str, int]:
    """{'embedding', 'decoder', 'cca', 'encoder', 'non_embedding', 'total'} -> count.

    Uses `nnx.eval_shape`: no memory is allocated for the weights, so 7.5B counts on a laptop.
    """
    abstract = nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0)))
    counts = dict.fromkeys(GROUPS, 0)
    for path, value in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = value.get_value().shape
        counts[_group(path)] += math.prod(shape)
    counts["non_embedding"] = counts["decoder"] + counts["cca"] + counts["encoder"]
    counts["total"] = counts["non_embedding"] + counts["embedding"]
    return counts


def _millions(x: int) -> str:
    return f"{x / 1e6:,.1f}M"


def markdown_table(name: str, counts: dict[str, int]) -> str:
    """One config's counts beside the paper's Table 2 row for `name` (when it has one)."""
    paper = PAPER_TABLE2.get(name)
    baseline_ours = counts["decoder"]
    lines = [
        "| model | embedding | decoder | CCA | encoder | non-embedding (ours) "
        "| paper non-embedding | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    paper_retro = _millions(paper[1]) if paper else "-"
    ratio = f"{counts['non_embedding'] / paper[1]:.3f}" if paper else "-"
    lines.append(
        f"| {name} | {_millions(counts['embedding'])} | {_millions(counts['decoder'])} | "
        f"{_millions(counts['cca'])} | {_millions(counts['encoder'])} | "
        f"{_millions(counts['non_embedding'])} | {paper_retro} | {ratio} |")
    if paper:
        lines.append(
            f"| {name} baseline (decoder only) | | | | | {_millions(baseline_ours)} | "
            f"{_millions(paper[0])} | {baseline_ours / paper[0]:.3f} |")
    return "\n".join(lines)


def run_params(args) -> int:
    """`retro-jax params --config EXP`: print the counts and the table beside the paper."""
    from retro_jax.configs import config_from_args

    config = config_from_args(args)
    cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    counts = count_params(cfg)
    for key in (*GROUPS, "non_embedding", "total"):
        print(f"{key:>14}: {counts[key]:>15,}")
    print()
    print(markdown_table(str(config.model.size), counts))
    return 0
