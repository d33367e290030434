"""Text: SentencePiece tokenizer, fixed-length chunks, train/eval near-duplicate filtering,
and the one rule for counting words and bytes.

    tokenizer = train_tokenizer(texts, "tokenizer.model", vocab_size=32_000)  # or load_tokenizer
    stats = chunk_split(documents, tokenizer, out_dir, rows_file, split="train", chunk_len=64,
                        first_doc_id=0)                  # tokens.npy [N, m], doc_ids.npy [N]
    dedup = NearDuplicateFilter(threshold=0.8, ngram=13)  # MinHash-LSH over 13-grams
    word_count(text), byte_count(text)                     # what word ppl / bpb divide by

Token ids: PAD 0 (never a real token), UNK 1, BOS 2, EOS 3; a document is
`encode(text) + [EOS]`, cut into chunks of m tokens, the last padded with 0.
"""

from data_pipeline.text.chunks import (
    ChunkFileWriter,
    SplitChunkStats,
    chunk_split,
    chunk_token_ids,
    keep_fraction,
)
from data_pipeline.text.counting import byte_count, word_count
from data_pipeline.text.dedup import NearDuplicateFilter
from data_pipeline.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "ChunkFileWriter", "NearDuplicateFilter",
    "SplitChunkStats", "Tokenizer", "byte_count", "chunk_split", "chunk_token_ids",
    "keep_fraction", "load_tokenizer", "train_tokenizer", "word_count",
]
