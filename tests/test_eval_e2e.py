"""End-to-end evaluation with the real database build, input pipeline and model.

Default (reduced) tests share one tiny database (real build, hash-trigram keys) and an
untrained tiny Retro in memory: scoring is checked against an independent computation,
every token is scored once for any stride, per-chunk sums and the leakage curve are
consistent, and the kNN-LM path runs. The slow tests train tiny runs (real trainer) on
corpora written in the Wikitext103 and Pile formats and run `retro-jax eval` / `report`.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.evaluate.evaluator import documents_in_order, evaluate
from retro_jax.evaluate.knn_lm import DatastoreSearcher, KnnLM, build_datastore
from retro_jax.evaluate.leakage import chunk_num_bytes, chunk_overlaps, leakage_curve
from retro_jax.evaluate.scoring import make_scorer
from tests._db_fixtures import make_tiny_database

SEQ, M = 64, 16


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return make_tiny_database(tmp_path_factory.mktemp("evaldb"), num_docs=20, eval_docs=3)


@pytest.fixture(scope="module")
def tiny_model():
    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro

    cfg = RetroConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                      ffw_dim=64, chunk_len=M, cca_layers=(2,), encoder_width=32,
                      encoder_layers=1, encoder_heads=2, encoder_head_dim=16,
                      encoder_ffw_dim=64, dtype="float32")
    return Retro(cfg, rngs=nnx.Rngs(0))


def _direct_nll(model, db, split: str) -> tuple[float, int]:
    """NLL of every document in disjoint windows of SEQ tokens, with full logits."""
    arrays = db.split(split)
    _, first, count = documents_in_order(arrays.doc_ids)
    inputs, targets = [], []
    for f, c in zip(first.tolist(), count.tolist()):
        stream = np.asarray(arrays.tokens[f:f + c]).reshape(-1)
        stream = np.concatenate([stream, np.zeros(SEQ + 1, stream.dtype)])
        for start in range(0, c * M, SEQ):
            inputs.append(stream[start:start + SEQ])
            targets.append(stream[start + 1:start + SEQ + 1])
    inputs, targets = np.stack(inputs), np.stack(targets)
    log_softmax = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x, None), axis=-1))
    logp = np.asarray(log_softmax(model, jnp.asarray(inputs)))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    valid = (targets != 0) & (inputs != 0)
    return -float(picked[valid].astype(np.float64).sum()), int(valid.sum())


def test_scores_match_independent_computation(tiny_db, tiny_model):
    result = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=SEQ,
                      num_neighbours=0, batch_size=4, progress=False)
    want_nll, want_tokens = _direct_nll(tiny_model, tiny_db, "validation")
    assert result.overall.tokens == want_tokens
    assert result.overall.nll == pytest.approx(want_nll, rel=1e-5)
    assert result.documents_incomplete == 0 and result.overall.documents == 3
    docs = [r for r in tiny_db.documents.rows("validation")]
    assert result.overall.bytes == sum(r["num_bytes"] for r in docs)
    assert result.overall.words == sum(r["num_words"] for r in docs)
    assert result.overall.bits_per_byte == pytest.approx(
        want_nll / math.log(2) / result.overall.bytes, rel=1e-5)
    # Every token but each document's first is a target, scored once.
    assert result.overall.tokens == sum(r["num_tokens"] - 1 for r in docs)


def test_stride_retrieval_per_chunk_and_leakage(tiny_db, tiny_model):
    on = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=32, num_neighbours=2,
                  batch_size=4, per_chunk=True, progress=False)
    off_full = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=SEQ,
                        num_neighbours=0, batch_size=4, progress=False)
    # Same tokens scored once whatever the stride; retrieval changes the scores.
    assert on.overall.tokens == off_full.overall.tokens
    assert on.overall.nll != pytest.approx(off_full.overall.nll, rel=1e-6)
    # Per-chunk sums add up to the total, and each chunk holds at most m targets.
    assert on.chunk_nll.sum() == pytest.approx(on.overall.nll, rel=1e-9)
    assert on.chunk_tokens.sum() == on.overall.tokens and on.chunk_tokens.max() <= M
    assert on.timing["windows"] > 0 and on.timing["tokens_per_second"] > 0

    chunk_ids = np.flatnonzero(on.chunk_tokens > 0)
    ratios = chunk_overlaps(tiny_db, "validation", chunk_ids, num_neighbours=4)
    assert ratios.shape == chunk_ids.shape and ((ratios >= 0) & (ratios <= 1)).all()
    # The generated documents reuse one sentence pool: some chunks overlap the train split.
    assert ratios.max() >= 0.5
    tokens = np.asarray(tiny_db.split("validation").tokens[chunk_ids])
    chunk_bytes = chunk_num_bytes(tokens, tiny_db.tokenizer.decode)
    curve = leakage_curve(ratios, on.chunk_nll[chunk_ids], chunk_bytes,
                          (0.0, 0.125, 0.25, 0.5, 0.75, 1.0))
    kept = [p["chunks"] for p in curve]
    assert kept == sorted(kept) and kept[-1] == chunk_ids.size
    # Decoded chunk bytes approximate the documents' bytes (leading spaces may be dropped).
    doc_bytes = on.overall.bytes
    assert 0.9 * doc_bytes <= chunk_bytes.sum() <= 1.05 * doc_bytes
    assert curve[-1]["bpb"] == pytest.approx(
        on.overall.nll / math.log(2) / chunk_bytes.sum(), rel=1e-9)


def test_random_and_oracle_neighbour_diagnostics(tiny_db, tiny_model):
    from retro_jax.evaluate.evaluator import substitute_neighbours
    from retro_jax.train.diagnostics import oracle_neighbours

    inputs = np.arange(1, 2 * SEQ + 1, dtype=np.int32).reshape(2, SEQ)
    batch = {"inputs": inputs, "chunk_ids": np.array([[0, 1, 2, 3], [4, 5, -1, -1]])}
    oracle = substitute_neighbours("oracle", batch, tiny_db, M, 2)
    np.testing.assert_array_equal(oracle, oracle_neighbours(inputs, M, 2))
    np.testing.assert_array_equal(oracle[0, 1, 0], inputs[0, M:3 * M])  # [C_1 ; C_2]
    random = substitute_neighbours("random", batch, tiny_db, M, 2)
    assert random.shape == (2, SEQ // M, 2, 2 * M)
    # Deterministic per chunk id, whatever the batch: chunk 4's draw alone is the same.
    alone = {"inputs": inputs[1:], "chunk_ids": batch["chunk_ids"][1:]}
    np.testing.assert_array_equal(substitute_neighbours("random", alone, tiny_db, M, 2)[0],
                                  random[1])
    assert (random[1, 2:] == 0).all() and (random[0] != 0).any()  # padding chunks stay empty
    # Every random neighbour is [chunk ; continuation] of some database chunk.
    train = tiny_db.split("train").tokens
    all_windows = tiny_db.neighbour_tokens(np.arange(train.shape[0]))
    for window in random[0].reshape(-1, 2 * M):
        assert (all_windows == window).all(axis=1).any()

    kwargs = dict(seq_len=SEQ, stride=SEQ, num_neighbours=2, batch_size=4, progress=False)
    on = evaluate(tiny_model, tiny_db, "validation", **kwargs)
    results = {source: evaluate(tiny_model, tiny_db, "validation", neighbour_source=source,
                                **kwargs) for source in ("random", "oracle")}
    for result in results.values():
        assert result.overall.tokens == on.overall.tokens
        assert result.overall.nll != pytest.approx(on.overall.nll, rel=1e-6)
    with pytest.raises(ValueError, match="neighbour_source"):
        evaluate(tiny_model, tiny_db, "validation", neighbour_source="shuffled", **kwargs)


def test_max_documents_and_knn_lm(tiny_db, tiny_model):
    scorer = make_scorer(tiny_model, with_hidden=True)
    from data_pipeline.input_pipeline import make_eval_windows

    windows = make_eval_windows(tiny_db, "train", SEQ, SEQ, batch_size=4)
    store = build_datastore(lambda x: scorer(x, None, np.zeros_like(x))[1],
                            windows.as_numpy_iterator(), max_entries=3000)
    assert len(store) == 3000 and store.keys.shape[1] == 32
    searcher = DatastoreSearcher(store, use_scann=False)
    plain = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=SEQ,
                     num_neighbours=0, batch_size=4, max_documents=2, progress=False)
    assert plain.documents_selected == 2 and plain.overall.documents == 2
    none = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=SEQ,
                    num_neighbours=0, batch_size=4, max_documents=2, progress=False,
                    knn=KnnLM(searcher, k=8, temperature=1.0, lam=0.0))
    assert none.overall.nll == pytest.approx(plain.overall.nll, rel=1e-6)
    mixed = evaluate(tiny_model, tiny_db, "validation", seq_len=SEQ, stride=SEQ,
                     num_neighbours=0, batch_size=4, max_documents=2, progress=False,
                     knn=KnnLM(searcher, k=8, temperature=1.0, lam=0.5))
    assert np.isfinite(mixed.overall.nll) and mixed.overall.tokens == plain.overall.tokens
    # An untrained model is near-uniform; the datastore's neighbours add real mass.
    assert mixed.overall.nll < plain.overall.nll


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wikitext103", "pile"])
def test_trained_run_eval_and_report(tmp_path, kind, capsys):
    """Corpus files -> build-db -> train (RETRO and baseline) -> eval (on, off, baseline,
    kNN-LM, leakage) -> report, with the real modules; eval and report through the CLI."""
    from retro_jax.cli import main
    from retro_jax.evaluate.report import build_report
    from retro_jax.evaluate.results import result_path
    from retro_jax.evaluate.runner import evaluate_run
    from tests._eval_fixtures import (
        build_and_train,
        eval_config,
        write_experiment,
        write_pile,
        write_wikitext103,
    )

    corpus = (write_wikitext103(tmp_path / "corpus") if kind == "wikitext103"
              else write_pile(tmp_path / "corpus"))
    retro_cfg = eval_config(kind, corpus)
    run = build_and_train(retro_cfg, tmp_path / "retro")
    shared_db = {"database.path": str(tmp_path / "retro" / "db")}
    base_cfg = eval_config(kind, corpus, retrieval=False, **shared_db)
    base = build_and_train(base_cfg, tmp_path / "baseline")

    exp = write_experiment(tmp_path / "exp_retro.py", kind, corpus)
    assert main(["eval", "--config", str(exp), "--workdir", str(run), "--leakage"]) == 0
    assert "[ON]" in capsys.readouterr().out
    on = json.loads(result_path(run, "validation", "on").read_text())
    off = evaluate_run(retro_cfg, run, retrieval="off", leakage=True, progress=False)
    baseline = evaluate_run(base_cfg, base, leakage=True, progress=False)
    knn = evaluate_run(base_cfg, base, knn_lm=True, progress=False, knn_max_entries=2000)
    for record, mode in ((off, "off"), (baseline, "baseline"), (knn, "knn-lm")):
        path = result_path(run if mode in ("on", "off") else base, "validation", mode)
        saved = json.loads(path.read_text())
        assert saved["mode"] == mode and saved["value"] == record["value"] is not None
        assert saved["overall"]["tokens"] == on["overall"]["tokens"]
    assert on["num_neighbours"] == 2 and off["num_neighbours"] == 0
    assert on["params"] > baseline["params"]  # CCA + encoder
    assert knn["knn_lm"]["entries"] == 2000
    assert (run / "eval" / "validation-leakage.png").stat().st_size > 0
    if kind == "pile":
        assert len(on["by_source"]) >= 2 and on["metric"] == "bpb"
    else:
        assert on["metric"] == "word_ppl" and on["overall"]["words"] > 0
    out = tmp_path / "results.md"
    assert main(["report", str(run), str(base), "--out", str(out)]) == 0
    report = out.read_text()
    assert report == build_report([run, base])
    assert "RETRO" in report and "kNN-LM" in report and "baseline" in report
    assert (tmp_path / "results-leakage.png").stat().st_size > 0
    if kind == "wikitext103":
        assert "21.53" in report and "18.52" in report  # the paper's figures beside ours
