"""From checkpoints to train states and models: resume, initialise from a baseline, load.

  save_state / restore_state   the full train state <-> a checkpoint (exact resumption: the
                                dropout key and the step are stored, dropout masks derive
                                from them)
  init_from_baseline            retrofitting (paper section 4.2): copy a trained baseline's
                                decoder into a fresh RETRO state; CCA + encoder stay fresh
  load_trained_model            the latest checkpoint of a run as a Retro module (eval, sample)

Parameters are stored as a nested dict (`nnx.to_pure_dict`), so any model whose parameter
paths match can read them, whatever its mesh or train/frozen split. The decoder's paths depend
on `model.scan_layers` (per-layer `blocks/...` or stacked `stacked_blocks/...`, see
retro_jax/models/scan_layers.py): every loader reads a checkpoint in the layout it was
written in (found from the stored tree) and converts it to the model's, so a checkpoint of
either layout resumes, evaluates, samples and initialises a model of the other.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax.configs import ConfigError, load_saved_config
from retro_jax.configs.loader import config_from_dict
from retro_jax.models.config import RetroConfig
from retro_jax.models.retro import Retro
from retro_jax.models.scan_layers import convert_params, params_layout, unstack_params
from retro_jax.models.sharding import axis_rules, logical_axis_rules, make_mesh
from retro_jax.train.checkpoint import Checkpointer, resolve_checkpoint_dir
from retro_jax.train.state import DROPOUT_STREAM, TrainSetup, variable_shardings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- RNG keys
def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 data (what a checkpoint can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree: Any, like: Any) -> Any:
    return jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        if _is_key(ref) else x, tree, like)


# ------------------------------------------------------------- train states
def _saveable(setup: TrainSetup, state: dict) -> tuple[dict, dict]:
    params = nnx.to_pure_dict(setup.full_params(state))
    train = {"step": state["step"], "rng": jax.random.key_data(state["rng"]),
             "opt_state": state["opt_state"],
             "rest": _keys_to_data(nnx.to_pure_dict(state["rest"]))}
    return params, train


def save_state(ckpt: Checkpointer, setup: TrainSetup, state: dict, *, next_step: int,
               config) -> bool:
    """Write `state` as checkpoint `next_step` (async); meta holds the config and position."""
    params, train = _saveable(setup, state)
    meta = {"next_step": int(next_step), "config": config.to_dict(), "time": time.time()}
    return ckpt.save(next_step, params=params, train=train, meta=_jsonable(meta))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def restore_state(ckpt: Checkpointer, setup: TrainSetup, step: int | None = None
                  ) -> tuple[dict, dict]:
    """(train state, meta) of checkpoint `step` (None = latest), in `setup`'s shardings.

    A checkpoint written with the other `model.scan_layers` is restored in its own layout
    (a TrainSetup of that layout, same optimiser, filters and mesh) and converted: the
    parameters and every parameter-shaped part of the optimiser state (the AdamW moments).
    """
    cfg = _model_cfg(setup)
    stored = params_layout(ckpt.params_tree(step))
    if cfg is not None and stored is not None and stored != cfg.scan_layers:
        src_cfg = dataclasses.replace(cfg, scan_layers=stored)
        source = TrainSetup.create(lambda rngs: Retro(src_cfg, rngs=rngs), setup.optimizer,
                                   setup.mesh, setup.rules, trainable=setup.filters[0])
        state, meta = restore_state(ckpt, source, step)
        log.info("checkpoint %s: model.scan_layers=%s layout converted to scan_layers=%s",
                 meta.get("next_step"), stored, cfg.scan_layers)
        return _convert_state(state, setup, cfg), meta
    abstract = setup.abstract_state
    abstract_params = nnx.to_pure_dict(nnx.merge_state(abstract["params"], abstract["frozen"]))
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    abstract_rest = jax.eval_shape(lambda r: _keys_to_data(nnx.to_pure_dict(r)), abstract["rest"])
    abstract_rest = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_rest)
    abstract_rng = jax.eval_shape(jax.random.key_data, abstract["rng"])
    abstract_train = {"step": abstract["step"], "opt_state": abstract["opt_state"],
                      "rest": abstract_rest,
                      "rng": jax.ShapeDtypeStruct(abstract_rng.shape, abstract_rng.dtype,
                                                  sharding=replicated)}
    try:
        restored = ckpt.restore(step, abstract_params=abstract_params,
                                abstract_train=abstract_train)
        rng = jax.random.wrap_key_data(restored["train"]["rng"])  # the default impl, as init
    except ValueError as error:
        # Checkpoints written before the dropout key was saved have no train/rng: use the
        # key a fresh run with the checkpoint's train.seed starts from.
        del abstract_train["rng"]
        try:
            restored = ckpt.restore(step, abstract_params=abstract_params,
                                    abstract_train=abstract_train)
        except ValueError:
            raise error from None
        seed = int(restored["meta"].get("config", {}).get("train", {}).get("seed", 0))
        log.warning("checkpoint %s has no dropout key: derived from train.seed=%d",
                    restored["meta"].get("next_step"), seed)
        rng = jax.device_put(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM),
                             replicated)
    full = nnx.merge_state(abstract["params"], abstract["frozen"])
    nnx.replace_by_pure_dict(full, restored["params"])
    params, frozen = nnx.split_state(full, setup.filters[0], nnx.Param)
    rest = jax.tree.map(lambda x: x, abstract["rest"])
    if jax.tree.leaves(abstract_rest):
        nnx.replace_by_pure_dict(rest, _data_to_keys(restored["train"]["rest"],
                                                     nnx.to_pure_dict(abstract["rest"])))
    state = {"step": restored["train"]["step"], "rng": rng, "params": params, "frozen": frozen,
             "rest": rest, "opt_state": restored["train"]["opt_state"]}
    return state, restored["meta"]


def _model_cfg(setup: TrainSetup) -> RetroConfig | None:
    """The RetroConfig of `setup`'s model (None for a model that is not a Retro)."""
    abstract = setup.abstract_state
    model = nnx.merge(setup.graphdef, abstract["params"], abstract["frozen"], abstract["rest"])
    return getattr(model, "cfg", None)


