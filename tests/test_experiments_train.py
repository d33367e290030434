"""Every experiment file's `:runlocal` variant builds its model and trains a few steps.

Experiments whose runlocal model, data shape and training settings coincide (the paper files'
sizes differ only in their pod-sized values, which runlocal replaces) are trained once; every
runlocal variant still gets its own validated config. Batches are synthetic (the data path is
covered by the pipeline, build and end-to-end tests), so this checks exactly what an
experiment file changes: the model it builds and how it trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _experiment_specs import specs
from _train_fixtures import read_metrics, synthetic_batches

from retro_jax.configs import load_config

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.name != "__init__.py")
STEPS = 2


def _shape_key(config) -> str:
    """What decides the compiled model and train step of a runlocal run."""
    model = config.model.to_dict()
    model.pop("size")  # a label only
    return json.dumps({"model": model, "data": config.data.to_dict(),
                       "retrofit": config.train.retrofit, "chunk": config.database.chunk_len},
                      sort_keys=True, default=str)


def _runlocal_configs() -> dict[str, tuple[str, object]]:
    """Unique runlocal configs: shape key -> (first experiment name, config)."""
    unique: dict[str, tuple[str, object]] = {}
    for path in EXPERIMENTS:
        config = load_config(f"{path}:runlocal", num_devices=8)
        config.train.num_steps = STEPS
        config.train.log_every = 1
        config.train.warmup_steps = 1
        config.train.checkpoint_every = STEPS
        unique.setdefault(_shape_key(config), (str(path.relative_to(REPO)), config))
    return unique


# The reduced form (default test run): one experiment of each kind of change.
REDUCED = ("experiments/ablations/base.py", "experiments/ablations/retrieval_off.py",
           "experiments/ablations/retrofit.py", "experiments/ablations/cca_every_layer.py",
           "experiments/ablations/encoder_depth6.py",
           "experiments/ablations/no_query_conditioning.py",
           "experiments/paper/wikitext103.py", "experiments/demo.py")


@pytest.mark.parametrize("reduced", [
    pytest.param(True, id="reduced"),
    pytest.param(False, id="every-file", marks=pytest.mark.slow),
])
def test_runlocal_variants_train_a_few_steps(tmp_path, reduced):
    from retro_jax.train.loop import train

    runs = sorted(_runlocal_configs().values(), key=lambda r: (
        bool(r[1].model.retrieval), bool(r[1].train.retrofit)))
    assert len(runs) >= 10, "expected the ablations to give distinct runlocal models"
    if reduced:
        runs = [r for r in runs if r[0] in REDUCED]
        assert len(runs) == len(REDUCED), [r[0] for r in runs]
    baseline_ckpt = None
    trained = []
    for name, config in runs:
        workdir = tmp_path / Path(name).stem
        if config.train.retrofit:
            assert baseline_ckpt is not None, "retrofit needs a baseline trained first"
            config.train.init_from = str(baseline_ckpt)
        train(config, workdir, batches=synthetic_batches(config), tokens_per_byte=0.3,
              progress="none", tensorboard=False)
        losses = [row["loss"] for row in read_metrics(workdir) if "loss" in row]
        assert len(losses) >= STEPS and all(math.isfinite(v) for v in losses), (name, losses)
        if not config.model.retrieval and baseline_ckpt is None:
            baseline_ckpt = workdir / "checkpoints"
        trained.append(name)
    assert any("retrofit" in n for n in trained)


@pytest.mark.parametrize("spec", specs(runlocal=True))
def test_runlocal_is_cpu_sized(spec):
    config = load_config(str(REPO / spec), num_devices=8)
    assert config.model.d_model <= 256 and config.data.seq_len <= 512
    assert config.train.num_steps <= 1000 and config.train.batch_size <= 16
