"""benchmarks/device_mfu.py, the GPU/TPU MFU check, kept from rotting: its --smoke form runs
the same code path (real train step, model FLOPs, peak, JSON) on a tiny model on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


def _script(repo_root):
    spec = importlib.util.spec_from_file_location("device_mfu",
                                                  repo_root / "benchmarks" / "device_mfu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_a_json_record(repo_root, tmp_path, capsys):
    out = tmp_path / "mfu.jsonl"
    assert _script(repo_root).main(["--smoke", "--json-out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == record
    assert record["benchmark"] == "device_mfu" and record["mode"] == "smoke"
    assert record["backend"] == "cpu" and record["devices"] == 1
    assert record["batch"] == 2 and record["seq_len"] == 64 and record["grad_accum"] == 1
    assert record["retrieval"] and record["num_neighbours"] > 0
    assert len(record["step_seconds_all"]) == 2 and record["step_seconds"] > 0
    assert record["tokens_per_second"] == pytest.approx(2 * 64 / record["step_seconds"])
    assert record["model_flops_per_token"] > 0 and record["peak_flops_per_device"] > 0
    assert record["mfu"] == pytest.approx(record["achieved_flops_per_second"]
                                          / record["peak_flops_per_device"])
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"])
    assert record["meets_goal"] is None  # a smoke run is no speed measurement


def test_expecting_an_accelerator_on_cpu_fails_clearly(repo_root, capsys):
    assert _script(repo_root).main(["--expect-backend", "gpu"]) == 2
    assert "expected the gpu backend" in capsys.readouterr().err
