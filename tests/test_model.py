"""Transformer: parameter count, cached decoding == full forward, jit via split/merge, tile_cache.

Everything runs jitted (through ``nnx.split`` / ``nnx.merge``, as the search
does); eager op-by-op execution would spend most of the time compiling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphareason.model import (KVCache, ModelConfig, Transformer, count_params, flops_per_token, matmul_params,
                               tile_cache)
from alphareason.tokenizer import PAD, VOCAB_SIZE


def make_model(seed=0, **overrides) -> Transformer:
    """A micro model whose parameters are perturbed so every output is O(1) and
    depends on everything (the zero-initialised value head included)."""
    model = Transformer(ModelConfig.micro(**overrides), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape, np.float32), params))
    return model


def jitted(model, fn):
    """``fn(model, *args)`` jitted over the split model state."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: compiled(state, *args)


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
    tokens = random_tokens(1, (2, 9))
    dots16 = list(_dot_generals(jax.make_jaxpr(lambda t: model16(t))(tokens).jaxpr))
    assert len(dots16) >= 6 * 2 + 2  # qkv, scores, probs@v, out, up, down per layer; two heads
    for eqn in dots16:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.params["preferred_element_type"] == jnp.float32
    for eqn in _dot_generals(jax.make_jaxpr(lambda t: rope_model(t))(tokens).jaxpr):
        assert [v.aval.dtype for v in eqn.invars] == [jnp.float32, jnp.float32]
    l32, v32 = jitted(rope_model, lambda m, t: m(t))(tokens)
    l16, v16 = jitted(model16, lambda m, t: m(t))(tokens)
    assert l16.dtype == v16.dtype == jnp.float32 and l16.shape == (2, 9, VOCAB_SIZE) and v16.shape == (2, 9)
    err = float(jnp.max(jnp.abs(l32 - l16)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(l32)))


def test_right_padding_does_not_change_earlier_positions(rope_model):
    forward = jitted(rope_model, lambda m, t: m(t))
    tokens = random_tokens(2, (2, 10))
    l1, v1 = forward(tokens)
    l2, v2 = forward(tokens.at[:, 6:].set(PAD))
    np.testing.assert_allclose(l1[:, :6], l2[:, :6], atol=1e-5)
    np.testing.assert_allclose(v1[:, :6], v2[:, :6], atol=1e-5)
    assert float(jnp.max(jnp.abs(l1[:, 6:] - l2[:, 6:]))) > 1e-2


def test_cached_decoding_equals_full_forward(model):
    """Ragged prefill then decode steps (one with an inactive row) == the full forward."""
    batch, prompt_len, num_steps = 3, 6, 5
    seq = random_tokens(3, (batch, 14))
    lengths = jnp.array([3, 6, 4], jnp.int32)
    actives = np.ones((num_steps, batch), bool)
    actives[2, 1] = False  # row 1 sits out step 2

    def run(m, seq, lengths, actives):
        # Garbage (not PAD) after each row's prompt: it must be ignored.
        prompt = jnp.where(jnp.arange(prompt_len)[None] < lengths[:, None], seq[:, :prompt_len], 7)
        logits, values, cache = m.prefill(prompt, lengths, m.init_cache(batch, 16))
        outs = [(logits, values)]
        for step in range(num_steps):
            token = seq[jnp.arange(batch), cache.lengths]
            logits, values, cache = m.decode(token, cache, actives[step])
            outs.append((logits, values))
        return outs, cache, m(seq)

    outs, cache, (full_logits, full_values) = jitted(model, run)(seq, lengths, actives)
    assert isinstance(cache, KVCache)
    pos = np.asarray(lengths) - 1
    for step, (logits, values) in enumerate(outs):
        active = np.ones(batch, bool) if step == 0 else actives[step - 1]
        rows = np.flatnonzero(active)
        np.testing.assert_allclose(logits[rows], full_logits[rows, pos[rows]], atol=1e-5)
        np.testing.assert_allclose(values[rows], full_values[rows, pos[rows]], atol=1e-5)
        if step < num_steps:
            pos = pos + actives[step]
    np.testing.assert_array_equal(cache.lengths, np.asarray(lengths) + actives.sum(0))
    # The outputs really differ between positions, so the comparison above can fail.
    assert float(jnp.min(jnp.max(jnp.abs(full_logits[:, 1:] - full_logits[:, :-1]), axis=-1))) > 1e-2
    assert float(jnp.min(jnp.abs(full_values[:, 1:] - full_values[:, :-1]))) > 1e-4


def test_decode_leaves_inactive_rows_untouched(rope_model):
    seq = random_tokens(4, (3, 8))

    def run(m, seq):
        _, _, cache = m.prefill(seq[:, :5], jnp.array([5, 2, 4]), m.init_cache(3, 8))
        _, _, new = m.decode(seq[:, 5], cache, jnp.array([True, False, True]))
        return cache, new

    cache, new = jitted(rope_model, run)(seq)
    np.testing.assert_array_equal(new.lengths, [6, 2, 5])
    np.testing.assert_array_equal(new.k[:, 1], cache.k[:, 1])
    np.testing.assert_array_equal(new.v[:, 1], cache.v[:, 1])
    assert not np.array_equal(new.k[:, 0], cache.k[:, 0])


def test_tile_cache(rope_model):
    seq = random_tokens(6, (2, 6))
    tokens = jnp.array([5, 9], jnp.int32)

    def run(m, seq):
        _, _, cache = m.prefill(seq, jnp.array([3, 6]), m.init_cache(2, 8))
        tiled = tile_cache(cache, 3)
        ref, _, _ = m.decode(tokens, cache)
        out, _, _ = m.decode(jnp.repeat(tokens, 3), tiled)
        return cache, tiled, ref, out

    cache, tiled, ref, out = jitted(rope_model, run)(seq)
    assert tiled.k.shape == (2, 6, 8, 2, 16)
    np.testing.assert_array_equal(tiled.lengths, [3, 3, 3, 6, 6, 6])
    for b in range(2):
        for j in range(3):
            np.testing.assert_array_equal(tiled.k[:, b * 3 + j], cache.k[:, b])
            np.testing.assert_array_equal(tiled.v[:, b * 3 + j], cache.v[:, b])
    # Decoding on the tiled cache continues each copy from its source row.
    np.testing.assert_allclose(out, jnp.repeat(ref, 3, axis=0), atol=1e-6)


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
