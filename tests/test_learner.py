"""The self-play learner: candidate scoring equals the search's prior; the losses learn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.model import ModelConfig, tile_cache
from alphareason.model.sampling import sample_step
from alphareason.model.testing import perturbed_model
from alphareason.search.env import NEG_INF
from alphareason.tasks import get_task
from alphareason.train.learner import candidate_logits, selfplay_loss

B, K = 3, 4


# The sequential reference: teacher-forcing each step through a tiled KV cache.
def score_steps(model, cache, logits, steps, tool_mask):
    """Teacher-forces ``steps`` through a cache; log-likelihood of the model-written tokens.

    Args:
      cache: a KV cache of the prefixes, one row per step.
      logits: float32[N, V], the model's outputs at each prefix's last position.
      steps: int32[N, S], PAD after the step (all PAD: nothing to score).
      tool_mask: bool[N, S], tokens written by a tool (not scored).
    Returns:
      (logprob float32[N], length int32[N]): summed log-probabilities and tokens per step.
    """
    length = jnp.sum(steps != tok.PAD, axis=-1).astype(jnp.int32)

    def body(i, carry):
        logits, cache, total = carry
        token = steps[:, i]
        active = i < length
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], -1)[:, 0]
        total = total + jnp.where(active & ~tool_mask[:, i], logp, 0.0)
        new_logits, _, cache = model.decode(token, cache, active)
        logits = jnp.where(active[:, None], new_logits, logits)
        return logits, cache, total

    _, _, total = jax.lax.fori_loop(0, steps.shape[1], body, (logits, cache, jnp.zeros(steps.shape[:1], jnp.float32)))
    return total, length


@pytest.fixture(scope="module")
def task():
    return get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    return perturbed_model(ModelConfig.micro(max_len=64, positions=request.param), seed=3)


def _states(task, seed=0):
    """B ragged prefixes (prompt + 0..2 solution steps) and K candidate steps each."""
    problems = task.generate(seed, B)
    T = 48
    tokens = np.full((B, T), tok.PAD, np.int32)
    length = np.zeros((B,), np.int32)
    for i, p in enumerate(problems):
        steps = task.solve(p).split("\n")[: i % 3]
        text = task.prompt(p) + "".join(s + "\n" for s in steps)
        ids = tok.encode(text, bos=True)
        tokens[i, : len(ids)], length[i] = ids, len(ids)
    rng = np.random.default_rng(seed)
    pool = ["1+2=3\n", "10-3=7\n", "7*2=14\n", "9/3=3\n", "4+4=8\n", "#\n", "12\n"]
    cands = np.stack([np.stack([tok.encode_padded(pool[j], task.max_step_len)
                                for j in rng.choice(len(pool), K, replace=False)]) for _ in range(B)])
    return problems, tokens, length, cands


@functools.partial(jax.jit, static_argnums=0)
def _sequential(graphdef, params, tokens, length, cands, tool_mask):
    """The search's way: prefill, tile the cache, teacher-force each candidate token by token."""
    model = nnx.merge(graphdef, params)
    Bn, Kn, S = cands.shape
    logits, value_logits, cache = model.prefill(tokens, length, model.init_cache(Bn, tokens.shape[1] + S))
    logprob, _ = score_steps(model, tile_cache(cache, Kn), jnp.repeat(logits, Kn, 0), cands.reshape(Bn * Kn, S),
                             tool_mask.reshape(Bn * Kn, S))
    return logprob.reshape(Bn, Kn), value_logits


CALCULATOR = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
NO_TOOL = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _parallel(graphdef, params, tokens, length, cands, tool):
    model = nnx.merge(graphdef, params)
    return candidate_logits(model, CALCULATOR if tool else NO_TOOL, tokens, length, cands,
                            jnp.ones(cands.shape[:2], bool), length_normalize=False)


