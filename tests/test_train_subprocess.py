"""Training in real subprocesses: kill -9 and resume, SIGTERM, two JAX processes.

Each test launches `python tests/_train_fixtures.py` (the real `train()` on a tiny RETRO with
synthetic batches). They take tens of seconds each on a loaded 2-core machine, so they are
marked slow; their in-process reduced forms (exact resume, SIGTERM, NaN) run by default in
tests/test_train_loop.py.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time

import pytest
from _train_fixtures import losses_by_step, script_command, subprocess_env

from retro_jax.train.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

TIMEOUT = 600
# Dropout on: a resumed run must also reproduce the dropout masks (derived from the saved key
# and the step), so its losses equal the uninterrupted run's.
BASE = ["--config.train.num_steps=24", "--config.train.checkpoint_every=4",
        "--config.train.keep_last=3", "--config.mesh.fsdp=2", "--config.model.dropout=0.1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def _env(cache_dir, num_devices=8):
    env = subprocess_env(num_devices)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _run(workdir, cache_dir, *extra, check=True):
    proc = subprocess.run(script_command(workdir, *BASE, *extra), env=_env(cache_dir),
                          capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def _start(workdir, cache_dir):
    return subprocess.Popen(script_command(workdir, *BASE), env=_env(cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step: int) -> int:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        logged = losses_by_step(workdir)
        if logged and max(logged) >= step:
            return max(logged)
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for training progress")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, cache_dir)
    return losses_by_step(workdir)


def test_kill_9_at_a_random_step_then_resume_is_exact(uninterrupted, tmp_path, cache_dir):
    kill_after = random.Random().randint(5, 18)
    proc = _start(tmp_path, cache_dir)
    reached = _wait_for_step(proc, tmp_path, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _run(tmp_path, cache_dir)  # relaunch: resumes from the latest complete checkpoint
    resumed = losses_by_step(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted), (reached, sorted(resumed))
    for step, losses in resumed.items():  # before the kill, recomputed after it: all equal
        for loss in losses:
            assert loss == pytest.approx(uninterrupted[step][0], rel=1e-6), (step, reached)


def test_sigterm_saves_and_exits_zero_then_continues(uninterrupted, tmp_path, cache_dir):
    proc = _start(tmp_path, cache_dir)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-3000:]
    last_logged = max(losses_by_step(tmp_path))
    assert last_logged < 24
    saved = Checkpointer(tmp_path / "checkpoints", read_only=True).latest_step()
    assert saved == last_logged  # the step in flight finished, was logged and saved
    _run(tmp_path, cache_dir)
    resumed = losses_by_step(tmp_path)
    assert min(s for s in resumed if s > saved) == saved + 1 and max(resumed) == 24
    for step, losses in resumed.items():
        assert losses[-1] == pytest.approx(uninterrupted[step][0], rel=1e-6), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multihost
def test_two_processes_match_one_process(tmp_path, cache_dir):
    """2 processes x 4 CPU devices on a (data=2, fsdp=4) mesh == 1 process x 8 devices."""
    extra = ["--config.train.num_steps=4", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
    single = tmp_path / "single"
    proc = subprocess.run(script_command(single, *extra), env=_env(cache_dir, 8),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = _free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen(script_command(multi, *extra, "--processes", "2", "--process-id",
                                             str(i), "--port", str(port)),
                              env=_env(cache_dir, 4), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, stderr[-3000:]
    one, two = losses_by_step(single), losses_by_step(multi)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5), step
    assert Checkpointer(multi / "checkpoints", read_only=True).latest_step() == 4
