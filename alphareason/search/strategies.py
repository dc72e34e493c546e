"""Test-time compute strategies under one compute accounting (Snell et al. 2024, in miniature).

This module owns the strategies that turn a compute budget into one answer
per problem, and the rules that size and cap them. A budget is a number of
**model token forwards** per problem (tokens pushed through the transformer,
prefill and decode both, as counted in ``model/sampling.py`` and
``search/env.py``). Every strategy derives its size (samples, beams or
simulations) from the budget and a per-generation cost estimate, never
spends more than the budget, and reports exactly what it spent.

Strategies (``StrategyConfig.name``):

  ``greedy``         one chain of thought, argmax at every token;
  ``sample``         one chain at ``temperature``;
  ``best_of_n``      N chains, the one the value head ranks highest at its
                     end (outcome-verifier style);
  ``weighted_vote``  N chains, the final answer (``Verdict.answer``) whose
                     chains' values sum highest; the best chain with it;
  ``majority_vote``  N chains, the most frequent final answer (self-consistency);
  ``beam``           step-level beam search guided by the value head
                     (process-verifier style, as in the paper): N candidate
                     steps per round, the best N/M partial chains continue
                     with M new steps each; the final chain is the one the
                     value head ranks highest;
  ``mcts_puct``      one episode per problem of the project's MCTS
  ``mcts_gumbel``    (``Searcher``: PUCT or Gumbel MuZero), a search before
                     every step, the simulations sized to the budget.

Learned selection and the exact verifier are kept apart. The strategies
above choose with the value head only: they never read whether a chain is
solved or whether its steps are legal (for arithmetic, legality *is*
correctness). ``StrategyConfig(verifier=True)`` is the separate, clearly
labelled oracle option (label suffix ``+verifier``): ``best_of_n`` and
``beam`` then return a chain the task's exact verifier accepts if they
found one, and MCTS scores finished chains with the verifier's reward (the
environment's default, ``ReasoningEnv``) instead of the value head. Two
things every strategy does see: where a chain ends (the environment stops a
chain when the task's transition says it is done, solved or not, as every
decoder of the project does), and, for MCTS only, the environment's masking
of illegal candidate steps (``ReasoningEnv``; for Countdown and Game24 these
are the rules of the game: numbers in hand, exact division).

Voting needs a final answer that the problem does not give away: for
arithmetic the product; for Countdown / Game24 ``Verdict.answer`` is the
last number, and the problem states the target, so a vote over it would be
verifier selection in disguise. ``has_votable_answer`` says which tasks vote.

Compute. ``generation_cost`` (the budget unit, "one generation") is the most
one chain of thought can cost: the longest prompt plus ``max_steps`` steps
of ``max_step_len`` tokens. The sampling strategies prefill each prompt
once and sample their N chains through copies of its KV cache, so N chains
cost ``prompt + sum(chain tokens)``; ``N = (budget - max_prompt_len) //
cost_estimate`` where ``cost_estimate`` (default: the most a chain can
cost, ``max_steps * max_step_len``) is the per-generation estimate. Before
each step a chain may only start if the budget still covers a full step for
it and every lower-numbered chain of its problem (``max_step_len`` tokens
each); chains that cannot start are cut (never selected). With the default
estimate no chain is ever cut, so one generation of budget is exactly one
complete chain. MCTS cannot stop in the middle of a search, so its
simulations are sized for the worst case: every expansion prefills at most
``generation_cost`` tokens and samples ``K`` candidates of at most
``max_step_len`` tokens, and every episode runs ``max_steps`` searches.

Counting is done next to the model calls (the jitted decoders sum the
active rows they push through ``decode`` and the prompt lengths they
prefill; the ``Searcher`` sums its nodes' expansions), and
``TokenCountingModel`` wraps a model to count the same forwards
independently, from inside ``prefill`` / ``decode``, so a test can compare.

Randomness: a problem's key is ``fold_in(key, problem_id)``, chain (lane)
``j`` of it uses ``fold_in(problem_key, j)``, so a problem's chains do not
depend on the batch or on N: the first n chains of an N-chain run are the
chains of an n-chain run. ``StrategyRunner.run_budgets`` uses this to serve
all budgets of the sampling strategies from one set of samples.

Shapes: ``B`` problems, ``N`` chains (lanes) per problem, ``T`` the
sequence length, ``S`` the tokens per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.model import tile_cache
from alphareason.model.sampling import sample_step
from alphareason.search.env import INPUT_KEYS, EnvConfig, ReasoningEnv, append_steps
from alphareason.search.episodes import prompt_lengths
from alphareason.search.mcts import SearchConfig, Searcher, greedy_action, node_expansions
from alphareason.tasks import Problem, Task

STRATEGIES = ("greedy", "sample", "best_of_n", "weighted_vote", "majority_vote", "beam", "mcts_puct",
              "mcts_gumbel")
SAMPLING = ("greedy", "sample", "best_of_n", "weighted_vote", "majority_vote")  # share one set of chains
VOTING = ("weighted_vote", "majority_vote")
MCTS = {"mcts_puct": "puct", "mcts_gumbel": "gumbel"}
WITH_VERIFIER_OPTION = ("best_of_n", "beam", "mcts_puct", "mcts_gumbel")
VOTABLE_TASKS = ("arithmetic",)


def has_votable_answer(task: Task) -> bool:
    """Whether majority / weighted voting applies: the final answer is not stated in the problem."""
    return bool(getattr(task, "votable_answer", task.name in VOTABLE_TASKS))


# ------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """One strategy and its settings (the budget is given separately, per run).

    Attributes:
      name: one of ``STRATEGIES``.
      temperature: sampling temperature of chains / beam proposals / MCTS
        candidates; 0 means argmax (``greedy`` ignores it).
      top_p: nucleus threshold for the sampled tokens.
      beam_width: M, new steps per kept beam (``beam``); the beam keeps
        N/M partial chains. 1 is best-of-N.
      num_candidates: K, candidate steps per MCTS node.
      verifier: use the task's exact verifier to choose among finished
        chains (oracle option; only ``best_of_n``, ``beam`` and MCTS).
    """

    name: str
    temperature: float = 0.7
    top_p: float = 1.0
    beam_width: int = 4
    num_candidates: int = 4
    verifier: bool = False

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"strategy {self.name!r}: choose one of {', '.join(STRATEGIES)}")
        if self.verifier and self.name not in WITH_VERIFIER_OPTION:
            raise ValueError(f"strategy {self.name!r} has no verifier option; it exists for "
                             f"{', '.join(WITH_VERIFIER_OPTION)}")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.beam_width < 1:
            raise ValueError(f"beam_width={self.beam_width} must be >= 1")
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates={self.num_candidates} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.name == "greedy" or self.temperature == 0

    @property
    def label(self) -> str:
        """A short unique name, e.g. ``beam(M=4,t=0.7)``, ``best_of_n(t=0.7)+verifier``."""
        if self.name == "greedy":
            return "greedy"
        t = f"t={self.temperature:g}" + (f",p={self.top_p:g}" if self.top_p < 1 else "")
        if self.name == "beam":
            text = f"beam(M={self.beam_width},{t})"
        elif self.name in MCTS:
            text = f"{self.name}(K={self.num_candidates},{t})"
        else:
            text = f"{self.name}({t})"
        return text + ("+verifier" if self.verifier else "")

    @property
    def family(self) -> str:
        """``sampling``, ``beam`` or ``mcts``."""
        return "sampling" if self.name in SAMPLING else "beam" if self.name == "beam" else "mcts"


def parse_strategy(text: str, *, temperature: float | None = None) -> StrategyConfig:
    """``"beam:M=4,t=0.7"``, ``"best_of_n:t=1.0,verifier"``, ``"mcts_gumbel:K=8"`` -> StrategyConfig.

    ``temperature``: the default when the text sets none (else the dataclass default).
    """
    name, _, rest = text.strip().partition(":")
    keys = {"t": "temperature", "temperature": "temperature", "p": "top_p", "top_p": "top_p",
            "M": "beam_width", "beam_width": "beam_width", "K": "num_candidates", "num_candidates": "num_candidates"}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if item == "verifier":
            kwargs["verifier"] = True
            continue
        k, eq, v = item.partition("=")
        if not eq or k not in keys:
            raise ValueError(f"strategy {text!r}: setting {item!r} is not one of t=, p=, M=, K=, verifier")
        field = keys[k]
        try:
            kwargs[field] = int(v) if field in ("beam_width", "num_candidates") else float(v)
        except ValueError:
            raise ValueError(f"strategy {text!r}: {k}={v!r} is not a number") from None
    if temperature is not None:
        kwargs.setdefault("temperature", float(temperature))
    return StrategyConfig(name=name, **kwargs)


@dataclasses.dataclass
class StrategyResult:
    """One strategy at one budget on a list of problems (numpy)."""

    config: StrategyConfig
    budget: int  # token forwards allowed per problem
    size: int  # chains N (sampling, beam) or simulations per move (MCTS); 0: the budget is too small
    texts: list[str]  # the chosen chain of thought per problem
    solved: np.ndarray  # bool[B], the task's Python verifier on ``texts``
    token_forwards: np.ndarray  # int64[B], spent per problem (<= budget)
    beam_width: int = 0  # the M used (beam)
    idle_token_forwards: int = 0  # computed but charged to no problem: batch padding, unused search nodes

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def feasible(self) -> bool:
        return self.size > 0

    def rows(self, problems: Sequence[Problem], task: Task) -> list[dict[str, Any]]:
        """Results-file rows (JSONL): problem, solution, solved, strategy, compute."""
        return [{"problem": p, "solution": t, "solved": bool(s), "strategy": self.label, "budget": self.budget,
                 "size": self.size, "token_forwards": int(f), "difficulty": task.difficulty(p)}
                for p, t, s, f in zip(problems, self.texts, self.solved, self.token_forwards)]


# ------------------------------------------------------------- selection
def select_by_value(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """values f32[B, N], candidates bool[B, N] -> int[B]: the highest-valued candidate (lane 0 if none)."""
    scores = np.where(candidates, values, -np.inf)
    best = np.argmax(scores, axis=1)
    return np.where(candidates.any(axis=1), best, 0)


def select_by_verifier(solved: np.ndarray, candidates: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The first candidate the exact verifier accepts; else the highest-valued one (oracle option)."""
    ok = solved & candidates
    return np.where(ok.any(axis=1), np.argmax(ok, axis=1), select_by_value(values, candidates))


