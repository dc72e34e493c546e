"""Running test-time strategies at compute budgets (``StrategyRunner``).

``StrategyRunner(model, task).run(StrategyConfig("beam"), problems, budget,
key)`` sizes a strategy to a budget (``eval.budget``), decodes its chains with
the project's one chain decoder (``search.decode.ChainDecoder``: N lanes per
problem, the budget enforced step by step, beam search by the value head) or
plays its MCTS episodes with the one episode runner
(``search.episodes.EpisodeRunner``), chooses one chain per problem
(``eval.select``) and reports what it spent. ``run_budgets`` serves every
budget of the sampling strategies from one set of chains.

Every strategy sees where a chain ends (the task's transition says when it
is done, solved or not, as every decoder of the project does) and, for MCTS
only, the environment's masking of illegal candidate steps (the rules of the
game: numbers in hand, exact division). Only the ``+verifier`` options read
whether a chain is solved: best-of-N and beam then return a chain the exact
verifier accepts if they found one, and MCTS scores finished chains with the
verifier's reward instead of the value head (``EnvConfig.terminal_reward``).

Randomness: a problem's key is ``fold_in(key, problem_id)`` and chain ``j``
of it ``fold_in(problem_key, j)``, so a problem's chains do not depend on
the batch or on N: the first n chains of an N-chain run are the chains of an
n-chain run, which ``run_budgets`` relies on.

On a mesh (``StrategyRunner(..., mesh=...)``) every decode and search
call's problems are split over the devices (padded to a multiple of them;
the padding's compute is charged to no problem).

Shapes: ``B`` problems, ``N`` chains (lanes) per problem, ``T`` the
sequence length, ``S`` the tokens per step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason import parallel
from alphareason import tokenizer as tok
from alphareason.model import flops_per_token
from alphareason.eval.budget import lanes_for_budget, simulations_for_budget
from alphareason.eval.select import select_by_value, select_by_verifier, select_by_vote
from alphareason.eval.strategy import (MCTS, VOTABLE_TASKS, VOTING, StrategyConfig, StrategyResult,
                                       has_votable_answer)
from alphareason.search.decode import ChainDecoder
from alphareason.search.env import EnvConfig, ReasoningEnv
from alphareason.search.episodes import EpisodeRunner, prompt_lengths
from alphareason.search.mcts import SearchConfig, Searcher
from alphareason.tasks import Problem, Task


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
    lane_computed: np.ndarray  # int64[B, N]: token forwards computed per lane (its loop iterations)
    prompt_computed: np.ndarray  # int64[B]: the prompt's padded prefill width
    idle: int = 0  # token forwards of padding rows (charged to no problem)
    idle_computed: int = 0  # token forwards computed for padding rows


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
      mesh: the devices each call's problems are split over (None: one device).
    """

    def __init__(self, model, task: Task, *, cost_estimate: float | None = None, max_lanes: int = 2048,
                 mcts_batch: int = 32, mesh=None):
        self.task, self.mesh = task, mesh
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
        self._decoder = ChainDecoder(task, self.graphdef, seq_len=self.seq_len, mesh=mesh)
        self._searchers: dict[tuple, Searcher] = {}
        self._prompt_env = ReasoningEnv(task, self.graphdef, EnvConfig(num_candidates=1), seq_len=self.seq_len)
        self.flops_per_token = flops_per_token(model.config, self.seq_len)

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
                              token_forwards=np.zeros((len(problems),), np.int64),
                              computed_token_forwards=np.zeros((len(problems),), np.int64),
                              flops_per_token=self.flops_per_token)

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
        computed_all = lanes.prompt_computed + lanes.lane_computed.sum(axis=1)
        if config.name in ("greedy", "sample"):
            spent = lanes.prompt + lanes.lane_forwards[:, 0]
            computed = lanes.prompt_computed + lanes.lane_computed[:, 0]
        else:
            spent, computed = lanes.spent, computed_all
        idle, idle_computed = lanes.idle, lanes.idle_computed
        if config.name in ("greedy", "sample") and N > 1:
            idle += int((lanes.spent - spent).sum())  # lanes decoded beyond the one used
            idle_computed += int((computed_all - computed).sum())
        return StrategyResult(config=config, budget=budget, size=size, texts=texts, solved=solved,
                              token_forwards=spent.astype(np.int64), beam_width=width, idle_token_forwards=idle,
                              computed_token_forwards=computed.astype(np.int64),
                              idle_computed_token_forwards=idle_computed, flops_per_token=self.flops_per_token)

    def _lanes(self, problems, ids, key, lanes, budget, temperature, greedy, top_p, *, beam_width) -> _Lanes:
        """Decodes ``lanes`` chains per problem in batches of at most ``max_lanes`` chains."""
        per_call = parallel.padded_rows(max(1, min(len(problems), self.max_lanes // lanes)), self.mesh)
        parts, idle, idle_computed = [], 0, 0
        for start, end in _chunks(len(problems), per_call):
            chunk = _pad(problems[start:end], per_call)
            chunk_ids = np.concatenate([ids[start:end], np.full((per_call - (end - start),), ids[start])])
            inputs = self._prompt_env.initial(chunk)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(chunk_ids))
            out = self._decoder(self.params, keys, jax.tree.map(jnp.asarray, inputs), lanes=lanes, budget=budget,
                                beam_width=beam_width, greedy=greedy, temperature=temperature, top_p=top_p)
            out = parallel.to_host(out)
            idle += int(out["spent"][end - start:].sum())
            idle_computed += int(out["computed"][end - start:].sum())
            parts.append(jax.tree.map(lambda x: x[: end - start], out))
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _Lanes(tokens=cat["tokens"], length=cat["length"], candidate=cat["candidate"], value=cat["value"],
                      solved=cat["solved"], spent=cat["spent"].astype(np.int64),
                      lane_forwards=cat["lane_forwards"].astype(np.int64), prompt=cat["prompt"].astype(np.int64),
                      cut=cat["cut"], lane_computed=cat["lane_computed"].astype(np.int64),
                      prompt_computed=cat["prompt_computed"].astype(np.int64), idle=idle, idle_computed=idle_computed)

    # --------------------------------------------------------------- MCTS
    def _searcher(self, config: StrategyConfig, sims: int) -> Searcher:
        k = (config.name, config.num_candidates, config.temperature, config.top_p, config.verifier, sims)
        if k not in self._searchers:
            env = EnvConfig(num_candidates=config.num_candidates, temperature=max(config.temperature, 1e-6),
                            top_p=config.top_p, terminal_reward="verifier" if config.verifier else "value")
            search = SearchConfig(policy=MCTS[config.name], num_simulations=sims,
                                  max_num_considered_actions=config.num_candidates, dirichlet_fraction=0.0)
            self._searchers[k] = Searcher(self.task, self.graphdef, env, search, seq_len=self.seq_len, mesh=self.mesh)
        return self._searchers[k]

    def _run_mcts(self, config, problems, budget, key, ids, sims) -> StrategyResult:
        """One episode per problem (``EpisodeRunner``): a search before each move, then its most visited step.

        Searches from finished chains cost nothing (``ReasoningEnv``), so a
        problem's charge does not depend on its batch.
        """
        runner = EpisodeRunner(self._searcher(config, sims))
        texts, solved, spent, computed, idle, idle_computed = [], [], [], [], 0, 0
        per_call = parallel.padded_rows(min(len(problems), self.mcts_batch), self.mesh)
        for start, end in _chunks(len(problems), per_call):
            n = end - start
            chunk = _pad(problems[start:end], per_call)
            chunk_ids = np.concatenate([ids[start:end], np.full((per_call - n,), ids[start])])
            out = runner.run(self.params, chunk, key, record=False, problem_ids=chunk_ids)
            texts += out.texts[:n]
            solved.append(out.solved[:n])
            spent.append(out.token_forwards[:n])
            computed.append(out.computed_token_forwards[:n])
            idle += int(out.token_forwards[n:].sum())
            idle_computed += int(out.computed_token_forwards[n:].sum())
        return StrategyResult(config=config, budget=budget, size=sims, texts=texts, solved=np.concatenate(solved),
                              token_forwards=np.concatenate(spent).astype(np.int64), idle_token_forwards=idle,
                              computed_token_forwards=np.concatenate(computed).astype(np.int64),
                              idle_computed_token_forwards=idle_computed, flops_per_token=self.flops_per_token)


def _prefix(lanes: _Lanes, n: int) -> _Lanes:
    """The first ``n`` lanes of a decode without beam search, as an n-lane decode would return them."""
    return _Lanes(tokens=lanes.tokens[:, :n], length=lanes.length[:, :n], candidate=lanes.candidate[:, :n],
                  value=lanes.value[:, :n], solved=lanes.solved[:, :n],
                  spent=lanes.prompt + lanes.lane_forwards[:, :n].sum(axis=1), lane_forwards=lanes.lane_forwards[:, :n],
                  prompt=lanes.prompt, cut=lanes.cut[:, :n], lane_computed=lanes.lane_computed[:, :n],
                  prompt_computed=lanes.prompt_computed)
