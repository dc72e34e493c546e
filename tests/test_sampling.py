"""sample_step: one reasoning step per row with the KV cache, checked against the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from alphareason.model import ModelConfig, Tool, Transformer, prefill_token_forwards, sample_step
from alphareason.model.sampling import top_p_filter
from alphareason.model.testing import forward, perturbed_model
from alphareason.tokenizer import BOS, DIGIT0, EOS, EQUALS, PAD, SEP, VOCAB_SIZE, char_id, encode
from alphareason.tokenizer import decode as detok

BATCH, PROMPT, SEQ, STEP = 12, 6, 16, 8  # rows, prompt width, cache and reference width, max_step_len


def make_model(seed=0) -> Transformer:
    """A perturbed micro model (outputs O(1), value head non-zero)."""
    return perturbed_model(ModelConfig.micro(max_len=SEQ), seed=seed)


@functools.partial(jax.jit, static_argnums=0)
def prefill(graphdef, state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, lengths, model.init_cache(tokens.shape[0], SEQ))


@functools.partial(jax.jit, static_argnums=(0, 6))
def sample(graphdef, state, cache, logits, key, active, options):
    return sample_step(nnx.merge(graphdef, state), cache, logits, key, max_step_len=STEP, active=active,
                       **dict(options))


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, PROMPT + 1, BATCH).astype(np.int32)
    prompts = rng.integers(4, VOCAB_SIZE, (BATCH, PROMPT)).astype(np.int32)
    prompts[:, 0] = 1  # BOS
    prompts[np.arange(PROMPT)[None] >= lengths[:, None]] = PAD
    logits, values, cache = prefill(graphdef, state, jnp.asarray(prompts), jnp.asarray(lengths))
    return dict(graphdef=graphdef, state=state, prompts=prompts, lengths=lengths, logits=logits, values=values,
                cache=cache)


def continued(setup, out):
    """Each row's prompt followed by its sampled step, PAD-padded to SEQ."""
    seq = np.zeros((BATCH, SEQ), np.int32)
    for b in range(BATCH):
        n, m = setup["lengths"][b], int(out.length[b])
        seq[b, :n] = setup["prompts"][b, :n]
        seq[b, n:n + m] = np.asarray(out.tokens[b, :m])
    return seq


def check_against_full_forward(setup, out, active=None):
    """Tokens are well formed, logprob / final outputs / cache agree with the full forward."""
    active = np.ones(BATCH, bool) if active is None else active
    seq = continued(setup, out)
    full_logits, full_values = forward(setup["graphdef"], setup["state"], jnp.asarray(seq))
    log_probs = np.asarray(jax.nn.log_softmax(full_logits, axis=-1))
    _, _, fresh = prefill(setup["graphdef"], setup["state"], jnp.asarray(seq), jnp.asarray(
        setup["lengths"] + np.asarray(out.length)))
    (out_k, out_v), (fresh_k, fresh_v), (start_k, start_v) = (
        c.stacked() for c in (out.cache, fresh, setup["cache"]))  # [L, B, H, S, Dh] each
    for b in range(BATCH):
        n, m = int(setup["lengths"][b]), int(out.length[b])
        step = np.asarray(out.tokens[b])
        assert (step[m:] == PAD).all() and (step[:m] != PAD).all()
        ends = np.isin(step[:m], [SEP, EOS])
        assert not ends[:-1].any(), "a step continues after SEP/EOS"
        assert bool(out.stopped[b]) == bool(m and ends[-1])
        assert m == STEP or out.stopped[b] or not active[b]
        if not active[b]:
            assert m == 0
            np.testing.assert_array_equal(out_k[:, b], start_k[:, b])
            np.testing.assert_array_equal(out_v[:, b], start_v[:, b])
            continue
        # Untempered log-likelihood of the step under the full forward.
        expected = sum(log_probs[b, n - 1 + i, step[i]] for i in range(m))
        np.testing.assert_allclose(out.logprob[b], expected, atol=1e-4, rtol=1e-5)
        assert int(out.num_sampled[b]) == m
        # Outputs at the step's last token, ready for the next step.
        np.testing.assert_allclose(out.logits[b], full_logits[b, n + m - 1], atol=1e-5)
        np.testing.assert_allclose(out.value_logits[b], full_values[b, n + m - 1], atol=1e-5)
        # The cache holds prefix + step; the rest of the row was never written.
        assert int(out.cache.lengths[b]) == n + m
        np.testing.assert_allclose(out_k[:, b, :, :n + m], fresh_k[:, b, :, :n + m], atol=1e-5)
        np.testing.assert_allclose(out_v[:, b, :, :n + m], fresh_v[:, b, :, :n + m], atol=1e-5)
        np.testing.assert_array_equal(out_k[:, b, :, n + m:], start_k[:, b, :, n + m:])
    assert int(out.token_forwards) == int(np.sum(out.length))


