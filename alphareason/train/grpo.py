"""GRPO: reinforcement learning on the verifier's reward, without search.

This module owns Group Relative Policy Optimization (Shao et al. 2024,
DeepSeekMath; the recipe of DeepSeek-R1-Zero and TinyZero) as an algorithm of
the self-play loop (``selfplay.algorithm="grpo"``, ``train.loop``), which
supplies the problems, checkpoints, metrics, evaluation and resume:

* rollouts (``GRPO.play``): ``G`` chains of thought per problem written by
  the policy alone, rewarded by the task's exact Python verifier (1 solved,
  0 otherwise; ``format_reward`` optionally pays unsolved chains for their
  valid steps). Two action spaces, chosen by ``search.candidates``:
    - ``"sample"`` -> ``"steps"``: free generation, token by token, with the
      project's chain decoder (``search.decode.ChainDecoder``, ``lanes=G``:
      one prefill per problem, KV cache, the task's tool writes its tokens);
      a decision is a model-written token;
    - ``"enumerate"`` -> ``"legal_steps"``: at every state the policy is the
      softmax over the task's legal steps of their log-likelihoods
      (``train.learner.candidate_logits``: the prior the search uses with
      enumerated candidates); a decision is a step. It needs no SFT, so it
      runs from a random network (the tabula-rasa setting).
* advantages (``group_advantages``): ``(r - mean) / (std + eps)`` within a
  group (population std), or ``r - mean`` (Dr. GRPO). A group whose rewards
  are all equal has no signal: its chains are left out of the learner batch,
  so they contribute nothing (neither surrogate nor KL);
* loss (``grpo_loss``): the PPO clipped surrogate per decision, with the
  ratio taken against the rollout policy, plus ``kl_beta`` times the k3
  estimate of the KL to a frozen reference policy; per chain the mean over
  its decisions (GRPO) or their sum over the most decisions a chain can
  take (Dr. GRPO: no length normalisation); the mean over chains. Prompt,
  tool-written tokens and padding are no decisions (masked out);
* learner (``GRPO.learner_data``, ``GRPO.minibatches``, ``GRPO.learner_step``):
  the rollout policy's and the reference's log-probabilities are computed
  once per iteration, before any update, then ``updates_per_batch`` epochs of
  minibatches of ``selfplay.learner_batch_size`` chains.

The policy is the sampler's distribution: at ``temperature`` tau, with PAD
and BOS excluded (``model.sampling.choose_tokens``), the ratio is exactly
pi_theta / pi_rollout of what was sampled.

Compute (model token forwards, as everywhere in the project): rollouts are
charged as the decoder charges (prompt once per problem, every decoded token)
or, for legal steps, as the search's enumerated expansion (prefix + every
candidate's tokens, per decision); the learner's forwards count every row of
every pass through the model, padding included: once for the old and
reference log-probability passes, three times for a loss step (forward and
backward, the 1 + 2 FLOPs convention of the other learners).

Options (config section ``grpo``) and their names in Tunix's ``GRPOConfig``:
``group_size`` = ``num_generations``, ``clip_eps`` = ``epsilon``,
``updates_per_batch`` = ``num_iterations`` (mu), ``kl_beta`` = ``beta``,
``dr_grpo`` = ``done_right``.

Shapes: ``P`` problems, ``G`` chains per problem, ``N`` chains, ``T`` the
context, ``D`` decisions per chain (``T - 1`` token positions, or ``M`` =
the task's most steps), ``K`` legal steps per state, ``S`` tokens per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.config import ConfigDict, ConfigError
from alphareason.parallel import jit_state_step
from alphareason.search.decode import ChainDecoder
from alphareason.search.env import NEG_INF, EnvConfig, ReasoningEnv, append_steps
from alphareason.tasks import Problem, Task
from alphareason.train.learner import candidate_logits

ACTION_SPACES = {"sample": "steps", "enumerate": "legal_steps"}  # search.candidates -> GRPO's action space
ADVANTAGE_EPS = 1e-4  # (r - mean) / (std + eps)


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """GRPO's options (see the module docstring for their Tunix names)."""

    group_size: int = 8
    clip_eps: float = 0.2
    updates_per_batch: int = 1
    kl_beta: float = 0.0
    dr_grpo: bool = False
    temperature: float = 1.0
    format_reward: float = 0.0
    token_budget: int = 0  # > 0: an iteration plays problems until rollouts + learner reach this many forwards
    minibatch_size: int = 64
    action_space: str = "steps"  # "steps" (free generation) | "legal_steps"
    length_normalize: bool = False  # legal steps: the prior's log-likelihood per model-written token


