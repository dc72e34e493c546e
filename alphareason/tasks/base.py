"""The task interface: what every reasoning task provides.

A task owns everything that is specific to one kind of problem and nothing
else (no models, no search):

* a seeded problem generator with difficulty levels, and validation of
  problems read from files (JSON objects, one per line);
* the text format: the prompt and the chain of thought, one reasoning step per
  line (every step ends with a newline, which the tokenizer maps to ``SEP``);
* a reference solver giving a shortest solution and a depth-first search trace
  with backtracking (Stream-of-Search style demonstrations);
* an exact verifier in Python, ``verify(problem, text) -> Verdict``;
* a jittable JAX step transition over token arrays that agrees with
  ``verify``: ``step(state, step_tokens) -> (state, valid, done, reward)``;
* optionally a tool (the calculator) whose output tokens are written by the
  environment instead of the model.

Text conventions (shared by all tasks):

* ``prompt(problem)`` ends with ``"\\n"``; the model sees
  ``BOS + prompt + steps + EOS``.
* A solution text is the steps, each ending with ``"\\n"``.
* A step that is exactly ``"#"`` (search traces only) undoes the previous
  step: the verifier and the JAX transition go back one state.
* Lines are the text split on ``"\\n"``; a trailing empty piece is ignored, so
  a missing final newline is accepted (``split_steps``). Every line is one
  step; an empty line is an invalid step.
* A chain ends (``done``) when it is solved, when it reaches a dead end (a
  state with no way forward that is not solved, e.g. the last remaining
  number is not the target), or at an invalid step. A dead end is reached by
  valid steps (reward 0) and a following ``"#"`` is valid and reopens the
  previous state; after a solved or invalid step every further step is
  invalid.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

Problem = dict[str, Any]  # JSON-serialisable; the problem file format
TaskState = dict[str, Any]  # pytree of fixed-shape arrays, see ``init_state``


class ProblemError(ValueError):
    """A problem (from a file or from code) that the task cannot accept.

    The message names where the problem came from (``where``, e.g.
    ``"problems.jsonl line 3"``), what is wrong and how to fix it.
    """


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one chain of thought.

    Attributes:
      solved: the text is a complete, correct solution.
      reason: human-readable; names the first bad step (1-based) and why, or
        says why the text is incomplete, or confirms the solution.
      num_valid_steps: steps accepted before the first bad one.
      answer: the final result the text arrives at (``None`` if none), for
        majority voting.
    """

    solved: bool
    reason: str
    num_valid_steps: int = 0
    answer: int | None = None


