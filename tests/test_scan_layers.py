"""`model.scan_layers`: the decoder as scans over repeated layer groups.

What must hold: the runs cover every layer with the fewest compiled layer bodies; a scanned
model has the unrolled model's parameters (stacked) and count; it computes the same logits,
CCA attention shares and gradients (with dropout and every remat policy); its program does not
grow with depth; retrofitting, optimiser weight decay and checkpoints work across the layouts.

Tolerance for scanned vs unrolled (fp32, CPU): rtol 1e-5 and atol 1e-5 x max|reference|. The
two programs compute the same operations in the same order, but XLA fuses a loop body and an
unrolled chain differently, which moves fp32 roundings (observed: ~1e-6 on logits of
magnitude 3); 1e-5 relative is ten fp32 ulps of headroom and far below any real difference
(a wrong layer order, dropout key or remat placement changes logits by > 1e-2).
"""

from __future__ import annotations

import dataclasses
import functools
import random

import jax
import numpy as np
import pytest
from _model_fixtures import make_batch, new_model, save_untrained_run
from _model_fixtures import tiny_config as model_config
from flax import nnx, traverse_util

from retro_jax.configs import PAPER_SIZES
from retro_jax.configs.validate import default_cca_layers
from retro_jax.models.config import RetroConfig
from retro_jax.models.loss import cross_entropy
from retro_jax.models.params import count_params
from retro_jax.models.scan_layers import (
    CCA,
    CCA_ENCODER,
    PLAIN,
    decoder_runs,
    describe_runs,
    layer_kinds,
    plan_runs,
    stack_params,
    unstack_params,
)

RTOL = 1e-5


def assert_close(got, want, err_msg=""):
    want = np.asarray(want)
    atol = RTOL * max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=atol, err_msg=err_msg)


def scanned(cfg: RetroConfig) -> RetroConfig:
    return dataclasses.replace(cfg, scan_layers=True)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def flat(tree) -> dict:
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


# ------------------------------------------------------------------------ the runs
@pytest.mark.parametrize("num_layers, cca_layers, expected", [
    (12, default_cca_layers(12), "P x5 | E | (P P C) x2"),  # paper 172M / 425M: 6, 9, 12
    (24, default_cca_layers(24), "P x8 | E | (P P C) x5"),  # paper 1.5B: 9, 12, ..., 24
    (32, default_cca_layers(32), "P x8 | E | P x2 | (C P P) x7"),  # paper 7.5B: 9, ..., 30
    (12, (), "P x12"),  # the baseline
    (12, tuple(range(1, 13)), "E | C x11"),  # CCA everywhere
    (12, (12,), "P x11 | E"),  # CCA at the top only
    (12, (5, 6, 7, 8), "P x4 | E | C x3 | P x4"),  # in the middle
])
def test_runs_of_paper_and_ablation_placements(num_layers, cca_layers, expected):
    cfg = RetroConfig(vocab_size=8, d_model=8, num_layers=num_layers, num_heads=1, head_dim=8,
                      ffw_dim=8, chunk_len=4, cca_layers=cca_layers, scan_layers=True)
    assert describe_runs(decoder_runs(cfg)) == expected
    unrolled = decoder_runs(dataclasses.replace(cfg, scan_layers=False))
    assert [(r.first, r.repeats) for r in unrolled] == [(i, 1) for i in range(1, num_layers + 1)]


def test_runs_cover_every_layer_and_minimise_the_compiled_bodies():
    """Random CCA placements: the runs rebuild the layer list exactly, and no decomposition
    has fewer layer bodies (checked against a brute force over all splittings)."""

    def best_bodies(kinds):  # min over every split into runs of repeated groups
        if not kinds:
            return 0
        best = None
        for p in range(1, len(kinds) + 1):
            unit, repeats = kinds[:p], 1
            while kinds[repeats * p:(repeats + 1) * p] == unit:
                repeats += 1
            for r in range(1, repeats + 1):
                cost = p + best_bodies(kinds[r * p:])
                best = cost if best is None else min(best, cost)
        return best

    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 11)
        cca = tuple(sorted(rng.sample(range(1, n + 1), rng.randint(0, n))))
        kinds = layer_kinds(n, cca)
        runs = plan_runs(kinds)
        rebuilt = tuple(k for run in runs for _ in range(run.repeats) for k in run.unit)
        assert rebuilt == kinds, (n, cca)
        assert [run.first for run in runs] == list(np.cumsum(
            [1] + [run.period * run.repeats for run in runs])[:-1])
        assert sum(run.period for run in runs) == best_bodies(kinds), (n, cca, runs)
    assert layer_kinds(5, (2, 4)) == (PLAIN, CCA_ENCODER, PLAIN, CCA, PLAIN)


