"""GRPO (selfplay.algorithm=grpo): the loss against a hand computation, group advantages, the decision mask
against the task's Python tool mask, learning a micro task from a random network in both action spaces,
exact resume after a kill, and bad configs refused before any work."""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.checkpoint import Checkpointer
from alphareason.config import ConfigError
from alphareason.model import ModelConfig, Transformer
from alphareason.model.testing import perturbed_model
from alphareason.run import make_optimizer, make_task
from alphareason.tasks import Task, Verdict, get_task, split_steps
from alphareason.train import grpo
from alphareason.train.loop import SelfPlayLoop, run_training, validate_config
from alphareason.train.metrics import read_metrics
from helpers import micro_config
from test_loop import Killed, _params, _strip_timing


# ------------------------------------------------------------------ the loss
def _hand_loss(logp, old, ref, mask, adv, weight, eps, beta, denominators):
    """The GRPO objective and its gradient w.r.t. ``logp``, decision by decision in plain Python."""
    N, D = len(logp), len(logp[0])
    loss, grad = 0.0, [[0.0] * D for _ in range(N)]
    total_weight = sum(weight)
    for i in range(N):
        chain = 0.0
        for t in range(D):
            if not mask[i][t] or not weight[i]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            unclipped, clipped = r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i]
            # d/dlogp of -min(r A, clip(r) A): -r A where the unclipped term is the smaller one, else 0
            d_surrogate = -r * adv[i] if unclipped <= clipped else 0.0
            q = ref[i][t] - logp[i][t]
            kl = math.exp(q) - q - 1
            d_kl = -math.exp(q) + 1
            chain += -min(unclipped, clipped) + beta * kl
            grad[i][t] = weight[i] / total_weight * (d_surrogate + beta * d_kl) / denominators[i]
        loss += weight[i] * chain / denominators[i]
    return loss / total_weight, grad


@pytest.mark.parametrize("dr_grpo,beta", [(False, 0.1), (True, 0.1), (False, 0.0)])
def test_loss_and_gradient_equal_a_hand_computation(dr_grpo, beta):
    eps = 0.2
    # chain 0 (A = +1): ratio 1.5 (clipped above), 0.5 (below the range but A > 0: not clipped), 1.1, masked.
    # chain 1 (A = -0.5): ratio 0.5 (clipped below), 1.5 (above the range but A < 0: not clipped), 2 masked.
    # chain 2: a padding row (weight 0) with a full mask.
    old = [[-1.0, -2.0, -0.5, -3.0], [-1.2, -0.7, -0.1, -0.2], [-1.0, -1.0, -1.0, -1.0]]
    ratio = [[1.5, 0.5, 1.1, 9.0], [0.5, 1.5, 7.0, 0.01], [3.0, 3.0, 3.0, 3.0]]
    logp = [[o + math.log(r) for o, r in zip(orow, rrow)] for orow, rrow in zip(old, ratio)]
    ref = [[-1.1, -1.5, -0.8, -0.1], [-0.9, -1.0, -0.3, -5.0], [-2.0, -2.0, -2.0, -2.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    adv, weight = [1.0, -0.5, 2.0], [1.0, 1.0, 0.0]
    denominators = [4, 4, 4] if dr_grpo else [3, 2, 4]
    want_loss, want_grad = _hand_loss(logp, old, ref, mask, adv, weight, eps, beta, denominators)

    def f(lp):
        return grpo.grpo_loss(lp, jnp.array(old), jnp.array(ref), jnp.array(mask, bool), jnp.array(adv),
                              jnp.array(weight), clip_eps=eps, kl_beta=beta, dr_grpo=dr_grpo, max_decisions=4)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.array(logp, jnp.float32))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.array(want_grad), rtol=1e-5, atol=1e-7)
    # The clip removes the gradient of 2 of the 5 decisions (chain 0's first, chain 1's first).
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 5)
    if not beta:  # a clipped decision has no gradient; without the KL term nothing is left
        assert np.asarray(grad)[0, 0] == 0 and np.asarray(grad)[1, 0] == 0
        assert np.asarray(grad)[0, 1] != 0 and np.asarray(grad)[1, 1] != 0
    assert ("kl" in metrics) == bool(beta)
    assert not np.asarray(grad)[2].any() and not np.asarray(grad)[0, 3] and not np.asarray(grad)[1, 2:].any()


