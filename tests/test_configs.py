"""Config system: every experiment file validates; every kind of mistake is caught and named."""

import subprocess
import sys
from pathlib import Path

import pytest

from retro_jax.configs import (
    ConfigError,
    default_cca_layers,
    get_base_config,
    load_config,
    load_saved_config,
    mesh_shape,
    save_config,
    validate_config,
)
from retro_jax.configs.loader import load_experiment_module

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.name != "__init__.py")


def test_there_are_experiment_files():
    assert len(EXPERIMENTS) >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_file_validates(path):
    module = load_experiment_module(path)
    assert module.__doc__ and "retro-jax" in module.__doc__, (
        f"{path}: the docstring must hold the exact command to run it")
    load_config(str(path))
    load_config(f"{path}:runlocal", num_devices=8)


def test_base_config_is_valid():
    validate_config(get_base_config())


def _mistake(key, value, num_devices=None):
    config = get_base_config()
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=num_devices, source="experiments/x.py")
    return str(info.value)


def test_unknown_key_names_the_key_and_suggests():
    config = get_base_config()
    config.model.unlock()
    config.model.num_layer = 3
    with pytest.raises(ConfigError, match=r"model\.num_layer.*does not exist"):
        validate_config(config)


def test_unknown_key_in_new_section():
    config = get_base_config()
    config.unlock()
    config.optimiser = {"lr": 1.0}
    with pytest.raises(ConfigError, match=r"optimiser\.lr"):
        validate_config(config)


@pytest.mark.parametrize("key,value,expected", [
    ("model.num_layers", "12", "expected int"),
    ("model.num_layers", 12.0, "expected int"),
    ("train.learning_rate", "1e-4", "expected float"),
    ("model.retrieval", 1, "expected bool"),
    ("model.cca_layers", 6, "expected tuple"),
])
def test_wrong_type(key, value, expected):
    message = _mistake(key, value)
    assert key in message and expected in message and "experiments/x.py" in message


def test_int_accepted_for_float():
    config = get_base_config()
    config.train.learning_rate = 1
    validate_config(config)


@pytest.mark.parametrize("key,value,expected", [
    ("data.seq_len", 1000, "multiple of database.chunk_len=64"),
    ("model.cca_layers", (6, 13), r"\[1, model.num_layers=12\]"),
    ("model.cca_layers", (0,), "1-based"),
    ("model.cca_layers", (6, 6), "must not repeat"),
    ("data.num_neighbours", 0, ">= 1"),
    ("eval.num_neighbours", 0, ">= 1"),
    ("model.activation", "tanh", "allowed: gelu"),
    ("corpus.kind", "web", "allowed: stdlib"),
    ("eval.stride", 100, "multiple of database.chunk_len"),
    ("eval.stride", 4096, "<= data.seq_len"),
    ("train.min_lr_ratio", 1.5, "between 0 and 1"),
    ("train.learning_rate", 0.0, "> 0"),
    ("model.encoder_cross_attend_layers", (3,), "model.encoder_layers=2"),
    ("mesh.fsdp", 0, "positive size or -1"),
    ("mesh.axis_rules", (("batch", "pod"),), "mesh axes are"),
    ("eval.alphas", (0.5, 2.0), "each alpha"),
])
def test_inconsistent_values(key, value, expected):
    message = _mistake(key, value)
    assert key in message
    import re
    assert re.search(expected, message), message


def test_default_cca_empty_for_small_decoder_is_an_error():
    config = get_base_config()
    config.model.num_layers = 4
    with pytest.raises(ConfigError, match="list the CCA layers explicitly"):
        validate_config(config)
    config.model.retrieval = False  # the baseline needs none
    validate_config(config)


def test_batch_must_divide_into_microbatches():
    config = get_base_config()
    config.train.grad_accum = 3
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate_config(config)


def test_mesh_against_device_count():
    config = get_base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
    with pytest.raises(ConfigError, match="4 devices but 8 are available"):
        validate_config(config, num_devices=8)
    config.mesh.data = -1
    validate_config(config, num_devices=8)
    assert mesh_shape(config.mesh, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    config.mesh.fsdp = 3
    with pytest.raises(ConfigError, match="does not divide"):
        validate_config(config, num_devices=8)
    config.mesh.fsdp, config.mesh.tensor = -1, -1
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        validate_config(config)


def test_paper_cca_placement():
    assert default_cca_layers(12) == (6, 9, 12)
    assert default_cca_layers(24) == (9, 12, 15, 18, 21, 24)
    assert default_cca_layers(32)[0] == 9


def test_overrides_are_typed(tmp_path):
    config = load_config(
        str(REPO / "experiments/demo.py"),
        ["train.num_steps=7", "model.cca_layers=(1,3)", "model.retrieval=false",
         "train.learning_rate=1", "name=abc", "model.encoder_cross_attend_layers=1"],
    )
    assert config.train.num_steps == 7
    assert config.model.cca_layers == (1, 3)
    assert config.model.retrieval is False
    assert isinstance(config.train.learning_rate, float)
    assert config.name == "abc"
    assert config.model.encoder_cross_attend_layers == (1,)


@pytest.mark.parametrize("override,expected", [
    ("train.num_step=3", "key does not exist"),
    ("trian.num_steps=3", "not a config section"),
    ("train.num_steps=abc", "not a Python literal"),
    ("model.retrieval=maybe", "expected true or false"),
    ("train.num_steps", "expected --config.KEY=VALUE"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(str(REPO / "experiments/demo.py"), [override])


def test_missing_experiment_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/nope.py")


def test_saved_config_round_trip(tmp_path):
    config = load_config(str(REPO / "experiments/demo.py:quick"))
    save_config(config, tmp_path)
    again = load_saved_config(tmp_path)
    assert again.to_dict() == config.to_dict()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retro_jax", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_help_lists_every_command():
    from retro_jax.cli import COMMANDS

    out = _cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    for name in COMMANDS:
        sub = _cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: retro-jax " + name in sub.stdout


def test_cli_reports_config_errors_in_one_line(tmp_path):
    out = _cli("params", "--config", "experiments/demo.py", "--config.model.num_layer=3")
    assert out.returncode == 2
    assert "model.num_layer" in out.stderr and "Traceback" not in out.stderr
