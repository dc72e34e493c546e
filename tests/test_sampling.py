"""sample_step: one reasoning step per row with the KV cache, checked against the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from alphareason.model import ModelConfig, Tool, Transformer, prefill_token_forwards, sample_step
from alphareason.model.sampling import sample_candidates
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


# ------------------------------------------- K candidates from one prefix
A, B_, C_, D_ = (char_id(c) for c in "abcd")
# A toy step distribution: "a\n" 0.5, "b\n" 0.15, "bd\n" 0.15, "c\n" 0.2 (every other token impossible).
TOY_STEPS = {"a\n": 0.5, "b\n": 0.15, "bd\n": 0.15, "c\n": 0.2}


def toy_logits(first, second, position):
    """Next-token log-probabilities [..., V] after a continuation's tokens (first, second) at ``position``."""
    def dist(pairs):
        out = jnp.full(first.shape + (VOCAB_SIZE,), -jnp.inf)
        for token, p in pairs:
            out = out.at[..., token].set(np.log(p))
        return out

    start = dist([(A, 0.5), (B_, 0.3), (C_, 0.2)])
    stop = dist([(SEP, 1.0)])
    after_b = dist([(SEP, 0.5), (D_, 0.5)])
    at1 = jnp.where(((first == B_) & (position == 0))[..., None], after_b, stop)
    return jnp.where((position < 0)[..., None], start, at1)


@struct.dataclass
class FedBranches:
    fed: jax.Array  # int32[B, K, S]


class ToyModel:
    """``decode_branches`` follows ``TOY_STEPS``; the value logit is the number of tokens fed."""

    def init_branches(self, batch, num, length):
        return FedBranches(jnp.zeros((batch, num, length), jnp.int32))

    def decode_branches(self, tokens, prefix, branches, slot, active=None):
        fed = branches.fed.at[:, :, slot].set(tokens)
        logits = toy_logits(fed[:, :, 0], fed[:, :, 1], jnp.full(tokens.shape, slot))
        return logits, jnp.full(tokens.shape, slot + 1.0), FedBranches(fed)


def toy_candidates(rows, K, distinct, seed=0):
    keys = jax.random.split(jax.random.key(seed), rows)
    first = toy_logits(jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32), jnp.full((rows,), -1))
    run = jax.jit(lambda k: sample_candidates(ToyModel(), None, first, k, num_candidates=K, max_step_len=4,
                                              distinct=distinct))
    out = jax.tree.map(np.asarray, run(keys))
    texts = [[detok(out.tokens[r, k, :out.length[r, k]]) if out.length[r, k] else None for k in range(K)]
             for r in range(rows)]
    return out, texts


def exact_inclusion(K):
    """P(step in a sample of K drawn without replacement), by enumerating the orders of the draws."""
    import itertools
    steps = list(TOY_STEPS)
    incl = dict.fromkeys(steps, 0.0)
    for order in itertools.permutations(steps, min(K, len(steps))):
        p, left = 1.0, 1.0
        for s in order:
            p *= TOY_STEPS[s] / left
            left -= TOY_STEPS[s]
        for s in order:
            incl[s] += p
    return incl


def test_distinct_candidates_are_drawn_without_replacement_with_the_right_inclusion_probabilities():
    """Stochastic beam search over the toy distribution, 4000 rows with their own keys (pinned): every row's
    K = 2 steps are distinct and complete; each step's frequency matches its exact inclusion probability
    (within 4 standard errors); the reported log-probability of inclusion makes sum(p / q * f) an unbiased
    estimate of E_p[f] (the prior's correction); each logprob is the step's own."""
    rows, K = 4000, 2
    out, texts = toy_candidates(rows, K, distinct=True)
    incl = exact_inclusion(K)
    counts = dict.fromkeys(TOY_STEPS, 0)
    estimate = 0.0
    for r in range(rows):
        assert len(set(texts[r])) == K and all(t in TOY_STEPS for t in texts[r]), texts[r]
        for k, t in enumerate(texts[r]):
            counts[t] += 1
            np.testing.assert_allclose(out.logprob[r, k], np.log(TOY_STEPS[t]), rtol=1e-5)
            assert out.log_inclusion[r, k] <= 0.0
            if t == "bd\n":
                estimate += TOY_STEPS[t] / np.exp(out.log_inclusion[r, k])
    for t, q in incl.items():
        se = np.sqrt(q * (1 - q) / rows)
        assert abs(counts[t] / rows - q) < 4 * se, (t, counts[t] / rows, q)
    assert abs(estimate / rows - TOY_STEPS["bd\n"]) < 0.02, estimate / rows
    np.testing.assert_array_equal(out.stopped, True)
    np.testing.assert_array_equal(out.value_logits, out.length)  # the value at each step's last token


def test_distinct_candidates_are_all_steps_when_fewer_exist_and_independent_ones_repeat():
    out, texts = toy_candidates(50, 6, distinct=True, seed=1)
    for r in range(50):
        assert sorted(t for t in texts[r] if t) == sorted(TOY_STEPS) and texts[r].count(None) == 2
        np.testing.assert_array_equal(out.log_inclusion[r], 0.0)  # every step was drawn: probability 1
    assert out.iterations == 3  # the longest step, then every beam has ended
    # K independent samples: duplicates, each step at its probability.
    out, texts = toy_candidates(2000, 6, distinct=False, seed=2)
    firsts = [t[0] for t in texts]
    assert any(len(set(t)) < 6 for t in texts)
    for t, p in TOY_STEPS.items():
        assert abs(firsts.count(t) / 2000 - p) < 4 * np.sqrt(p * (1 - p) / 2000)
    np.testing.assert_array_equal(out.log_inclusion, 0.0)
    # Needed: tokens pushed for live candidates; here every candidate is a kept step.
    np.testing.assert_array_equal(out.token_forwards, out.length.sum(-1))


def test_row_groups_stop_separately_and_sample_the_same_steps(setup):
    """With one key per row, splitting the rows into groups (each with its own loop) gives every row the same
    step, logits, value and cache; a group whose rows are all inactive runs no iteration, and each row is
    charged the iterations of its group's loop."""
    active = np.ones(BATCH, bool)
    active[8:] = False  # the third group of 4 rows: nothing to do
    keys = jax.random.split(jax.random.key(5), BATCH)
    run = jax.jit(lambda cache, logits, keys, group: sample_step(
        nnx.merge(setup["graphdef"], setup["state"]), cache, logits, keys, max_step_len=STEP,
        temperature=2.5, active=jnp.asarray(active), group_rows=group), static_argnums=3)
    whole = run(setup["cache"], setup["logits"], keys, None)
    grouped = run(setup["cache"], setup["logits"], keys, 4)
    for name in ("tokens", "length", "num_sampled", "stopped"):
        np.testing.assert_array_equal(getattr(grouped, name), getattr(whole, name))
    for name in ("logprob", "logits", "value_logits"):
        np.testing.assert_allclose(getattr(grouped, name), getattr(whole, name), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grouped.cache, whole.cache)
    assert int(grouped.token_forwards) == int(whole.token_forwards) == int(np.sum(whole.length))
    lanes = np.asarray(grouped.lane_forwards)
    np.testing.assert_array_equal(lanes[8:], 0)
    for g in range(2):
        assert (lanes[4 * g: 4 * g + 4] == np.asarray(whole.length[4 * g: 4 * g + 4]).max()).all()
    np.testing.assert_array_equal(whole.lane_forwards, np.asarray(whole.length).max())
