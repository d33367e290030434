"""retro_jax/sample: sampling filters, cached == uncached decoding, re-retrieval, attribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.models.retro import Retro
from retro_jax.sample.decode import CachedDecoder, UncachedDecoder
from retro_jax.sample.generate import DatabaseRetriever, attribution, generate
from retro_jax.sample.sampling import choose_tokens, filter_logits
from tests._model_fixtures import CHUNK, new_model, save_untrained_run, tiny_config

NEG = jnp.finfo(jnp.float32).min


# ------------------------------------------------------------------- sampling filters
def test_top_k_keeps_the_k_largest():
    logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    np.testing.assert_array_equal(np.asarray(out > NEG), [[False, True, False, True, False]])
    np.testing.assert_array_equal(filter_logits(logits, top_k=0), logits)
    np.testing.assert_array_equal(filter_logits(logits, top_k=9), logits)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probs)
    kept = lambda p: np.asarray(filter_logits(logits, top_p=p) > NEG)[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1e-6) == [True, False, False, False]  # the most likely token always stays
    assert kept(1.0) == [True, True, True, True]


def test_choose_tokens_greedy_and_filtered_sampling():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.9], [4.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(choose_tokens(logits, jax.random.key(0), temperature=0.0),
                                  [1, 0])
    rows = jnp.tile(logits, (100, 1))  # 100 independent draws per row in one call
    draws = np.asarray(jax.jit(lambda x, k: choose_tokens(x, k, temperature=1.0, top_k=2))(
        rows, jax.random.key(1))).reshape(100, 2)
    assert set(draws[:, 0].tolist()) == {1, 3}  # both survivors are drawn, nothing else
    assert set(draws[:, 1].tolist()) <= {0, 1, 2, 3}
    top1 = jax.jit(lambda x, k: choose_tokens(x, k, temperature=2.0, top_p=1e-3))(
        rows, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(top1).reshape(100, 2), np.tile([1, 0], (100, 1)))


# ------------------------------------------------------------------- decoding
class HashRetriever:
    """Deterministic neighbours from a chunk's tokens and the call number: every third chunk
    has none at all, every other one lacks its second neighbour (exercises the masks)."""

    def __init__(self, k: int = 2, vocab: int = 64, m: int = CHUNK):
        self.num_neighbours, self.vocab, self.m = k, vocab, m
        self.calls: list[list[int]] = []
        self.returned: list[np.ndarray] = []

    def __call__(self, chunk_tokens):
        call = len(self.calls)
        self.calls.append([int(t) for t in chunk_tokens])
        seed = int(np.sum(np.asarray(chunk_tokens, np.int64) * np.arange(1, self.m + 1)))
        rng = np.random.default_rng(seed)
        ids = np.arange(self.num_neighbours, dtype=np.int64) + seed
        tokens = rng.integers(1, self.vocab, (self.num_neighbours, 2 * self.m)).astype(np.int32)
        tokens[:, -2:] = 0  # a short continuation (padding)
        if call % 3 == 2:
            ids[:], tokens[:] = -1, 0
        elif call % 2 == 1:
            ids[1], tokens[1] = -1, 0
        self.returned.append(tokens)
        return ids, tokens


@pytest.fixture(scope="module")
def model() -> Retro:
    return new_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def scanned_model() -> Retro:
    """model.scan_layers with a run to scan: 4 layers, CCA at 2, 3, 4 (runs P | E | C x2)."""
    return new_model(tiny_config(cca_layers=(2, 3, 4), scan_layers=True), seed=3)


PROMPT = [5, 9, 11, 2, 40, 7]  # one complete chunk of 4 and a partial one
MAX_LEN = 8 * CHUNK  # one cache size for every test: the compiled steps are shared


@pytest.mark.parametrize("which", ["model", "scanned_model"])
def test_cached_and_uncached_greedy_agree_token_for_token(which, request):
    """Decoding with the cache (`decode_step`, which reads a scanned model's stacked blocks
    layer by layer) against the full forward (the scans) every token."""
    model = request.getfixturevalue(which)
    max_len = MAX_LEN
    results, logits = {}, {}
    for use_cache in (True, False):
        retriever = HashRetriever()
        dec_cls = CachedDecoder if use_cache else UncachedDecoder
        decoder = dec_cls(model, batch=1, max_len=max_len, num_neighbours=2)
        steps = []
        original = decoder.feed

        def feed(*args, _orig=original, _steps=steps, _dec=decoder, **kw):
            out = _orig(*args, **kw)
            if out is not None:
                _steps.append(np.asarray(_dec.last_logits))
            return out

        decoder.feed = feed
        results[use_cache] = generate(model, PROMPT, max_tokens=20, max_len=max_len,
                                      retriever=retriever, decoder=decoder, stop_at_eos=False)
        logits[use_cache] = np.concatenate(steps[-20:])  # from the last prompt token on
        assert len(retriever.calls) == (len(PROMPT) + 20 - 1) // CHUNK
    cached, uncached = results[True], results[False]
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    assert len(cached.generated) == 20 and cached.stop_reason == "max_tokens"
    np.testing.assert_allclose(logits[True], logits[False], atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(cached.neighbour_ids, uncached.neighbour_ids)
    # Complete attending chunks: the cached per-token shares equal the model's own.
    n_full = (len(cached.tokens) - 1 - (CHUNK - 1)) // CHUNK
    np.testing.assert_allclose(cached.shares[:n_full], uncached.shares[:n_full], atol=1e-5)


def test_cached_logits_match_full_forward_with_the_same_neighbours(model):
    """Against `model(...)` on exactly the tokens so far (not the padded reference)."""
    retriever = HashRetriever()
    result = generate(model, PROMPT, max_tokens=40, max_len=MAX_LEN, retriever=retriever,
                      stop_at_eos=False, temperature=0.0)
    assert result.stop_reason == "max_len" and len(result.tokens) == MAX_LEN
    tokens = result.tokens[:-1]
    n = len(tokens)
    n_chunks = -(-n // CHUNK)
    neighbours = np.zeros((1, n_chunks, 2, 2 * CHUNK), np.int32)
    for u, returned in enumerate(retriever.returned[:n_chunks]):
        neighbours[0, u] = returned
    logits = np.asarray(nnx.jit(lambda mdl, x, nb: mdl(x, nb))(
        model, jnp.asarray(tokens[None]), jnp.asarray(neighbours)))
    greedy = logits[0].argmax(-1)
    np.testing.assert_array_equal(greedy[len(PROMPT) - 1:], result.tokens[len(PROMPT):])


def test_attention_shares_sum_to_one_per_chunk_with_neighbours(model):
    retriever = HashRetriever()
    result = generate(model, PROMPT, max_tokens=22, max_len=MAX_LEN, retriever=retriever,
                      stop_at_eos=False)
    has_neighbours = (result.neighbour_ids[: len(result.shares)] >= 0).any(-1)
    assert has_neighbours.any() and not has_neighbours.all()
    sums = result.shares.sum(-1)
    np.testing.assert_allclose(sums[has_neighbours], 1.0, atol=1e-5)
    np.testing.assert_allclose(sums[~has_neighbours], 0.0, atol=1e-7)
    missing = result.neighbour_ids[: len(result.shares)] < 0
    np.testing.assert_allclose(result.shares[missing], 0.0, atol=1e-7)


def test_sampling_ignores_dropout(model):
    """Decoding never drops: a model with dropout > 0 samples exactly as the same weights
    without dropout."""
    dropped = new_model(tiny_config(dropout=0.5), seed=3)
    results = [generate(m, PROMPT, max_tokens=6, max_len=MAX_LEN, retriever=HashRetriever(),
                        stop_at_eos=False, temperature=1.0, seed=4) for m in (model, dropped)]
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    np.testing.assert_array_equal(results[0].shares, results[1].shares)


@pytest.mark.slow
def test_baseline_generates_without_retrieval():
    baseline = new_model(tiny_config(cca_layers=()), seed=0)
    off = generate(baseline, PROMPT, retriever=None, max_tokens=9, max_len=MAX_LEN,
                   temperature=1.0, top_k=10, top_p=0.9, stop_at_eos=False)
    assert len(off.generated) == 9 and off.shares.shape[0] == 0


def test_long_prompt_is_truncated_to_the_context(model):
    result = generate(model, list(range(1, 40)), max_tokens=5, max_len=MAX_LEN,
                      retriever=HashRetriever(), stop_at_eos=False)
    assert result.prompt_truncated == 39 - (MAX_LEN - 1)
    assert len(result.tokens) == MAX_LEN and result.stop_reason == "max_len"


# ------------------------------------------------------------------- with a database
TINY_MODEL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
              "model.head_dim": 16, "model.ffw_dim": 64, "model.cca_layers": (2,),
              "model.encoder_width": 32, "model.encoder_layers": 1, "model.encoder_heads": 2,
              "model.encoder_head_dim": 16, "model.encoder_ffw_dim": 64,
              "model.dtype": "float32", "sample.num_neighbours": 2}


SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.95, seed=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory: a tiny database (hash-trigram keys), config.json, a checkpoint of a
    random tiny model (sampling needs no training to be tested)."""
    from tests._db_fixtures import HashEmbedder, make_tiny_database
    from tests._db_fixtures import tiny_config as db_config

    workdir = tmp_path_factory.mktemp("run")
    db = make_tiny_database(workdir, name="db")
    config = db_config(**TINY_MODEL, **{"embedder.name": HashEmbedder().name})
    model = save_untrained_run(config, workdir)
    return workdir, db, config, model


