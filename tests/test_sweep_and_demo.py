"""The user-facing jobs end to end: a sweep over two tiny ablations, and the demo (reduced)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _eval_fixtures import write_experiment, write_pile

from retro_jax.sweep import database_fingerprint, plan_runs, run_name, sweep

REPO = Path(__file__).resolve().parent.parent


def test_run_names_and_shared_database(tmp_path):
    assert run_name("experiments/ablations/cca_top_only.py:runlocal") == "cca_top_only"
    assert run_name("experiments/demo.py:baseline,runlocal") == "demo-baseline"
    runs = plan_runs([str(REPO / "experiments/ablations/base.py:runlocal"),
                      str(REPO / "experiments/ablations/cca_top_only.py:runlocal"),
                      str(REPO / "experiments/ablations/db_size_10pct.py:runlocal"),
                      str(REPO / "experiments/ablations/retrofit.py:runlocal"),
                      str(REPO / "experiments/ablations/retrieval_off.py:runlocal")],
                     tmp_path, [], 8)
    by_name = {r.name: r for r in runs}
    # Same database sections -> one database; a different corpus fraction -> its own.
    assert by_name["base"].config.database.path == by_name["cca_top_only"].config.database.path
    assert by_name["db_size_10pct"].config.database.path != by_name["base"].config.database.path
    assert database_fingerprint(by_name["base"].config) in by_name["base"].config.database.path
    # The baseline trains first and the retrofit starts from it.
    assert runs[0].name == "retrieval_off" and runs[-1].name == "retrofit"
    assert by_name["retrofit"].config.train.init_from == str(
        tmp_path / "retrieval_off" / "checkpoints")


def test_sweep_over_two_tiny_ablations_writes_table_and_charts(tmp_path):
    corpus = write_pile(tmp_path / "pile", train_docs=16, eval_docs=3)
    base = write_experiment(tmp_path / "tiny_base.py", "pile", corpus)
    ablation = write_experiment(tmp_path / "tiny_cca_first.py", "pile", corpus,
                                **{"model.cca_layers": "(1,)"})
    root = tmp_path / "sweep"
    runs = sweep([str(base), str(ablation)], root)
    assert [r.status for r in runs] == ["done", "done"], [r.error for r in runs]
    table = (root / "results.md").read_text()
    assert "tiny_base" in table and "tiny_cca_first" in table
    assert "| done" in table
    for png in ("bpb.png", "loss.png"):
        assert (root / png).stat().st_size > 1000, png
    for run in runs:
        for mode in ("on", "off"):
            record = json.loads((run.workdir / "eval" / f"validation-{mode}.json").read_text())
            assert record["value"] > 0 and record["leakage"]["curve"]
    # A second sweep finds both finished and skips them.
    again = sweep([str(base), str(ablation)], root)
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_demo_verdicts():
    from retro_jax.demo import verdicts

    lines = verdicts({"RETRO[ON]": 2.40, "RETRO[OFF]": 2.41, "baseline": 2.39,
                      "RETRO-fit[ON]": 2.38, "RETRO-fit[OFF]": 2.39, "RETRO[random]": 2.45})
    assert lines[0] == "RETRO[ON] vs baseline: -0.010 bits per byte (retrieval does not help here)"
    assert lines[1].startswith("RETRO-fit[ON] vs baseline: +0.010 bits per byte (retrieval helps;")
    assert lines[2].startswith("RETRO-fit[OFF] - baseline: +0.0e+00")
    assert lines[3].startswith("RETRO[ON] vs RETRO[random]: +0.050 bits per byte")
    assert verdicts({"RETRO[ON]": 2.0}) == []


def test_demo_quick_end_to_end(tmp_path):
    """`retro-jax demo --quick` (what CI runs; `make demo` runs the full one)."""
    workdir = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "retro_jax", "demo", "--quick", "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("[1/6] corpus", "[2/6] build-db", "[3/6] train", "[4/6] eval",
                  "[5/6] sample", "[6/6] report"):
        assert stage in out.stdout
    results = (workdir / "results.md").read_text()
    for row in ("RETRO[ON]", "RETRO[OFF]", "baseline", "RETRO-fit[ON]", "RETRO-fit[OFF]"):
        assert f"| {row} |" in results
    # The retrofit's decoder is the baseline's, frozen: without neighbours it is the baseline.
    off = json.loads((workdir / "retrofit" / "eval" / "validation-off.json").read_text())
    base = json.loads((workdir / "baseline" / "eval" / "validation-baseline.json").read_text())
    assert off["value"] == pytest.approx(base["value"], rel=1e-6)
    sample = json.loads((workdir / "sample.json").read_text())
    assert sample["generated_tokens"] > 0
    assert any(rec["neighbours"] for rec in sample["attribution"])
    assert (workdir / "leakage.png").is_file() and (workdir / "loss.png").is_file()