def select_by_vote(answers: Sequence[Sequence[Any]], candidates: np.ndarray,
                   values: np.ndarray | None = None) -> np.ndarray:
    """Self-consistency: the most frequent final answer among the candidates (``values`` None), or
    the answer whose candidates' values sum highest (weighted voting). Chains without an answer
    (``None``) do not vote.

    Ties go to the answer seen first (lowest lane). The returned chain is the first candidate with
    the winning answer (majority) or its highest-valued one (weighted). A problem where no
    candidate has an answer falls back to lane 0 (majority) or the best value (weighted).

    Args:
      answers: ``B`` sequences of ``N`` answers (any hashable, or None).
      candidates: bool[B, N].
      values: f32[B, N] or None.
    Returns: int[B], the chosen lane per problem.
    """
    B = len(answers)
    chosen = np.zeros((B,), np.int64)
    for b in range(B):
        tally: dict[Any, float] = {}
        first: dict[Any, int] = {}
        for j, a in enumerate(answers[b]):
            if a is None or not candidates[b, j]:
                continue
            tally[a] = tally.get(a, 0.0) + (1.0 if values is None else float(values[b, j]))
            first.setdefault(a, j)
        if not tally:
            chosen[b] = 0 if values is None else int(select_by_value(values[b:b + 1], candidates[b:b + 1])[0])
            continue
        winner = max(tally, key=lambda a: (tally[a], -first[a]))
        if values is None:
            chosen[b] = first[winner]
        else:
            lanes = [j for j, a in enumerate(answers[b]) if a == winner and candidates[b, j]]
            chosen[b] = max(lanes, key=lambda j: (values[b, j], -j))
    return chosen


