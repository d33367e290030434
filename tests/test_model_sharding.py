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
        data = tuple(jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in batch)
        in_sh = (shardings,) + tuple(batch_sharding(mesh, rules, x.ndim) for x in batch)
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
