"""Fast unit tests of retro_jax/train: schedule, decay mask, checkpoints, metrics, multihost."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.configs import get_base_config
from retro_jax.train import metrics as metrics_lib
from retro_jax.train.checkpoint import Checkpointer
from retro_jax.train.multihost import multi_process_requested
from retro_jax.train.optimizer import decay_mask, learning_rate_schedule, schedule_from_config


def test_schedule_paper_values():
    tc = get_base_config().train  # 1e-7 warm-up over 750 steps to 2e-4, cosine to 0.1x
    lr = schedule_from_config(tc)
    assert float(lr(0)) == pytest.approx(1e-7, rel=1e-5)
    assert float(lr(375)) == pytest.approx((1e-7 + 2e-4) / 2, rel=1e-5)
    assert float(lr(750)) == pytest.approx(2e-4, rel=1e-6)
    mid = 750 + (tc.num_steps - 750) // 2
    assert float(lr(mid)) == pytest.approx(0.55 * 2e-4, rel=1e-4)  # half-way down the cosine
    assert float(lr(tc.num_steps)) == pytest.approx(0.1 * 2e-4, rel=1e-5)
    assert float(lr(tc.num_steps + 1000)) == pytest.approx(0.1 * 2e-4, rel=1e-5)
    values = np.array([float(lr(s)) for s in range(0, tc.num_steps, 997)])
    peak = int(np.argmax(values))
    assert np.all(np.diff(values[: peak + 1]) > 0) and np.all(np.diff(values[peak:]) <= 0)


def test_schedule_without_warmup_and_short_runs():
    lr = learning_rate_schedule(peak_lr=1.0, num_steps=10, warmup_steps=0, warmup_init_lr=1e-7,
                                min_lr_ratio=0.1)
    assert float(lr(0)) == pytest.approx(1.0)
    assert float(lr(10)) == pytest.approx(0.1)
    only_warmup = learning_rate_schedule(peak_lr=1.0, num_steps=5, warmup_steps=10,
                                         warmup_init_lr=0.0, min_lr_ratio=0.1)
    assert float(only_warmup(5)) == pytest.approx(0.5)


def test_weight_decay_mask_matrices_only():
    params = {"embed": jnp.zeros((10, 4)), "kernel": jnp.zeros((4, 2, 3)),
              "scale": jnp.zeros((4,)), "bias": jnp.zeros((3,))}
    assert decay_mask(params) == {"embed": True, "kernel": True, "scale": False, "bias": False}
    # model.scan_layers: a leading layers axis is not a matrix dimension.
    stacked = {"stacked_blocks": {0: {0: {"scale": jnp.zeros((3, 4)),
                                          "kernel": jnp.zeros((3, 4, 2))}}}}
    assert decay_mask(stacked) == {"stacked_blocks": {0: {0: {"scale": False, "kernel": True}}}}


def test_checkpointer_roundtrip_retention_and_partial_writes(tmp_path):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep_last=2, keep_every=4, async_save=True)
    for step in range(1, 8):
        params = {"w": jnp.full((4, 2), float(step))}
        ckpt.save(step, params=params, train={"step": jnp.int32(step)},
                  meta={"next_step": step, "config": {}})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6, 7]  # the last two, and every 4th
    ckpt.close()

    # A checkpoint interrupted while being written (orbax's temporary directory, never
    # renamed into place) is not listed and not loaded; a new manager removes it.
    partial = directory / "9.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 16)
    reader = Checkpointer(directory, read_only=True)
    assert reader.latest_step() == 7
    abstract = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
    restored = reader.restore_params(None, abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((4, 2), 7.0))
    assert reader.restore_meta()["next_step"] == 7
    reader.close()
    writer = Checkpointer(directory, keep_last=2, keep_every=4)
    assert writer.latest_step() == 7
    writer.save(8, params={"w": jnp.zeros((4, 2))}, train={"step": jnp.int32(8)},
                meta={"next_step": 8, "config": {}})
    writer.wait()  # leftovers are removed in the background before the first save
    assert writer.all_steps() == [4, 7, 8] and not partial.exists()
    writer.close()


def test_bits_per_byte_and_manifest_ratio():
    manifest = {"splits": {"train": {"num_tokens": 250, "num_bytes": 1000}}}
    tpb = metrics_lib.tokens_per_byte_from_manifest(manifest)
    assert tpb == 0.25
    assert metrics_lib.bits_per_byte(math.log(2) * 4, tpb) == pytest.approx(1.0)
    assert metrics_lib.tokens_per_byte_from_manifest({"splits": {}}) is None


def test_model_flops_per_token_paper_size():
    from retro_jax.models.config import RetroConfig

    base = get_base_config()  # RETRO-172M
    retro = RetroConfig.from_config(base.model, base.database.chunk_len)
    base.model.retrieval = False
    baseline = RetroConfig.from_config(base.model, base.database.chunk_len)
    flops_base = metrics_lib.model_flops_per_token(baseline, seq_len=2048, num_neighbours=0,
                                                   chunk_len=64)
    # 6 x (12 layers x (4 d hd + 2 d f) + d V) + 6 x 12 layers x 2 n hd (PaLM's count).
    d, f, hd, v = 896, 3584, 16 * 64, 128_000
    expected = 6 * (12 * (4 * d * hd + 2 * d * f) + d * v) + 6 * 12 * 2 * 2048 * hd
    assert flops_base == pytest.approx(expected, rel=1e-6)
    flops_retro = metrics_lib.model_flops_per_token(retro, seq_len=2048, num_neighbours=2,
                                                    chunk_len=64)
    assert flops_base < flops_retro < 3 * flops_base


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv(metrics_lib.PEAK_FLOPS_ENV, "123e12")
    assert metrics_lib.peak_flops_per_device() == (123e12, "$RETRO_JAX_PEAK_FLOPS")
    monkeypatch.delenv(metrics_lib.PEAK_FLOPS_ENV)
    value, source = metrics_lib.peak_flops_per_device()
    assert value > 0 and source == "measured (cpu)"


def test_metric_writer_and_reader(tmp_path):
    writer = metrics_lib.MetricWriter(tmp_path, total_steps=3, tensorboard=False,
                                      progress="none")
    writer.write(1, {"loss": 3.0})
    writer.write(2, {"loss": 2.0})
    writer.write(2, {"eval_loss": 2.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a resumed run rewrites step 2
        f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n{\"step\": 3, \"lo")  # cut line
    rows = metrics_lib.read_metrics(tmp_path)
    assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5, "eval_loss": 2.5}]
    resumed = metrics_lib.MetricWriter(tmp_path, total_steps=4, tensorboard=False,
                                       progress="none")
    resumed.write(4, {"loss": 1.0})  # after the cut line, still a line of its own
    resumed.close()
    assert metrics_lib.read_metrics(tmp_path)[-1] == {"step": 4, "loss": 1.0}


def test_multi_process_detection():
    assert multi_process_requested({}) is None
    assert multi_process_requested({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}) is None
    assert multi_process_requested({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).startswith("TPU")
    assert multi_process_requested({"JAX_COORDINATOR_ADDRESS": "h:1"}) == \
        "JAX_COORDINATOR_ADDRESS"
    assert multi_process_requested({"SLURM_NTASKS": "4"}) == "SLURM_NTASKS"


def test_plot_renders_several_runs(tmp_path):
    from argparse import Namespace

    from retro_jax.configs import ConfigError
    from retro_jax.train.plot import run_plot

    runs = []
    for name, scale in (("retro", 1.0), ("baseline", 1.2)):
        run = tmp_path / name
        writer = metrics_lib.MetricWriter(run, total_steps=5, tensorboard=False,
                                          progress="none")
        for step in range(1, 6):
            writer.write(step, {"loss": scale * 5 / step, "diag_loss_on": 1.0 / step,
                                "diag_loss_off": 2.0 / step})
        writer.close()
        (run / "config.json").write_text(json.dumps({"name": f"demo-{name}"}))
        runs.append(run)
    out = tmp_path / "plots" / "loss.png"
    assert run_plot(Namespace(workdirs=runs, out=out, metric="loss")) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="available: diag_loss_off, diag_loss_on, loss"):
        run_plot(Namespace(workdirs=runs, out=out, metric="eval_loss"))
    from retro_jax.train.plot import expand_metric

    records = metrics_lib.read_metrics(runs[0])
    assert expand_metric("diagnostics", records) == ["diag_loss_off", "diag_loss_on"]
    assert expand_metric("loss,diag_loss_on", records) == ["loss", "diag_loss_on"]
    assert run_plot(Namespace(workdirs=runs, out=out, metric="diagnostics")) == 0


def test_compile_without_libtpu_says_what_to_install(capsys, repo_root):
    from argparse import Namespace

    from retro_jax.train.aot import run_compile

    pytest.importorskip("jax")
    try:
        import libtpu  # noqa: F401

        pytest.skip("libtpu is installed: the command would compile")
    except ImportError:
        pass
    args = Namespace(config=str(repo_root / "experiments" / "demo.py"), overrides=[],
                     topology="v5p:2x2x2")
    assert run_compile(args) == 2
    assert 'pip install "jax[tpu]==0.10.2"' in capsys.readouterr().err


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_draws_random_numbers_only_with_dropout(grad_accum):
    """With model.dropout 0 the lowered train step has no random-number ops (the program of
    a model without dropout); with dropout > 0 it derives its keys inside the step."""
    from _train_fixtures import tiny_config
    from flax import nnx

    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.optimizer import make_optimizer
    from retro_jax.train.state import TrainSetup

    texts = {}
    for dropout in (0.0, 0.1):
        config = tiny_config(**{"model.dropout": dropout, "train.grad_accum": grad_accum})
        model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
        mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
        setup = TrainSetup.create(lambda rngs, c=model_cfg: Retro(c, rngs=rngs),
                                  make_optimizer(config.train), mesh,
                                  logical_axis_rules(config.mesh), trainable=nnx.Param)
        assert setup.dropout == dropout
        step = setup.make_train_step(grad_accum=grad_accum,
                                     schedule=schedule_from_config(config.train))
        b, n, m = config.train.batch_size, config.data.seq_len, config.database.chunk_len
        batch = {"inputs": jax.ShapeDtypeStruct((b, n), jnp.int32),
                 "targets": jax.ShapeDtypeStruct((b, n), jnp.int32),
                 "neighbours": jax.ShapeDtypeStruct((b, n // m, 2, 2 * m), jnp.int32)}
        texts[dropout] = step.lower(setup.abstract_state, batch).as_text()
    assert "threefry" not in texts[0.0] and "random" not in texts[0.0]
    assert "threefry" in texts[0.1]


def test_restore_keeps_the_dropout_key_and_derives_it_for_older_checkpoints(tmp_path):
    """A checkpoint stores the dropout key; one written before it did (no train/rng) resumes
    with the key a fresh run of the checkpoint's train.seed starts from."""
    from _train_fixtures import tiny_config

    from retro_jax.models.config import RetroConfig
    from retro_jax.models.retro import Retro
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.optimizer import make_optimizer
    from retro_jax.train.restore import _saveable, restore_state, save_state
    from retro_jax.train.state import TrainSetup

    config = tiny_config(**{"model.dropout": 0.1, "train.seed": 5})
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    setup = TrainSetup.create(lambda rngs: Retro(model_cfg, rngs=rngs),
                              make_optimizer(config.train),
                              make_mesh(config.mesh, devices=jax.devices()[:1]),
                              logical_axis_rules(config.mesh))
    state = setup.init(5)
    state["rng"] = jax.random.fold_in(state["rng"], 123)  # not what init(5) gives
    ckpt = Checkpointer(tmp_path / "new", async_save=False)
    save_state(ckpt, setup, state, next_step=1, config=config)
    restored, _ = restore_state(ckpt, setup)
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                  jax.random.key_data(state["rng"]))

    old = Checkpointer(tmp_path / "old", async_save=False)
    params, train = _saveable(setup, state)
    del train["rng"]
    old.save(1, params=params, train=train, meta={"next_step": 1, "config": config.to_dict()})
    restored, _ = restore_state(old, setup)
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                  jax.random.key_data(setup.init(5)["rng"]))
    for c in (ckpt, old):
        c.close()
