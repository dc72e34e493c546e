"""Transformer: parameter count, cached decoding == full forward, jit via split/merge, tile_cache.

Everything runs jitted (through ``nnx.split`` / ``nnx.merge``, as the search
does); eager op-by-op execution would spend most of the time compiling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphareason.model import (KVCache, ModelConfig, Transformer, count_params, flops_per_token, matmul_params,
                               tile_cache)
from alphareason.model.testing import forward, perturbed_model
from alphareason.tokenizer import PAD, VOCAB_SIZE


def make_model(seed=0, **overrides) -> Transformer:
    """A perturbed micro model (``alphareason.model.testing.perturbed_model``)."""
    return perturbed_model(ModelConfig.micro(**overrides), seed=seed)


# Jitted entry points over the split model, shared by the tests so that each
# (model structure, shapes) pair compiles once.
@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill(graphdef, state, tokens, lengths, cache_len):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, lengths, model.init_cache(tokens.shape[0], cache_len))


@functools.partial(jax.jit, static_argnums=0)
def decode(graphdef, state, tokens, cache, active):
    return nnx.merge(graphdef, state).decode(tokens, cache, active)


def random_tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(4, VOCAB_SIZE, shape, dtype=np.int32))


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    return make_model(positions=request.param)


@pytest.fixture(scope="module")
def rope_model():
    return make_model(positions="rope")


def test_tiny_parameter_count():
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    # per layer: qkv 128*384 + out 128*128 + mlp 2*128*512 + 2 norms 2*128 = 196_864; 4 layers = 787_456
    # + embedding 55*128 + final norm 128 + policy head 128*55 + value head 128 + bias 1
    assert count_params(model) == 801_793
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    learned = nnx.eval_shape(lambda: Transformer(ModelConfig.tiny(positions="learned"), rngs=nnx.Rngs(0)))
    assert count_params(learned) == 801_793 + 128 * 128
    assert matmul_params(ModelConfig.tiny()) == 793_600
    assert flops_per_token(ModelConfig.tiny(), 64) == 2 * 793_600 + 4 * 4 * 128 * 64


def _dot_generals(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                yield from _dot_generals(getattr(inner, "jaxpr", inner))


def test_bfloat16_is_mixed_precision(rope_model):
    """bf16 matmul inputs with float32 accumulation, float32 params and outputs."""
    model16 = Transformer(ModelConfig.micro(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(rope_model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    tokens = random_tokens(1, (3, 16))
    dots16 = list(_dot_generals(jax.make_jaxpr(lambda t: model16(t))(tokens).jaxpr))
    assert len(dots16) >= 6 * 2 + 2  # qkv, scores, probs@v, out, up, down per layer; two heads
    for eqn in dots16:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.params["preferred_element_type"] == jnp.float32
    for eqn in _dot_generals(jax.make_jaxpr(lambda t: rope_model(t))(tokens).jaxpr):
        assert [v.aval.dtype for v in eqn.invars] == [jnp.float32, jnp.float32]
    l32, v32 = forward(*nnx.split(rope_model), tokens)
    l16, v16 = forward(*nnx.split(model16), tokens)
    assert l16.dtype == v16.dtype == jnp.float32 and l16.shape == (3, 16, VOCAB_SIZE) and v16.shape == (3, 16)
    err = float(jnp.max(jnp.abs(l32 - l16)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(l32)))


def test_right_padding_does_not_change_earlier_positions(rope_model):
    tokens = random_tokens(2, (3, 16))
    l1, v1 = forward(*nnx.split(rope_model), tokens)
    l2, v2 = forward(*nnx.split(rope_model), tokens.at[:, 6:].set(PAD))
    np.testing.assert_allclose(l1[:, :6], l2[:, :6], atol=1e-5)
    np.testing.assert_allclose(v1[:, :6], v2[:, :6], atol=1e-5)
    assert float(jnp.max(jnp.abs(l1[:, 6:] - l2[:, 6:]))) > 1e-2


def test_cached_decoding_equals_full_forward(model):
    """Ragged prefill then decode steps (one with an inactive row) == the full forward."""
    graphdef, state = nnx.split(model)
    batch, prompt_len, num_steps = 3, 6, 5
    seq = random_tokens(3, (batch, 16))
    lengths = jnp.array([3, 6, 4], jnp.int32)
    # Garbage (not PAD) after each row's prompt: it must be ignored.
    prompt = jnp.where(jnp.arange(prompt_len)[None] < lengths[:, None], seq[:, :prompt_len], 7)
    logits, values, cache = prefill(graphdef, state, prompt, lengths, 16)
    full_logits, full_values = forward(graphdef, state, seq)
    pos = np.asarray(lengths) - 1
    active = np.ones(batch, bool)
    for step in range(num_steps + 1):
        rows = np.flatnonzero(active)
        np.testing.assert_allclose(logits[rows], full_logits[rows, pos[rows]], atol=1e-5)
        np.testing.assert_allclose(values[rows], full_values[rows, pos[rows]], atol=1e-5)
        if step == num_steps:
            break
        active = np.array([True, step != 2, True])  # row 1 sits out step 2
        token = seq[jnp.arange(batch), cache.lengths]
        logits, values, cache = decode(graphdef, state, token, cache, active)
        pos = pos + active
    assert isinstance(cache, KVCache)
    np.testing.assert_array_equal(cache.lengths, np.asarray(lengths) + [5, 4, 5])
    # The outputs really differ between positions, so the comparison above can fail.
    assert float(jnp.min(jnp.max(jnp.abs(full_logits[:, 1:] - full_logits[:, :-1]), axis=-1))) > 1e-2
    assert float(jnp.min(jnp.abs(full_values[:, 1:] - full_values[:, :-1]))) > 1e-4


@functools.partial(jax.jit, static_argnums=0)
def score_continuations(graphdef, state, tokens, lengths, continuations):
    return nnx.merge(graphdef, state).score_continuations(tokens, lengths, continuations)


def test_score_continuations_equals_full_forwards(model):
    """K continuations of ragged prefixes in one pass == K separate full forwards (logits and value)."""
    graphdef, state = nnx.split(model)
    batch, T, K, S = 3, 6, 4, 3
    lengths = np.array([2, 6, 4])
    prefix = np.array(random_tokens(5, (batch, T)))
    prefix[np.arange(T)[None] >= lengths[:, None]] = 9  # garbage after each prefix: must be ignored
    conts = np.asarray(random_tokens(6, (batch, K, S)))
    logits, values = score_continuations(graphdef, state, jnp.asarray(prefix), jnp.asarray(lengths),
                                         jnp.asarray(conts))
    assert logits.shape == (batch, K, S, VOCAB_SIZE) and values.shape == (batch,)
    for b in range(batch):
        n = lengths[b]
        seqs = np.concatenate([np.repeat(prefix[b:b + 1, :n], K, 0), conts[b]], 1)  # [K, n + S]
        full_logits, full_values = forward(graphdef, state, jnp.asarray(seqs))
        # Token s of continuation k is predicted at position n - 1 + s.
        np.testing.assert_allclose(logits[b, :, 0], full_logits[:, n - 1], atol=1e-5)
        np.testing.assert_allclose(logits[b, :, 1:], full_logits[:, n: n + S - 1], atol=1e-5)
        np.testing.assert_allclose(values[b], full_values[0, n - 1], atol=1e-5)
    # Different continuations really give different outputs, so the comparison can fail.
    assert float(jnp.max(jnp.abs(logits[:, 0, 1:] - logits[:, 1, 1:]))) > 1e-2


def test_decode_leaves_inactive_rows_untouched(rope_model):
    graphdef, state = nnx.split(rope_model)
    seq = random_tokens(4, (3, 16))
    _, _, cache = prefill(graphdef, state, seq[:, :6], jnp.array([5, 2, 4]), 16)
    _, _, new = decode(graphdef, state, seq[:, 6], cache, jnp.array([True, False, True]))
    np.testing.assert_array_equal(new.lengths, [6, 2, 5])
    (new_k, new_v), (old_k, old_v) = new.stacked(), cache.stacked()  # [L, B, H, S, Dh]
    np.testing.assert_array_equal(new_k[:, 1], old_k[:, 1])
    np.testing.assert_array_equal(new_v[:, 1], old_v[:, 1])
    assert not np.array_equal(new_k[:, 0], old_k[:, 0])


def test_jit_through_split_and_merge_inside_one_function(rope_model):
    """The search's pattern: split once, merge inside a jitted function."""
    graphdef, state = nnx.split(rope_model)
    seq = random_tokens(5, (3, 16))
    lengths = jnp.array([4, 6, 1], jnp.int32)

    @jax.jit
    def run(state, seq, lengths):
        m = nnx.merge(graphdef, state)
        logits, values, cache = m.prefill(seq[:, :6], lengths, m.init_cache(3, 16))
        logits, values, cache = m.decode(seq[jnp.arange(3), cache.lengths], cache)
        return logits, values, cache

    logits, values, cache = run(state, seq, lengths)
    full_logits, full_values = forward(graphdef, state, seq)
    np.testing.assert_allclose(logits, full_logits[jnp.arange(3), lengths], atol=1e-5)
    np.testing.assert_allclose(values, full_values[jnp.arange(3), lengths], atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, lengths + 1)


