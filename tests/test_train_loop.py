"""The training loop end to end on a tiny RETRO (in process, 8 fake CPU devices).

One uninterrupted run (module fixture) is the reference; the other tests restart from its
checkpoints and must reproduce its losses exactly (resume, SIGTERM), stop on NaN without
saving, or retrofit a baseline.
"""

from __future__ import annotations

import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from _train_fixtures import losses_by_step, synthetic_batches, tiny_config

from retro_jax.train.checkpoint import Checkpointer
from retro_jax.train.loop import TrainingDiverged, train
from retro_jax.train.metrics import read_metrics
from retro_jax.train.restore import load_trained_model

NUM_STEPS = 12
OVERRIDES = {"train.num_steps": NUM_STEPS, "train.checkpoint_every": 4, "train.keep_last": 5,
             "mesh.fsdp": 2}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical step programs across the tests' runs compile once."""
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _eval_factory(config):
    factory = synthetic_batches(config, seed=99)
    return lambda: factory(0)


def _run(config, workdir, batches=None, **kwargs):
    return train(config, workdir, batches=batches or synthetic_batches(config),
                 tokens_per_byte=0.25, progress="none", **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run with evaluation every 6 steps."""
    config = tiny_config(**OVERRIDES, **{"train.eval_every": 6})
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(config, workdir, eval_batches=_eval_factory(config))
    return config, workdir, result


def _copy_checkpoint(reference_dir, workdir, step: int) -> None:
    """A run directory whose only checkpoint is `step` of the reference run."""
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_dir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))


def test_runlocal_training_writes_metrics_tensorboard_and_checkpoints(reference):
    config, workdir, result = reference
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses  # the synthetic language is learnable
    for key in ("perplexity", "bits_per_byte", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    timed = rows[2:]
    for key in ("tokens_per_s", "mfu", "input_wait", "steps_per_s"):
        assert all(r[key] >= 0 for r in timed), key
    assert rows[0]["lr"] == pytest.approx(config.train.warmup_init_lr, rel=1e-5)
    assert rows[0]["bits_per_byte"] == pytest.approx(losses[0] / math.log(2) * 0.25)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert result["step"] == NUM_STEPS and result["loss"] == pytest.approx(losses[-1])

    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    import tensorflow as tf

    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0]))
            for v in e.summary.value}
    assert {"loss", "lr", "mfu", "eval_loss", "diag_loss_oracle"} <= tags
    # Retrieval diagnostics ride along with every evaluation (retro_jax/train/diagnostics.py).
    for row in evals:
        for variant in ("on", "off", "random", "oracle"):
            assert math.isfinite(row[f"diag_loss_{variant}"])
            assert math.isfinite(row[f"diag_bpb_{variant}"])
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [4, 8, 12]
    assert (workdir / "config.json").is_file()


def test_load_trained_model_gives_the_trained_loss(reference):
    config, workdir, _ = reference
    model = load_trained_model(workdir)
    batch = next(synthetic_batches(config)(NUM_STEPS))
    from flax import nnx

    logits = nnx.jit(lambda m, x, n: m(x, n))(model, batch["inputs"], batch["neighbours"])
    assert logits.shape == (config.train.batch_size, config.data.seq_len, config.model.vocab_size)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                              batch["targets"][..., None], -1).mean()
    assert nll < read_metrics(workdir)[0]["loss"] - 0.5


def test_resume_from_checkpoint_is_exact(reference, tmp_path):
    config, ref_dir, _ = reference
    _copy_checkpoint(ref_dir, tmp_path, 4)
    _run(config, tmp_path)
    ref, resumed = losses_by_step(ref_dir), losses_by_step(tmp_path)
    assert sorted(resumed) == list(range(5, NUM_STEPS + 1))
    for step, (loss,) in resumed.items():
        assert loss == pytest.approx(ref[step][0], rel=1e-6), step


def test_sigterm_finishes_step_saves_and_resumes(reference, tmp_path):
    config, ref_dir, _ = reference
    _copy_checkpoint(ref_dir, tmp_path, 4)
    data = synthetic_batches(config)

    def preempted(start_step):
        for step, batch in enumerate(data(start_step), start=start_step):
            if step == 6:  # the signal arrives while the 7th batch is being read
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    handler = signal.getsignal(signal.SIGTERM)
    result = _run(config, tmp_path, batches=preempted)
    assert result["step"] == 7  # the step in flight finished, then the run stopped
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).latest_step() == 7
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler is uninstalled
    _run(config, tmp_path)  # the next launch continues from step 7
    ref, resumed = losses_by_step(ref_dir), losses_by_step(tmp_path)
    assert sorted(resumed) == list(range(5, NUM_STEPS + 1))
    for step, losses in resumed.items():
        assert losses[-1] == pytest.approx(ref[step][0], rel=1e-6), step


def test_nan_loss_stops_without_saving(reference, tmp_path):
    config, ref_dir, _ = reference
    _copy_checkpoint(ref_dir, tmp_path, 4)
    data = synthetic_batches(config)

    def poisoned(start_step):
        # Step 6's targets lie outside the vocabulary: the gather of their logits yields NaN,
        # so the loss of step 6 is NaN (a corrupt batch, in the same compiled program).
        for step, batch in enumerate(data(start_step), start=start_step):
            if step == 5:
                batch = {**batch, "targets": batch["targets"] + config.model.vocab_size}
            yield batch

    with pytest.raises(TrainingDiverged, match=r"at step 6 ") as error:
        _run(config, tmp_path, batches=poisoned)
    assert "the last good checkpoint is 4" in str(error.value)
    # The checkpoint due at step 8 was never written, nor anything after the NaN.
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [4]
    assert max(losses_by_step(tmp_path)) == 5  # steps 5.. were logged up to the last good one


def test_retrofit_trains_only_cca_and_encoder(tmp_path):
    from flax import nnx, traverse_util

    baseline_dir, retro_dir = tmp_path / "baseline", tmp_path / "retro"
    from retro_jax.models.sharding import make_mesh

    small = {"train.num_steps": 2, "train.checkpoint_every": 1}
    baseline = tiny_config(**small, **{"model.retrieval": False})
    one_device = make_mesh(baseline.mesh, devices=jax.devices()[:1])  # compiles fastest
    _run(baseline, baseline_dir, mesh=one_device)
    retro = tiny_config(**small, **{"train.retrofit": True, "train.init_from": str(baseline_dir)})
    _run(retro, retro_dir, mesh=one_device)

    def flat_params(workdir, step):
        model = load_trained_model(workdir, step=step)
        flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}

    before = flat_params(baseline_dir, 2)
    after_1, after_2 = flat_params(retro_dir, 1), flat_params(retro_dir, 2)
    new = sorted(set(after_2) - set(before))
    assert new and all("cca" in p or "encoder" in p for p in new), new
    assert any("cca_norm" in p for p in new)
    for path, value in before.items():  # the decoder: bit-identical to the baseline
        np.testing.assert_array_equal(np.asarray(after_2[path]), np.asarray(value),
                                      err_msg=path)
    # CCA and encoder did train between the two retrofitting steps.
    changed = [p for p in new if not np.array_equal(after_1[p], after_2[p])]
    assert len(changed) > len(new) // 2, changed


def test_resume_with_dropout_is_exact(tmp_path):
    """Dropout masks derive from the saved key, the step and the micro-batch index, so a run
    resumed from its step-3 checkpoint reproduces the uninterrupted run's losses bit for bit
    (with gradient accumulation: each micro-batch draws its own masks)."""
    from retro_jax.models.sharding import make_mesh

    config = tiny_config(**{"model.dropout": 0.1, "train.grad_accum": 2, "train.num_steps": 6,
                            "train.checkpoint_every": 3, "train.keep_last": 5, "mesh.fsdp": 2})
    mesh = make_mesh(config.mesh, devices=jax.devices()[:4])  # micro-batch 4 over 2x2
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(config, full, mesh=mesh)
    _copy_checkpoint(full, resumed, 3)
    _run(config, resumed, mesh=mesh)
    ref, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(ref) == list(range(1, 7)) and sorted(got) == [4, 5, 6]
    for step, (loss,) in got.items():
        assert loss == ref[step][0], step