def test_database_retrieval_and_attribution(run_dir):
    from tests._db_fixtures import HashEmbedder

    _, db, _, model = run_dir
    m = db.chunk_len
    from data_pipeline.retrieval import BertRetriever

    search = BertRetriever(HashEmbedder()).text_search(db)
    retriever = DatabaseRetriever(db, search, num_neighbours=2)
    prompt_tokens = [int(t) for t in db.split("train").tokens[:2].reshape(-1)]  # 2 chunks
    # The CLI test's settings: the compiled steps are shared.
    result = generate(model, prompt_tokens, max_tokens=2 * m, max_len=4 * m,
                      retriever=retriever, stop_at_eos=False, **SAMPLING)
    assert retriever.calls == len(result.neighbour_ids) >= 2
    # The first prompt chunk is in the database: searching with its own key finds it.
    assert result.neighbour_ids[0, 0] == 0
    records = attribution(result, db, generated_only=False)
    assert records and records[0]["chunk"] == 1
    for record in records:
        shares = [n["share"] for n in record["neighbours"]]
        assert abs(sum(shares) - 1.0) < 1e-5
        for n in record["neighbours"]:
            assert n["title"].startswith("train document") and n["text"]
    generated = attribution(result, db)
    assert all(r["last_token"] >= result.prompt_len for r in generated)


