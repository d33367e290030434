"""SentencePiece tokenizer: training, loading, determinism, byte fallback, errors."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from data_pipeline.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    file_sha256,
    load_tokenizer,
    train_tokenizer,
)
from tests._db_fixtures import generated_documents

TEXTS = [d.text for d in generated_documents(40, seed=3)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return train_tokenizer(TEXTS, path, vocab_size=320, model_type="unigram",
                           sample_bytes=100_000)


def test_train_writes_model_with_project_ids(tokenizer):
    assert tokenizer.path.is_file()
    assert tokenizer.vocab_size == 320
    assert tokenizer.sha256 == file_sha256(tokenizer.path)
    assert [tokenizer.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == [
        "<pad>", "<unk>", "<s>", "</s>"]
    ids = tokenizer.encode(TEXTS[0])
    assert ids and PAD_ID not in ids and min(ids) >= 0 and max(ids) < 320


def test_training_is_deterministic(tokenizer, tmp_path):
    again = train_tokenizer(TEXTS, tmp_path / "again.model", vocab_size=320,
                            model_type="unigram", sample_bytes=100_000)
    assert again.sha256 == tokenizer.sha256
    other = train_tokenizer(TEXTS[:20], tmp_path / "other.model", vocab_size=320,
                            model_type="bpe", sample_bytes=100_000)
    assert other.sha256 != tokenizer.sha256


def test_load_existing_model(tokenizer):
    loaded = load_tokenizer(tokenizer.path)
    assert loaded.sha256 == tokenizer.sha256
    assert loaded.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    assert loaded.encode_batch(TEXTS[:3]) == [tokenizer.encode(t) for t in TEXTS[:3]]


@pytest.mark.parametrize("text", [
    "ünïcödé 日本語 🙂 Ω≈ç√",  # characters never seen in training: byte pieces, not UNK
    "line one\n\tindented\n\n  two spaces  \n",  # newlines/tabs/runs of spaces survive
    "ＡＢＣ ﬁ",  # no NFKC normalisation: full-width and ligatures are kept as written
])
def test_byte_fallback_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert UNK_ID not in ids
    assert tokenizer.decode(ids) == text


def test_decode_drops_padding(tokenizer):
    ids = tokenizer.encode("kalo mine")
    assert tokenizer.decode(ids + [EOS_ID, PAD_ID, PAD_ID]) == "kalo mine"


def test_vocab_too_large_for_sample_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.vocab_size=5000.*train_sample_bytes"):
        train_tokenizer(TEXTS[:3], tmp_path / "big.model", vocab_size=5000,
                        sample_bytes=10_000)
    assert not (tmp_path / "big.model").exists()


def test_vocab_below_reserved_pieces(tmp_path):
    with pytest.raises(DataError, match="byte-fallback"):
        train_tokenizer(TEXTS, tmp_path / "x.model", vocab_size=100, sample_bytes=10_000)


def test_empty_training_text(tmp_path):
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "  \n"], tmp_path / "x.model", vocab_size=300, sample_bytes=100)


def test_load_missing_or_corrupt_model(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(bad)