def test_greedy_equals_argmax_of_full_forward_step_by_step(setup):
    out = sample(setup["graphdef"], setup["state"], setup["cache"], setup["logits"], jax.random.key(0),
                 jnp.ones(BATCH, bool), (("greedy", True),))
    seq = np.zeros((BATCH, SEQ), np.int32)
    seq[:, :PROMPT] = setup["prompts"]
    lengths = setup["lengths"].copy()
    expected = np.full((BATCH, STEP), PAD, np.int32)
    done = np.zeros(BATCH, bool)
    for i in range(STEP):
        logits, _ = forward(setup["graphdef"], setup["state"], jnp.asarray(seq))
        last = logits[np.arange(BATCH), lengths - 1].at[:, jnp.array([PAD, BOS])].set(-jnp.inf)  # never chosen
        choice = np.asarray(jnp.argmax(last, axis=-1))
        for b in np.flatnonzero(~done):
            expected[b, i] = seq[b, lengths[b]] = choice[b]
            lengths[b] += 1
            done[b] = choice[b] in (SEP, EOS)
    np.testing.assert_array_equal(out.tokens, expected)
    check_against_full_forward(setup, out)


def test_sampling_stops_at_sep_truncates_and_is_reproducible(setup):
    options = (("temperature", 2.5), ("top_p", 0.98))
    args = (setup["graphdef"], setup["state"], setup["cache"], setup["logits"])
    all_rows = jnp.ones(BATCH, bool)
    out = sample(*args, jax.random.key(3), all_rows, options)
    # This key gives both kinds of rows, so both paths are exercised.
    assert out.stopped.any() and (~out.stopped).any()
    assert (np.asarray(out.length)[np.asarray(out.stopped)] < STEP).any()
    check_against_full_forward(setup, out)
    again = sample(*args, jax.random.key(3), all_rows, options)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    np.testing.assert_array_equal(again.logprob, out.logprob)
    other = sample(*args, jax.random.key(4), all_rows, options)
    assert not np.array_equal(other.tokens, out.tokens)


def test_inactive_rows_write_nothing(setup):
    active = np.ones(BATCH, bool)
    active[[1, 5]] = False
    out = sample(setup["graphdef"], setup["state"], setup["cache"], setup["logits"], jax.random.key(3),
                 jnp.asarray(active), (("temperature", 2.5), ("top_p", 0.98)))
    assert (np.asarray(out.length)[[1, 5]] == 0).all()
    check_against_full_forward(setup, out, active)
    assert int(out.token_forwards) == int(np.sum(out.length)) < STEP * BATCH


def test_prefill_token_forwards():
    assert int(prefill_token_forwards(jnp.array([3, 5, 1]))) == 9


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(0.01) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]


# ------------------------------------------- scripted model: stop, truncate, tool
@struct.dataclass
class FedCache:
    fed: jax.Array  # int32[B, N], token fed at each position
    lengths: jax.Array  # int32[B]


