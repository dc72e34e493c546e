"""Test-time strategies as data: names, settings, labels and results (Snell et al. 2024, in miniature).

``StrategyConfig`` names one strategy and its settings; ``parse_strategy``
reads the command line's ``"beam:M=4,t=0.7"``; ``StrategyResult`` is what
running one at one budget gives. ``eval.runner.StrategyRunner`` runs them.

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

Learned selection and the exact verifier are kept apart: the strategies
choose with the value head only, and ``StrategyConfig(verifier=True)`` is the
separate, clearly labelled oracle option (label suffix ``+verifier``).

Voting needs a final answer that the problem does not give away: for
arithmetic the product; for Countdown / Game24 ``Verdict.answer`` is the
last number, and the problem states the target, so a vote over it would be
verifier selection in disguise. ``has_votable_answer`` says which tasks vote.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

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
    token_forwards: np.ndarray  # int64[B], needed per problem (<= budget)
    beam_width: int = 0  # the M used (beam)
    idle_token_forwards: int = 0  # needed but charged to no problem: batch padding, lanes beyond the one used
    computed_token_forwards: np.ndarray | None = None  # int64[B], computed for each problem (padding included)
    idle_computed_token_forwards: int = 0  # computed but charged to no problem
    flops_per_token: float = 0.0  # forward FLOPs of one token forward at the model's context

    @property
    def computed_flops(self) -> np.ndarray:
        """float64[B]: forward FLOPs computed for each problem (``computed_token_forwards x flops_per_token``)."""
        return np.asarray(self.computed_token_forwards, np.float64) * self.flops_per_token

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def feasible(self) -> bool:
        return self.size > 0

    def rows(self, problems: Sequence[Problem], task: Task) -> list[dict[str, Any]]:
        """Results-file rows (JSONL): problem, solution, solved, strategy, compute."""
        computed = (self.computed_token_forwards if self.computed_token_forwards is not None
                    else np.zeros(len(self.texts), np.int64))
        return [{"problem": p, "solution": t, "solved": bool(s), "strategy": self.label, "budget": self.budget,
                 "size": self.size, "token_forwards": int(f), "computed_token_forwards": int(c),
                 "flops": float(c) * self.flops_per_token, "difficulty": task.difficulty(p)}
                for p, t, s, f, c in zip(problems, self.texts, self.solved, self.token_forwards, computed)]