def beam_sources(value: jax.Array, expandable: jax.Array, frozen: jax.Array, beam_width: int):
    """Which lane every slot copies for the next round of beam search (jittable).

    Finished chains (``frozen``) keep their slots. The other slots are filled
    in order with ``beam_width`` copies each of the best expandable chains
    (highest ``value`` first, ties to the lower lane): with nothing frozen,
    N/M beams of M copies. Slots left over when too few chains can be
    expanded are emptied.

    Args:
      value: f32[B, N]; expandable, frozen: bool[B, N] (disjoint).
    Returns:
      (src int32[B, N], filled bool[B, N]).
    """
    N = value.shape[1]
    score = jnp.where(expandable, value, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)
    num_beams = jnp.sum(expandable, axis=1, keepdims=True)
    free = ~frozen
    beam = (jnp.cumsum(free, axis=1) - 1) // beam_width
    src = jnp.where(frozen, jnp.arange(N)[None], jnp.take_along_axis(order, jnp.clip(beam, 0, N - 1), axis=1))
    return src.astype(jnp.int32), frozen | (free & (beam < num_beams))


# ------------------------------------------------------ compute accounting
def lanes_for_budget(budget: int, *, prompt_cost: int, chain_cost: float) -> int:
    """N chains that fit a budget: ``(budget - prompt_cost) // chain_cost`` (0: not even one)."""
    return max(0, int((budget - prompt_cost) // max(chain_cost, 1)))


def simulations_for_budget(budget: int, *, moves: int, expansion_cost: int) -> int:
    """Simulations per move such that ``moves * (sims + 1) * expansion_cost <= budget`` (0: none fit)."""
    return max(0, budget // (moves * expansion_cost) - 1)


class TokenCounter:
    """Host-side tally of token forwards, fed by ``TokenCountingModel`` (via ``jax.debug.callback``)."""

    def __init__(self):
        self.prefill = 0
        self.decode = 0

    @property
    def total(self) -> int:
        jax.effects_barrier()
        return self.prefill + self.decode

    def reset(self) -> None:
        jax.effects_barrier()
        self.prefill = self.decode = 0

    def _add_prefill(self, n):
        self.prefill += int(np.sum(n))

    def _add_decode(self, n):
        self.decode += int(np.sum(n))


class TokenCountingModel(nnx.Module):
    """A transformer that counts the token forwards it computes into a ``TokenCounter``.

    ``prefill`` counts the prompt lengths (``sum(lengths)``), ``decode`` the
    active rows (all rows when ``active`` is None): the project's rule of
    counting tokens, not padded lanes. Counting happens on the host through
    ``jax.debug.callback``, so it works inside ``jit``, ``vmap`` and loops;
    it is for tests and audits, not for speed. ``nnx.split`` it like a model.
    """

    def __init__(self, model, counter: TokenCounter):
        self.model = model
        self.counter = counter

    @property
    def config(self):
        return self.model.config

    def init_cache(self, batch_size: int, max_len: int | None = None):
        return self.model.init_cache(batch_size, max_len)

    def __call__(self, tokens):
        jax.debug.callback(self.counter._add_prefill, jnp.asarray(tokens.size, jnp.int32))
        return self.model(tokens)

    def prefill(self, tokens, lengths, cache):
        out = self.model.prefill(tokens, lengths, cache)
        jax.debug.callback(self.counter._add_prefill, jnp.sum(jnp.asarray(lengths, jnp.int32)))
        return out

    def score_continuations(self, tokens, lengths, continuations):
        out = self.model.score_continuations(tokens, lengths, continuations)
        n = jnp.sum(jnp.asarray(lengths, jnp.int32)) + jnp.sum(continuations != tok.PAD, dtype=jnp.int32)
        jax.debug.callback(self.counter._add_prefill, n)  # the prefixes and the continuations' tokens
        return out

    def decode(self, tokens, cache, active=None):
        out = self.model.decode(tokens, cache, active)
        n = jnp.int32(tokens.shape[0]) if active is None else jnp.sum(jnp.asarray(active, jnp.int32))
        jax.debug.callback(self.counter._add_decode, n)
        return out


# ------------------------------------------------------------- MCTS pieces
class LearnedRewardEnv(ReasoningEnv):
    """``ReasoningEnv`` whose finished chains are scored by the value head, not the verifier.

    When a step ends the chain, its reward is the value head's estimate at
    the end of that step (``Node.network_value``: the network's belief that
    the chain is solved) instead of the verifier's 0 / 1. That estimate comes
    from the terminal node's prefill, which ``ReasoningEnv`` computes but does
    not charge (its output is unused there); here it is used, so it is
    charged. Everything else (candidates, masking, transitions) is
    ``ReasoningEnv``.
    """

    def recurrent_fn(self, params, key, action, node):
        out, child = super().recurrent_fn(params, key, action, node)
        ended_here = child.done & ~node.done
        out = out.replace(reward=jnp.where(ended_here, child.network_value, 0.0).astype(jnp.float32))
        child = child.replace(token_forwards=child.token_forwards + jnp.where(ended_here, child.length, 0))
        return out, child


class _StrategySearcher(Searcher):
    """A ``Searcher`` (tree kept) whose environment may be ``LearnedRewardEnv``."""

    def __init__(self, task, graphdef, env_config, search_config, *, seq_len, learned_reward: bool):
        super().__init__(task, graphdef, env_config, search_config, seq_len=seq_len, keep_tree=True)
        if learned_reward:
            self.env = LearnedRewardEnv(task, graphdef, env_config, seq_len=seq_len,
                                        max_depth=search_config.max_depth)
        env = self.env
        self.advance = jax.jit(lambda root, action: {k: v for k, v in env.transition(root, action).items()
                                                     if k in INPUT_KEYS})


def computed_token_forwards(tree) -> np.ndarray:
    """int64[B]: token forwards a search computed, charged or not: every expansion's prefill
    (``length``) plus its decoded candidate tokens, times the node's expansions."""
    emb = tree.embeddings
    per_node = np.asarray(emb.length, np.int64) + np.asarray(emb.cand_length, np.int64).sum(-1)
    return (np.asarray(node_expansions(tree), np.int64) * per_node).sum(-1)


# ------------------------------------------------------------------ runner
def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _pad(items: list, size: int) -> list:
    """Pads a short final batch with copies of its first item so shapes (and compiles) stay fixed."""
    return items + [items[0]] * (size - len(items))


@dataclasses.dataclass
class _Lanes:
    """What a lanes decode returns, on the host: ``B`` problems x ``N`` lanes."""

    tokens: np.ndarray  # int32[B, N, T]
    length: np.ndarray  # int32[B, N]
    candidate: np.ndarray  # bool[B, N]: holds a chain that was not cut by the budget
    value: np.ndarray  # f32[B, N]: value head at the chain's end
    solved: np.ndarray  # bool[B, N]: the task's JAX transition (used by +verifier only)
    spent: np.ndarray  # int64[B]: prompt + every decoded token of the problem
    lane_forwards: np.ndarray  # int64[B, N]: decoded tokens per lane (sampling: without beam)
    prompt: np.ndarray  # int64[B]: prompt tokens prefilled
    cut: np.ndarray  # bool[B, N]: a step was refused for lack of budget
    idle: int = 0  # token forwards of padding rows (charged to no problem)


class StrategyRunner:
    """Runs test-time strategies for one task and one model at given budgets.

    ``runner.run(StrategyConfig("beam"), problems, budget, key)`` returns a
    ``StrategyResult``. Compiled functions are cached per shape and static
    setting (the budget and the temperature are traced, so changing them
    does not recompile; the number of chains N does).

    Args:
      model: a ``Transformer`` (or a ``TokenCountingModel`` around one).
      task: the task.
      cost_estimate: per-chain cost estimate in token forwards used to size N
        (default: ``max_steps * max_step_len``, the most a chain can cost,
        with which no chain is ever cut).
      max_lanes: the most chains decoded in one call (problems x N).
      mcts_batch: problems searched in one call.
    """

    def __init__(self, model, task: Task, *, cost_estimate: float | None = None, max_lanes: int = 2048,
                 mcts_batch: int = 32):
        self.task = task
        self.graphdef, self.params = nnx.split(model)
        self.seq_len = int(model.config.max_len)
        self.step_len = task.max_step_len
        self.chain_cost = task.max_steps * task.max_step_len
        self.generation_cost = task.max_prompt_len + self.chain_cost
        needed = self.generation_cost
        if self.seq_len < needed:
            raise ValueError(f"the model's context ({self.seq_len} tokens) is shorter than the {needed} a chain "
                             f"of thought of task {task.name} can take; use a model built for this task")
        self.cost_estimate = float(cost_estimate) if cost_estimate else float(self.chain_cost)
        if self.cost_estimate <= 0:
            raise ValueError(f"cost_estimate={cost_estimate} must be positive")
        self.max_lanes, self.mcts_batch = max_lanes, mcts_batch
        self._decode = jax.jit(self._decode_impl, static_argnames=("lanes", "beam_width", "greedy", "top_p"))
        self._searchers: dict[tuple, _StrategySearcher] = {}
        self._prompt_env = ReasoningEnv(task, self.graphdef, EnvConfig(num_candidates=1), seq_len=self.seq_len)

    @property
    def exact_prefix(self) -> bool:
        """No chain can be cut, so the first n of N chains are an n-chain run (default estimate)."""
        return self.cost_estimate >= self.chain_cost

    # ------------------------------------------------------------ sizing
    def budget_for(self, generations: float) -> int:
        """Token forwards of ``generations`` generations' worth of budget."""
        return int(round(generations * self.generation_cost))

    def size_for(self, config: StrategyConfig, budget: int) -> tuple[int, int]:
        """(N chains or simulations per move, beam width M used) for a budget; N = 0: infeasible."""
        if config.family == "mcts":
            K, S = config.num_candidates, self.step_len
            return simulations_for_budget(budget, moves=self.task.max_steps,
                                          expansion_cost=self.generation_cost + K * S), 0
        n = lanes_for_budget(budget, prompt_cost=self.task.max_prompt_len, chain_cost=self.cost_estimate)
        if config.name in ("greedy", "sample"):
            return min(n, 1), 0
        if config.name == "beam":
            m = max(1, min(config.beam_width, n))
            return m * (n // m), m
        return n, 0

    # ----------------------------------------------------------- running
    def run(self, config: StrategyConfig, problems: Sequence[Problem], budget: int, key, *,
            problem_ids: Sequence[int] | None = None) -> StrategyResult:
        """Runs one strategy at one budget (token forwards per problem) on ``problems``."""
        problems = list(problems)
        ids = np.arange(len(problems)) if problem_ids is None else np.asarray(problem_ids)
        self._check(config)
        size, width = self.size_for(config, budget)
        if size == 0 or not problems:
            return self._infeasible(config, problems, budget)
        if config.family == "mcts":
            return self._run_mcts(config, problems, budget, key, ids, size)
        lanes = self._lanes(problems, ids, key, size, budget, config.temperature, config.greedy, config.top_p,
                            beam_width=width if config.name == "beam" else 1)
        return self._select(config, problems, lanes, size, budget, width)

    def run_budgets(self, configs: Sequence[StrategyConfig], problems: Sequence[Problem],
                    budgets: Sequence[int], key, *, problem_ids: Sequence[int] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[tuple[str, int], StrategyResult]:
        """Every config at every budget: ``{(label, budget): StrategyResult}``.

        The same as calling ``run`` for each pair, with less work: the
        sampling strategies that share a temperature are served from one set
        of chains (the first N(b) chains for budget b) when no chain can be
        cut (``exact_prefix``).
        """
        problems = list(problems)
        ids = np.arange(len(problems)) if problem_ids is None else np.asarray(problem_ids)
        log = log or (lambda s: None)
        out: dict[tuple[str, int], StrategyResult] = {}
        shared: dict[tuple, list[StrategyConfig]] = {}
        for c in configs:
            self._check(c)
            if c.family == "sampling" and self.exact_prefix:
                shared.setdefault((c.greedy, c.temperature if not c.greedy else 0.0, c.top_p), []).append(c)
        for (greedy, temperature, top_p), group in shared.items():
            sizes = {b: max(self.size_for(c, b)[0] for c in group) for b in budgets}
            n_max = max(sizes.values())
            if n_max == 0:
                for c in group:
                    for b in budgets:
                        out[c.label, b] = self._infeasible(c, problems, b)
                continue
            top = max(budgets, key=lambda b: sizes[b])
            log(f"  {', '.join(c.label for c in group)}: {n_max} chains x {len(problems)} problems")
            pool = self._lanes(problems, ids, key, n_max, top, temperature, greedy, top_p, beam_width=1)
            assert not pool.cut.any(), "a chain was cut although the cost estimate is the worst case"
            for c in group:
                for b in budgets:
                    n = self.size_for(c, b)[0]
                    out[c.label, b] = (self._select(c, problems, _prefix(pool, n), n, b, 0) if n
                                       else self._infeasible(c, problems, b))
        for c in configs:
            if c.family == "sampling" and self.exact_prefix:
                continue
            for b in budgets:
                size = self.size_for(c, b)[0]
                what = "simulations per move" if c.family == "mcts" else "chains"
                log(f"  {c.label} at budget {b}: {what} {size}" if size else
                    f"  {c.label} at budget {b}: too small for one {what[:-1].split()[0]}, skipped")
                out[c.label, b] = self.run(c, problems, b, key, problem_ids=ids)
        return out

    def sample_chains(self, problems: Sequence[Problem], num_samples: int, key, *, temperature: float = 0.7,
                      top_p: float = 1.0, problem_ids: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """``num_samples`` chains per problem, no budget: solved bool[B, N] (Python verifier), the value
        head at each chain's end f32[B, N], and the token forwards per chain int64[B, N] (its decoded
        tokens; the shared prompt not included)."""
        problems = list(problems)
        ids = np.arange(len(problems)) if problem_ids is None else np.asarray(problem_ids)
        budget = self.task.max_prompt_len + num_samples * self.chain_cost
        lanes = self._lanes(problems, ids, key, num_samples, budget, temperature, temperature == 0, top_p,
                            beam_width=1)
        starts = prompt_lengths(self.task, problems)
        solved = np.array([[self.task.verify(p, self._text(lanes, b, j, starts[b])).solved
                            for j in range(num_samples)] for b, p in enumerate(problems)], bool)
        return {"solved": solved, "value": lanes.value, "chain_forwards": lanes.lane_forwards,
                "prompt_forwards": lanes.prompt}

    # ----------------------------------------------------------- internals
    def _check(self, config: StrategyConfig) -> None:
        if config.name in VOTING and not has_votable_answer(self.task):
            raise ValueError(f"{config.name} needs a final answer the problem does not state; task "
                             f"{self.task.name}'s answer is the target it gives (voting would be verifier "
                             f"selection). Voting tasks: {', '.join(VOTABLE_TASKS)}")

    def _infeasible(self, config, problems, budget) -> StrategyResult:
        return StrategyResult(config=config, budget=budget, size=0, texts=[""] * len(problems),
                              solved=np.zeros((len(problems),), bool),
                              token_forwards=np.zeros((len(problems),), np.int64))

    def _text(self, lanes: _Lanes, b: int, j: int, start: int) -> str:
        return tok.decode(lanes.tokens[b, j, start: lanes.length[b, j]])

    def _select(self, config, problems, lanes: _Lanes, size, budget, width) -> StrategyResult:
        B, N = lanes.candidate.shape
        if config.name in ("greedy", "sample"):
            chosen = np.zeros((B,), np.int64)
        elif config.verifier:
            chosen = select_by_verifier(lanes.solved, lanes.candidate, lanes.value)
        elif config.name in VOTING:
            starts = prompt_lengths(self.task, problems)
            answers = [[self.task.verify(p, self._text(lanes, b, j, starts[b])).answer if lanes.candidate[b, j]
                        else None for j in range(N)] for b, p in enumerate(problems)]
            chosen = select_by_vote(answers, lanes.candidate,
                                    lanes.value if config.name == "weighted_vote" else None)
        else:
            chosen = select_by_value(lanes.value, lanes.candidate)
        starts = prompt_lengths(self.task, problems)
        texts = [self._text(lanes, b, int(chosen[b]), starts[b]) for b in range(B)]
        solved = np.array([self.task.verify(p, t).solved for p, t in zip(problems, texts)], bool)
        if config.name in ("greedy", "sample"):
            spent = lanes.prompt + lanes.lane_forwards[:, 0]
        else:
            spent = lanes.spent
        idle = lanes.idle
        if config.name in ("greedy", "sample") and N > 1:
            idle += int((lanes.spent - spent).sum())  # lanes decoded beyond the one used
        return StrategyResult(config=config, budget=budget, size=size, texts=texts, solved=solved,
                              token_forwards=spent.astype(np.int64), beam_width=width, idle_token_forwards=idle)

    def _lanes(self, problems, ids, key, lanes, budget, temperature, greedy, top_p, *, beam_width) -> _Lanes:
        """Decodes ``lanes`` chains per problem in batches of at most ``max_lanes`` chains."""
        per_call = max(1, min(len(problems), self.max_lanes // lanes))
        parts, idle = [], 0
        for start, end in _chunks(len(problems), per_call):
            chunk = _pad(problems[start:end], per_call)
            chunk_ids = np.concatenate([ids[start:end], np.full((per_call - (end - start),), ids[start])])
            inputs = self._prompt_env.initial(chunk)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(chunk_ids))
            out = self._decode(self.params, keys, jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["length"]),
                               jax.tree.map(jnp.asarray, inputs["task_state"]), jnp.int32(budget),
                               jnp.float32(max(temperature, 1e-6)), lanes=lanes, beam_width=beam_width,
                               greedy=bool(greedy), top_p=float(top_p))
            out = jax.tree.map(np.asarray, out)
            idle += int(out["spent"][end - start:].sum())
            parts.append(jax.tree.map(lambda x: x[: end - start], out))
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _Lanes(tokens=cat["tokens"], length=cat["length"], candidate=cat["candidate"], value=cat["value"],
                      solved=cat["solved"], spent=cat["spent"].astype(np.int64),
                      lane_forwards=cat["lane_forwards"].astype(np.int64), prompt=cat["prompt"].astype(np.int64),
                      cut=cat["cut"], idle=idle)

    def _decode_impl(self, params, keys, tokens, length, task_state, budget, temperature, *, lanes, beam_width,
                     greedy, top_p):
        """Prefill each prompt once, then ``max_steps`` rounds: every live lane writes one step.

        Lane j of problem b may write a step only if the problem's spending so
        far plus ``S`` tokens for it and for every live lane before it fits
        the budget; lanes refused are cut. With ``beam_width`` M > 1, before
        every round after the first the slots are refilled by ``beam_sources``.
        """
        task, S, N = self.task, self.step_len, lanes
        model = nnx.merge(self.graphdef, params)
        B = tokens.shape[0]
        cache = model.init_cache(B, self.seq_len)
        logits, value_logits, cache = model.prefill(tokens, length, cache)
        rep = lambda x: jnp.repeat(x, N, axis=0)  # noqa: E731
        lane_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(N)))(keys)
        lane_keys = lane_keys.reshape(B * N)
        BN = B * N
        carry = dict(cache=tile_cache(cache, N), logits=rep(logits), value_logits=rep(value_logits),
                     tokens=rep(tokens), length=rep(length), state=jax.tree.map(rep, task_state),
                     done=jnp.zeros((BN,), bool), solved=jnp.zeros((BN,), bool), holds=jnp.ones((BN,), bool),
                     cut=jnp.zeros((BN,), bool), lane_forwards=jnp.zeros((BN,), jnp.int32),
                     spent=length.astype(jnp.int32))

        def reselect(c):
            value = jax.nn.sigmoid(c["value_logits"]).reshape(B, N)
            expandable = (c["holds"] & ~c["done"]).reshape(B, N)
            frozen = (c["holds"] & c["done"]).reshape(B, N)
            src, filled = beam_sources(value, expandable, frozen, beam_width)
            flat = (jnp.arange(B)[:, None] * N + src).reshape(BN)
            take = lambda x: jnp.take(x, flat, axis=0)  # noqa: E731
            n = dict(c)
            for name in ("logits", "value_logits", "tokens", "length", "done", "solved", "holds", "cut"):
                n[name] = take(c[name])
            n["state"] = jax.tree.map(take, c["state"])
            n["cache"] = jax.tree.map(take, c["cache"])  # every cache leaf is batch-first
            filled = filled.reshape(BN)
            n["holds"] = n["holds"] & filled
            n["done"] = n["done"] | ~filled
            return n

        def one_round(r, c):
            if beam_width > 1:
                c = jax.lax.cond(r > 0, reselect, lambda c: c, c)
            live = (~c["done"]).reshape(B, N)
            need = c["spent"][:, None] + S * jnp.cumsum(live, axis=1)
            allowed = (live & (need <= budget)).reshape(BN)
            cut = ~c["done"] & ~allowed
            tool_fn = None
            if task.tool is not None:
                def tool_fn(step_tokens, step_length):
                    return jax.vmap(task.tool_output)(c["state"], step_tokens, step_length)
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(lane_keys, r)
            sample = sample_step(model, c["cache"], c["logits"], step_keys, max_step_len=S,
                                 temperature=temperature, top_p=top_p, greedy=greedy, tool_fn=tool_fn,
                                 tool_output_len=task.tool_output_len, value_logits=c["value_logits"],
                                 active=allowed)
            new_state, valid, step_done, reward = jax.vmap(task.step)(c["state"], sample.tokens)

            def keep(new, old):
                mask = allowed.reshape(allowed.shape + (1,) * (new.ndim - 1))
                return jnp.where(mask, new, old)

            written = jnp.where(allowed, sample.length, 0)
            n = dict(c)
            n.update(
                tokens=jnp.where(allowed[:, None], append_steps(c["tokens"], c["length"], sample.tokens), c["tokens"]),
                length=c["length"] + written, state=jax.tree.map(keep, new_state, c["state"]),
                solved=jnp.where(allowed, reward > 0, c["solved"]),
                done=c["done"] | cut | (allowed & (step_done | ~valid)),
                holds=c["holds"] & ~cut, cut=c["cut"] | cut,
                lane_forwards=c["lane_forwards"] + written,
                spent=c["spent"] + written.reshape(B, N).sum(axis=1),
                logits=sample.logits, value_logits=sample.value_logits, cache=sample.cache)
            return n

        c = jax.lax.fori_loop(0, task.max_steps, one_round, carry)
        shape = lambda x: x.reshape((B, N) + x.shape[1:])  # noqa: E731
        return {"tokens": shape(c["tokens"]), "length": shape(c["length"]), "candidate": shape(c["holds"]),
                "value": shape(jax.nn.sigmoid(c["value_logits"].astype(jnp.float32))),
                "solved": shape(c["solved"] & c["done"]), "spent": c["spent"],
                "lane_forwards": shape(c["lane_forwards"]), "prompt": length.astype(jnp.int32),
                "cut": shape(c["cut"])}

    # --------------------------------------------------------------- MCTS
    def _searcher(self, config: StrategyConfig, sims: int) -> _StrategySearcher:
        k = (config.name, config.num_candidates, config.temperature, config.top_p, config.verifier, sims)
        if k not in self._searchers:
            env = EnvConfig(num_candidates=config.num_candidates, temperature=max(config.temperature, 1e-6),
                            top_p=config.top_p)
            search = SearchConfig(policy=MCTS[config.name], num_simulations=sims,
                                  max_num_considered_actions=config.num_candidates, dirichlet_fraction=0.0)
            self._searchers[k] = _StrategySearcher(self.task, self.graphdef, env, search, seq_len=self.seq_len,
                                                   learned_reward=not config.verifier)
        return self._searchers[k]

    def _run_mcts(self, config, problems, budget, key, ids, sims) -> StrategyResult:
        """One episode per problem: a search before each move, then its most visited step.

        Searches from finished chains cost nothing (``ReasoningEnv``), so a
        problem's charge does not depend on its batch.
        """
        searcher = self._searcher(config, sims)
        texts, solved, spent, idle = [], [], [], 0
        per_call = min(len(problems), self.mcts_batch)
        for start, end in _chunks(len(problems), per_call):
            n = end - start
            chunk = _pad(problems[start:end], per_call)
            chunk_ids = np.concatenate([ids[start:end], np.full((per_call - n,), ids[start])])
            inputs = jax.tree.map(jnp.asarray, searcher.env.initial(chunk))
            charged = np.zeros((per_call,), np.int64)
            for move in range(searcher.env.max_actions):
                if bool(np.all(np.asarray(inputs["done"]))):
                    break
                move_key = jax.random.fold_in(key, move)
                keys = jax.vmap(lambda i: jax.random.fold_in(move_key, i))(jnp.asarray(chunk_ids))
                result = searcher(self.params, keys, inputs)
                move_charged = np.asarray(result.token_forwards, np.int64)
                charged += move_charged
                idle += int(computed_token_forwards(result.tree).sum() - move_charged[:n].sum())
                inputs = searcher.advance(result.root, greedy_action(result.visit_counts, result.action_weights))
            tokens, length = np.asarray(inputs["tokens"]), np.asarray(inputs["length"])
            starts = prompt_lengths(self.task, chunk)
            for i, p in enumerate(chunk[:n]):
                text = tok.decode(tokens[i, starts[i]: length[i]])
                texts.append(text)
                solved.append(self.task.verify(p, text).solved)
            spent.append(charged[:n])
        return StrategyResult(config=config, budget=budget, size=sims, texts=texts, solved=np.array(solved, bool),
                              token_forwards=np.concatenate(spent), idle_token_forwards=idle)


def _prefix(lanes: _Lanes, n: int) -> _Lanes:
    """The first ``n`` lanes of a decode without beam search, as an n-lane decode would return them."""
    return _Lanes(tokens=lanes.tokens[:, :n], length=lanes.length[:, :n], candidate=lanes.candidate[:, :n],
                  value=lanes.value[:, :n], solved=lanes.solved[:, :n],
                  spent=lanes.prompt + lanes.lane_forwards[:, :n].sum(axis=1), lane_forwards=lanes.lane_forwards[:, :n],
                  prompt=lanes.prompt, cut=lanes.cut[:, :n])


def log2_budgets(max_generations: int, *, min_generations: int = 1) -> list[int]:
    """Generations' worth of budget doubling from ``min_generations`` to ``max_generations``: [1, 2, 4, ...]."""
    if max_generations < min_generations or min_generations < 1:
        raise ValueError(f"budgets from {min_generations} to {max_generations} generations: need 1 <= min <= max")
    out, g = [], min_generations
    while g <= max_generations:
        out.append(g)
        g *= 2
    return out


__all__ = ["STRATEGIES", "StrategyConfig", "StrategyResult", "StrategyRunner", "TokenCounter", "TokenCountingModel",
           "LearnedRewardEnv", "beam_sources", "has_votable_answer", "lanes_for_budget", "log2_budgets",
           "parse_strategy", "select_by_value", "select_by_verifier", "select_by_vote", "simulations_for_budget"]