class Task(abc.ABC):
    """Base class of all tasks. Subclasses are constructed by ``get_task``."""

    name: str
    #: Static shapes, used by the model, search and data code.
    max_steps: int  # steps in the longest solution the transition accepts
    min_steps: int = 1  # steps in the shortest solution of any problem (a lower bound)
    max_step_len: int  # S: tokens in one step including the trailing SEP
    max_prompt_len: int  # tokens of BOS + prompt (including its SEP)
    max_trace_steps: int  # steps (lines) in the longest ``search_trace``
    tool: str | None = None  # "calculator" or None
    num_difficulties: int = 1

    # ------------------------------------------------------------ sizes
    def context_len(self, *, traces: bool = False) -> int:
        """Tokens of the longest chain of thought: BOS + prompt, the steps, EOS.

        ``traces``: of the longest search trace (``max_trace_steps`` steps),
        a bound far above real traces, which a run may cut to a shorter context.
        """
        steps = self.max_trace_steps if traces else self.max_steps
        return self.max_prompt_len + steps * self.max_step_len + 1

    def max_trace_len(self, context: int) -> int:
        """The most steps a search trace may write in a context of ``context`` tokens."""
        return self.max_trace_steps

    # ---------------------------------------------------------------- problems
    @abc.abstractmethod
    def generate(self, seed: int, n: int, *, difficulty: int | None = None,
                 exclude: Iterable[Problem] = ()) -> list[Problem]:
        """``n`` distinct solvable problems, deterministic for ``seed``.

        ``difficulty`` in ``range(num_difficulties)`` restricts to one level;
        problems equal to one in ``exclude`` never appear.
        """

    @abc.abstractmethod
    def difficulty(self, problem: Problem) -> int:
        """The difficulty level of a problem, in ``range(num_difficulties)``."""

    @abc.abstractmethod
    def validate_problem(self, obj: Mapping[str, Any], *, where: str = "problem") -> Problem:
        """Checks a parsed JSON object; returns the canonical problem or raises ``ProblemError``."""

    def parse_problem(self, text: str, *, where: str = "problem") -> Problem:
        """A problem typed by a user: a JSON object (the problem file's format) or the prompt's text.

        Raises ``ProblemError`` naming ``where`` and the expected formats.
        """
        import json  # noqa: PLC0415
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProblemError(f"{where}: {text!r} is not valid JSON ({e.msg})") from None
            return self.validate_problem(obj, where=where)
        return self.parse_prompt(text, where=where)

    def parse_prompt(self, text: str, *, where: str = "problem") -> Problem:
        """The problem whose ``prompt`` is ``text`` (without the final newline)."""
        raise ProblemError(f"{where}: give the problem as a JSON object, as in a problem file")

    def problem_key(self, problem: Problem) -> tuple:
        """Hashable identity used for de-duplication and exclusion lists."""
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in problem.items()))

    # -------------------------------------------------------------------- text
    @abc.abstractmethod
    def prompt(self, problem: Problem) -> str:
        """The prompt text; ends with a newline."""

    @abc.abstractmethod
    def solve(self, problem: Problem) -> str | None:
        """A shortest solution text (steps, each ending in newline), or None if unsolvable."""

    @abc.abstractmethod
    def search_trace(self, problem: Problem, *, max_steps: int | None = None) -> str:
        """A depth-first search trace with ``#`` backtracking lines, ending solved if possible."""

    @abc.abstractmethod
    def verify(self, problem: Problem, text: str) -> Verdict:
        """Exact verdict on a chain of thought (text after the prompt)."""

    def solvable_after(self, problem: Problem, text: str) -> bool | None:
        """Exact value of a state (V*): whether the chain ``text`` can still end solved.

        None when the task has no exact solver for partial chains. Used to
        label and diagnose the value head (an oracle: the search never reads it).
        """
        return None

    def tool_mask(self, text: str) -> np.ndarray:
        """bool[len(text)]: True where the tool (not the model) wrote the character.

        Without a tool every entry is False.
        """
        return np.zeros((len(text),), bool)

    # --------------------------------------------------------------- JAX side
    @abc.abstractmethod
    def init_state(self, problem: Problem) -> TaskState:
        """The transition's start state as numpy arrays of fixed shapes (a pytree)."""

    @abc.abstractmethod
    def step(self, state: TaskState, step_tokens):
        """Jittable transition of ONE problem (vmap for batches).

        Args:
          state: a pytree as returned by ``init_state`` (or by ``step``).
          step_tokens: int32[S] with S = ``max_step_len``: one step's tokens,
            ending in SEP and padded with PAD after it.
        Returns:
          (new_state, valid: bool[], done: bool[], reward: float32[]).
          An invalid step is terminal with reward 0. ``done`` with reward 1
          means solved. A step after ``done`` is invalid, except ``"#"``
          after a dead end (``done`` by a valid step with reward 0), which
          reopens the previous state.
        """

    def tool_output(self, state: TaskState, step_tokens, length):
        """Jittable: tokens the tool writes after the model wrote ``=``.

        Args:
          state: the task state before this step.
          step_tokens: int32[S], the step so far (``length`` tokens, the last
            one being ``=``), PAD after.
        Returns:
          (forced: int32[F], count: int32[]) with F = ``tool_output_len``: the
          result's characters followed by SEP, then PAD.
        """
        raise NotImplementedError(f"task {self.name!r} has no tool")

    tool_output_len: int = 0

    @property
    def tool_trigger(self) -> int | None:
        """The token after which the tool writes (the calculator: ``=``); None without a tool.

        The model's sampler and the token-level search ask the task for it:
        the network knows no task's syntax.
        """
        return None

    def tool_written(self, steps):
        """Jittable: bool[..., S], the tokens of PAD-padded steps int32[..., S] that the tool wrote.

        Without a tool every entry is False.
        """
        import jax.numpy as jnp  # noqa: PLC0415
        return jnp.zeros(jnp.shape(steps), bool)

    def legal_steps(self, state: TaskState):
        """Optional jittable legal-step generator: (int32[K, S], bool[K])."""
        raise NotImplementedError(f"task {self.name!r} has no legal-step generator")

    def legal_written_len(self) -> int:
        """W <= S: the model-written tokens of every step ``legal_steps`` makes lie in its first W; the rest
        is the tool's output or PAD. Scoring legal steps reads only those W (``search.env.score_legal_steps``).
        S unless a task knows better."""
        return self.max_step_len

    def negative_example(self, problem: Problem, rng: np.random.Generator) -> str | None:
        """Optional: a chain of thought that does not solve ``problem`` (for value targets)."""
        return None

    def random_walk(self, problem: Problem, rng: np.random.Generator) -> str | None:
        """Optional: legal steps chosen uniformly at random until the chain ends (solved or a dead end).

        The states along such walks are those a search over legal steps reaches, whatever its policy;
        the value diagnostics label them with ``solvable_after``. None for a task that cannot list its
        legal steps.
        """
        return None


def split_steps(text: str) -> list[str]:
    """The steps (lines) of a chain of thought; a trailing empty line is ignored.

    ``"13-9=4\\n10-4=6\\n"`` and ``"13-9=4\\n10-4=6"`` both give two steps;
    ``""`` gives none and ``"\\n"`` one empty (invalid) step.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def int_option(value: Any, name: str, low: int, high: int | None = None) -> int:
    """Checks a task option is an integer in ``[low, high]``; raises ``ValueError`` naming it."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = int(value)
        ok = value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"option {name}={value!r} is invalid: it must be an integer in {allowed}")
    return value


def is_integer(value: Any) -> bool:
    """True for JSON integers; bools, floats (even ``24.0``) and strings are not integers."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
