"""`retro-jax eval` across JAX processes: two processes write the result file one process does.

Two local processes (4 CPU devices each, jax.distributed on 127.0.0.1 with gloo collectives,
started through the environment variables `maybe_initialize_distributed` reads, as on a pod)
evaluate the same checkpoint as one process with 8 devices, on the same mesh and global batch.
Every number of the result file must be identical (only `timing` may differ): bits per byte,
word perplexity, NLL and token sums, per-subset rows and the leakage curve.

- default (reduced, about a minute): a 2-layer model trained 1 step on a tiny Wikitext103-format
  corpus; RETRO[ON] with stride < n and the leakage curve; the batch sharded across processes.
- slow: Pile-format subsets, RETRO[ON] and [OFF], the baseline with two windows per device
  and a batch replicated across processes (the gathered placement), all bit-identical; tensor
  parallelism across processes (its all-reduce sums in another order: equal to 1e-7);
  kNN-LM refuses several processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _train_fixtures import subprocess_env

from tests._eval_fixtures import (
    build_and_train,
    eval_config,
    write_experiment,
    write_pile,
    write_wikitext103,
)

pytestmark = pytest.mark.multihost

TIMEOUT = 600
MESH = {"mesh.data": 2, "mesh.fsdp": 4}  # 8 devices: 1 process x 8 or 2 processes x 4
TINY = {"train.num_steps": 1, "train.checkpoint_every": 1, "eval.batch_size": 8, **MESH}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retro_jax", *args]


def eval_processes(args: list[str], *, processes: int, devices_per_process: int,
                   cache_dir: Path) -> list[subprocess.CompletedProcess]:
    """`retro-jax eval ARGS` in `processes` local JAX processes (one when processes == 1)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        env = subprocess_env(devices_per_process)
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        if processes > 1:
            env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                        "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i)})
        procs.append(subprocess.Popen(_cli("eval", *args), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    deadline = time.time() + TIMEOUT
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.time(), 1))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timing"}


