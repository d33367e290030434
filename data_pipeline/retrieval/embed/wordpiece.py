"""BERT's WordPiece tokenizer (Rust `tokenizers`), set up as sentence-transformers uses it.

Read from `tokenizer.json` when the directory has one, else from `vocab.txt` with
`BertWordPieceTokenizer`. Lower-casing follows `do_lower_case` in `tokenizer_config.json`
(then `config.json`), as Hugging Face's `BertTokenizerFast` does: it overrides what the
normalizer in `tokenizer.json` says. The padding and truncation stored in `tokenizer.json`
are dropped (all-MiniLM-L6-v2's says "pad to 128", which sentence-transformers overrides
too); the embedder pads to its own length buckets and truncates to `max_wordpieces`,
[CLS] and [SEP] included, keeping [SEP] last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, normalizers
from tokenizers.implementations import BertWordPieceTokenizer

from data_pipeline.errors import DataError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _do_lower_case(model_dir: Path) -> bool | None:
    """`do_lower_case` from tokenizer_config.json, else config.json; None if neither says."""
    for name in ("tokenizer_config.json", "config.json"):
        value = _read_json(model_dir / name).get("do_lower_case")
        if value is not None:
            return bool(value)
    return None


class WordPieceTokenizer:
    """Text -> WordPiece ids with [CLS] ... [SEP], truncated to `max_wordpieces`."""

    def __init__(self, model_dir: Path, *, max_wordpieces: int):
        model_dir = Path(model_dir)
        if max_wordpieces < 2:
            raise ValueError(f"max_wordpieces must be >= 2 ([CLS] and [SEP]); got {max_wordpieces}")
        lower = _do_lower_case(model_dir)
        tokenizer_json = model_dir / "tokenizer.json"
        vocab_txt = model_dir / "vocab.txt"
        if tokenizer_json.is_file():
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
            normalizer = json.loads(tokenizer_json.read_text()).get("normalizer") or {}
            if lower is not None and normalizer.get("type") == "BertNormalizer" and (
                normalizer.get("lowercase") != lower
            ):
                tokenizer.normalizer = normalizers.BertNormalizer(
                    clean_text=normalizer.get("clean_text", True),
                    handle_chinese_chars=normalizer.get("handle_chinese_chars", True),
                    strip_accents=normalizer.get("strip_accents"),
                    lowercase=lower,
                )
        elif vocab_txt.is_file():
            tokenizer = BertWordPieceTokenizer(
                str(vocab_txt), lowercase=True if lower is None else lower
            )
        else:
            raise DataError(
                f"{model_dir}: neither tokenizer.json nor vocab.txt; the BERT embedder needs "
                "one of them beside config.json"
            )
        tokenizer.no_padding()
        # Truncation counts the [CLS]/[SEP] the post-processor adds, as in transformers.
        tokenizer.enable_truncation(max_length=max_wordpieces)
        self._tokenizer = tokenizer
        self.max_wordpieces = max_wordpieces
        self.pad_id = self._token_id("[PAD]", model_dir)
        self.cls_id = self._token_id("[CLS]", model_dir)
        self.sep_id = self._token_id("[SEP]", model_dir)

    def _token_id(self, token: str, model_dir: Path) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"{model_dir}: the vocabulary has no {token} token")
        return token_id

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One int32 array per text: [CLS] wordpieces [SEP], at most max_wordpieces long."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
