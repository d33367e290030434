"""`retro-jax compile` reporting and benchmarks/compile_paper.py, without libtpu.

The TPU compile itself needs libtpu (`make tpu-env`); here the same code path compiles the
train step for this process's CPU devices (`--topology cpu`), so the report (bytes, FLOPs,
timing, the HBM verdict, the prediction, what to change) and the exit codes are checked in CI.
compile_paper.py runs against a stand-in interpreter that prints a report.
"""

from __future__ import annotations

import importlib.util
import json
import stat
from argparse import Namespace

import pytest

from retro_jax.train.aot import (
    CHIPS,
    Chip,
    chip_for,
    needed_bytes,
    predict_step,
    topology_chips,
)


def test_chip_table_and_topology_names():
    assert chip_for("v5p:4x4x4") is CHIPS["v5p"] and chip_for("v4:2x2x2") is CHIPS["v4"]
    assert chip_for("v5litepod:4x4") is CHIPS["v5e"] and chip_for("cpu") is None
    assert CHIPS["v5p"].peak_flops == 459e12 and CHIPS["v5p"].hbm_bytes == 95 * 2**30
    assert CHIPS["v4"].peak_flops == 275e12 and CHIPS["v4"].hbm_bytes == 32 * 2**30
    assert topology_chips("v5p:2x2x4") == 16 and topology_chips("v5p:4x4x4") == 64
    assert topology_chips("cpu") is None
    # The training loop's peak table agrees with the compile tool's.
    from retro_jax.train.metrics import PEAK_FLOPS_BY_DEVICE_KIND

    assert PEAK_FLOPS_BY_DEVICE_KIND["TPU v5p"] == CHIPS["v5p"].peak_flops
    assert PEAK_FLOPS_BY_DEVICE_KIND["TPU v4"] == CHIPS["v4"].peak_flops


def test_prediction_is_a_roofline():
    chip = Chip("test", peak_flops=100.0, hbm_bytes=10, hbm_bandwidth=10.0)
    report = {"devices": 4, "tokens_per_step": 80, "model_flops_per_step": 1600.0,
              "xla_flops_per_device": 500.0, "xla_bytes_accessed_per_device": 20.0}
    p = predict_step(report, chip)
    assert p["predicted_step_seconds"] == 5.0 and p["predicted_bound"] == "compute"
    assert p["predicted_mfu"] == pytest.approx(1600 / (4 * 100 * 5))
    assert p["predicted_tokens_per_second"] == 16.0
    report["xla_bytes_accessed_per_device"] = 100.0  # 10 s of HBM traffic > 5 s of FLOPs
    p = predict_step(report, chip)
    assert p["predicted_step_seconds"] == 10.0 and p["predicted_bound"] == "hbm bandwidth"
    # XLA counting less than the model (a loop body counted once): the model's FLOPs, times
    # the remat policy's recompute, rule; XLA's bytes are scaled by the same undercount.
    report.update({"xla_flops_per_device": 100.0, "xla_bytes_accessed_per_device": 2.0})
    p = predict_step(report, chip)
    assert p["predicted_compute_seconds"] == 1600 / 4 / 100 and p["model_to_xla_flops"] == 4.0
    assert p["predicted_hbm_seconds"] == pytest.approx(2.0 * 4 / 10)
    assert p["predicted_mfu"] == pytest.approx(1.0)
    assert p["predicted_flops_source"] == "model x remat recompute"
    p = predict_step({**report, "remat": "full"}, chip)
    assert p["predicted_compute_seconds"] == pytest.approx(1600 / 4 / 100 * 4 / 3)
    assert p["predicted_mfu"] == pytest.approx(0.75)  # the recomputed forward is not useful


