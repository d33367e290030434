"""SentencePiece tokenizer: trained on a sample of the train split, or loaded from a `.model`.

Ids follow the project convention (docs/ARCHITECTURE.md): PAD 0, UNK 1, BOS 2, EOS 3.
Training uses `byte_fallback=True`, so every UTF-8 string is representable (unknown
characters become byte pieces, never UNK), and a single thread with no input shuffling, so
the same sample gives a byte-identical model file (the database manifest keys on its sha256).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.fileio import file_sha256

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# 4 special ids + 256 byte-fallback pieces are always in the vocabulary.
_RESERVED_PIECES = 4 + 256
# SentencePiece skips training lines longer than this (bytes); long lines are cut to fit.
_MAX_SENTENCE_BYTES = 4096


class Tokenizer:
    """A loaded SentencePiece model.

    Attributes:
      path: the `.model` file.
      sha256: hex digest of that file (what the database manifest records).
      vocab_size: number of ids, including PAD/UNK/BOS/EOS and the byte pieces.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model {self.path} does not exist; set "
                            "tokenizer.model_path to a SentencePiece .model file, or leave it "
                            "empty to train one")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer model {self.path} is not a SentencePiece model ({e})") \
                from e
        self.sha256 = file_sha256(self.path)
        self.vocab_size = int(self._sp.GetPieceSize())
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(
                f"tokenizer model {self.path}: special ids (pad, unk, bos, eos) are {found}, "
                f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with "
                "data_pipeline.text.train_tokenizer (or leave tokenizer.model_path empty)")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in order."""
        return self._sp.EncodeAsIds(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; PAD ids are dropped (EOS/BOS decode to nothing)."""
        return self._sp.DecodeIds([int(i) for i in ids if int(i) != PAD_ID])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_path: str | os.PathLike) -> Tokenizer:
    """Load an existing SentencePiece `.model` (DataError if missing or malformed)."""
    return Tokenizer(model_path)


def _sample_lines(texts: Iterable[str], sample_bytes: int) -> Iterator[str]:
    """Non-empty lines of `texts`, at most `sample_bytes` UTF-8 bytes in all, each cut to fit
    SentencePiece's maximum sentence length (longer lines would be silently skipped)."""
    budget = sample_bytes
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            data = line.encode("utf-8")
            while data and budget > 0:
                piece = data[: min(_MAX_SENTENCE_BYTES, budget)]
                # Do not split a multi-byte character.
                text_piece = piece.decode("utf-8", errors="ignore")
                if not text_piece:
                    break
                consumed = len(text_piece.encode("utf-8"))
                budget -= consumed
                data = data[consumed:]
                yield text_piece
            if budget <= 0:
                return


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    sample_bytes: int = 200_000_000,
) -> Tokenizer:
    """Train SentencePiece on the first `sample_bytes` of `texts` and write `model_path`.

    Args:
      texts: documents (the train split, in corpus order); only the sample is read.
      model_path: where the `.model` goes (written atomically).
      vocab_size: total ids including PAD/UNK/BOS/EOS and the 256 byte pieces.
      model_type: "unigram" or "bpe".
      sample_bytes: UTF-8 bytes of text to train on.

    Raises:
      DataError: the sample is empty or too small for `vocab_size` (the message says which
        config key to change).
    """
    import sentencepiece as spm

    if vocab_size <= _RESERVED_PIECES:
        raise DataError(f"tokenizer.vocab_size={vocab_size} is too small: the 4 special ids "
                        f"and 256 byte-fallback pieces need {_RESERVED_PIECES}; use at least "
                        f"{_RESERVED_PIECES + 64}")
    lines = list(_sample_lines(texts, sample_bytes))
    if not lines:
        raise DataError("cannot train the tokenizer: the train split has no text (check "
                        "corpus.kind / corpus.path)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            character_coverage=0.9995,
            # Identity normalisation: decode(encode(text)) == text, newlines and tabs included
            # (they are never in the line-based training sample, so they become byte pieces).
            normalization_rule_name="identity",
            max_sentence_length=_MAX_SENTENCE_BYTES * 4,
            # Determinism: one thread, corpus order, no sentence sampling.
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            # Code and markup: keep runs of spaces and digits as the text has them.
            remove_extra_whitespaces=False,
            split_digits=True,
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if "smaller than required_chars" in message:
            raise DataError(
                f"tokenizer.vocab_size={vocab_size} is too small for the characters of the "
                f"training sample (SentencePiece: {message.strip()}); raise "
                "tokenizer.vocab_size") from e
        if "Vocabulary size" in message or "vocab_size" in message:
            sampled = sum(len(s.encode("utf-8")) for s in lines)
            raise DataError(
                f"tokenizer.vocab_size={vocab_size} is more than the {sampled}-byte training "
                f"sample supports (SentencePiece: {message.strip()}); lower "
                "tokenizer.vocab_size or raise tokenizer.train_sample_bytes / add documents"
            ) from e
        raise DataError(f"SentencePiece training failed: {message}") from e
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)