# ------------------------------------------------------------------ parameters
CFG = model_config(num_layers=8, cca_layers=(2, 4, 6, 8))  # runs (P E) | (P C) x3
# The least that scans CCA layers (runs E | C x2), for the tests that compile a train step.
SMALL = dict(num_layers=3, cca_layers=(1, 2, 3), encoder_layers=1,
             encoder_cross_attend_layers=(1,))


def test_same_seed_same_parameters_stacked_and_the_conversions_invert():
    unrolled, stacked = params_of(new_model(CFG)), params_of(new_model(scanned(CFG)))
    assert "blocks" in unrolled and "stacked_blocks" in stacked and "blocks" not in stacked
    # run 1 = (P C) x3: its CCA position stacks layers 4, 6, 8
    kernel = stacked["stacked_blocks"][1][1]["cca"]["attention"]["query"]["kernel"]
    assert kernel.shape == (3, 32, 4, 8)
    np.testing.assert_array_equal(kernel[2], unrolled["blocks"][7]["cca"]["attention"]["query"]
                                  ["kernel"])
    for converted, want in ((stack_params(unrolled, CFG), stacked),
                            (unstack_params(stacked, CFG), unrolled)):
        assert jax.tree.structure(converted) == jax.tree.structure(want)
        for got, ref in zip(jax.tree.leaves(converted), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("size", ["172M", "7.5B"])
def test_parameter_counts_do_not_depend_on_the_layout(size):
    cfg = RetroConfig(vocab_size=128_000, chunk_len=64, cca_layers=default_cca_layers(
        PAPER_SIZES[size]["num_layers"]), encoder_width=896, encoder_heads=14,
        encoder_head_dim=64, encoder_ffw_dim=3584, **PAPER_SIZES[size])
    assert count_params(scanned(cfg)) == count_params(cfg)


# ------------------------------------------------------- the same function
@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(graphdef, state, inputs, targets, neighbours, key):
    def f(state):
        m = nnx.merge(graphdef, state)
        logits, shares = m(inputs, neighbours, return_cca_attention=True, dropout_rng=key)
        total, count = cross_entropy(logits, targets)
        return total / count, (logits, shares)

    return jax.value_and_grad(f, has_aux=True)(state)


def _outputs(model, inputs, targets, neighbours, key):
    """(loss, logits, shares) and the gradient of the loss (dropout on when `key`)."""
    (loss, (logits, shares)), grads = _value_and_grad(*nnx.split(model), inputs, targets,
                                                      neighbours, key)
    return loss, logits, shares, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("overrides", [
    dict(SMALL, dropout=0.3),  # E | C x2: dropout in the scan, each layer with its own key
    dict(num_layers=3, cca_layers=(), remat="full"),  # the baseline: P x3
    pytest.param(dict(dropout=0.3), marks=pytest.mark.slow),  # (P E) | (P C) x3
    pytest.param(dict(cca_layers=tuple(range(1, 9)), remat="full"),  # E | C x7
                 marks=pytest.mark.slow),
    pytest.param(dict(cca_layers=(), remat="dots"), marks=pytest.mark.slow),  # P x8
])
def test_scanned_and_unrolled_give_the_same_logits_shares_and_gradients(overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    inputs, targets, neighbours = make_batch()
    if not cfg.retrieval:
        neighbours = None
    key = jax.random.key(5, impl="rbg") if cfg.dropout else None  # compiles faster
    model = new_model(cfg)
    ref = _outputs(model, inputs, targets, neighbours, key)
    got = _outputs(new_model(scanned(cfg)), inputs, targets, neighbours, key)
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])
    assert sorted(got[2]) == sorted(ref[2]) == sorted(cfg.cca_layers)
    for layer in ref[2]:
        assert_close(got[2][layer], ref[2][layer], err_msg=f"shares of layer {layer}")
    grads, ref_grads = flat(unstack_params(got[3], cfg)), flat(ref[3])
    assert grads.keys() == ref_grads.keys()
    for path, want in ref_grads.items():
        assert_close(grads[path], want, err_msg=path)
    if cfg.dropout:  # the dropout keys matter: another key gives other logits
        other = _outputs(model, inputs, targets, neighbours, jax.random.key(6, impl="rbg"))
        assert np.abs(np.asarray(other[1] - ref[1])).max() > 1e-2


def _lowered_size(cfg: RetroConfig) -> tuple[int, int]:
    """(characters, while loops) of the lowered loss + gradient of `cfg`'s model."""
    inputs, targets, _ = make_batch()
    abstract = nnx.eval_shape(lambda: new_model(cfg))
    graphdef, state = nnx.split(abstract)

    def loss(state):
        total, count = cross_entropy(nnx.merge(graphdef, state)(inputs), targets)
        return total / count

    text = jax.jit(jax.grad(loss)).lower(state).as_text()
    return len(text), text.count("stablehlo.while")