def test_out_of_memory_messages_give_the_bytes_needed():
    """Both of XLA's wordings (its G is GiB)."""
    assert needed_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                        "required for HLO temporaries (124.88G) exceeds available HBM "
                        "(95.74G).") == int(124.88 * 2**30)
    assert needed_bytes("XLA:TPU compile permanent error. Ran out of memory in memory space "
                        "hbm. Used 112.5G of 95.74G hbm. Exceeded hbm capacity by 16.76G.") \
        == int(112.5 * 2**30)
    assert needed_bytes("INTERNAL: something else") is None


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    from tests._eval_fixtures import write_experiment

    root = tmp_path_factory.mktemp("compile")
    return write_experiment(root / "exp.py", "wikitext103", root / "corpus",
                            **{"mesh.data": 2, "mesh.fsdp": 4})


def _args(config, **kw):
    return Namespace(config=str(config), overrides=[], topology="cpu", json=False,
                     hbm_gib=None, peak_tflops=None, **kw)


def test_compile_for_cpu_devices_reports_and_judges_the_fit(tiny_experiment, capsys):
    from retro_jax.train.aot import run_compile

    # A chip with room: exit 0, the summary, then one JSON line with every figure.
    args = _args(tiny_experiment)
    args.hbm_gib, args.peak_tflops = 8.0, 1.0
    assert run_compile(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert "fits: yes" in "\n".join(out[:-1]) and "predicted at peak" in "\n".join(out[:-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    for key in ("bytes_params_per_device", "bytes_optimizer_per_device",
                "bytes_argument_per_device", "bytes_output_per_device",
                "bytes_temp_per_device", "bytes_total_per_device", "xla_flops_per_device",
                "compile_seconds", "predicted_step_seconds", "predicted_mfu"):
        assert report[key] > 0, key
    assert report["fits"] and report["hbm_fraction"] < 1
    assert report["bytes_total_per_device"] < 8 * 2**30
    # FSDP over 4: the parameters' shard is about a quarter of the parameters (fp32).
    assert report["bytes_params_per_device"] <= 1.5 * report["params_total"]
    # XLA counts about the model's FLOPs (no remat here); per device, over 8 devices.
    assert 0.5 < report["model_to_xla_flops"] < 2.0

    # A chip too small: exit 1, the reason and what to change, in JSON and on stderr.
    args.hbm_gib = 0.001
    assert run_compile(args) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["fits"] is False and report["hbm_fraction"] > 1
    assert "train.grad_accum" in report["what_to_change"]
    assert "model.remat" in report["what_to_change"]
    assert "does not fit" in captured.err and "What to change" in captured.err


def test_compile_without_libtpu_exits_2_with_the_install_hint(repo_root, capsys):
    from retro_jax.train.aot import run_compile

    try:
        import libtpu  # noqa: F401

        pytest.skip("libtpu is installed: the command would compile")
    except ImportError:
        pass
    args = _args(repo_root / "experiments" / "demo.py")
    args.topology = "v5p:2x2x4"
    assert run_compile(args) == 2
    err = capsys.readouterr().err
    assert "make tpu-env" in err and 'jax[tpu]==0.10.2' in err


# ------------------------------------------------------------- compile_paper.py
def _compile_paper(repo_root):
    spec = importlib.util.spec_from_file_location(
        "compile_paper", repo_root / "benchmarks" / "compile_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_paper_lists_every_paper_config(repo_root):
    cp = _compile_paper(repo_root)
    entries = cp.paper_configs()
    assert len(entries) == 16 and entries[0]["size"] == "172m"  # smallest first
    by_size = {e["size"]: e["topology"] for e in entries}
    assert by_size == {"172m": "v5p:2x2x4", "425m": "v5p:2x2x4", "1.5b": "v5p:2x4x4",
                       "7.5b": "v5p:4x4x4"}
    # The slices are the experiments' own (their docstrings name them) and chip counts match.
    for e in entries:
        doc = (repo_root / e["config"].split(":")[0]).read_text()
        assert f"| {e['size']} |" in doc and e["slice"] in doc
        assert cp.SLICES[e["size"]][0] == e["slice"]
        assert topology_chips(e["topology"]) * 2 == int(e["slice"].split("-")[1])
    from retro_jax.configs import load_config

    for e in entries:  # every config loads for its slice's chip count
        load_config(str(repo_root / e["config"].split(":")[0]) + ":" + e["config"].split(":")[1],
                    num_devices=topology_chips(e["topology"]))


def test_compile_paper_runs_one_process_per_config_and_resumes(repo_root, tmp_path, capsys):
    cp = _compile_paper(repo_root)
    calls = tmp_path / "calls"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$*" in
  *baseline*) echo '{{"fits": false, "error": "RESOURCE_EXHAUSTED", "devices": 16}}'; exit 1;;
  *425m*) echo 'Traceback: boom' >&2; exit 3;;
  *) echo 'summary line'; echo '{{"fits": true, "devices": 16, "compile_seconds": 12.5,
"bytes_total_per_device": 1073741824, "hbm_bytes_per_device": 102005473280,
"xla_flops_per_device": 1e15, "model_flops_per_step": 1.2e16,
"predicted_step_seconds": 2.5, "predicted_mfu": 0.61}}' | tr -d '\\n'; echo;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "results.jsonl"
    argv = ["--python", str(fake), "--out", str(out), "--sizes", "172m,425m",
            "--datasets", "pile,wikitext103", "--timeout", "60"]
    assert cp.main(argv) == 0
    records = {r["config"].removeprefix("experiments/paper/"): r
               for r in map(json.loads, out.read_text().splitlines())}
    assert {k: r["status"] for k, r in records.items()} == {
        "pile.py:172m": "ok", "pile.py:172m,baseline": "does_not_fit",
        "wikitext103.py:172m": "ok", "wikitext103.py:172m,baseline": "does_not_fit",
        "pile.py:425m": "error", "pile.py:425m,baseline": "does_not_fit",
        "wikitext103.py:425m": "error", "wikitext103.py:425m,baseline": "does_not_fit"}
    retro = records["pile.py:172m"]
    assert retro["topology"] == "v5p:2x2x4" and retro["compile_seconds"] == 12.5
    assert "boom" in records["pile.py:425m"]["stderr_tail"]
    # WikiText-103 trains the same step as the Pile: compiled once, recorded twice.
    twin = records["wikitext103.py:172m"]
    assert twin["same_step_as"] == "experiments/paper/pile.py:172m"
    assert twin["step_key"] == retro["step_key"] and twin["compile_seconds"] == 12.5
    # pile 172m and its baseline, pile 425m (error) and its baseline, wikitext103 425m (the
    # error had no figures to copy): 5 compiles for 8 configs.
    assert len(calls.read_text().splitlines()) == 5
    assert all("--json" in line and "compile" in line for line in calls.read_text().splitlines())
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 8

    assert cp.main(argv) == 0  # resumes: only the two failed configs run again
    assert len(calls.read_text().splitlines()) == 7
    # A record of another step (the config was edited since) is compiled again.
    edited = [dict(r, step_key="edited") if r["config"].endswith("pile.py:172m") else r
              for r in map(json.loads, out.read_text().splitlines())]
    out.write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert cp.main(argv) == 0
    assert len(calls.read_text().splitlines()) == 10  # pile 172m, and the two failed again
    assert cp.main(["--out", str(out), "--table", "--sizes", "172m", "--datasets", "pile"]) == 0
    table = capsys.readouterr().out
    assert "| pile.py:172m | v5p-32 (v5p:2x2x4) | ok | 12 |" in table
    assert "1.0 (1%)" in table and "| 2,500 | 61% |" in table  # no bound recorded


def test_compile_paper_without_libtpu_skips(repo_root, monkeypatch, capsys):
    cp = _compile_paper(repo_root)
    monkeypatch.setattr(cp, "tpu_python", lambda explicit: None)
    assert cp.main(["--out", "/nonexistent/x.jsonl"]) == 0
    assert "make tpu-env" in capsys.readouterr().err
