"""Sharding: the same logits and gradients on every mesh, and the golden PartitionSpecs.

Regenerate the golden file after an intended change of parameter names or rules:

    RETRO_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_model_sharding.py -k golden
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from _model_fixtures import loss_fn, make_batch, new_model, tiny_config
from flax import nnx
from jax.sharding import PartitionSpec

from retro_jax.configs import get_base_config
from retro_jax.models.retro import Retro
from retro_jax.models.sharding import (
    axis_rules,
    batch_sharding,
    logical_axis_rules,
    logical_to_spec,
    make_mesh,
    state_partition_specs,
    state_shardings,
)

GOLDEN = Path(__file__).parent / "golden" / "partition_specs_2x2x2.json"


def mesh_config(data: int, fsdp: int, tensor: int):
    mesh = get_base_config().mesh
    mesh.data, mesh.fsdp, mesh.tensor = data, fsdp, tensor
    return mesh


def _value_and_grad(graphdef, state, inputs, targets, neighbours):
    def f(state):
        model = nnx.merge(graphdef, state)
        return loss_fn(model, inputs, targets, neighbours), model(inputs, neighbours)

    (loss, logits), grads = jax.value_and_grad(f, has_aux=True)(state)
    return loss, logits, grads


@pytest.fixture(scope="module")
def reference():
    model = new_model()
    inputs, targets, neighbours = make_batch(batch=8)
    graphdef, state = nnx.split(model)
    out = jax.jit(_value_and_grad, static_argnums=0)(graphdef, state, inputs, targets,
                                                     neighbours)
    return model, (inputs, targets, neighbours), jax.device_get(out)


def _run_on_mesh(model, batch, shape):
    mesh_cfg = mesh_config(*shape)
    mesh = make_mesh(mesh_cfg)
    rules = logical_axis_rules(mesh_cfg)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), axis_rules(rules):
        shardings = state_shardings(state, mesh, rules)
        state = jax.device_put(state, shardings)
        placed = [None if x is None else batch_sharding(mesh, rules, x.ndim) for x in batch]
        data = tuple(None if x is None else jax.device_put(x, sh)
                     for x, sh in zip(batch, placed, strict=True))
        in_sh = (shardings, *placed)
        fn = jax.jit(lambda s, *b: _value_and_grad(graphdef, s, *b), in_shardings=in_sh,
                     out_shardings=(None, None, shardings))
        loss, logits, grads = fn(state, *data)
        # the batch really is split across data (x fsdp)
        assert len(logits.sharding.device_set) == 8
        return jax.device_get((loss, logits, grads)), shardings


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2),
                                   pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_mesh_matches_single_device(reference, shape):
    model, batch, (loss, logits, grads) = reference
    (m_loss, m_logits, m_grads), shardings = _run_on_mesh(model, batch, shape)
    np.testing.assert_allclose(m_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(m_logits, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    ref_leaves = jax.tree.leaves(grads)
    for got, want in zip(jax.tree.leaves(m_grads), ref_leaves, strict=True):
        scale = np.abs(want).max() + 1e-12
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    if shape != (8, 1, 1):  # some parameters are split over fsdp/tensor
        specs = [s.spec for s in jax.tree.leaves(shardings)]
        assert any(any(a is not None for a in spec) for spec in specs)


def _specs_json(model) -> dict[str, list]:
    mesh_cfg = mesh_config(2, 2, 2)
    rules = logical_axis_rules(mesh_cfg)
    specs = state_partition_specs(nnx.state(model, nnx.Param), rules,
                                  {"data": 2, "fsdp": 2, "tensor": 2})
    out = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[key] = [list(a) if isinstance(a, tuple) else a for a in spec]
    return dict(sorted(out.items()))


def test_partition_specs_match_golden():
    model = nnx.eval_shape(lambda: Retro(tiny_config(), rngs=nnx.Rngs(0)))  # shapes only
    got = _specs_json(model)
    if os.environ.get("RETRO_REGENERATE_GOLDEN"):
        lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in got.items()]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    want = json.loads(GOLDEN.read_text())
    assert got == want, "PartitionSpecs changed; regenerate the golden file if intended"


def test_rule_resolution_skips_used_axes_and_indivisible_dims():
    rules = logical_axis_rules(get_base_config().mesh)
    assert logical_to_spec(("batch", "length", "embed"), rules) == PartitionSpec(
        ("data", "fsdp"), None, None)  # fsdp already used by batch
    assert logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    assert logical_to_spec(("embed", "heads"), rules, (6, 4), sizes) == PartitionSpec(
        None, "tensor")


# ------------------------------------------------------------------ model.scan_layers
def test_stacked_parameters_shard_like_unrolled_ones():
    """A stacked parameter `[R, ...]` (model.scan_layers) is replicated along its "layers"
    axis and sharded like the unrolled parameter of each of its rows on the rest."""
    import dataclasses

    from retro_jax.models.scan_layers import decoder_runs

    cfg = tiny_config(num_layers=6, cca_layers=(2, 4, 6))
    specs = {}
    for scan in (False, True):
        layout = dataclasses.replace(cfg, scan_layers=scan)
        specs[scan] = _specs_json(nnx.eval_shape(lambda c=layout: Retro(c, rngs=nnx.Rngs(0))))
    expected = {k: v for k, v in specs[False].items() if not k.startswith("blocks/")}
    for s, run in enumerate(decoder_runs(dataclasses.replace(cfg, scan_layers=True))):
        for j in range(run.period):
            for layer in run.layers(j):
                prefix = f"blocks/{layer - 1}/"
                for key, spec in specs[False].items():
                    if key.startswith(prefix):
                        stacked_key = f"stacked_blocks/{s}/{j}/{key[len(prefix):]}"
                        assert specs[True][stacked_key] == [None] + spec, stacked_key
                        expected[stacked_key] = [None] + spec
    assert specs[True] == expected  # nothing else is stacked, nothing is missing


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


@pytest.mark.parametrize("layers", [
    dict(num_layers=3, cca_layers=()),  # the baseline: runs P x3
    pytest.param(dict(num_layers=6, cca_layers=(2, 4, 6)),  # runs (P E) | (P C) x2
                 marks=pytest.mark.slow),
])
def test_scanned_model_on_a_mesh_matches_the_unrolled_one(layers):
    """FSDP x tensor sharding of stacked parameters under the scan (a loop over plain layers;
    the slow form adds stacked CCA layers and the encoder): the loss, logits and gradients of
    the unrolled model on one device."""
    import dataclasses

    from retro_jax.models.scan_layers import unstack_params

    cfg = tiny_config(**layers)
    batch = make_batch(batch=8)
    if not cfg.retrieval:
        batch = (*batch[:2], None)
    unrolled = new_model(cfg)
    graphdef, state = nnx.split(unrolled)
    loss, logits, grads = jax.device_get(
        jax.jit(_value_and_grad, static_argnums=0)(graphdef, state, *batch))
    scanned = new_model(dataclasses.replace(cfg, scan_layers=True))
    (m_loss, m_logits, m_grads), _ = _run_on_mesh(scanned, batch, (2, 2, 2))
    np.testing.assert_allclose(m_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(m_logits, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    got = _flatten(unstack_params(nnx.to_pure_dict(m_grads), cfg))
    want = _flatten(nnx.to_pure_dict(grads))
    assert got.keys() == want.keys()
    for path, ref in want.items():
        np.testing.assert_allclose(got[path], ref, rtol=1e-5,
                                   atol=1e-5 * (np.abs(ref).max() + 1e-12), err_msg=str(path))
