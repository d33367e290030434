"""The report table, the leakage plot and the result-file helpers, on hand-written records."""

import json
from types import SimpleNamespace

import pytest

from retro_jax.evaluate.plots import plot_leakage
from retro_jax.evaluate.report import (
    build_report,
    format_eval_table,
    paper_figure,
    run_report,
)
from retro_jax.evaluate.results import collect_leakage_curves, eval_mode, load_results


def _totals(bpb, word_ppl=None, tokens=100):
    return {"nll": 1.0, "tokens": tokens, "bytes": 400, "words": 80, "documents": 3,
            "nll_per_token": 0.5, "perplexity": 1.6, "word_perplexity": word_ppl,
            "bits_per_byte": bpb}


def _record(name, mode, split, value, *, corpus="wikitext103", metric="word_ppl", leakage=None,
            by_source=None):
    rec = {"format": 1, "name": name, "mode": mode, "split": split, "corpus": corpus,
           "metric": metric, "value": value, "params": 1_234_567,
           "non_embedding_params": 1_000_000, "db_chunks": 50_000,
           "num_neighbours": 10 if mode == "on" else 0, "seq_len": 64, "stride": 32,
           "overall": _totals(0.9, word_ppl=value), "by_source": by_source or {},
           "timing": {"tokens_per_second": 1000.0, "seconds": 2.0}, "knn_lm": None}
    if mode == "knn-lm":
        rec["knn_lm"] = {"k": 1024, "entries": 10}
    if leakage is not None:
        rec["leakage"] = {"curve": [{"alpha": a, "bpb": b, "chunks": 5, "fraction": f}
                                    for a, b, f in leakage]}
    return rec


def _write(workdir, record):
    path = workdir / "eval" / f"{record['split']}-{record['mode']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_eval_mode():
    assert eval_mode(True, "on") == "on" and eval_mode(True, "off") == "off"
    assert eval_mode(True, "random") == "random" and eval_mode(True, "oracle") == "oracle"
    assert eval_mode(False, "on") == "baseline"
    assert eval_mode(False, "on", knn_lm=True) == "knn-lm"
    with pytest.raises(ValueError):
        eval_mode(True, "maybe")


def test_paper_figures_only_for_wikitext103_rows():
    assert paper_figure("wikitext103", "baseline", "validation")[1] == 21.53
    assert paper_figure("wikitext103", "baseline", "test")[1] == 22.96
    assert paper_figure("wikitext103", "knn-lm", "test")[1] == 19.54
    assert paper_figure("wikitext103", "retro", "validation")[1] == 18.46
    assert paper_figure("wikitext103", "retro", "test")[1] == 18.97
    assert paper_figure("pile", "retro", "test") is None
    assert paper_figure("wikitext103", "retro", "train") is None


def test_report_groups_on_off_and_sets_paper_figures(tmp_path):
    retro, base = tmp_path / "retro", tmp_path / "base"
    curve_on = [(0.0, 1.1, 0.2), (0.5, 1.0, 0.7), (1.0, 0.9, 1.0)]
    _write(retro, _record("wt-retro", "on", "validation", 25.0, leakage=curve_on))
    _write(retro, _record("wt-retro", "off", "validation", 30.0,
                          leakage=[(0.0, 1.2, 0.2), (1.0, 1.1, 1.0)]))
    _write(retro, _record("wt-retro", "random", "validation", 29.0))
    _write(base, _record("wt-base", "baseline", "validation", 31.0))
    _write(base, _record("wt-base", "knn-lm", "validation", 28.0))
    (retro / "eval" / "junk.json").write_text("{not json")
    records = load_results([retro, base])
    assert {r["mode"] for r in records} == {"on", "off", "random", "baseline", "knn-lm"}
    report = build_report([retro, base])
    lines = [line for line in report.splitlines() if line.startswith("| wt-")]
    retro_row = next(line for line in lines if "(RETRO)" in line)
    # ON, OFF, random neighbours and oracle (not evaluated: –) side by side in one row, then
    # the filtered columns and the paper's figure.
    assert "| 25.000 | 30.000 | 29.000 | – |" in retro_row and "18.46" in retro_row
    assert "random neighbours" in report.splitlines()[2]
    assert "| 1.100 | 1.000 | 0.900 |" in retro_row
    base_row = next(line for line in lines if "(baseline)" in line)
    assert "| – | 31.000 | – | – |" in base_row and "21.53" in base_row
    knn_row = next(line for line in lines if "(kNN-LM)" in line)
    assert "| 28.000 | – |" in knn_row and "18.52" in knn_row
    assert "1.2M (1.0M)" in retro_row and "50.0k" in retro_row
    assert "Leakage-filtered" in report and "1.000 (70%)" in report
    curves = collect_leakage_curves([retro, base], "validation")
    assert set(curves) == {"wt-retro [ON]", "wt-retro [OFF]"}


def test_subsets_table_and_eval_table():
    by_source = {"Github": _totals(0.5), "Pile-CC": _totals(0.8)}
    rec = _record("pile-retro", "on", "test", 0.7, corpus="pile", metric="bpb",
                  by_source=by_source, leakage=[(0.0, 0.6, 0.5), (1.0, 0.7, 1.0)])
    text = format_eval_table(rec)
    assert "| Github |" in text and "| Pile-CC |" in text and "| 0% | 0.600 | 5 |" in text
    assert "1000 tokens/s" in text


def test_run_report_writes_markdown_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, _record("pile-retro", "on", "test", 0.7, corpus="pile", metric="bpb",
                        by_source={"A": _totals(0.5), "B": _totals(0.9)},
                        leakage=[(0.0, 0.6, 0.5), (1.0, 0.7, 1.0)]))
    out = tmp_path / "results.md"
    assert run_report(SimpleNamespace(workdirs=[run], out=out)) == 0
    text = out.read_text()
    assert "Bits per byte per subset" in text and "| A | 0.500 |" in text
    assert (tmp_path / "results-leakage.png").stat().st_size > 1000
    assert "results.md" in capsys.readouterr().out
    empty = build_report([tmp_path / "nothing"])
    assert "No evaluation results" in empty


def test_plot_leakage_accepts_tuples_and_skips_empty_points(tmp_path):
    png = plot_leakage({"a": [(0.0, 1.0), (1.0, 0.8)],
                        "b": [{"alpha": 0.0, "bpb": None}, {"alpha": 1.0, "bpb": 0.9}],
                        "empty": []}, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