def test_program_size_is_flat_with_depth():
    """The baseline at 4 and 16 layers: the scanned program is the same size (one loop over
    the stacked layers), the unrolled one grows with every layer."""
    base = dataclasses.replace(CFG, cca_layers=())
    sizes = {(n, scan): _lowered_size(dataclasses.replace(base, num_layers=n, scan_layers=scan))
             for n in (4, 16) for scan in (False, True)}
    assert sizes[(16, True)][0] < 1.05 * sizes[(4, True)][0], sizes
    assert sizes[(16, False)][0] > 3 * sizes[(4, False)][0], sizes
    assert sizes[(16, True)][1] > sizes[(16, False)][1]  # the scan's loops (forward, backward)


# ------------------------------------------------------------ training pieces
def test_weight_decay_skips_stacked_vectors():
    from retro_jax.train.optimizer import decay_mask

    stacked = nnx.state(nnx.eval_shape(lambda: new_model(scanned(CFG))), nnx.Param)
    unrolled = nnx.state(nnx.eval_shape(lambda: new_model(CFG)), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(stacked))
    assert mask["stacked_blocks"][1][1]["cca_norm"]["scale"] is False
    assert mask["stacked_blocks"][1][1]["cca"]["attention"]["query"]["kernel"] is True
    # Per layer (each stacked flag repeated over its rows, then unstacked): as unrolled.
    rows = {**mask, "stacked_blocks": jax.tree.map(
        lambda m, p: np.full(p.shape[:1], m), mask["stacked_blocks"],
        nnx.to_pure_dict(stacked)["stacked_blocks"])}
    per_layer = {k: bool(v) for k, v in flat(unstack_params(rows, CFG)).items()}
    assert per_layer == flat(nnx.to_pure_dict(decay_mask(unrolled)))


@pytest.fixture(scope="module")
def retrofit_setups():
    """Per layout (False: unrolled, True: scanned): (config, RetroConfig, TrainSetup, initial
    state) of RETRO with train.retrofit (`SMALL`: runs E | C x2, so a scanned run holds
    trainable CCA and frozen self-attention parameters) on one device. The states are shared:
    a test that changes one works on a copy (`_copy`)."""
    from _train_fixtures import tiny_config

    from retro_jax.models.retro import Retro, retrofit_filter
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.optimizer import make_optimizer
    from retro_jax.train.state import TrainSetup

    out = {}
    for scan in (False, True):
        config = tiny_config(**{f"model.{k}": v for k, v in SMALL.items()},
                             **{"train.retrofit": True, "model.scan_layers": scan})
        model_cfg = RetroConfig.from_config(config.model, config.database.chunk_len)
        setup = TrainSetup.create(lambda rngs, c=model_cfg: Retro(c, rngs=rngs),
                                  make_optimizer(config.train),
                                  make_mesh(config.mesh, devices=jax.devices()[:1]),
                                  logical_axis_rules(config.mesh), trainable=retrofit_filter)
        out[scan] = (config, model_cfg, setup, setup.init(0))
    return out


def _copy(state: dict) -> dict:
    """New containers (States, Variables) around the same arrays: loaders replace values in
    place."""
    return jax.tree.map(lambda x: x, state)


def _per_layer(tree, cfg) -> dict:
    """Path -> host copy (the train step donates the state) of each parameter, per layer."""
    return {k: np.asarray(v) for k, v in flat(unstack_params(nnx.to_pure_dict(tree),
                                                             cfg)).items()}


def test_retrofit_filter_selects_the_same_parameters_in_both_layouts(retrofit_setups):
    """The trainable (CCA + encoder) and frozen parameters are the same, per layer, with the
    same initial values (same seed) in both layouts."""
    per = {scan: {key: _per_layer(state[key], cfg) for key in ("params", "frozen")}
           for scan, (_, cfg, _, state) in retrofit_setups.items()}
    trainable = per[False]["params"]
    assert trainable and all("cca" in p or p.startswith("encoder") for p in trainable)
    for key in ("params", "frozen"):
        assert per[True][key].keys() == per[False][key].keys(), key
        for path, value in per[False][key].items():
            np.testing.assert_array_equal(per[True][key][path], value, err_msg=path)