def test_equal_rewards_give_zero_advantage_zero_gradient_and_no_learner_rows():
    rewards = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]], np.float32)
    adv = np.asarray(grpo.group_advantages(rewards))
    assert (adv[[0, 1, 3]] == 0).all()
    np.testing.assert_allclose(adv[2], (rewards[2] - 0.25) / (np.std(rewards[2]) + grpo.ADVANTAGE_EPS), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grpo.group_advantages(rewards, scale_by_std=False))[2],
                                  [0.75, -0.25, -0.25, -0.25])
    assert grpo.has_signal(rewards).tolist() == [False, False, True, False]
    # Through the network: a batch of zero-advantage chains has exactly zero policy gradient.
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    T = task.context_len()
    model = perturbed_model(ModelConfig.micro(max_len=T))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, tok.VOCAB_SIZE, (4, T)), jnp.int32)
    mask = jnp.ones((4, T - 1), bool)

    def objective(m):
        logp, _ = grpo.token_logprobs(m, tokens)
        return grpo.grpo_loss(logp, jax.lax.stop_gradient(logp) - 0.3, None, mask, jnp.zeros(4), jnp.ones(4),
                              clip_eps=0.2)[0]

    grads = nnx.grad(objective)(model)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))
    # In the learner: only the groups with signal are trained on.
    g = _grpo(task, model, group_size=4)
    buffer = g.buffer(4)
    rows = {name: np.zeros((16,) + shape, dtype) for name, (shape, dtype) in g.fields.items()}
    rows.update(reward=rewards.reshape(16), signal=np.repeat(grpo.has_signal(rewards), 4),
                advantage=adv.reshape(16), tokens=np.asarray(jnp.tile(tokens, (4, 1))))
    buffer.add(rows)
    data, _ = g.learner_data(buffer, nnx.state(model))
    np.testing.assert_array_equal(data["advantage"], adv[2])


# ------------------------------------------------------- rollouts and masks
def _grpo(task, model, **settings):
    settings = {"group_size": 4, "minibatch_size": 8, **settings}
    optimizer = make_optimizer(model, learning_rate=1e-3, steps=10, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)
    return grpo.GRPO(task, nnx.split(model)[0], nnx.split((model, optimizer))[0], grpo.GRPOSettings(**settings),
                     seq_len=model.config.max_len)


def _python_decision_mask(task, tokens, prompt_length, length):
    """The data pipeline's reference: every token after the prompt except those the tool wrote (``tool_mask``)."""
    want = np.zeros(tokens.shape, bool)
    for i, (row, p, n) in enumerate(zip(tokens, prompt_length, length)):
        text = tok.decode(row[p:n])
        want[i, p:n] = True
        want[i, p: p + len(text)] &= ~task.tool_mask(text)
    return want[:, 1:]