def _convert_state(state: dict, setup: TrainSetup, cfg: RetroConfig) -> dict:
    """A train state of the other parameter layout in `setup`'s (`cfg.scan_layers`), placed
    in its shardings. Parameter-shaped trees (params, frozen, the optimiser moments) are
    converted with `convert_params`; counters, the step and the key are kept."""
    target = setup.abstract_state

    def convert(tree, like):
        if not isinstance(tree, nnx.State):
            return tree
        pure = convert_params(nnx.to_pure_dict(tree), cfg, scan_layers=cfg.scan_layers)
        out = jax.tree.map(lambda x: x, like)
        nnx.replace_by_pure_dict(out, pure)
        return out

    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    converted = {
        **state,
        "params": convert(state["params"], target["params"]),
        "frozen": convert(state["frozen"], target["frozen"]),
        "opt_state": jax.tree.map(convert, state["opt_state"], target["opt_state"],
                                  is_leaf=is_state),
    }
    keys = ("params", "frozen", "opt_state")
    placed = jax.device_put({k: converted[k] for k in keys},
                            {k: setup.state_shardings[k] for k in keys})
    return {**converted, **placed}


def _abstract_params(cfg: RetroConfig, mesh: Mesh, rules) -> nnx.State:
    """The parameters of `Retro(cfg)` as ShapeDtypeStructs carrying their shardings."""
    # Abstract shapes outside the mesh context: the variables' logical axis names are not
    # mesh axes (the rule table maps them below).
    params = nnx.state(nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = variable_shardings(params, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)


def restore_params(ckpt: Checkpointer, step: int | None, cfg: RetroConfig, mesh: Mesh,
                   rules) -> dict:
    """The parameters of checkpoint `step` (None = latest) as a nested dict in the layout of
    `cfg` (`cfg.scan_layers`), sharded over `mesh` by `rules`.

    The checkpoint's own layout is read from its stored tree; one of the other layout is
    restored as written and converted (`convert_params`).
    """
    stored = params_layout(ckpt.params_tree(step))
    if stored is None or stored == cfg.scan_layers:
        return ckpt.restore_params(step, nnx.to_pure_dict(_abstract_params(cfg, mesh, rules)))
    src = dataclasses.replace(cfg, scan_layers=stored)
    restored = ckpt.restore_params(step, nnx.to_pure_dict(_abstract_params(src, mesh, rules)))
    log.info("checkpoint %s: model.scan_layers=%s layout converted to scan_layers=%s",
             ckpt.directory, stored, cfg.scan_layers)
    converted = convert_params(restored, cfg, scan_layers=cfg.scan_layers)
    target = _abstract_params(cfg, mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(target))
    return jax.device_put(converted, shardings)


# ------------------------------------------------------------- retrofitting
def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def config_from_meta(meta: dict, source: str):
    """The validated config stored in a checkpoint's meta."""
    return config_from_dict(meta["config"], source)


def init_from_baseline(setup: TrainSetup, state: dict, init_from: str | Path,
                       *, require_frozen: bool) -> dict:
    """`state` with every parameter found in the checkpoint at `init_from` replaced by it.

    Parameters the source lacks (CCA and encoder, when the source is a baseline) keep their
    fresh initialisation. A source parameter with no counterpart, or with another shape,
    is an error (the architectures differ); so is a frozen parameter that the source does
    not provide (it would stay random and never train) when `require_frozen`.
    """
    directory = resolve_checkpoint_dir(init_from)
    source = Checkpointer(directory, read_only=True)
    step = source.latest_step()
    if step is None:
        raise ConfigError(f"config key 'train.init_from': found {str(init_from)!r}; "
                          f"no complete checkpoint in {directory}: train the baseline first")
    src_config = config_from_meta(source.restore_meta(step), f"{directory}/{step}/meta")
    src_model = RetroConfig.from_config(src_config.model, src_config.database.chunk_len)
    # Source and model are compared and merged per layer (the unrolled layout), whatever
    # their model.scan_layers: their decoders are grouped into different runs anyway (a
    # baseline is one run, RETRO several).
    cfg = _model_cfg(setup)
    loaded = traverse_util.flatten_dict(unstack_params(
        restore_params(source, step, src_model, setup.mesh, setup.rules), src_model))
    source.close()

    def per_layer(tree: nnx.State) -> dict:
        return traverse_util.flatten_dict(unstack_params(nnx.to_pure_dict(tree), cfg))

    full = nnx.merge_state(state["params"], state["frozen"])
    current = per_layer(full)
    frozen_paths = set(per_layer(state["frozen"]))
    for path, value in loaded.items():
        if path not in current:
            raise ConfigError(f"train.init_from={str(init_from)!r}: parameter {_name(path)} of the "
                              "source has no counterpart in this model (different architecture)")
        if current[path].shape != value.shape:
            raise ConfigError(f"train.init_from={str(init_from)!r}: parameter {_name(path)} has "
                              f"shape {value.shape} in the source, {current[path].shape} here")
    missing_frozen = sorted((p for p in frozen_paths if p not in loaded), key=_name)
    if require_frozen and missing_frozen:
        raise ConfigError(f"train.init_from={str(init_from)!r}: frozen parameters missing in "
                          "the source (they would never train): "
                          f"{[_name(p) for p in missing_frozen[:5]]}")
    fresh = sorted((p for p in current if p not in loaded), key=_name)
    log.info("initialised %d parameters from %s (step %d); %d fresh (e.g. %s)", len(loaded),
             directory, step, len(fresh), ", ".join(_name(p) for p in fresh[:3]))
    current.update(loaded)
    nnx.replace_by_pure_dict(full, convert_params(traverse_util.unflatten_dict(current), cfg,
                                                  scan_layers=cfg.scan_layers))
    params, frozen = nnx.split_state(full, setup.filters[0], nnx.Param)
    # Placed in the train state's shardings (the source may come from another layout).
    params = jax.device_put(params, setup.state_shardings["params"])
    frozen = jax.device_put(frozen, setup.state_shardings["frozen"])
    return {**state, "params": params, "frozen": frozen}


# ---------------------------------------------------------------- eval / sample
def load_trained_model(workdir: str | Path, config=None, mesh: Mesh | None = None,
                       step: int | None = None) -> Retro:
    """The Retro module of a run's latest checkpoint (or `step`), sharded over `mesh`.

    Args:
      workdir: the run directory (or its checkpoints/ directory).
      config: the run's config (default: `<workdir>/config.json`).
      mesh: where the parameters go (default: `make_mesh(config.mesh)` over all devices).
    """
    workdir = Path(workdir)
    if config is None:
        config = load_saved_config(workdir.parent if workdir.name == "checkpoints" else workdir)
    mesh = mesh or make_mesh(config.mesh)
    rules = logical_axis_rules(config.mesh)
    model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
    ckpt = Checkpointer(resolve_checkpoint_dir(workdir), read_only=True)
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: Retro(model_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    restored = restore_params(ckpt, step, model_cfg, mesh, rules)
    ckpt.close()
    with jax.set_mesh(mesh), axis_rules(rules):
        nnx.replace_by_pure_dict(params, restored)
        if jax.tree.leaves(rest):
            rest = jax.jit(lambda: nnx.split(Retro(model_cfg, rngs=nnx.Rngs(0)),
                                             nnx.Param, ...)[2])()
        return nnx.merge(graphdef, params, rest)