def grpo_settings(config: ConfigDict, task: Task | None = None) -> GRPOSettings:
    """The config's ``grpo`` section (and the loop's batch sizes) checked; raises ``ConfigError`` naming the fix.

    Given the ``task``, also checks that legal steps can be enumerated when asked.
    """
    g, sp = config.grpo, config.selfplay
    candidates = config.search.candidates
    if candidates not in ACTION_SPACES:
        raise ConfigError(
            f"selfplay.algorithm=grpo with search.candidates={candidates!r}: GRPO's policy writes whole steps "
            f"('sample': free generation) or picks one of the task's legal steps ('enumerate'); token-level "
            f"candidates are a search setting with no GRPO policy. Set search.candidates to 'sample' or 'enumerate'")
    if g.group_size < 2:
        raise ConfigError(f"grpo.group_size={g.group_size}: GRPO's advantage compares the chains of one problem, "
                          f"and a group of one has nothing to compare with (its advantage is always 0); use 2 or "
                          f"more (Tunix: num_generations)")
    if not 0.0 < g.clip_eps < 1.0:
        raise ConfigError(f"grpo.clip_eps={g.clip_eps} is outside (0, 1): the ratio is clipped to "
                          f"[1 - clip_eps, 1 + clip_eps]; use e.g. 0.2 (Tunix: epsilon)")
    if g.updates_per_batch < 1:
        raise ConfigError(f"grpo.updates_per_batch={g.updates_per_batch}: use 1 or more epochs over each rollout "
                          f"batch (Tunix: num_iterations)")
    if g.kl_beta < 0:
        raise ConfigError(f"grpo.kl_beta={g.kl_beta} is negative; use 0 (no KL penalty) or a positive weight")
    if g.kl_beta > 0:
        check_reference(config)
    if not g.temperature > 0:
        raise ConfigError(f"grpo.temperature={g.temperature} must be > 0 (the rollouts sample from the policy)")
    if not 0.0 <= g.format_reward < 1.0:
        raise ConfigError(f"grpo.format_reward={g.format_reward} must be in [0, 1): an unsolved chain may earn at "
                          f"most that much for its valid steps, less than a solved chain's 1")
    if g.token_budget < 0:
        raise ConfigError(f"grpo.token_budget={g.token_budget} is negative; use 0 (every one of "
                          f"selfplay.episodes_per_iteration problems) or the token forwards one iteration may spend")
    if candidates == "enumerate" and task is not None:
        try:
            jax.eval_shape(task.legal_steps, task.init_state(task.generate(0, 1)[0]))
        except NotImplementedError as e:
            raise ConfigError(f"selfplay.algorithm=grpo with search.candidates='enumerate' needs a legal-step "
                              f"generator: {e}; use search.candidates='sample'") from e
    return GRPOSettings(group_size=g.group_size, clip_eps=g.clip_eps, updates_per_batch=g.updates_per_batch,
                        kl_beta=g.kl_beta, dr_grpo=g.dr_grpo, temperature=g.temperature,
                        format_reward=g.format_reward, token_budget=g.token_budget,
                        minibatch_size=sp.learner_batch_size,
                        action_space=ACTION_SPACES[candidates],
                        length_normalize=config.search.length_normalize)