def test_decision_mask_leaves_out_prompt_tool_tokens_and_padding():
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    model = perturbed_model(ModelConfig.micro(max_len=task.context_len()), seed=1, scale=0.5)
    g = _grpo(task, model, group_size=8)
    problems = task.generate(0, 4)
    rows = g.play(nnx.state(model), problems, jax.random.split(jax.random.key(0), 4))
    # Solutions written as the sampler would (the calculator's digits and line ends are tool tokens), too.
    T = model.config.max_len
    sol = np.full((4, T), tok.PAD, np.int32)
    prompt = np.zeros(4, np.int32)
    for i, p in enumerate(problems):
        ids = tok.encode(task.prompt(p), bos=True) + tok.encode(task.solve(p))
        sol[i, :len(ids)], prompt[i] = ids, len(tok.encode(task.prompt(p), bos=True))
    tokens = np.concatenate([rows["tokens"], sol])
    prompt_length = np.concatenate([rows["prompt_length"], prompt])
    length = np.concatenate([rows["length"], (sol != tok.PAD).sum(1)])
    got = np.asarray(grpo.decision_mask(task, jnp.asarray(tokens), prompt_length, length))
    want = _python_decision_mask(task, tokens, prompt_length, length)
    np.testing.assert_array_equal(got, want)
    assert (rows["mask"] == got[:32]).all()
    # Every solution step has tool tokens; so do some sampled chains.
    tool = (np.arange(T - 1)[None] >= prompt_length[:, None] - 1) & (np.arange(T - 1)[None] < length[:, None] - 1) & ~got
    assert tool[32:].sum() >= 4 * 2 * 2 and tool[:32].any()
    # The rollout's charge is the decoder's: each prompt once, then every token written.
    np.testing.assert_array_equal(rows["token_forwards"],
                                  prompt[:4] + (rows["length"] - rows["prompt_length"]).reshape(4, 8).sum(1))