class ScriptedModel:
    """``decode`` puts almost all probability on ``script[b, next position]``;
    the cache records every fed token; the value logit is the position."""

    def __init__(self, script):
        self.script = jnp.asarray(script, jnp.int32)  # [B, N]

    def logits_at(self, lengths):
        return 8.0 * jax.nn.one_hot(self.script[jnp.arange(len(lengths)), lengths], VOCAB_SIZE)

    def decode(self, tokens, cache, active):
        write_at = jnp.where(active, cache.lengths, cache.fed.shape[1])
        fed = cache.fed.at[jnp.arange(len(tokens)), write_at].set(tokens, mode="drop")
        lengths = cache.lengths + active
        return self.logits_at(lengths), lengths.astype(jnp.float32), FedCache(fed, lengths)


def calculator(state, step_tokens, length):
    """Adds the two one-digit operands of ``a+b=``: forces the sum's digit and SEP."""
    total = step_tokens[:, 0] - DIGIT0 + step_tokens[:, 2] - DIGIT0
    forced = jnp.stack([DIGIT0 + total % 10, jnp.full_like(total, SEP), jnp.full_like(total, PAD)], axis=1)
    return forced, jnp.full_like(total, 2)


def test_scripted_stop_truncation_and_tool_forcing():
    prefix = 2  # positions 0, 1 hold the prompt
    x = char_id("x")
    rows = [encode("1+2=xxxxxx"),  # the tool writes "3\n" after '='; the model's 'x' never appears
            encode("12\nxxxxxxx"),  # stops after SEP
            [char_id("7"), EOS] + [x] * 8,  # stops after EOS
            encode("xxxxxxxxxx"),  # truncated at S
            encode("4+5=xxxxxx")]  # tool again: "9\n"
    script = np.full((5, 16), x, np.int32)
    script[:, prefix:prefix + 10] = rows
    model = ScriptedModel(script)
    cache = FedCache(fed=jnp.zeros((5, 16), jnp.int32), lengths=jnp.full((5,), prefix, jnp.int32))
    run = jax.jit(lambda cache, key: sample_step(model, cache, model.logits_at(cache.lengths), key,
                                                 max_step_len=STEP, greedy=True,
                                                 tool=Tool(trigger=EQUALS, output=calculator, width=3)))
    out = run(cache, jax.random.key(0))
    expected = ["1+2=3\n", "12\n", "7", "xxxxxxxx", "4+5=9\n"]
    lengths = [6, 3, 2, 8, 6]
    sampled = [4, 3, 2, 8, 4]
    for b in range(5):
        step = np.asarray(out.tokens[b])
        assert detok(step, stop_at_eos=False) == expected[b]
        assert (step[lengths[b]:] == PAD).all()
    np.testing.assert_array_equal(out.length, lengths)
    np.testing.assert_array_equal(out.num_sampled, sampled)
    np.testing.assert_array_equal(out.stopped, [True, True, True, False, True])
    # logprob counts the model's choices only: each scripted token has log-prob log(e^8 / (e^8 + V - 1)).
    per_token = 8.0 - np.log(np.exp(8.0) + VOCAB_SIZE - 1)
    np.testing.assert_allclose(out.logprob, np.array(sampled) * per_token, rtol=1e-5)
    # Forced tokens were fed through decode; nothing was fed after a row stopped.
    for b in range(5):
        fed = np.asarray(out.cache.fed[b])
        np.testing.assert_array_equal(fed[prefix:prefix + lengths[b]], np.asarray(out.tokens[b, :lengths[b]]))
        assert (fed[prefix + lengths[b]:] == 0).all()
    np.testing.assert_array_equal(out.cache.lengths, prefix + np.array(lengths))
    np.testing.assert_allclose(out.value_logits, prefix + np.array(lengths))
    assert int(out.token_forwards) == sum(lengths)
    assert EQUALS in np.asarray(out.tokens[0]).tolist()
