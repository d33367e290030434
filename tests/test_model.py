"""RETRO model behaviour on a tiny config: causality, neighbour handling, modes, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _model_fixtures import CHUNK, CHUNKS, forward, loss_fn, make_batch, new_model, tiny_config
from flax import nnx

from retro_jax.models.config import RetroConfig
from retro_jax.models.loss import chunked_cross_entropy, cross_entropy
from retro_jax.models.retro import Retro, retrofit_filter

# One jitted value-and-grad for every test (nnx.jit caches per graph and shapes).
value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))


@pytest.fixture(scope="module")
def model() -> Retro:
    return new_model()


def test_shapes_and_dtypes(model):
    inputs, _, neighbours = make_batch()
    logits = forward(model, inputs, neighbours)
    assert logits.shape == (2, CHUNK * CHUNKS, 64) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_causal_in_inputs(model):
    inputs, _, neighbours = make_batch()
    base = forward(model, inputs, neighbours)
    t = 7
    changed = inputs.at[:, t:].set((inputs[:, t:] + 5) % 63 + 1)
    out = forward(model, changed, neighbours)
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("chunk", [0, 2])
def test_neighbours_of_chunk_u_reach_only_its_attending_chunk_onwards(model, chunk):
    inputs, _, neighbours = make_batch()
    base = forward(model, inputs, neighbours)
    changed = neighbours.at[:, chunk].set((neighbours[:, chunk] + 3) % 63 + 1)
    out = forward(model, inputs, changed)
    first = (chunk + 1) * CHUNK - 1  # the last token of C_u is the first that may see them
    np.testing.assert_allclose(out[:, :first], base[:, :first], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, first], base[:, first], atol=1e-6)
    assert not np.allclose(out[:, first:], base[:, first:])


def test_permuting_neighbours_leaves_logits_unchanged(model):
    inputs, _, neighbours = make_batch()
    base = forward(model, inputs, neighbours)
    out = forward(model, inputs, neighbours[:, :, ::-1])
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-5)


def test_retro_off_equals_all_padding_neighbours(model):
    inputs, _, neighbours = make_batch()
    off = forward(model, inputs, None)
    padded = forward(model, inputs, jnp.zeros_like(neighbours))
    np.testing.assert_allclose(off, padded, rtol=1e-6, atol=1e-6)
    on = forward(model, inputs, neighbours)
    # the first m-1 tokens never see neighbours
    np.testing.assert_allclose(on[:, : CHUNK - 1], off[:, : CHUNK - 1], rtol=1e-5, atol=1e-6)


def test_no_nan_with_missing_neighbours_forward_and_grad(model):
    inputs, targets, neighbours = make_batch()
    # chunk 0: nothing at all; chunk 1: one neighbour missing; chunk 2: half padded
    neighbours = neighbours.at[:, 0].set(0).at[:, 1, 1].set(0).at[:, 2, :, CHUNK:].set(0)
    loss, grads = value_and_grad(model, inputs, targets, neighbours)
    assert np.isfinite(float(loss))
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all()
    loss0, grads0 = value_and_grad(
        model, inputs, targets, jnp.zeros_like(neighbours))
    assert np.isfinite(float(loss0))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads0))


def test_cca_attention_shares(model):
    inputs, _, neighbours = make_batch()
    neighbours = neighbours.at[:, 0].set(0).at[:, 1, 1].set(0)
    fn = nnx.jit(lambda m, x, nb: m(x, nb, return_cca_attention=True))
    logits, shares = fn(model, inputs, neighbours)
    np.testing.assert_allclose(logits, forward(model, inputs, neighbours), rtol=1e-5, atol=1e-5)
    assert sorted(shares) == [2, 4]
    s = np.asarray(shares[2])
    assert s.shape == (2, CHUNKS, 2)
    np.testing.assert_allclose(s[:, 0], 0.0)  # no neighbours: no attention
    np.testing.assert_allclose(s[:, 1], [[1.0, 0.0]] * 2, atol=1e-6)  # all on the one present
    np.testing.assert_allclose(s[:, 2:].sum(-1), 1.0, rtol=1e-5)


def test_baseline_has_no_retrieval_params():
    base = new_model(tiny_config(cca_layers=()))
    assert base.encoder is None and all(b.cca is None for b in base.blocks)
    assert not jax.tree.leaves(nnx.state(base, retrofit_filter))
    inputs, _, neighbours = make_batch()
    assert forward(base, inputs).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="baseline"):
        base(inputs, neighbours)


@pytest.mark.parametrize("overrides", [
    dict(activation="geglu", neighbour_parts="neighbours", encoder_query_conditioning=False,
         cca_relative_positions=False, remat="dots", dtype="bfloat16"),
    pytest.param(dict(activation="swiglu", tie_embeddings=True, remat="full"),
                 marks=pytest.mark.slow),
    pytest.param(dict(activation="relu", neighbour_parts="continuations", d_model=16,
                      num_heads=2), marks=pytest.mark.slow),
])
def test_variants_give_finite_loss_and_grads(overrides):
    cfg = tiny_config(**overrides)
    model = new_model(cfg, 1)
    inputs, targets, neighbours = make_batch()
    loss, grads = value_and_grad(model, inputs, targets, neighbours)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert forward(model, inputs, neighbours).dtype == jnp.float32  # logits fp32 in bf16 too
    if not cfg.encoder_query_conditioning:
        assert all(layer.cross_attention is None for layer in model.encoder.layers)


def test_neighbour_parts_masks_the_dropped_half():
    model = new_model(tiny_config(neighbour_parts="neighbours"))
    inputs, _, neighbours = make_batch()
    base = forward(model, inputs, neighbours)
    # continuations are dropped: changing them changes nothing
    changed = neighbours.at[..., CHUNK:].set(7)
    np.testing.assert_allclose(forward(model, inputs, changed), base, rtol=1e-6, atol=1e-6)


def test_cross_entropy_ignores_padding_and_chunked_matches():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 8)), jnp.int32).at[0, :3].set(0)
    total, count = cross_entropy(logits, targets)
    logp = jax.nn.log_softmax(logits)
    want = -sum(float(logp[b, t, targets[b, t]]) for b in range(2) for t in range(8)
                if targets[b, t] != 0)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(count) == int((np.asarray(targets) != 0).sum())
    hidden = jnp.asarray(rng.normal(size=(2, 8, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    mask = jnp.ones((2, 8), bool).at[1, -1].set(False)
    got = chunked_cross_entropy(hidden, w, targets, mask, block_len=4)
    ref = cross_entropy(hidden @ w, targets, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # The custom VJP (gradients taken in the forward pass): hidden and weights, scaled loss.
    g1 = jax.grad(lambda h, w: 3.0 * chunked_cross_entropy(h, w, targets, mask, block_len=4)[0],
                  argnums=(0, 1))(hidden, w)
    g2 = jax.grad(lambda h, w: 3.0 * cross_entropy(h @ w, targets, mask)[0],
                  argnums=(0, 1))(hidden, w)
    for got_g, want_g in zip(g1, g2):  # fp32 sums in another order: atol scales with |g|
        atol = 1e-6 * max(1.0, float(np.abs(want_g).max()))
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=atol)


def test_attention_matches_reference_softmax():
    """dot_product_attention (einsum form) against jax.nn's XLA implementation: causal, a key
    mask, and a fully masked row (finite, uniform)."""
    from retro_jax.models.attention import attention_weights, dot_product_attention

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32) for _ in range(3))
    got = dot_product_attention(q, k, v, is_causal=True)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = jnp.asarray(rng.random((2, 1, 1, 6)) > 0.4).at[1].set(False)
    got = dot_product_attention(q, k, v, mask=mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], jnp.broadcast_to(v[1].mean(0), got[1].shape), rtol=1e-5)
    weights = attention_weights(q, k, mask)
    np.testing.assert_allclose(weights[1], 0.0)
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, rtol=1e-5)


def _train(model, filt, steps=4):
    inputs, targets, neighbours = make_batch(seed=3)
    opt = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.01), wrt=filt)

    @nnx.jit
    def step(model, opt):
        diff = nnx.DiffState(0, filt)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, inputs, targets,
                                                                 neighbours)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


def test_adamw_steps_reduce_loss():
    model = new_model()
    losses = _train(model, nnx.Param)
    assert losses[-1] < losses[0] - 0.05, losses


def test_retrofit_changes_only_cca_and_encoder():
    model = new_model()
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    before = {p: np.asarray(v.get_value()) for p, v in params}
    losses = _train(model, retrofit_filter, steps=3)
    assert losses[-1] < losses[0], losses
    moved = set()
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not np.array_equal(before[p], np.asarray(v.get_value())):
            moved.add(p)
    trainable = {p for p, _ in nnx.to_flat_state(nnx.state(model, retrofit_filter))}
    assert moved and moved <= trainable
    # CCA, its pre-norm (which a baseline lacks too) and the encoder; nothing else.
    assert all({"cca", "cca_norm"} & set(map(str, p)) or str(p[0]) == "encoder"
               for p in trainable)
    assert any("cca_norm" in map(str, p) for p in trainable)
    assert any(str(p[0]) == "encoder" for p in moved)


def test_from_config_resolves_cca_layers():
    from retro_jax.configs import get_base_config

    c = get_base_config()
    cfg = RetroConfig.from_config(c.model, c.database.chunk_len)
    assert cfg.cca_layers == (6, 9, 12) and cfg.chunk_len == 64
    c.model.num_layers = 24
    assert RetroConfig.from_config(c.model, 64).cca_layers == (9, 12, 15, 18, 21, 24)
    c.model.retrieval = False
    assert RetroConfig.from_config(c.model, 64).cca_layers == ()
    assert RetroConfig.from_config(c.model, 64).compute_dtype == jnp.float32  # CPU "auto"


# ------------------------------------------------------------------- cached decoding
def test_self_attention_with_a_cache_equals_the_causal_forward(model):
    """The cached path, fed in two pieces (a 5-token prefill, then one token at a time),
    gives the causal forward's outputs and leaves each position's rotated keys in the cache."""
    from retro_jax.models.attention import KVCache

    block = model.blocks[0]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 32)), jnp.float32)
    want = block.self_attention(x)
    zeros = jnp.zeros((2, 12, 4, 8), jnp.float32)  # room for 12 positions, 8 used
    out, cache = block.self_attention(x[:, :5], jnp.arange(5), KVCache(zeros, zeros))
    outs = [out]
    for t in range(5, 8):
        out, cache = block.self_attention(x[:, t:t + 1], jnp.array([t]), cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.k[:, 8:], 0.0)  # positions never fed stay empty


def test_decode_step_equals_the_forward_pass(model):
    """`Retro.decode_step` token by token (neighbours fed with each chunk's last token) gives
    the full forward's logits at every position and, per attending chunk, its attention
    shares."""
    from retro_jax.sample.decode import init_cache

    inputs, _, neighbours = make_batch()
    neighbours = neighbours.at[:, 1, 1].set(0)  # a missing neighbour: the masks matter
    want, want_shares = nnx.jit(lambda m, x, nb: m(x, nb, return_cca_attention=True))(
        model, inputs, neighbours)
    step = nnx.jit(lambda m, t, p, c, nb: m.decode_step(t, p, c, nb, return_cca_attention=True))
    cache = init_cache(model, batch=2, max_len=CHUNK * CHUNKS, num_neighbours=2)
    logits, shares = [], []
    for pos in range(CHUNK * CHUNKS):
        completes = (pos + 1) % CHUNK == 0
        out, cache, share = step(model, inputs[:, pos], jnp.int32(pos), cache,
                                 neighbours[:, pos // CHUNK] if completes else None)
        logits.append(out)
        shares.append(share)
    np.testing.assert_allclose(jnp.stack(logits, axis=1), want, rtol=1e-4, atol=1e-5)
    for layer in (2, 4):  # attending chunk u: positions u*m + m-1 .. u*m + 2m-2
        per_token = np.stack([np.asarray(s[layer]) for s in shares], axis=1)  # [B, n, k]
        for u in range(CHUNKS - 1):
            first = u * CHUNK + CHUNK - 1
            np.testing.assert_allclose(per_token[:, first:first + CHUNK].mean(1),
                                       want_shares[layer][:, u], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(per_token[:, :CHUNK - 1], 0.0)  # nothing to attend to yet


# ------------------------------------------------------------------- dropout
def test_dropout_config_is_validated_and_read():
    from retro_jax.configs import get_base_config

    with pytest.raises(ValueError, match="model.dropout"):
        tiny_config(dropout=1.0)
    with pytest.raises(ValueError, match="model.dropout"):
        tiny_config(dropout=-0.1)
    c = get_base_config()
    assert RetroConfig.from_config(c.model, 64).dropout == 0.0
    c.model.dropout = 0.25
    assert RetroConfig.from_config(c.model, 64).dropout == 0.25


train_forward = nnx.jit(lambda m, x, nb, key: m(x, nb, dropout_rng=key))


def test_dropout_changes_training_outputs_only(model):
    """Same weights: dropout 0 ignores the key; dropout > 0 without a key (evaluation) is the
    plain forward; with a key it changes the logits, the same way for the same key."""
    dropped = new_model(tiny_config(dropout=0.3))  # same seed, same parameters as `model`
    inputs, _, neighbours = make_batch()
    base = forward(model, inputs, neighbours)
    key = jax.random.key(7)
    np.testing.assert_array_equal(train_forward(model, inputs, neighbours, key), base)
    np.testing.assert_array_equal(forward(dropped, inputs, neighbours), base)
    train = train_forward(dropped, inputs, neighbours, key)
    assert np.abs(np.asarray(train - base)).mean() > 1e-2
    np.testing.assert_array_equal(train_forward(dropped, inputs, neighbours, key), train)
    other = train_forward(dropped, inputs, neighbours, jax.random.key(8))
    assert not np.allclose(other, train)


def test_dropout_on_every_residual_branch():
    """Each branch's output is zeroed with probability p and the rest scaled by 1/(1-p);
    the encoder and CCA drop too; every site draws its own mask."""
    p = 0.5
    m = new_model(tiny_config(dropout=p))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, CHUNK * CHUNKS, 32)), jnp.float32)
    key = jax.random.key(3)
    block = m.blocks[1]  # layer 2: self-attention, CCA, FFW
    for branch in (lambda k: block.feed_forward(x, k),
                   lambda k: block.self_attention(x, dropout_rng=k)):
        eval_delta, train_delta = branch(None) - x, branch(key) - x
        dropped = np.isclose(np.asarray(train_delta), 0.0, atol=1e-7)
        assert 0.4 < dropped.mean() < 0.6
        np.testing.assert_allclose(np.asarray(train_delta)[~dropped],
                                   np.asarray(eval_delta / (1 - p))[~dropped], rtol=1e-4,
                                   atol=1e-6)
    # The FFW and the self-attention of one layer (same shapes) drop different elements.
    ffw = np.isclose(np.asarray(block.feed_forward(x, key) - x), 0.0, atol=1e-7)
    attn = np.isclose(np.asarray(block.self_attention(x, dropout_rng=key) - x), 0.0, atol=1e-7)
    assert 0.3 < (ffw != attn).mean() < 0.7

    inputs, _, neighbours = make_batch()
    encoded, mask = m._encode(neighbours, x)
    encoded_train, _ = m._encode(neighbours, x, key)
    assert not np.allclose(encoded_train, encoded)
    cca_eval, _ = block.chunked_cross_attention(x, encoded, mask)
    cca_train, _ = block.chunked_cross_attention(x, encoded, mask, dropout_rng=key)
    assert not np.allclose(cca_train, cca_eval)
    np.testing.assert_allclose(cca_train[:, :CHUNK - 1], x[:, :CHUNK - 1])  # no CCA there


def test_encoder_embedding_output_reads_the_output_projection():
    cfg = tiny_config(encoder_embedding="output")
    model = new_model(cfg, 2)
    tokens = jnp.array([[1, 5, 9]])
    want = model.output.kernel[...].T[tokens] * cfg.d_model ** 0.5
    np.testing.assert_allclose(model.neighbour_embedding(tokens), want, rtol=1e-6)
    # Gradients through the neighbours' embedding reach the output projection's columns.
    grads = nnx.grad(lambda m: m.neighbour_embedding(tokens).sum())(model)
    column_norms = np.linalg.norm(np.asarray(grads["output"]["kernel"][...]), axis=0)
    assert (column_norms[[1, 5, 9]] > 0).all() and column_norms.sum() == column_norms[
        [1, 5, 9]].sum()
    # Tied: the output table is the embedding, so "output" reads the same vectors as "input".
    tied = new_model(tiny_config(encoder_embedding="output", tie_embeddings=True), 3)
    np.testing.assert_allclose(tied.neighbour_embedding(tokens), tied.embed(tokens), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="encoder_embedding"):
        tiny_config(encoder_embedding="shared")