@pytest.mark.slow
def test_retrofit_train_step_with_scan(retrofit_setups):
    """One retrofitting train step (AdamW with weight decay) gives the same loss and
    trainable parameters in both layouts and leaves the frozen ones as they were."""
    from _train_fixtures import synthetic_batch

    from retro_jax.train.optimizer import schedule_from_config

    results = {}
    for scan, (config, model_cfg, setup, _) in retrofit_setups.items():
        state = setup.init(0)  # the step donates it
        before = _per_layer(state["frozen"], model_cfg)
        step = setup.make_train_step(grad_accum=1, schedule=schedule_from_config(config.train))
        batch = synthetic_batch(0, config.train.batch_size, config.data.seq_len,
                                config.data.num_neighbours, config.database.chunk_len)
        state, metrics = step(state, batch)
        after = _per_layer(state["frozen"], model_cfg)
        for path, value in before.items():
            np.testing.assert_array_equal(after[path], value, err_msg=path)
        results[scan] = (float(metrics["loss"]), _per_layer(state["params"], model_cfg))
    assert results[True][1].keys() == results[False][1].keys()
    assert_close(results[True][0], results[False][0])
    for path, want in results[False][1].items():
        assert_close(results[True][1][path], want, err_msg=path)


def _adam(opt_state):
    """The AdamW moments (the optimiser state with `mu` and `nu`)."""
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu"))


def test_resume_across_layouts(retrofit_setups, tmp_path):
    """A train state saved unrolled resumes in a scanned run: parameters and AdamW moments
    converted, exactly."""
    from retro_jax.train.checkpoint import Checkpointer
    from retro_jax.train.restore import restore_state, save_state

    (config, cfg, unrolled, state), (_, scan_cfg, scanned_setup, _) = (retrofit_setups[False],
                                                                      retrofit_setups[True])
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, state["params"])  # non-zero moments
    _, opt_state = unrolled.optimizer.update(grads, state["opt_state"], state["params"])
    state = {**_copy(state), "opt_state": opt_state}
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    save_state(ckpt, unrolled, state, next_step=1, config=config)
    resumed, meta = restore_state(ckpt, scanned_setup)
    ckpt.close()
    assert meta["next_step"] == 1
    pairs = [(state[key], resumed[key]) for key in ("params", "frozen")]
    adam, adam_ref = _adam(resumed["opt_state"]), _adam(state["opt_state"])
    assert "stacked_blocks" in nnx.to_pure_dict(adam.mu)
    pairs += [(adam_ref.mu, adam.mu), (adam_ref.nu, adam.nu)]
    for ref, got in pairs:
        want, got = _per_layer(ref, cfg), _per_layer(got, scan_cfg)
        assert want.keys() == got.keys()
        for path, value in want.items():
            np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_retrofit_a_scanned_model_from_an_unrolled_baseline(retrofit_setups, tmp_path):
    """`train.init_from`: a baseline checkpoint (unrolled) initialises the shared parameters
    of a scanned RETRO; CCA and encoder keep their initialisation."""
    from retro_jax.train.checkpoint import Checkpointer
    from retro_jax.train.restore import init_from_baseline

    config, cfg, _, _ = retrofit_setups[False]
    _, scan_cfg, scanned_setup, fresh = retrofit_setups[True]
    base_config = config.copy_and_resolve_references()
    base_config.model.retrieval, base_config.train.retrofit = False, False
    base_config.model.cca_layers = ()
    model = new_model(dataclasses.replace(cfg, cca_layers=()), seed=7)
    source = Checkpointer(tmp_path / "baseline", async_save=False)
    source.save(1, params=params_of(model), train={"step": np.int32(1)},
                meta={"next_step": 1, "config": base_config.to_dict()})
    source.wait()
    source.close()
    initial = _per_layer(fresh["params"], scan_cfg)
    state = init_from_baseline(scanned_setup, _copy(fresh), tmp_path / "baseline",
                               require_frozen=True)
    loaded = _per_layer(nnx.merge_state(state["params"], state["frozen"]), scan_cfg)
    for path, value in flat(params_of(model)).items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    for path, value in initial.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)


@pytest.mark.parametrize("saved_scan", [False, True])
def test_a_checkpoint_loads_into_a_model_of_the_other_layout(tmp_path, saved_scan):
    """`load_trained_model` (eval, sample) reads either layout into either."""
    from _train_fixtures import tiny_config

    from retro_jax.train.restore import load_trained_model

    config = tiny_config(**{f"model.{k}": v for k, v in SMALL.items()},
                         **{"model.scan_layers": saved_scan})
    saved = save_untrained_run(config, tmp_path)
    config.model.scan_layers = not saved_scan
    from retro_jax.models.sharding import make_mesh

    loaded = load_trained_model(tmp_path, config, mesh=make_mesh(config.mesh, jax.devices()[:1]))
    assert loaded.cfg.scan_layers is (not saved_scan)
    assert ("stacked_blocks" in params_of(loaded)) is (not saved_scan)
    want, got = (flat(unstack_params(params_of(m), m.cfg)) for m in (saved, loaded))
    assert want.keys() == got.keys()
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