def test_tile_cache(rope_model):
    graphdef, state = nnx.split(rope_model)
    seq = random_tokens(6, (3, 16))
    _, _, cache = prefill(graphdef, state, seq[:, :6], jnp.array([3, 6, 2]), 16)
    tiled = tile_cache(cache, 2)
    (tiled_k, tiled_v), (k, v) = tiled.stacked(), cache.stacked()
    assert tiled_k.shape == (2, 6, 2, 16, 16)  # [L, B, H, S, Dh]
    np.testing.assert_array_equal(tiled.lengths, [3, 3, 6, 6, 2, 2])
    for b in range(3):
        for j in range(2):
            np.testing.assert_array_equal(tiled_k[:, b * 2 + j], k[:, b])
            np.testing.assert_array_equal(tiled_v[:, b * 2 + j], v[:, b])
    # Decoding on the tiled cache continues each copy from its source row.
    tokens = jnp.array([5, 9, 11], jnp.int32)
    ref, _, _ = decode(graphdef, state, tokens, cache, jnp.ones(3, bool))
    out, _, _ = decode(graphdef, state, jnp.repeat(tokens, 2), tiled, jnp.ones(6, bool))
    np.testing.assert_allclose(out, jnp.repeat(ref, 2, axis=0), atol=1e-6)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="num_heads=3"):
        ModelConfig(d_model=32, num_heads=3)
    with pytest.raises(ValueError, match="positions='alibi'"):
        ModelConfig(positions="alibi")
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        ModelConfig(compute_dtype="float16")
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.micro(positions="learned"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_len=64"):
        model.init_cache(1, 64)


def test_bfloat16_cached_decoding_equals_its_full_forward():
    """The cache holds bf16 keys/values and decode's attention uses the same mixed-precision products."""
    graphdef, state = nnx.split(make_model(positions="rope", compute_dtype="bfloat16"))
    seq, lengths = random_tokens(3, (3, 16)), jnp.array([3, 6, 4], jnp.int32)
    logits, values, cache = prefill(graphdef, state, seq[:, :6], lengths, 16)
    assert all(k.dtype == jnp.bfloat16 for k in cache.k)
    full_logits, full_values = forward(graphdef, state, seq)
    pos = np.asarray(lengths) - 1
    for _ in range(6):
        np.testing.assert_allclose(logits, full_logits[np.arange(3), pos], atol=1e-5)
        np.testing.assert_allclose(values, full_values[np.arange(3), pos], atol=1e-5)
        logits, values, cache = decode(graphdef, state, seq[jnp.arange(3), cache.lengths], cache, jnp.ones(3, bool))
        pos = pos + 1
