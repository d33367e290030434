"""Parameter counts of the paper's sizes (nnx.eval_shape: nothing is allocated).

Table 2 of arXiv 2112.04426 lists non-embedding parameters: 132M/368M/1,309M/6,982M for the
baselines and 172M/425M/1,451M/7,532M for RETRO (decoder + CCA + encoder). Ours are 8-10%
lower: rotary positions carry no parameters, Transformer-XL's relative attention has a
position projection per attention layer (see retro_jax/models/params.py).
"""

from __future__ import annotations

import argparse

import pytest

from retro_jax.configs import PAPER_SIZES
from retro_jax.configs.validate import default_cca_layers
from retro_jax.models.config import RetroConfig
from retro_jax.models.params import PAPER_TABLE2, count_params, run_params


def paper_config(size: str) -> RetroConfig:
    """The paper's size with its retrieval parts: 128k vocabulary, encoder 896 x 2 layers
    (both cross-attending to H_u), CCA every 3rd layer from 6 (from 9 past 15 layers)."""
    dims = PAPER_SIZES[size]
    return RetroConfig(vocab_size=128_000, chunk_len=64,
                       cca_layers=default_cca_layers(dims["num_layers"]), encoder_width=896,
                       encoder_layers=2, encoder_heads=14, encoder_head_dim=64,
                       encoder_ffw_dim=3584, encoder_cross_attend_layers=(1, 2), **dims)


@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_non_embedding_params_within_10_percent_of_table2(size):
    counts = count_params(paper_config(size))
    baseline, retro = PAPER_TABLE2[size]
    assert abs(counts["non_embedding"] / retro - 1) < 0.10, counts
    assert abs(counts["decoder"] / baseline - 1) < 0.10, counts
    assert counts["embedding"] == 2 * 128_000 * PAPER_SIZES[size]["d_model"]  # in + out
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_baseline_counts_no_retrieval_params():
    import dataclasses

    counts = count_params(dataclasses.replace(paper_config("172M"), cca_layers=()))
    assert counts["cca"] == 0 and counts["encoder"] == 0


def test_run_params_prints_table(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text(
        "from retro_jax.configs import get_base_config\n"
        "def get_config(arg=None):\n"
        "    c = get_base_config()\n"
        "    c.model.size = '172M'\n"
        "    return c\n")
    args = argparse.Namespace(config=str(exp), overrides=["model.vocab_size=128000"])
    assert run_params(args) == 0
    out = capsys.readouterr().out
    assert "non_embedding" in out and "| 172M |" in out and "172.0M" in out
