"""Long multiplication written as partial products and running sums.

This module owns the arithmetic task: generator, text format, solver,
verifier and the jittable step transition that agrees with it.

Problem ``{"a": 123, "b": 45}``, prompt ``123*45\\n``. The chain of thought
multiplies ``a`` by each digit of ``b`` from the least significant, written
with its place value in full (zero digits included: ``123*0=0``), then adds
the partial products up::

    123*5=615
    123*40=4920
    615+4920=5535

With a one-digit ``b`` the single step ``a*b=P`` is the whole solution. The
chain is done after the last required step and solved iff every step is
exactly the expected one; any other step is invalid. ``#`` undoes the
previous step as in every task (there are no dead ends here), and the search
trace is simply the solution: there is nothing to backtrack from.

Difficulty: the pair (digits of a, digits of b), as the index
``(digits_a - 1) * max_digits_b + (digits_b - 1)``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from alphareason import tokenizer as tok
from alphareason.tasks import jax_text as jtx
from alphareason.tasks.base import (Problem, ProblemError, Task, TaskState, Verdict, int_option,
                                    is_integer, split_steps)

MAX_DIGITS = 4
_STEP_RE = re.compile(r"([0-9]+)([-+*/])([0-9]+)=([0-9]+)", re.ASCII)


def solution_steps(a: int, b: int) -> list[str]:
    """The expected steps (without newlines) for ``a*b``."""
    digits = [int(d) for d in reversed(str(b))]
    if len(digits) == 1:
        return [f"{a}*{b}={a * b}"]
    partials = [d * 10**i for i, d in enumerate(digits)]
    steps = [f"{a}*{p}={a * p}" for p in partials]
    total = a * partials[0]
    for p in partials[1:]:
        steps.append(f"{total}+{a * p}={total + a * p}")
        total += a * p
    return steps


class ArithmeticTask(Task):
    """Multiply an up-to-``max_digits_a``-digit ``a`` by an up-to-``max_digits_b``-digit ``b``.

    Static sizes: ``max_steps = 2 * max_digits_b - 1``; ``max_step_len`` S is
    the longest expected step (reached with all-nines operands) plus SEP;
    ``max_prompt_len`` = BOS + ``a*b`` + SEP; ``max_trace_steps = max_steps``.
    """

    option_names = ("max_digits_a", "max_digits_b")
    tool = None

    def __init__(self, max_digits_a: int = 3, max_digits_b: int = 3, tool: str | None = None):
        if tool is not None:
            raise ValueError(f"option tool={tool!r} is invalid: the arithmetic task has no tool "
                             f"(its steps are the arithmetic); leave tool unset")
        self.max_digits_a = int_option(max_digits_a, "max_digits_a", 1, MAX_DIGITS)
        self.max_digits_b = int_option(max_digits_b, "max_digits_b", 1, MAX_DIGITS)
        self.name = "arithmetic"
        self.options = dict(max_digits_a=self.max_digits_a, max_digits_b=self.max_digits_b)
        da, db = self.max_digits_a, self.max_digits_b
        self.max_steps = 2 * db - 1
        self.max_trace_steps = self.max_steps
        longest = solution_steps(10**da - 1, 10**db - 1)
        self.max_step_len = max(len(s) for s in longest) + 1
        self.max_prompt_len = 1 + da + 1 + db + 1
        self.num_difficulties = da * db

    def __repr__(self):
        return f"ArithmeticTask(max_digits_a={self.max_digits_a}, max_digits_b={self.max_digits_b})"

    def __eq__(self, other):
        return type(other) is type(self) and self.options == other.options

    def __hash__(self):
        return hash((type(self).__name__, tuple(self.options.items())))

    # ---------------------------------------------------------------- problems
    def problem_key(self, problem: Problem) -> tuple:
        return int(problem["a"]), int(problem["b"])

    def check_problem(self, obj: Any, *, where: str = "problem") -> Problem:
        """Shape, type and range checks; returns the canonical problem."""
        if not isinstance(obj, Mapping):
            raise ProblemError(f'{where}: expected a JSON object like {{"a": 123, "b": 45}}, '
                               f"got {type(obj).__name__} {obj!r}")
        out = {}
        for field, digits in (("a", self.max_digits_a), ("b", self.max_digits_b)):
            if field not in obj:
                raise ProblemError(f'{where}: missing field "{field}"; write each problem as '
                                   f'{{"a": integer, "b": integer}}, e.g. {{"a": 123, "b": 45}}')
            v = obj[field]
            if not is_integer(v):
                raise ProblemError(f'{where}: "{field}" is {v!r}, not an integer; write a whole number '
                                   f"without quotes or a decimal point")
            if not 0 <= v < 10**digits:
                raise ProblemError(f'{where}: "{field}" = {v} is out of range; it must be in '
                                   f"0..{10**digits - 1} (max_digits_{field}={digits})")
            out[field] = int(v)
        return out

    def validate_problem(self, obj: Mapping[str, Any], *, where: str = "problem") -> Problem:
        return self.check_problem(obj, where=where)  # every multiplication is solvable

    def difficulty(self, problem: Problem) -> int:
        da, db = len(str(problem["a"])), len(str(problem["b"]))
        return (da - 1) * self.max_digits_b + (db - 1)

    def generate(self, seed: int, n: int, *, difficulty: int | None = None,
                 exclude: Iterable[Problem] = ()) -> list[Problem]:
        """Each problem: a difficulty level uniformly (or the one given), then ``a`` and
        ``b`` uniformly among numbers with that many digits (one-digit numbers are 1..9)."""
        n = int_option(n, "n", 0)
        if difficulty is not None:
            difficulty = int_option(difficulty, "difficulty", 0, self.num_difficulties - 1)
        levels = [difficulty] if difficulty is not None else list(range(self.num_difficulties))
        capacity = sum(self._level_size(level) for level in levels)
        seen = {self.problem_key(p) for p in exclude}
        rng = np.random.default_rng(seed)
        out: list[Problem] = []
        attempts, limit = 0, 10_000 + 100 * n
        while len(out) < n and attempts < limit:
            attempts += 1
            level = levels[int(rng.integers(len(levels)))]
            da, db = divmod(level, self.max_digits_b)
            a = int(rng.integers(10**da if da else 1, 10**(da + 1)))
            b = int(rng.integers(10**db if db else 1, 10**(db + 1)))
            if (a, b) not in seen:
                seen.add((a, b))
                out.append({"a": a, "b": b})
        if len(out) < n:
            raise ValueError(f"arithmetic: found only {len(out)} of the {n} distinct problems asked for "
                             f"(at most {capacity} exist at the difficulties asked, some may be excluded); "
                             f"ask for fewer or raise max_digits_a / max_digits_b")
        return out

    def _level_size(self, level: int) -> int:
        da, db = divmod(level, self.max_digits_b)
        count = lambda d: 9 * 10**d  # noqa: E731  (numbers with d+1 digits; 1..9 for one digit)
        return count(da) * count(db)

    # -------------------------------------------------------------------- text
    def prompt(self, problem: Problem) -> str:
        return f"{problem['a']}*{problem['b']}\n"

    def solve(self, problem: Problem) -> str | None:
        problem = self.check_problem(problem)
        return "".join(s + "\n" for s in solution_steps(problem["a"], problem["b"]))

    def search_trace(self, problem: Problem, *, max_steps: int | None = None) -> str:
        """The solution itself (there is no search to show), cut at ``max_steps`` lines."""
        cap = self.max_trace_steps if max_steps is None else int_option(max_steps, "max_steps", 0)
        return "".join(s + "\n" for s in split_steps(self.solve(problem))[:cap])

    def solvable_after(self, problem: Problem, text: str) -> bool:
        """Every valid prefix of the (unique) solution can still be completed; nothing else can."""
        verdict = self.verify(problem, text)
        return verdict.solved or (verdict.num_valid_steps == len(split_steps(text))
                                  and verdict.reason.startswith("incomplete"))

    def verify(self, problem: Problem, text: str) -> Verdict:
        """Exact verdict; ``answer`` is the result written in the text's last step (if any)."""
        problem = self.check_problem(problem)
        expected = solution_steps(problem["a"], problem["b"])
        lines = split_steps(text)
        answer = None
        if lines:
            match = _STEP_RE.fullmatch(lines[-1])
            answer = int(match[4]) if match else None
        pos = 0  # index of the next expected step
        for k, line in enumerate(lines, 1):
            if pos == len(expected):
                return Verdict(False, f"text after the solution was complete (step {k})", k - 1, answer)
            if line == "#":
                if pos == 0:
                    return Verdict(False, f'step {k} "#": nothing to undo', k - 1, answer)
                pos -= 1
                continue
            want = expected[pos]
            if line != want:
                lhs, result = want.split("=")
                if line.startswith(lhs + "="):
                    why = f"{lhs} is {result}, not {line[len(lhs) + 1:]}"
                else:
                    why = f'expected "{want}"'
                shown = line if len(line) <= 40 else line[:40] + "..."
                return Verdict(False, f'step {k} "{shown}": {why}', k - 1, answer)
            pos += 1
        if pos == len(expected):
            return Verdict(True, f"solved in {len(lines)} steps", len(lines), answer)
        return Verdict(False, f"incomplete: {pos} of {len(expected)} steps done", len(lines), answer)

    def negative_example(self, problem: Problem, rng: np.random.Generator) -> str | None:
        """A correct prefix then one step with a wrong result."""
        steps = solution_steps(problem["a"], problem["b"])
        k = int(rng.integers(len(steps)))
        lhs, c = steps[k].split("=")
        wrong = int(c) + int(rng.integers(1, 10)) * (10 ** int(rng.integers(0, len(c))))
        return "".join(s + "\n" for s in steps[:k]) + f"{lhs}={wrong}\n"

    # --------------------------------------------------------------- JAX side
    def init_state(self, problem: Problem) -> TaskState:
        """Fixed-shape numpy state; T = ``max_steps``, S = ``max_step_len``.

        Keys: ``expected`` int32[T, S] (the solution's step tokens, PAD rows
        after ``num_required``), ``num_required`` int32[], ``position``
        int32[] (steps on the current path), ``done``, ``solved``,
        ``invalid`` bool[].
        """
        problem = self.check_problem(problem)
        steps = solution_steps(problem["a"], problem["b"])
        expected = np.zeros((self.max_steps, self.max_step_len), np.int32)
        for i, s in enumerate(steps):
            expected[i] = tok.encode_padded(s + "\n", self.max_step_len)
        return {
            "expected": expected,
            "num_required": np.int32(len(steps)),
            "position": np.int32(0),
            "done": np.bool_(False),
            "solved": np.bool_(False),
            "invalid": np.bool_(False),
        }

    def step(self, state: TaskState, step_tokens):
        step_tokens = jnp.asarray(step_tokens, jnp.int32)
        terminated, end = jtx.step_end(step_tokens)
        pos = state["position"]
        want = state["expected"][jnp.clip(pos, 0, self.max_steps - 1)]
        is_move = ~state["done"] & jnp.all(step_tokens == want)
        is_undo = terminated & jtx.is_undo(step_tokens, end) & (pos > 0) & ~state["done"]
        valid = is_move | is_undo
        new_pos = jnp.where(is_move, pos + 1, jnp.where(is_undo, pos - 1, pos)).astype(jnp.int32)
        solved = is_move & (new_pos == state["num_required"])
        new_state = {
            "expected": state["expected"],
            "num_required": state["num_required"],
            "position": new_pos,
            "done": solved | ~valid,
            "solved": solved,
            "invalid": state["invalid"] | ~valid,
        }
        reward = jnp.where(solved, 1.0, 0.0).astype(jnp.float32)
        return new_state, valid, new_state["done"], reward