def _assert_close(a, b, path=""):
    """Equal structure, counts and strings; floats to 1e-7 relative."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=1e-7), path
    else:
        assert a == b, path


def assert_same_result(args: list[str], result_file: Path, cache_dir: Path, *,
                       expect_exit: int = 0, exact: bool = True) -> tuple[dict, dict]:
    """One process x 8 devices, then two x 4: the same result file, number for number
    (`exact=False`: counts equal, floats to 1e-7)."""
    runs = {}
    for processes in (1, 2):
        result_file.unlink(missing_ok=True)
        done = eval_processes(args, processes=processes, devices_per_process=8 // processes,
                              cache_dir=cache_dir)
        for proc in done:
            assert proc.returncode == expect_exit, proc.stderr[-4000:]
        runs[processes] = json.loads(result_file.read_text())
        if processes == 2:  # only process 0 prints the table
            assert "written:" in done[0].stdout and "written:" not in done[1].stdout
    one, two = runs[1], runs[2]
    assert one["timing"]["processes"] == 1 and two["timing"]["processes"] == 2
    assert one["timing"]["global_batch"] == two["timing"]["global_batch"]
    for key in ("windows", "scored_tokens"):
        assert one["timing"][key] == two["timing"][key]
    if exact:
        assert _without_timing(two) == _without_timing(one)  # every number, to the last bit
    else:
        _assert_close(_without_timing(two), _without_timing(one))
    return one, two


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


# ------------------------------------------------------------------------- default
@pytest.fixture(scope="module")
def wikitext_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmh")
    corpus = write_wikitext103(root / "corpus", train_docs=16, eval_docs=3)
    config = eval_config("wikitext103", corpus, **TINY)
    run = build_and_train(config, root / "run")
    exp = write_experiment(root / "exp.py", "wikitext103", corpus, **TINY)
    return run, exp


def test_two_processes_write_the_result_of_one(wikitext_run, cache_dir):
    run, exp = wikitext_run
    result = run / "eval" / "validation-on.json"
    one, _ = assert_same_result(["--config", str(exp), "--workdir", str(run), "--leakage"],
                                result, cache_dir)
    # Real content, not two empty files: every validation token scored, a finite metric.
    assert one["overall"]["tokens"] > 0 and one["documents_incomplete"] == 0
    assert one["value"] is not None and np.isfinite(one["value"])
    assert one["stride"] < one["seq_len"] and one["num_neighbours"] == 2
    curve = one["leakage"]["curve"]
    assert curve[-1]["chunks"] == one["leakage"]["chunks"] > 0
    assert (run / "eval" / "validation-leakage.png").stat().st_size > 0


def _synthetic_windows(seed: int = 0):
    """Windows of three documents as make_eval_windows lays them out: L = 4 chunks of m = 4,
    stride 8 (each later window scores its last 8 positions), random per-token NLL."""
    rng = np.random.default_rng(seed)
    L, m = 4, 4
    n = L * m
    windows, first = [], 0
    for doc, num_chunks in enumerate((9, 4, 13)):
        for w, start in enumerate(range(0, max(num_chunks - L, 0) + 1 + 1, 2)):
            chunks = [first + start + u if start + u < num_chunks else -1 for u in range(L)]
            if chunks[0] < 0:
                break
            score = np.zeros(n, np.int32)
            score[0 if w == 0 else n - 8:] = 1
            valid = np.repeat(np.array(chunks) >= 0, m)
            targets = np.where(valid, rng.integers(1, 50, n), 0).astype(np.int32)
            if first + num_chunks - 1 in chunks:  # nothing follows the document's last token
                targets[valid.sum() - 1] = 0
            windows.append({"chunk_ids": np.array(chunks, np.int64),
                            "doc_ids": np.where(np.array(chunks) >= 0, doc, -1),
                            "score_mask": score, "targets": targets,
                            "nll": rng.exponential(3.0, n) * (1 + 1e-7 * rng.random(n))})
        first += num_chunks
    return windows, L, m


def _reduce(windows, L, m, order, batch):
    from retro_jax.evaluate.evaluator import WindowRecords

    records = WindowRecords(L, m, per_chunk=True)
    pad = {"chunk_ids": np.full(L, -1), "doc_ids": np.full(L, -1),
           "score_mask": np.zeros(L * m, np.int32), "targets": np.zeros(L * m, np.int32),
           "nll": np.zeros(L * m)}
    rows = [windows[i] for i in order]
    rows += [pad] * (-len(rows) % batch)
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        stacked = {k: np.stack([r[k] for r in part]) for k in pad}
        mask = stacked["score_mask"].astype(bool) & (stacked["targets"] != 0)
        records.add(stacked, stacked["nll"], mask)
    return records.local()


def test_window_reduction_is_exact_for_any_split(monkeypatch):
    """The reduction's contract: the same per-token NLLs, dealt to 1 or 3 processes in
    batches of 1, 2 or 5 windows, reduce to bit-identical per-document, per-chunk and total
    sums (allgather_host_arrays is replaced by the gather it performs across processes)."""
    import retro_jax.train.multihost as multihost
    from retro_jax.evaluate.evaluator import WindowRecords

    windows, L, m = _synthetic_windows()
    results = []
    for processes, batch in ((1, 1), (1, 5), (3, 2), (3, 1)):
        shares = [_reduce(windows, L, m, range(p, len(windows), processes), batch)
                  for p in range(processes)]
        longest = max(len(s["doc"]) for s in shares)
        padded = []
        for share in shares:  # make_eval_windows pads every process to the same batches
            extra = longest - len(share["doc"])
            padded.append({k: np.concatenate([v, np.full((extra, *v.shape[1:]), -1
                                                          if k in ("first_chunk", "doc")
                                                          else 0, v.dtype)])
                           for k, v in share.items()})
        gathered = {k: np.stack([p[k] for p in padded]) for k in padded[0]}
        monkeypatch.setattr(multihost, "allgather_host_arrays", lambda _, g=gathered: g)
        reduced = WindowRecords(L, m, per_chunk=True).reduce()
        nll, tokens = reduced.per_chunk(26)
        results.append((reduced, nll, tokens))
    base, base_nll, base_tokens = results[0]
    assert len(base.doc) == len(windows) and base.tokens.sum() > 0
    for reduced, nll, tokens in results[1:]:
        for field in ("first_chunk", "doc", "nll", "tokens", "slot_nll", "slot_tokens"):
            assert getattr(reduced, field).tobytes() == getattr(base, field).tobytes(), field
        assert nll.tobytes() == base_nll.tobytes() and np.array_equal(tokens, base_tokens)
    # Each target counted once, in the chunk that holds it.
    assert base_tokens.sum() == base.tokens.sum()
    assert base_nll.sum() == pytest.approx(base.nll.sum(), rel=1e-12)


def test_eval_batch_is_rounded_to_processes_and_batch_shards():
    import jax

    from retro_jax.configs import get_base_config
    from retro_jax.evaluate.evaluator import eval_batch_size
    from retro_jax.models.sharding import logical_axis_rules, make_mesh

    c = get_base_config()
    rules = logical_axis_rules(c.mesh)
    assert eval_batch_size(5) == 5  # no mesh: as given
    assert eval_batch_size(5, process_count=2) == 6
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = make_mesh(c.mesh, jax.devices()[:8])
    assert eval_batch_size(1, mesh, rules) == 4  # (data, fsdp) split the batch 4 ways
    assert eval_batch_size(8, mesh, rules, process_count=2) == 8
    assert eval_batch_size(9, mesh, rules, process_count=2) == 12


def test_process_row_layout_one_process():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from retro_jax.evaluate.scoring import process_row_layout

    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    assert process_row_layout(sharded, (8, 3)) == (0, 1)  # one row per device: local
    assert process_row_layout(sharded, (16, 3)) == (0, 2)
    assert process_row_layout(NamedSharding(mesh, PartitionSpec()), (8, 3)) == (0, 8)


def test_allgather_host_arrays_single_process_is_exact():
    from retro_jax.train.multihost import allgather_host_arrays, gather_shares, process_share

    x = {"a": np.array([0.1, 1e-300, np.pi], np.float64), "b": np.arange(3, dtype=np.int64)}
    out = allgather_host_arrays(x)
    assert out["a"].shape == (1, 3) and out["a"].dtype == np.float64
    assert out["a"][0].tobytes() == x["a"].tobytes() and out["b"][0].tolist() == [0, 1, 2]
    assert process_share(7) == slice(0, 7)
    assert gather_shares(np.arange(7), 7).tolist() == list(range(7))


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_two_processes_pile_modes_and_replicated_batch(tmp_path, cache_dir):
    corpus = write_pile(tmp_path / "corpus", train_docs=24, eval_docs=6)
    overrides = {**TINY, "train.num_steps": 2, "train.checkpoint_every": 2,
                 "eval.max_documents": 5}
    run = build_and_train(eval_config("pile", corpus, **overrides), tmp_path / "retro")
    shared = {**overrides, "database.path": str(run / "db")}
    base = build_and_train(eval_config("pile", corpus, retrieval=False, **shared),
                           tmp_path / "baseline")
    exp = write_experiment(tmp_path / "retro.py", "pile", corpus, **overrides)
    exp_base = write_experiment(tmp_path / "base.py", "pile", corpus, retrieval=False, **shared)

    common = ["--config", str(exp), "--workdir", str(run)]
    on, _ = assert_same_result([*common, "--leakage"], run / "eval" / "validation-on.json",
                               cache_dir)
    assert len(on["by_source"]) >= 2 and on["documents_selected"] == 5
    off, _ = assert_same_result([*common, "--retrieval", "off", "--leakage"],
                                run / "eval" / "validation-off.json", cache_dir)
    assert off["overall"]["tokens"] == on["overall"]["tokens"]
    assert off["overall"]["nll"] != on["overall"]["nll"]
    # Two windows per device (global batch 16 on 8 devices): the rows are gathered and laid
    # out in one process's order, so every device sees what it would in one process.
    assert_same_result(["--config", str(exp_base), "--workdir", str(base), "--split", "test",
                        "--config.eval.batch_size=16"],
                       base / "eval" / "test-baseline.json", cache_dir)
    # A batch replicated across processes (the rule table maps it to no mesh axis): each
    # process all-gathers the rows and feeds the whole batch; the result is still the same.
    rules = [("batch", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("kv", None), ("vocab", "tensor"), ("length", None), ("neighbours", None),
             ("chunks", None)]
    replicated = ["--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
                  f"--config.mesh.axis_rules={tuple(rules)!r}"]
    rep, _ = assert_same_result([*common, *replicated], run / "eval" / "validation-on.json",
                                cache_dir)
    assert rep["overall"]["tokens"] == on["overall"]["tokens"]
    # Tensor parallelism across the processes: its all-reduces sum float32 partial products
    # in another order between processes (gloo) than within one, so the numbers agree to
    # float rounding, not to the last bit; the counts are exact.
    tensor = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=-1"]
    assert_same_result([*common, *tensor], run / "eval" / "validation-on.json", cache_dir,
                       exact=False)


@pytest.mark.slow
def test_knn_lm_refuses_several_processes(tmp_path, cache_dir):
    corpus = write_wikitext103(tmp_path / "corpus", train_docs=12, eval_docs=2)
    overrides = {**TINY, "model.retrieval": False}
    run = build_and_train(eval_config("wikitext103", corpus, retrieval=False, **overrides),
                          tmp_path / "run")
    exp = write_experiment(tmp_path / "exp.py", "wikitext103", corpus, retrieval=False,
                           **overrides)
    done = eval_processes(["--config", str(exp), "--workdir", str(run), "--knn-lm"],
                          processes=2, devices_per_process=4, cache_dir=cache_dir)
    for proc in done:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "--knn-lm runs in one process" in proc.stderr
    assert not (run / "eval" / "validation-knn-lm.json").exists()


def test_knn_lm_check_names_the_fix(monkeypatch, tmp_path):
    """The refusal, in process: what to do instead is in the message."""
    import jax

    from retro_jax.configs import ConfigError
    from retro_jax.evaluate.runner import evaluate_run

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr("retro_jax.train.multihost.maybe_initialize_distributed", lambda: True)
    config = eval_config("wikitext103", tmp_path, retrieval=False)
    with pytest.raises(ConfigError, match="single host"):
        evaluate_run(config, tmp_path, knn_lm=True)


def test_eval_command_initialises_distributed(monkeypatch, tmp_path):
    """`retro-jax eval` connects the processes first, as `retro-jax train` does."""
    calls = []
    monkeypatch.setattr("retro_jax.train.multihost.maybe_initialize_distributed",
                        lambda: calls.append("init") or False)

    def fake_evaluate_run(config, workdir, **kwargs):
        calls.append("evaluate")
        raise SystemExit(0)

    monkeypatch.setattr("retro_jax.evaluate.runner.evaluate_run", fake_evaluate_run)
    from retro_jax.cli import main

    corpus = write_wikitext103(tmp_path / "corpus", train_docs=2, eval_docs=1)
    exp = write_experiment(tmp_path / "exp.py", "wikitext103", corpus)
    with pytest.raises(SystemExit):
        main(["eval", "--config", str(exp), "--workdir", str(tmp_path / "run")])
    assert calls[:2] == ["init", "evaluate"]