@pytest.mark.parametrize("tool", [False, True])
def test_parallel_candidate_scoring_equals_sequential_cached_decoding(task, model, tool):
    _, tokens, length, cands = _states(task)
    graphdef, params = nnx.split(model)
    flat = jnp.asarray(cands.reshape(B * K, -1))
    tool_mask = (CALCULATOR if tool else NO_TOOL).tool_written(flat).reshape(cands.shape)
    want, want_value = _sequential(graphdef, params, tokens, length, cands, tool_mask)
    got, got_value = _parallel(graphdef, params, tokens, length, cands, tool)
    assert float(jnp.std(want)) > 0.5  # the perturbed model gives the candidates different scores
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_value, want_value, atol=1e-5, rtol=1e-5)


def test_scoring_matches_the_samplers_logprob(task, model):
    """A step sampled through the cache gets the same log-likelihood from the learner's scoring."""
    _, tokens, length, _ = _states(task)
    graphdef, params = nnx.split(model)

    @jax.jit
    def sample(params, key):
        m = nnx.merge(graphdef, params)
        logits, _, cache = m.prefill(tokens, length, m.init_cache(B, tokens.shape[1]))
        cache_k, state_k = tile_cache(cache, K), None
        del state_k
        return sample_step(m, cache_k, jnp.repeat(logits, K, 0), key, max_step_len=task.max_step_len)

    s = sample(params, jax.random.key(7))
    cands = s.tokens.reshape(B, K, -1)
    got, _ = _parallel(graphdef, params, tokens, length, cands, False)
    np.testing.assert_allclose(got, s.logprob.reshape(B, K), atol=1e-5, rtol=1e-5)


def test_invalid_candidates_are_masked(task, model):
    _, tokens, length, cands = _states(task)
    valid = np.ones((B, K), bool)
    valid[0, 1] = valid[2, 3] = False
    logits, _ = candidate_logits(model, NO_TOOL, jnp.asarray(tokens), jnp.asarray(length), jnp.asarray(cands),
                                 jnp.asarray(valid), length_normalize=False)
    assert float(logits[0, 1]) == NEG_INF and float(logits[2, 3]) == NEG_INF
    assert np.all(np.asarray(logits)[valid] > NEG_INF / 2)