def test_sample_run_from_a_workdir(run_dir):
    """The command's path: saved config (+ overrides), checkpoint restore, database, JSON."""
    import argparse
    import json

    from retro_jax.sample.cli import format_text, resolve_config, sample_run
    from tests._db_fixtures import HashEmbedder

    workdir, _, _, _ = run_dir
    args = argparse.Namespace(workdir=workdir, config=None,
                              overrides=["sample.max_tokens=40"])
    config = resolve_config(args)
    assert config.sample.max_tokens == 40 and config.data.seq_len == 64
    prompt = "Ka lo mi ne ru to sa vi de po li an"
    out = sample_run(config, workdir, prompt, max_tokens=40, embedder=HashEmbedder(),
                     **SAMPLING)
    json.dumps(out)  # JSON-able
    assert out["generated_tokens"] >= 1 and out["settings"]["num_neighbours"] == 2
    for record in out["attribution"]:
        assert 1 <= len(record["neighbours"]) <= 2
        assert abs(sum(n["share"] for n in record["neighbours"]) - 1.0) < 1e-5
    assert out["prompt"] in format_text(out)
    # Same seed, same text: sampling is reproducible.
    again = sample_run(config, workdir, prompt, max_tokens=40, embedder=HashEmbedder(),
                       **SAMPLING)
    assert again["completion"] == out["completion"]


@pytest.mark.slow
def test_cli_sample_with_the_frozen_bert(tmp_path, capsys):
    """`retro-jax sample` end to end: real all-MiniLM-L6-v2 keys in the database and online."""
    import json

    from retro_jax.cli import main
    from tests._db_fixtures import make_tiny_database
    from tests._db_fixtures import tiny_config as db_config

    make_tiny_database(tmp_path, name="db", embedder="real")
    config = db_config(**TINY_MODEL)
    save_untrained_run(config, tmp_path)
    capsys.readouterr()  # the database build's summary
    assert main(["sample", "--workdir", str(tmp_path), "--prompt", "Def ka(x, y=5):",
                 "--max-tokens", "40", "--json"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("{"), text[:2000]  # --json: stdout is one JSON object, nothing else
    out = json.loads(text)
    assert out["attribution"] and out["stop_reason"] in ("max_tokens", "max_len", "eos")
    assert main(["sample", "--workdir", str(tmp_path), "--prompt", "Def ka(x, y=5):",
                 "--max-tokens", "20", "--no-cache", "--temperature", "0"]) == 0