def test_rollouts_over_legal_steps_record_every_decision_and_its_charge():
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    model = perturbed_model(ModelConfig.micro(max_len=task.context_len()), seed=2, scale=0.5)
    g = _grpo(task, model, group_size=4, action_space="legal_steps")
    problems = task.generate(1, 3)
    rows = g.play(nnx.state(model), problems, jax.random.split(jax.random.key(1), 3))
    charge = np.zeros(3, np.int64)
    for i in range(12):
        problem = problems[i // 4]
        seq = tok.encode(task.prompt(problem), bos=True)
        assert rows["prompt_length"][i] == len(seq)
        ended = False
        for m in range(task.max_steps):
            assert not (ended and rows["mask"][i, m])  # a chain that ended makes no more decisions
            if rows["cand_valid"][i, m].any():  # a live state: its prefix and every legal step were scored
                charge[i // 4] += rows["start"][i, m] + (rows["candidates"][i, m] != tok.PAD).sum()
            if not rows["mask"][i, m]:
                ended = True
                continue
            action = rows["action"][i, m]
            assert rows["cand_valid"][i, m, action] and rows["start"][i, m] == len(seq)
            seq += [t for t in rows["candidates"][i, m, action].tolist() if t != tok.PAD]
        assert rows["tokens"][i, :rows["length"][i]].tolist() == seq
        verdict = task.verify(problem, tok.decode(seq[rows["prompt_length"][i]:]))
        assert verdict.num_valid_steps == rows["mask"][i].sum() == task.max_steps  # legal steps to the end
        assert rows["solved"][i] == verdict.solved and rows["reward"][i] == float(verdict.solved)
    np.testing.assert_array_equal(rows["token_forwards"], charge)
    assert g.learner_forwards({"tokens": rows["tokens"]}) == 12 * task.max_steps * (
        task.context_len() + rows["candidates"].shape[2] * task.max_step_len)


# ------------------------------------------------ learning from chance (micro)
class PickTask(Task):
    """One step, one digit 0-3 (four legal steps); solved when it is (the prompt's digit + 1) mod 4.

    With ``max_step_len=1`` a step is a single token (no line end), so free
    generation picks among the whole vocabulary.
    """

    name = "pick"
    max_steps, min_steps, max_prompt_len, max_trace_steps = 1, 1, 3, 1

    def __init__(self, max_step_len=2):
        self.max_step_len = max_step_len

    def generate(self, seed, n, *, difficulty=None, exclude=()):
        return [{"digit": (seed + i) % 4} for i in range(n)]

    def difficulty(self, problem):
        return 0

    def validate_problem(self, obj, *, where="problem"):
        return {"digit": int(obj["digit"])}

    def prompt(self, problem):
        return f"{problem['digit']}\n"

    def answer(self, problem):
        return str((problem["digit"] + 1) % 4)

    def solve(self, problem):
        return self.answer(problem) + ("\n" if self.max_step_len > 1 else "")

    def search_trace(self, problem, *, max_steps=None):
        return self.solve(problem)

    def verify(self, problem, text):
        steps = split_steps(text)
        valid = len(steps) == 1 and steps[0] in ("0", "1", "2", "3") and text.endswith("\n") == (self.max_step_len > 1)
        return Verdict(valid and steps[0] == self.answer(problem), "pick", int(valid), None)

    def init_state(self, problem):
        return {"digit": np.int32(problem["digit"]), "done": np.bool_(False)}

    def step(self, state, step_tokens):
        digit = step_tokens[0] - tok.DIGIT0
        valid = ~state["done"] & (digit >= 0) & (digit < 4)
        if self.max_step_len > 1:
            valid &= (step_tokens[1] == tok.SEP)
        reward = jnp.where(valid & (digit == (state["digit"] + 1) % 4), 1.0, 0.0)
        return {"digit": state["digit"], "done": jnp.bool_(True)}, valid, jnp.bool_(True), reward

    def legal_steps(self, state):
        steps = jnp.stack([tok.DIGIT0 + jnp.arange(4), jnp.full(4, tok.SEP)], 1).astype(jnp.int32)
        return steps[:, :self.max_step_len], jnp.broadcast_to(~state["done"], (4,))


def _learn_pick(action_space, max_step_len, iterations, *, learning_rate):
    task = PickTask(max_step_len)
    model = Transformer(ModelConfig.micro(max_len=task.context_len()), rngs=nnx.Rngs(0))  # a random network
    settings = grpo.GRPOSettings(group_size=16, minibatch_size=64, action_space=action_space, updates_per_batch=2)
    optimizer = make_optimizer(model, learning_rate=learning_rate, steps=10 * iterations, warmup_steps=1,
                               weight_decay=0.0, grad_clip=1.0)
    graphdef, state = nnx.split((model, optimizer))
    g = grpo.GRPO(task, nnx.split(model)[0], graphdef, settings, seq_len=model.config.max_len)
    problems = task.generate(0, 4)
    buffer, rates, rng = g.buffer(4), [], np.random.default_rng(0)
    for it in range(iterations):
        params = nnx.state(nnx.merge(graphdef, state)[0])
        buffer.clear()
        buffer.add(g.play(params, problems, jax.random.split(jax.random.key(it), 4)))
        rates.append(float(buffer.rows()["solved"].mean()))
        data, _ = g.learner_data(buffer, params)
        for batch in g.minibatches(data, rng):
            state, _ = g.learner_step(state, batch)
    return rates


@pytest.mark.parametrize("action_space,max_step_len,iterations,learning_rate",
                         [("legal_steps", 2, 25, 1e-2), ("steps", 1, 40, 5e-3)])
def test_grpo_learns_a_micro_task_from_a_random_network(action_space, max_step_len, iterations, learning_rate):
    """64 sampled chains per iteration: from chance (1/4 of the legal steps; 1/53 of the tokens) to >= 90% solved.

    (Free generation at learning rate 2e-2 stalls at 75% here: one problem's right digit falls to probability
    ~0 while the others are learnt, its groups then never have signal: GRPO's known blind spot.)"""
    rates = _learn_pick(action_space, max_step_len, iterations, learning_rate=learning_rate)
    chance = 0.25 if action_space == "legal_steps" else 1 / (tok.VOCAB_SIZE - 2)
    assert rates[0] < chance + 0.2, rates
    assert np.mean(rates[-3:]) >= 0.9, rates


# ----------------------------------------------------------- loop and resume
def grpo_config(**grpo_options):
    c = micro_config()
    c.train.steps, c.train.learning_rate = 200, 3e-3  # enough SFT for some valid steps (format reward: signal)
    c.train.checkpoint_every = 100
    c.selfplay.algorithm = "grpo"
    c.selfplay.episodes_per_iteration = 8
    c.selfplay.actor_batch_size = 4  # two actor batches per iteration: a kill can land between them
    c.selfplay.learner_batch_size = 8
    c.grpo.group_size = 4
    c.grpo.format_reward = 0.5  # the micro model solves nothing yet: valid steps give the groups signal
    c.grpo.updates_per_batch = 2
    c.grpo.kl_beta = 0.05  # the reference: this run's SFT checkpoint
    for k, v in grpo_options.items():
        c.grpo[k] = v
    return c


def kill_grpo_at(monkeypatch, phase, iteration, nth=1):
    """Makes the loop die once, at the ``nth`` actor batch (``selfplay``) or learner step (``learn``) of ``iteration``."""
    method = {"selfplay": "play_groups", "learn": "learn_step"}[phase]
    original = getattr(SelfPlayLoop, method)
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        if self.it.iteration + 1 == iteration:
            calls["n"] += 1
            if calls["n"] == nth:
                raise Killed(f"{phase} {iteration} #{nth}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfPlayLoop, method, wrapped)


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    """An uninterrupted GRPO run of two iterations (free generation, KL to the SFT model, 2 epochs)."""
    workdir = str(tmp_path_factory.mktemp("grpo_uninterrupted"))
    config = grpo_config()
    out = run_training(config, workdir, progress=False, log=lambda *_: None)
    return config, workdir, out


def test_grpo_run_writes_its_metrics_and_counts_compute(grpo_reference):
    config, workdir, out = grpo_reference
    rows = out["iterations"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    sp = read_metrics(workdir, "selfplay")
    T = make_task(config).context_len()
    for r in sp:
        assert r["rollouts"] == 8 * 4 and r["grpo_response_tokens"] > 0
        for key in ("grpo_mean_reward", "selfplay_solve_rate", "grpo_pass_at_group", "rollouts_per_s",
                    "learn_kl", "learn_clip_fraction", "learn_entropy", "learner_tokens_per_s"):
            assert key in r, key
        # Only the chains of groups with signal are learnt from, in minibatches of 8 chains, 2 epochs.
        chains, steps = r["learner_chains"], r["learner_steps"]
        assert chains == round(r["grpo_signal_fraction"] * 8) * 4 > 0
        assert steps == 2 * -(-chains // 8)
        # Learner compute: every row of every pass (rollout and reference log-probabilities once, then the
        # steps three times: forward and backward).
        assert r["learner_token_forwards"] == (2 * 8 * -(-chains // 8) + 3 * steps * 8) * T
    assert rows[2]["selfplay_token_forwards"] == sum(r["rollout_token_forwards"] for r in sp)
    assert rows[2]["learner_token_forwards"] == sum(r["learner_token_forwards"] for r in sp)
    assert rows[2]["learner_examples"] == sum(2 * r["learner_chains"] for r in sp)


def test_token_budget_stops_rollouts_at_the_nearest_batch_and_is_spent_as_counted(grpo_reference, tmp_path):
    """With grpo.token_budget an iteration plays actor batches until rollouts + learner reach the budget; what
    it spends is exactly the rollouts' computed forwards plus the learner's."""
    _, ref_dir, ref_out = grpo_reference
    for part in ("data", os.path.join("checkpoints", "sft")):  # the reference's SFT start: no second SFT
        shutil.copytree(os.path.join(ref_dir, part), os.path.join(str(tmp_path), part))
    config = grpo_config()
    reference_rows = ref_out["iterations"]
    budget = reference_rows[1]["total_token_forwards"]  # what 8 problems (2 actor batches) spent
    config.selfplay.episodes_per_iteration = 24  # a cap of 6 actor batches
    config.selfplay.iterations = 1
    config.grpo.token_budget = budget
    out = run_training(config, str(tmp_path), progress=False, log=lambda *_: None)
    r = read_metrics(str(tmp_path), "selfplay")[0]
    played, spent = r["selfplay_episodes"], r["grpo_budget_spent"]
    assert r["grpo_token_budget"] == budget and played % 4 == 0 and 4 <= played < 24, (played, budget)
    assert spent == r["rollout_computed_token_forwards"] + r["learner_token_forwards"]
    assert out["iterations"][1]["total_token_forwards"] == spent
    batches = played // 4
    assert spent + spent / batches / 2 >= budget  # stopped at the batch boundary nearest the budget
    assert abs(spent - budget) <= spent / batches
    # the checkpoint keeps the chains played (4 per problem), not the buffer's capacity for 24 problems
    saved = Checkpointer(os.path.join(str(tmp_path), "checkpoints", "selfplay")).saved_shapes("replay", 1)
    assert saved["data.reward"] == (played * 4,) and saved["counters"] == (1,)


def test_killed_grpo_run_resumes_exactly(grpo_reference, tmp_path, monkeypatch):
    """Killed mid-rollouts of iteration 2, resumed, killed mid-learning of iteration 2, resumed: the same run."""
    config, ref_dir, ref_out = grpo_reference
    workdir = str(tmp_path / "run")
    for phase in ("selfplay", "learn"):
        kill_grpo_at(monkeypatch, phase, 2, nth=2)
        with pytest.raises(Killed, match=phase):
            run_training(config, workdir, progress=False, log=lambda *_: None)
        monkeypatch.undo()
        assert Checkpointer(os.path.join(workdir, "checkpoints", "selfplay")).latest_step() == 1
    out = run_training(grpo_config(), workdir, progress=False, log=lambda *_: None)
    assert _strip_timing(out["iterations"]) == _strip_timing(ref_out["iterations"])
    assert _strip_timing(read_metrics(workdir, "selfplay")) == _strip_timing(read_metrics(ref_dir, "selfplay"))
    got, _ = _params(config, workdir)
    want, _ = _params(config, ref_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)


@pytest.mark.slow  # about a minute: compiling the evaluation's MCTS over 24 enumerated steps
def test_grpo_over_legal_steps_runs_tabula_rasa(tmp_path):
    """No SFT (a random network), the policy over enumerated legal steps, Dr. GRPO."""
    config = grpo_config(kl_beta=0.0, format_reward=0.0, dr_grpo=True)
    config.train.steps = 0  # a random network
    config.search.candidates = "enumerate"
    config.selfplay.iterations = 1
    out = run_training(config, str(tmp_path), progress=False, log=lambda *_: None)
    assert [r["step"] for r in out["iterations"]] == [0, 1]
    r = read_metrics(str(tmp_path), "selfplay")[0]
    assert 1 <= r["grpo_decisions"] <= make_task(config).max_steps
    assert r["rollout_token_forwards"] > 0 and "learn_kl" not in r


@pytest.mark.parametrize("key,value,message", [
    ("grpo.group_size", 1, "grpo.group_size=1: GRPO's advantage compares"),
    ("grpo.clip_eps", 0.0, r"grpo.clip_eps=0.0 is outside \(0, 1\)"),
    ("grpo.clip_eps", 1.0, r"grpo.clip_eps=1.0 is outside \(0, 1\)"),
    ("grpo.kl_beta", 0.1, "needs a frozen reference policy, but train.steps=0"),
    ("grpo.reference", "EMPTY", "holds no checkpoint"),
    ("search.candidates", "tokens", "token-level candidates are a search setting with no GRPO policy"),
    ("grpo.updates_per_batch", 0, "grpo.updates_per_batch=0"),
    ("grpo.token_budget", -1, "grpo.token_budget=-1 is negative"),
])
def test_bad_grpo_configs_are_refused_before_work(tmp_path, key, value, message):
    config = grpo_config(kl_beta=0.0)
    section, name = key.split(".")
    if key == "grpo.kl_beta":
        config.train.steps = 0
    if key == "grpo.reference":
        (tmp_path / "empty").mkdir()
        value = str(tmp_path / "empty")
        config.grpo.kl_beta = 0.1
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, make_task(config))
    with pytest.raises(ConfigError, match=message):
        run_training(config, str(tmp_path / "w"), progress=False, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w")  # nothing was started