def test_policy_loss_is_cross_entropy_to_action_weights_and_learns(task):
    """A few Adam steps move the network's candidate distribution onto the search policy."""
    model = perturbed_model(ModelConfig.micro(max_len=48), seed=5, scale=0.05)
    _, tokens, length, cands = _states(task, seed=1)
    valid = np.ones((B, K), bool)
    valid[:, -1] = False
    weights = np.zeros((B, K), np.float32)
    weights[:, 0], weights[:, 1] = 0.8, 0.2
    batch = {"tokens": tokens, "length": length, "candidates": cands, "cand_valid": valid,
             "action_weights": weights, "search_value": np.full((B,), 0.5, np.float32),
             "outcome": np.array([1, 0, 1], np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)

    loss, metrics = selfplay_loss(model, batch, task=NO_TOOL, policy_weight=1.0, value_weight=0.0)
    logits, _ = candidate_logits(model, NO_TOOL, batch["tokens"], batch["length"], batch["candidates"],
                                 batch["cand_valid"], length_normalize=False)
    log_pi = np.asarray(jax.nn.log_softmax(logits, -1))
    want = -np.mean(0.8 * log_pi[:, 0] + 0.2 * log_pi[:, 1])
    np.testing.assert_allclose(float(metrics["policy_loss"]), want, rtol=1e-5)

    graphdef, state = nnx.split(model)
    tx = optax.adam(3e-3)
    opt_state = tx.init(state)

    @jax.jit
    def step(state, opt_state):
        def f(s):
            return selfplay_loss(nnx.merge(graphdef, s), batch, task=NO_TOOL, policy_weight=1.0, value_weight=1.0)[0]
        loss, grads = jax.value_and_grad(f)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    losses = []
    for _ in range(40):
        state, opt_state, loss = step(state, opt_state)
        losses.append(float(loss))
    # The minimum of the policy term is the entropy of (0.8, 0.2); the value term can reach ~0.
    entropy = -(0.8 * np.log(0.8) + 0.2 * np.log(0.2))
    assert losses[-1] < losses[0] - 0.5
    assert losses[-1] < entropy + 0.25


def test_policy_moves_solved_learns_the_policy_only_from_solved_episodes(task):
    """policy_moves="solved": the policy term is the mean over the solved rows only; the value term is unchanged."""
    model = perturbed_model(ModelConfig.micro(max_len=48), seed=5, scale=0.05)
    _, tokens, length, cands = _states(task, seed=1)
    weights = np.tile(np.array([0.6, 0.3, 0.1, 0.0], np.float32), (B, 1))
    weights[1] = [0.0, 0.1, 0.2, 0.7]
    batch = jax.tree.map(jnp.asarray, {
        "tokens": tokens, "length": length, "candidates": cands, "cand_valid": np.ones((B, K), bool),
        "action_weights": weights, "search_value": np.full((B,), 0.5, np.float32),
        "outcome": np.array([1, 0, 1], np.float32)})
    _, every = selfplay_loss(model, batch, task=NO_TOOL)
    _, solved = selfplay_loss(model, batch, task=NO_TOOL, policy_moves="solved")
    rows = np.array([0, 2])
    _, subset = selfplay_loss(model, jax.tree.map(lambda x: x[rows], batch), task=NO_TOOL)
    np.testing.assert_allclose(float(solved["policy_loss"]), float(subset["policy_loss"]), rtol=1e-6)
    assert abs(float(solved["policy_loss"]) - float(every["policy_loss"])) > 1e-3  # row 1 counted before
    np.testing.assert_allclose(float(solved["value_loss"]), float(every["value_loss"]), rtol=1e-6)
    with pytest.raises(ValueError, match="policy_moves"):
        selfplay_loss(model, batch, task=NO_TOOL, policy_moves="won")


def test_each_value_target_reads_its_own_replay_field(task):
    """The value term is the cross-entropy against the chosen target's field: swapping the fields swaps it."""
    model = perturbed_model(ModelConfig.micro(max_len=48), seed=5, scale=0.05)
    _, tokens, length, cands = _states(task, seed=1)
    fields = {"outcome": [1, 0, 1], "td_lambda": [0.2, 0.9, 0.4], "proven": [1, 1, 0], "search_value": [0.7, 0.1, 0.3]}
    base = {"tokens": tokens, "length": length, "candidates": cands, "cand_valid": np.ones((B, K), bool),
            "action_weights": np.full((B, K), 1.0 / K, np.float32),
            **{k: np.asarray(v, np.float32) for k, v in fields.items()}}
    losses = {}
    for target, field in (("outcome", "outcome"), ("td_lambda", "td_lambda"), ("proven", "proven"),
                          ("search_q", "search_value")):
        _, m = selfplay_loss(model, jax.tree.map(jnp.asarray, base), task=NO_TOOL, value_target=target)
        # the same loss where the outcome field holds this target's values
        _, as_outcome = selfplay_loss(model, jax.tree.map(jnp.asarray, dict(base, outcome=base[field])), task=NO_TOOL)
        np.testing.assert_allclose(float(m["value_loss"]), float(as_outcome["value_loss"]), rtol=1e-6)
        losses[target] = float(m["value_loss"])
    assert len({round(x, 6) for x in losses.values()}) == 4  # four different targets, four different losses


def test_sampled_set_correction_makes_the_searchs_own_prior_a_fixed_point(task):
    """Candidates drawn without replacement: the search's prior is log pi - log q (q = P(drawn)). If the search
    adds nothing (target = softmax of that prior), the corrected loss is already at its minimum (zero policy
    gradient); the uncorrected one pulls the network towards pi / q, away from its own most likely step."""
    model = perturbed_model(ModelConfig.micro(max_len=48), seed=5, scale=0.05)
    _, tokens, length, cands = _states(task, seed=1)
    valid = np.ones((B, K), bool)
    log_q = np.tile(np.array([0.0, -0.5, -2.0, -3.0], np.float32), (B, 1))
    logits, _ = candidate_logits(model, NO_TOOL, jnp.asarray(tokens), jnp.asarray(length), jnp.asarray(cands),
                                 jnp.ones((B, K), bool), length_normalize=False)
    prior = np.asarray(logits) - log_q
    target = np.asarray(jax.nn.softmax(prior, -1))
    batch = jax.tree.map(jnp.asarray, {
        "tokens": tokens, "length": length, "candidates": cands, "cand_valid": valid, "action_weights": target,
        "cand_log_inclusion": log_q, "search_value": np.zeros((B,), np.float32),
        "outcome": np.zeros((B,), np.float32)})
    graphdef, state = nnx.split(model)

    def policy_loss(s, correction):
        return selfplay_loss(nnx.merge(graphdef, s), batch, task=NO_TOOL, policy_weight=1.0, value_weight=0.0,
                             sampled_set_correction=correction)[1]["policy_loss"]

    corrected, uncorrected = policy_loss(state, True), policy_loss(state, False)
    log_p = np.asarray(jax.nn.log_softmax(prior, -1))
    np.testing.assert_allclose(float(corrected), -np.mean(np.sum(target * log_p, -1)), rtol=1e-5)  # the entropy
    log_pi = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(float(uncorrected), -np.mean(np.sum(target * log_pi, -1)), rtol=1e-5)
    norm = lambda g: float(optax.global_norm(g))  # noqa: E731
    g_corrected = norm(jax.grad(policy_loss)(state, True))
    g_uncorrected = norm(jax.grad(policy_loss)(state, False))
    assert g_uncorrected > 1e-3 and g_corrected < 1e-3 * g_uncorrected, (g_corrected, g_uncorrected)


def _policy_term(model, tokens, length, cands, valid, weights):
    """The policy term's metrics of ``selfplay_loss`` on one batch, and every candidate's log-likelihood
    (float[B, K], no mask) to check them against."""
    batch = jax.tree.map(jnp.asarray, {
        "tokens": tokens, "length": length, "candidates": cands, "cand_valid": valid, "action_weights": weights,
        "search_value": np.zeros((B,), np.float32), "outcome": np.zeros((B,), np.float32)})
    _, metrics = selfplay_loss(model, batch, task=NO_TOOL, policy_weight=1.0, value_weight=0.0)
    logprob, _ = candidate_logits(model, NO_TOOL, batch["tokens"], batch["length"], batch["candidates"],
                                  jnp.ones((B, K), bool), length_normalize=False)
    return metrics, np.asarray(logprob)


def test_invalid_candidates_stay_in_the_policy_softmax_with_target_zero(task, model):
    """Invalid steps are pushed down (target 0) instead of being ignored; repeats are left out."""
    _, tokens, length, cands = _states(task, seed=2)
    cands = cands.copy()
    cands[:, 3] = cands[:, 2]  # candidate 3 repeats candidate 2
    valid = np.ones((B, K), bool)
    valid[:, 1] = False  # invalid under the task
    valid[:, 3] = False  # the search masks repeats too
    weights = np.zeros((B, K), np.float32)
    weights[:, 0], weights[:, 2] = 0.6, 0.4
    metrics, logprob = _policy_term(model, tokens, length, cands, valid, weights)
    distinct = np.array([True, True, True, False])
    logprob = logprob[:, distinct]
    log_pi = logprob - np.log(np.sum(np.exp(logprob - logprob.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logprob.max(-1, keepdims=True)
    want = -np.mean(0.6 * log_pi[:, 0] + 0.4 * log_pi[:, 2])
    np.testing.assert_allclose(float(metrics["policy_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["invalid_mass"]), np.mean(np.exp(log_pi[:, 1])), rtol=1e-5)


def test_empty_candidate_slots_are_no_steps_and_stay_out_of_the_policy_softmax(task, model):
    """Enumerated candidates: the slots of steps that are not legal here are all PAD (cand_valid False). An empty
    candidate's log-likelihood is 0, above every real step's, so if one of them took part in the softmax it would
    hold nearly all the mass (invalid_mass ~ 1) and the legal steps' targets would not be ranked against each other.
    The policy is the softmax over the non-empty candidates only."""
    _, tokens, length, cands = _states(task, seed=2)
    cands = cands.copy()
    cands[:, 2:] = tok.PAD  # two illegal slots, identical (all PAD)
    valid = np.array([[True, True, False, False]] * B)
    weights = np.zeros((B, K), np.float32)
    weights[:, 0], weights[:, 1] = 0.7, 0.3
    metrics, logprob = _policy_term(model, tokens, length, cands, valid, weights)
    assert np.all(logprob[:, 2:] == 0.0) and np.all(logprob[:, :2] < -1.0)  # why an empty slot would dominate
    log_pi = logprob[:, :2] - np.logaddexp(logprob[:, 0], logprob[:, 1])[:, None]
    np.testing.assert_allclose(float(metrics["policy_loss"]), -np.mean(0.7 * log_pi[:, 0] + 0.3 * log_pi[:, 1]),
                               rtol=1e-5)
    assert float(metrics["invalid_mass"]) == 0.0
    entropy = -np.mean(np.sum(np.exp(log_pi) * log_pi, -1))
    np.testing.assert_allclose(float(metrics["policy_entropy"]), entropy, rtol=1e-4)  # float32, near 0


def test_legal_steps_cut_to_their_model_written_tokens_give_the_same_loss(task, model):
    """The loop's learner keeps only ``legal_written_len`` tokens of enumerated legal steps: the rest is the
    calculator's output, which no score reads (attention is causal, tool tokens are not scored)."""
    problems = [{"numbers": [10, 9, 8], "target": 27}, {"numbers": [7, 10, 6], "target": 23},
                {"numbers": [10, 10, 3], "target": 23}]  # two-digit results: the calculator writes 3 tokens
    T = 48
    tokens = np.full((B, T), tok.PAD, np.int32)
    length = np.zeros((B,), np.int32)
    for i, p in enumerate(problems):
        ids = tok.encode(task.prompt(p), bos=True)
        tokens[i, : len(ids)], length[i] = ids, len(ids)
    steps = np.stack([np.asarray(task.legal_steps(task.init_state(p))[0]) for p in problems])  # [B, K, S]
    valid = steps[..., 0] != tok.PAD
    W = task.legal_written_len()
    assert W < steps.shape[-1] and np.any(steps[..., W:] != tok.PAD)  # the cut drops tool tokens
    rng = np.random.default_rng(0)
    weights = np.where(valid, rng.random(valid.shape), 0.0).astype(np.float32)
    batch = {"tokens": tokens, "length": length, "candidates": steps, "cand_valid": valid,
             "action_weights": weights / weights.sum(-1, keepdims=True),
             "search_value": np.full((B,), 0.5, np.float32), "outcome": np.array([1, 0, 1], np.float32)}
    whole = selfplay_loss(model, jax.tree.map(jnp.asarray, batch), task=task)
    cut = selfplay_loss(model, jax.tree.map(jnp.asarray, dict(batch, candidates=steps[..., :W])), task=task)
    np.testing.assert_allclose(float(cut[0]), float(whole[0]), rtol=1e-5)
    np.testing.assert_allclose(float(cut[1]["policy_loss"]), float(whole[1]["policy_loss"]), rtol=1e-5)
