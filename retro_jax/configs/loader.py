"""Loading experiment files and command-line overrides.

An experiment is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`.
It is named on the command line as `experiments/X.py` or `experiments/X.py:ARG`, where ARG
(for example `runlocal`) selects a variant. Overrides `--config.a.b=VALUE` are parsed with the
type of the key they replace, then the whole config is validated.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from pathlib import Path

import ml_collections

from retro_jax.configs.validate import ConfigError, validate_config


def split_spec(spec: str) -> tuple[Path, str | None]:
    """'experiments/x.py:runlocal' -> (Path('experiments/x.py'), 'runlocal')."""
    path, sep, arg = spec.partition(":")
    return Path(path), (arg if sep else None)


def load_experiment_module(path: Path):
    """Import an experiment file by path (experiments may import their base by module name)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist; "
                          "pass --config experiments/<name>.py[:ARG]")
    root = str(path.resolve().parent)
    # Experiment files import their bases as `experiments.x` (repo root on sys.path) or by
    # sibling module name (their own directory on sys.path).
    repo_root = _repo_root_of(path)
    for entry in (root, repo_root):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"_retro_experiment_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {str(path)!r} defines no get_config(arg=None)")
    return module


def _repo_root_of(path: Path) -> str | None:
    for parent in path.resolve().parents:
        if (parent / "experiments").is_dir() and (parent / "retro_jax").is_dir():
            return str(parent)
    return None


def parse_override(config: ml_collections.ConfigDict, assignment: str, source: str = "") -> None:
    """Apply one 'a.b.c=VALUE' to `config`, parsing VALUE with the current value's type."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError(f"override {assignment!r}: expected --config.KEY=VALUE")
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"override --config.{key}: '{'.'.join(parts[: i + 1])}' is not a "
                              f"config section ({source or 'command line'})")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise ConfigError(f"override --config.{key}: key does not exist "
                          f"(see retro_jax/configs/base.py)")
    current = node[leaf]
    node[leaf] = _parse_value(raw, current, key)


def _parse_value(raw: str, current, key: str):
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"override --config.{key}={raw}: expected true or false")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"override --config.{key}={raw}: not a Python literal "
                          f"(expected {type(current).__name__})") from e
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    return value


def load_config(
    spec: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    num_devices: int | None = None,
) -> ml_collections.ConfigDict:
    """Load `experiments/X.py[:ARG]`, apply `a.b=VALUE` overrides, validate, return.

    Args:
      spec: experiment file, optionally with ':ARG'.
      overrides: assignments without the leading '--config.'.
      num_devices: checked against the mesh when given.
    """
    path, arg = split_spec(spec)
    module = load_experiment_module(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, "
                          "expected ml_collections.ConfigDict")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked, detached copy
    for assignment in overrides:
        parse_override(config, assignment, source=str(path))
    return validate_config(config, num_devices=num_devices, source=spec)


CONFIG_FILE = "config.json"


def config_from_args(args, *, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """The validated config of a CLI command (`args.config` + `args.overrides`)."""
    return load_config(args.config, getattr(args, "overrides", ()), num_devices=num_devices)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Write the resolved config to `workdir/config.json` (what sample/eval reuse)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def load_saved_config(workdir: Path, *, num_devices: int | None = None):
    """The config a run saved in `workdir/config.json`, validated again."""
    import json

    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: train in this workdir first, or pass --config")
    return config_from_dict(json.loads(path.read_text()), str(path), num_devices=num_devices)


def config_from_dict(raw: dict, source: str, *, num_devices: int | None = None
                     ) -> ml_collections.ConfigDict:
    """A validated config from its JSON form (config.json, a checkpoint's meta)."""
    from retro_jax.configs.base import get_base_config

    config = get_base_config()
    _assign_json(config, raw, source)
    return validate_config(config, num_devices=num_devices, source=source)


def _assign_json(node: ml_collections.ConfigDict, raw: dict, source: str, prefix: str = "") -> None:
    # JSON turns tuples into lists; restore the base config's types.
    for key, value in raw.items():
        if key not in node:
            raise ConfigError(f"config key '{prefix}{key}' (from {source}) does not exist")
        current = node[key]
        if isinstance(current, ml_collections.ConfigDict):
            _assign_json(current, value, source, f"{prefix}{key}.")
        elif isinstance(current, tuple):
            node[key] = _to_tuple(value)
        elif isinstance(current, float) and isinstance(value, int):
            node[key] = float(value)
        else:
            node[key] = value


def _to_tuple(value):
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value