def check_reference(config: ConfigDict) -> None:
    """A KL penalty needs a frozen reference policy: ``grpo.reference`` (a run with a checkpoint) or this run's SFT."""
    from alphareason.run import CHECKPOINT_PHASES, checkpoint_dir  # noqa: PLC0415
    g = config.grpo
    if g.reference:
        found = any(os.path.isdir(checkpoint_dir(g.reference, phase)) and os.listdir(checkpoint_dir(g.reference, phase))
                    for phase in CHECKPOINT_PHASES)
        if not found:
            raise ConfigError(f"grpo.kl_beta={g.kl_beta} with grpo.reference={g.reference!r}: that directory holds "
                              f"no checkpoint (checkpoints/sft or checkpoints/selfplay) to be the reference policy; "
                              f"point it at a trained run, or leave it empty to use this run's SFT checkpoint")
    elif config.train.steps == 0:
        raise ConfigError(f"grpo.kl_beta={g.kl_beta} needs a frozen reference policy, but train.steps=0 makes no SFT "
                          f"checkpoint to be it; set grpo.kl_beta=0 (no KL penalty, as Dr. GRPO and DAPO) or "
                          f"grpo.reference=<a run directory with a checkpoint>")


def steps_per_iteration(settings: GRPOSettings, num_chains: int, row_tokens: int = 0) -> int:
    """The most learner steps one iteration takes: for the learning-rate schedule.

    Every one of ``num_chains`` chains has signal or, with ``token_budget`` (and the learner's
    ``row_tokens``: ``learner_row_tokens``), the whole budget goes to the learner.
    """
    u, m = settings.updates_per_batch, settings.minibatch_size
    steps = u * math.ceil(num_chains / m)
    if settings.token_budget and row_tokens:
        steps = min(steps, max(u, u * (settings.token_budget // ((1 + 3 * u) * m * row_tokens))))
    return steps


def learner_row_tokens(task: Task, settings: GRPOSettings, seq_len: int) -> int:
    """Token forwards of one chain's row in a learner pass: the context (free generation), or every state's
    prefix and legal candidates (legal steps)."""
    if settings.action_space == "steps":
        return seq_len
    K = ReasoningEnv(task, None, EnvConfig(candidates="enumerate"), seq_len=seq_len).num_candidates
    return task.max_steps * (seq_len + K * task.max_step_len)


# --------------------------------------------------------------- pure pieces
def group_advantages(rewards: jax.Array, *, scale_by_std: bool = True) -> jax.Array:
    """Group-relative advantages: f32[P, G] -> f32[P, G].

    ``(r - mean) / (std + eps)`` within each row (population std), or
    ``r - mean`` when ``scale_by_std`` is False (Dr. GRPO). A row of equal
    rewards gives exactly 0.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not scale_by_std:
        return centred
    return centred / (jnp.std(rewards, axis=1, keepdims=True) + ADVANTAGE_EPS)


def has_signal(rewards: np.ndarray) -> np.ndarray:
    """bool[P]: the group's rewards f32[P, G] are not all equal (its advantages are not all 0)."""
    return np.any(rewards != rewards[:, :1], axis=1)


def grpo_loss(logp, old_logp, ref_logp, mask, advantage, weight, *, clip_eps: float, kl_beta: float = 0.0,
              dr_grpo: bool = False, max_decisions: int | None = None):
    """The GRPO objective (to minimise) of a batch of chains, and its metrics.

    Per decision t of chain i: ``ratio = exp(logp - old_logp)``,
    ``surrogate = -min(ratio * A_i, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A_i)``,
    ``kl = exp(ref_logp - logp) - (ref_logp - logp) - 1`` (k3), and
    ``l_it = surrogate + kl_beta * kl``. Per chain: the mean of ``l_it``
    over its decisions (GRPO), or their sum divided by ``max_decisions``
    (Dr. GRPO); the loss is the ``weight``-weighted mean over chains.

    Args:
      logp: f32[N, D], log-probabilities of the decisions under the policy being trained.
      old_logp: f32[N, D], under the rollout policy (constants).
      ref_logp: f32[N, D] under the reference policy, or None (needs ``kl_beta == 0``).
      mask: bool or f32[N, D], 1 where the chain made a decision (prompt,
        tool-written tokens and padding are 0).
      advantage: f32[N]; weight: f32[N], 0 for padding rows.
      max_decisions: Dr. GRPO's constant divisor (default D).
    Returns:
      ``(loss, metrics)``; metrics: ``surrogate``, ``kl`` (when ``kl_beta``),
      ``clip_fraction`` (decisions whose gradient the clip removes),
      ``ratio``, ``rollout_kl`` (mean ``old_logp - logp``), means over the
      weighted decisions.
    """
    mask = jnp.asarray(mask, jnp.float32) * jnp.asarray(weight, jnp.float32)[:, None]
    adv = jnp.asarray(advantage, jnp.float32)[:, None]
    log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = -jnp.minimum(ratio * adv, clipped * adv)
    per_decision = surrogate
    metrics = {}
    if kl_beta:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs the reference policy's log-probabilities (ref_logp)")
        ref_log_ratio = jnp.where(mask > 0, ref_logp - logp, 0.0)
        kl = jnp.exp(ref_log_ratio) - ref_log_ratio - 1.0
        per_decision = per_decision + kl_beta * kl
    decisions = jnp.sum(mask, axis=1)
    denominator = float(max_decisions or logp.shape[1]) if dr_grpo else jnp.maximum(decisions, 1.0)
    per_chain = jnp.sum(per_decision * mask, axis=1) / denominator
    weight = jnp.asarray(weight, jnp.float32)
    loss = jnp.sum(per_chain * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    def mean(x):
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    clip_active = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
    metrics.update(surrogate=mean(surrogate), clip_fraction=mean(clip_active.astype(jnp.float32)),
                   ratio=mean(ratio), rollout_kl=mean(-log_ratio))
    if kl_beta:
        metrics["kl"] = mean(kl)
    return loss, metrics


def token_logprobs(model, tokens, *, temperature: float = 1.0):
    """Free generation's policy: every next token under the sampler's distribution.

    Args:
      tokens: int32[N, T] chains.
    Returns:
      (logp f32[N, T-1] of ``tokens[:, 1:]``, entropy f32[N, T-1]) at
      ``temperature``, PAD and BOS excluded (they are never sampled).
    """
    logits, _ = model(tokens)
    logits = logits[:, :-1].astype(jnp.float32) / temperature
    logits = logits.at[..., jnp.array([tok.PAD, tok.BOS])].set(NEG_INF)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return logp, entropy


def step_logprobs(model, task: Task, tokens, start, candidates, cand_valid, action, *, temperature: float = 1.0,
                  length_normalize: bool = False):
    """The policy over legal steps: softmax of the candidates' log-likelihoods (the search's prior) at ``temperature``.

    Args:
      tokens: int32[N, T] chains; start: int32[N, M], where decision m's state ends.
      candidates: int32[N, M, K, S]; cand_valid: bool[N, M, K]; action: int32[N, M].
    Returns:
      (logp f32[N, M] of the actions taken, entropy f32[N, M] over the valid candidates).
    """
    N, M, K, S = candidates.shape
    logits, _ = candidate_logits(model, task, jnp.repeat(tokens, M, axis=0), start.reshape(N * M),
                                 candidates.reshape(N * M, K, S), cand_valid.reshape(N * M, K),
                                 length_normalize=length_normalize)
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(log_probs, action.reshape(N * M, 1), axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.where(cand_valid.reshape(N * M, K), jnp.exp(log_probs) * log_probs, 0.0), axis=-1)
    return logp.reshape(N, M), entropy.reshape(N, M)


def decision_mask(task: Task, tokens, prompt_length, length):
    """bool[N, T-1]: ``tokens[:, t + 1]`` was written by the model (after the prompt, before ``length``, not by the tool).

    The chain is split into steps as the sampler wrote them (a step ends at
    SEP or EOS, or after S tokens) and the task's ``tool_written`` judges
    each step. Jittable.

    Args:
      tokens: int32[N, T]; prompt_length, length: int32[N].
    """
    S = task.max_step_len
    N, T = tokens.shape

    def one(row, p, n):
        def advance(carry, t):
            step, pos = carry
            inside = (t >= p) & (t < n)
            ends = inside & ((row[t] == tok.SEP) | (row[t] == tok.EOS) | (pos + 1 == S))
            out = (jnp.where(inside, step, T), pos)  # T: outside the chain, dropped below
            return (step + ends, jnp.where(ends, 0, pos + inside)), out

        _, (step, pos) = jax.lax.scan(advance, (jnp.int32(0), jnp.int32(0)), jnp.arange(T))
        steps = jnp.full((T, S), tok.PAD, jnp.int32).at[step, pos].set(row, mode="drop")  # [T steps at most, S]
        by_tool = task.tool_written(steps)[jnp.minimum(step, T - 1), pos]
        return ((step < T) & ~by_tool)[1:]

    return jax.vmap(one)(tokens, jnp.asarray(prompt_length, jnp.int32), jnp.asarray(length, jnp.int32))


# ------------------------------------------------------------------- buffer
class RolloutBuffer:
    """One iteration's rollouts: up to ``capacity`` chains (groups of G consecutive rows) as numpy arrays.

    Saved as the ``replay`` item of every self-play checkpoint, like the
    ``ReplayBuffer`` of the search-based algorithms (a resumed iteration
    plays its rollouts again, so it is kept for inspection, not needed):
    only the rows it holds (``state_dict``), restored through ``restore_template``.
    """

    def __init__(self, capacity: int, fields: dict[str, tuple[tuple[int, ...], Any]]):
        self.capacity = capacity
        self.data = {name: np.zeros((capacity,) + shape, dtype) for name, (shape, dtype) in fields.items()}
        self.counters = np.zeros((1,), np.int64)  # chains held

    @property
    def size(self) -> int:
        return int(self.counters[0])

    def clear(self) -> None:
        self.counters[0] = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(batch["reward"])
        if self.size + n > self.capacity:
            raise ValueError(f"rollout buffer of {self.capacity} chains cannot take {n} more (holds {self.size})")
        for name, array in self.data.items():
            array[self.size: self.size + n] = batch[name]
        self.counters[0] += n

    def rows(self) -> dict[str, np.ndarray]:
        return {name: array[: self.size] for name, array in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        """The chains held (``size`` rows of each field) and the counter: what a checkpoint keeps."""
        return {"data": self.rows(), "counters": self.counters}

    def restore_template(self, saved_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, Any]:
        """Zeros in the structure of a checkpoint's ``replay``: as many chains as it saved.

        ``saved_shapes`` is ``Checkpointer.saved_shapes``' answer; where it is
        None (unreadable), a template of the capacity lets the restore name the problem.
        """
        rows = (saved_shapes or {}).get("data.reward", (self.capacity,))[0]
        return {"data": {k: np.zeros((rows,) + v.shape[1:], v.dtype) for k, v in self.data.items()},
                "counters": np.zeros_like(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(np.asarray(state["counters"])[0])
        if n > self.capacity:
            raise ValueError(f"the saved rollouts hold {n} chains, more than this run's buffer of {self.capacity} "
                             f"(selfplay.episodes_per_iteration x grpo.group_size); restore with the saved config")
        for k, v in state["data"].items():
            self.data[k][:n] = np.asarray(v)[:n]
        self.counters = np.asarray(state["counters"], np.int64).copy()


# ---------------------------------------------------------- actor + learner
POLICY_INPUTS = {"steps": ("tokens",), "legal_steps": ("tokens", "start", "candidates", "cand_valid", "action")}


class GRPO:
    """GRPO's actor and learner for one task and model graph; compiled once per shape.

    ``graphdef`` is the model's (``nnx.split(model)[0]``), ``train_graphdef``
    the split ``(model, optimizer)``'s that ``learner_step`` updates.
    ``place`` (optional) puts a batch on devices (``parallel.shard_batch``);
    ``state_sharding`` (optional, ``parallel.state_shardings``) keeps the
    learner's new state where the old one lived.
    """

    def __init__(self, task: Task, graphdef, train_graphdef, settings: GRPOSettings, *, seq_len: int,
                 traces: bool = False, place: Callable[[Any], Any] | None = None, state_sharding: Any = None):
        self.task, self.graphdef, self.settings, self.seq_len = task, graphdef, settings, seq_len
        self.place = place or (lambda tree: tree)
        legal = settings.action_space == "legal_steps"
        self.env = ReasoningEnv(task, graphdef, EnvConfig(candidates="enumerate" if legal else "sample"),
                                seq_len=seq_len)
        T, S, M = seq_len, task.max_step_len, task.max_steps
        fields = {"tokens": ((T,), np.int32), "prompt_length": ((), np.int32), "length": ((), np.int32),
                  "reward": ((), np.float32), "solved": ((), bool), "advantage": ((), np.float32),
                  "signal": ((), bool)}
        if legal:
            K = self.env.num_candidates
            fields.update(mask=((M,), bool), start=((M,), np.int32), candidates=((M, K, S), np.int32),
                          cand_valid=((M, K), bool), action=((M,), np.int32))
            self.max_decisions = M
            self._rollout = jax.jit(self._legal_rollout, static_argnames=("lanes",))
        else:
            fields["mask"] = ((T - 1,), bool)
            self.decoder = ChainDecoder(task, graphdef, seq_len=seq_len, traces=traces)
            self.max_decisions = (task.max_trace_steps if traces else task.max_steps) * S
            self._mask = jax.jit(lambda t, p, n: decision_mask(task, t, p, n))
        self.fields = fields
        self.row_tokens = learner_row_tokens(task, settings, seq_len)  # legal steps: M states x (prefix + K steps)
        self._logprobs = jax.jit(self._policy_logprobs_of_params)
        self.learner_step = self._make_learner_step(train_graphdef, state_sharding)

    # ------------------------------------------------------------ rollouts
    def buffer(self, num_problems: int) -> RolloutBuffer:
        """An empty buffer for one iteration of ``num_problems`` problems."""
        return RolloutBuffer(num_problems * self.settings.group_size, self.fields)

    def play(self, params, problems: list[Problem], keys) -> dict[str, Any]:
        """G chains for each problem: numpy rows ``p * G + g`` with ``fields``, plus ``token_forwards`` int64[P].

        ``keys``: one typed PRNG key per problem; chain g uses ``fold_in(keys[p], g)``.
        """
        s, G = self.settings, self.settings.group_size
        inputs = self.place(jax.tree.map(jnp.asarray, self.env.initial(problems)))
        keys = self.place(keys)
        P = len(problems)
        if s.action_space == "steps":
            out = self.decoder(params, keys, inputs, lanes=G, temperature=s.temperature)
            tokens = out["tokens"].reshape(P * G, -1)
            prompt = jnp.repeat(out["prompt"], G)
            length = out["length"].reshape(P * G)
            rows = {"tokens": tokens, "prompt_length": prompt, "length": length,
                    "mask": self._mask(tokens, prompt, length), "token_forwards": out["spent"],
                    "computed_token_forwards": out["computed"]}
        else:
            rows = self._rollout(params, keys, inputs["tokens"], inputs["length"], inputs["task_state"],
                                 jnp.float32(s.temperature), lanes=G)
            rows["prompt_length"] = jnp.repeat(inputs["length"], G)
        rows = jax.tree.map(np.asarray, rows)
        rows["token_forwards"] = rows["token_forwards"].astype(np.int64)
        rows["computed_token_forwards"] = rows["computed_token_forwards"].astype(np.int64)
        reward, solved = self.rewards(problems, rows)
        advantage = np.asarray(group_advantages(reward.reshape(P, G), scale_by_std=not s.dr_grpo)).reshape(P * G)
        rows.update(reward=reward, solved=solved, advantage=advantage,
                    signal=np.repeat(has_signal(reward.reshape(P, G)), G))
        return rows

    def rewards(self, problems: list[Problem], rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(reward f32[N], solved bool[N]) from the task's Python verifier on each chain's text."""
        G, task = self.settings.group_size, self.task
        reward = np.zeros(len(rows["length"]), np.float32)
        solved = np.zeros(len(rows["length"]), bool)
        for i, (tokens, p, n) in enumerate(zip(rows["tokens"], rows["prompt_length"], rows["length"])):
            verdict = task.verify(problems[i // G], tok.decode(tokens[p:n]))
            solved[i] = verdict.solved
            reward[i] = 1.0 if verdict.solved else (
                self.settings.format_reward * min(verdict.num_valid_steps / task.max_steps, 1.0))
        return reward, solved

    def _legal_rollout(self, params, keys, tokens, length, task_state, temperature, *, lanes):
        """G chains per problem over legal steps, recording every decision (jitted)."""
        task, S, T, M, G = self.task, self.task.max_step_len, self.seq_len, self.task.max_steps, lanes
        s = self.settings
        model = nnx.merge(self.graphdef, params)
        B = tokens.shape[0]
        rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731
        lane_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(G)))(keys)
        lane_keys = lane_keys.reshape(B * G)
        carry = dict(tokens=rep(tokens), length=rep(length), state=jax.tree.map(rep, task_state),
                     done=jnp.zeros((B * G,), bool), forwards=jnp.zeros((B * G,), jnp.int32))

        def decide(c, r):
            active = ~c["done"] & (c["length"] + S <= T)
            steps, legal = jax.vmap(task.legal_steps)(c["state"])  # [BG, K, S]
            cands = jnp.where(active[:, None, None], steps, tok.PAD)
            valid = legal & active[:, None]
            logits, _ = candidate_logits(model, task, c["tokens"], c["length"], cands, valid,
                                         length_normalize=s.length_normalize)
            keys_r = jax.vmap(jax.random.fold_in, in_axes=(0, None))(lane_keys, r)
            action = jax.vmap(jax.random.categorical)(keys_r, logits / temperature).astype(jnp.int32)
            moves = active & jnp.any(valid, axis=-1)
            step = jnp.take_along_axis(cands, action[:, None, None], axis=1)[:, 0]
            new_state, ok, step_done, _ = jax.vmap(task.step)(c["state"], step)

            def keep(new, old):
                return jnp.where(moves.reshape(moves.shape + (1,) * (new.ndim - 1)), new, old)

            n = dict(tokens=keep(append_steps(c["tokens"], c["length"], step), c["tokens"]),
                     length=c["length"] + jnp.where(moves, jnp.sum(step != tok.PAD, -1), 0),
                     state=jax.tree.map(keep, new_state, c["state"]),
                     done=c["done"] | ~moves | step_done | ~ok,
                     forwards=c["forwards"] + jnp.where(active, c["length"] + jnp.sum(cands != tok.PAD, (1, 2)), 0))
            return n, dict(start=c["length"], candidates=cands, cand_valid=valid, action=action, mask=moves)

        c, record = jax.lax.scan(decide, carry, jnp.arange(M))
        record = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), record)  # [BG, M, ...]
        # Computed: every decision scores [prefix | K candidates] at full width for all G lanes, M times.
        K, S = record["candidates"].shape[-2:]
        computed = jnp.full((B,), G * M * (T + K * S), jnp.int32)
        return dict(tokens=c["tokens"], length=c["length"], token_forwards=c["forwards"].reshape(B, G).sum(1),
                    computed_token_forwards=computed, **record)

    # ------------------------------------------------------------- learner
    def _policy(self, model, batch):
        s = self.settings
        if s.action_space == "steps":
            return token_logprobs(model, batch["tokens"], temperature=s.temperature)
        return step_logprobs(model, self.task, batch["tokens"], batch["start"], batch["candidates"],
                             batch["cand_valid"], batch["action"], temperature=s.temperature,
                             length_normalize=s.length_normalize)

    def _policy_logprobs_of_params(self, params, batch):
        return self._policy(nnx.merge(self.graphdef, params), batch)[0]

    def _make_learner_step(self, train_graphdef, state_sharding: Any = None) -> Callable:
        s = self.settings

        def step(state, batch):
            model, optimizer = nnx.merge(train_graphdef, state)

            def objective(m):
                logp, entropy = self._policy(m, batch)
                loss, metrics = grpo_loss(logp, batch["old_logp"], batch.get("ref_logp"), batch["mask"],
                                          batch["advantage"], batch["weight"], clip_eps=s.clip_eps,
                                          kl_beta=s.kl_beta, dr_grpo=s.dr_grpo, max_decisions=self.max_decisions)
                mask = batch["mask"] * batch["weight"][:, None]
                metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
                return loss, {**metrics, "loss": loss}

            (_, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
            metrics["grad_norm"] = optax.global_norm(grads)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), metrics

        return jit_state_step(step, state_sharding)

    def learner_data(self, buffer: RolloutBuffer, params, reference=None) -> tuple[dict[str, np.ndarray], int]:
        """The chains of groups with signal, with their rollout (and reference) log-probabilities.

        ``params`` must be the rollout policy's (call before any update).
        Returns the rows and the token forwards the log-probability passes cost.
        """
        rows = buffer.rows()
        keep = np.nonzero(rows["signal"])[0]
        data = {k: rows[k][keep] for k in POLICY_INPUTS[self.settings.action_space] + ("mask", "advantage")}
        forwards = 0
        for name, policy in (("old_logp", params), ("ref_logp", reference)):
            if policy is None:
                continue
            parts = []
            for batch, n in self._chunks(data):
                parts.append(np.asarray(self._logprobs(policy, self.place(batch)))[:n])
                forwards += self.learner_forwards(batch)
            data[name] = np.concatenate(parts) if parts else np.zeros((0,) + data["mask"].shape[1:], np.float32)
        return data, forwards

    def _chunks(self, data: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        size, total = self.settings.minibatch_size, len(data["advantage"])
        for start in range(0, total, size):
            idx = np.arange(start, min(start + size, total))
            yield {k: data[k][_pad_index(idx, size)] for k in POLICY_INPUTS[self.settings.action_space]}, len(idx)

    def minibatches(self, data: dict[str, np.ndarray], rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """``updates_per_batch`` epochs of shuffled minibatches (the last one padded with weight-0 rows)."""
        size, total = self.settings.minibatch_size, len(data["advantage"])
        for _ in range(self.settings.updates_per_batch):
            order = rng.permutation(total)
            for start in range(0, total, size):
                idx = order[start: start + size]
                batch = {k: v[_pad_index(idx, size)] for k, v in data.items()}
                batch["weight"] = (np.arange(size) < len(idx)).astype(np.float32)
                batch["mask"] = batch["mask"] & (batch["weight"][:, None] > 0)
                yield batch

    def learner_forwards(self, batch: dict[str, np.ndarray]) -> int:
        """Token forwards of one pass of ``batch`` through the model (every row, padding included)."""
        return len(batch["tokens"]) * self.row_tokens

    def learner_cost(self, num_chains: int, *, reference: bool = False) -> int:
        """Token forwards the learner spends on ``num_chains`` chains with signal, before it runs.

        The rollout (and ``reference``) log-probability passes once each, then ``updates_per_batch`` epochs
        of loss steps at 3 forwards per token, every pass over minibatches padded to ``minibatch_size``
        rows: exactly what ``learner_data`` and the loop's learner report.
        """
        rows = math.ceil(num_chains / self.settings.minibatch_size) * self.settings.minibatch_size
        passes = 1 + int(reference) + 3 * self.settings.updates_per_batch
        return passes * rows * self.row_tokens


def _pad_index(idx: np.ndarray, size: int) -> np.ndarray:
    """``idx`` padded to ``size`` by repeating its first entry (padding rows get weight 0)."""
    return np.concatenate([idx, np.full(size - len(idx), idx[0], idx.dtype)]) if len(idx) < size else idx


def rollout_metrics(buffer: RolloutBuffer, group_size: int) -> dict[str, float]:
    """Mean reward, solve rate, pass@G, fraction of groups with signal, response length (tokens) and decisions."""
    rows = buffer.rows()
    if not len(rows["reward"]):
        return {}
    solved = rows["solved"].reshape(-1, group_size)
    return {"grpo_mean_reward": float(np.mean(rows["reward"])), "selfplay_solve_rate": float(np.mean(solved)),
            "grpo_pass_at_group": float(np.mean(solved.any(axis=1))),
            "grpo_signal_fraction": float(np.mean(rows["signal"].reshape(-1, group_size)[:, 0])),
            "grpo_response_tokens": float(np.mean(rows["length"] - rows["prompt_length"])),
            "grpo_decisions": float(np.mean(rows["mask"].sum(axis=1)))}
