"""Countdown and Game24: combine numbers with ``+ - * /`` to reach a target.

This module owns the Countdown task family: the problem generator (with a
memoised reachable-values solver), the text format, the reference solver and
depth-first search traces, the Python verifier, and the jittable JAX step
transition, legal-step generator and calculator tool that agree with it.

Format (problem ``{"numbers": [4, 9, 10, 13], "target": 24}``)::

    prompt   4,9,10,13>24\\n        numbers in the given order, then the target
    steps    13-9=4\\n10-4=6\\n6*4=24\\n

A step ``a op b=c`` takes ``a`` and ``b`` from the numbers still available (a
multiset: ``a`` from the first slot holding it, ``b`` from the first other
slot holding it), and ``c`` takes ``a``'s slot while ``b``'s slot empties.
Results are non-negative integers up to ``2**31-1`` (the int32 bound):
``a-b`` needs ``a >= b``, ``/`` must be exact with ``b != 0``. Numbers are
written without leading zeros or spaces. With ``use_all`` the chain ends when
one number remains (solved iff it is the target); without it, it ends solved
as soon as a step's result is the target and unsolved when one number remains.
A step ``#`` undoes the previous one (search traces); it is also the only step
allowed after a dead end (a chain ended unsolved by valid steps).

Difficulty (``num_difficulties = 3``): take the distinct first moves (distinct
resulting multisets); ``f`` is the fraction of them after which the target is
still reachable. Level 0 (easy) ``f >= 0.25``, level 1 ``0.08 <= f < 0.25``,
level 2 (hard) ``f < 0.08``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from alphareason import tokenizer as tok
from alphareason.tasks import jax_text as jtx
from alphareason.tasks.base import (Problem, ProblemError, Task, TaskState, Verdict, int_option,
                                    is_integer, split_steps)

INT32_MAX = jtx.INT32_MAX
OPS = jtx.OPS
TOOLS = (None, "calculator")
MAX_NUM_NUMBERS = 6
DIFFICULTY_THRESHOLDS = (0.25, 0.08)  # f >= 0.25: level 0; f >= 0.08: level 1; else level 2
_ENUMERATE_LIMIT = 20_000  # problem spaces up to this size are enumerated, not sampled
_STEP_RE = re.compile(r"([0-9]+)([-+*/])([0-9]+)=([0-9]+)", re.ASCII)
_NUMBER_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)


# ------------------------------------------------------------------ arithmetic
def apply_op(a: int, op: str, b: int) -> tuple[int | None, str]:
    """``a op b`` under the task's rules -> (result, "") or (None, why not)."""
    if op == "+":
        c = a + b
    elif op == "-":
        if a < b:
            return None, f"{a}-{b} is negative"
        c = a - b
    elif op == "*":
        c = a * b
    else:
        if b == 0:
            return None, f"{a}/{b} divides by zero"
        if a % b:
            return None, f"{a}/{b} is not a whole number"
        c = a // b
    if c > INT32_MAX:
        return None, f"{a}{op}{b} is {c}, larger than {INT32_MAX}"
    return c, ""


def _combine(xs: Iterable[int], ys: Iterable[int], out: set) -> None:
    """Adds to ``out`` every legal result of one step on x in ``xs`` and y in ``ys``."""
    for x in xs:
        for y in ys:
            hi, lo = (x, y) if x >= y else (y, x)
            out.add(hi - lo)
            if hi + lo <= INT32_MAX:
                out.add(hi + lo)
            if hi * lo <= INT32_MAX:
                out.add(hi * lo)
            if lo and hi % lo == 0:
                out.add(hi // lo)


@functools.lru_cache(maxsize=None)
def _splits(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Index splits of n items into two non-empty groups (item 0 in the first)."""
    out = []
    for mask in range(1, 2 ** n, 2):
        first = tuple(i for i in range(n) if mask >> i & 1)
        second = tuple(i for i in range(n) if not mask >> i & 1)
        if second:
            out.append((first, second))
    return tuple(out)


def _parts(ms: tuple[int, ...]):
    """The distinct splits of a sorted multiset into two sorted non-empty sub-multisets."""
    seen = set()
    for first, second in _splits(len(ms)):
        part = (tuple(ms[i] for i in first), tuple(ms[i] for i in second))
        if part not in seen:
            seen.add(part)
            yield part


def _reachable_sorted(ms: tuple[int, ...]) -> frozenset:
    """``reachable`` of an already sorted tuple."""
    n = len(ms)
    if n == 1:
        return frozenset(ms)
    out: set = set()
    if n == 2:
        _combine((ms[0],), (ms[1],), out)
    elif n == 3:
        a, b, c = ms
        _combine((a,), _cached_small((b, c)), out)
        if b != a:
            _combine((b,), _cached_small((a, c)), out)
        if c != b:
            _combine((c,), _cached_small((a, b)), out)
    else:
        for first, second in _parts(ms):
            _combine(_cached(first), _cached(second), out)
    return frozenset(out)


_cached_small = functools.lru_cache(maxsize=1 << 16)(_reachable_sorted)  # up to 3 numbers
_cached_large = functools.lru_cache(maxsize=1 << 11)(_reachable_sorted)


def _cached(ms: tuple[int, ...]) -> frozenset:
    return _cached_small(ms) if len(ms) <= 3 else _cached_large(ms)


def reachable(numbers: Iterable[int]) -> frozenset:
    """Every value a chain using ALL ``numbers`` can end with (memoised on the sorted multiset)."""
    return _cached(tuple(sorted(numbers)))


def _can_make(xs: frozenset, ys: frozenset, t: int) -> bool:
    """Whether one step on some x in ``xs`` and y in ``ys`` (either order) gives ``t``."""
    if len(xs) > len(ys):
        xs, ys = ys, xs
    for x in xs:
        if t - x in ys or x - t in ys or x + t in ys:  # x+y, x-y, y-x
            return True
        if x != 0 and t * x in ys:  # y/x
            return True
        if (t % x == 0 and t // x in ys) if x != 0 else t == 0:  # x*y
            return True
        if (x % t == 0 and x // t != 0 and x // t in ys) if t != 0 else (x == 0 and any(ys)):  # x/y
            return True
    return False


def reaches(numbers: Iterable[int], target: int) -> bool:
    """Whether a chain using ALL ``numbers`` can end with ``target`` (``target in reachable(numbers)``).

    For more than three numbers this checks each split into two groups
    against the target directly instead of building the whole set.
    """
    ms = tuple(sorted(numbers))
    if len(ms) <= 3:
        return target in _cached(ms)
    return any(_can_make(_cached(first), _cached(second), target) for first, second in _parts(ms))


def reaches_any(numbers: Iterable[int], target: int) -> bool:
    """Whether some step can produce ``target`` from a sub-multiset (at least two) of ``numbers``."""
    ms = tuple(sorted(numbers))
    return any(reaches(sub, target) for size in range(2, len(ms) + 1)
               for sub in set(itertools.combinations(ms, size)))


class _Chain:
    """The verifier's state: slots of values, the undo stack, how it ended."""

    def __init__(self, numbers: list[int], target: int, use_all: bool):
        self.slots: list[int | None] = list(numbers)
        self.target, self.use_all = target, use_all
        self.stack: list[tuple[list[int | None], int | None]] = []
        self.last: int | None = None  # result of the latest step on the path
        self.solved = self.dead = False

    @property
    def available(self) -> list[int]:
        return [v for v in self.slots if v is not None]

    @property
    def done(self) -> bool:
        return self.solved or self.dead

    def find(self, value: int, skip: int = -1) -> int:
        for i, v in enumerate(self.slots):
            if v == value and i != skip:
                return i
        return -1

    def move(self, a: int, b: int, c: int) -> None:
        """Applies a checked step ``a op b=c``."""
        i = self.find(a)
        j = self.find(b, skip=i)
        self.stack.append((list(self.slots), self.last))
        self.slots[i], self.slots[j] = c, None
        self.last = c
        left = len(self.available)
        if self.use_all:
            self.solved, self.dead = left == 1 and c == self.target, left == 1 and c != self.target
        else:
            self.solved = c == self.target
            self.dead = left == 1 and not self.solved

    def undo(self) -> None:
        self.slots, self.last = self.stack.pop()
        self.solved = self.dead = False


def _show(line: str, limit: int = 40) -> str:
    return '"' + (line if len(line) <= limit else line[:limit] + "...") + '"'


def _num_list(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


def _bound(max_number: int, count: int) -> int:
    """A bound on the values a chain over ``count`` numbers in 1..max_number reaches (capped).

    ``m**i + m**j <= m**(i+j)`` and ``m**i * m**j = m**(i+j)`` for m >= 2.
    """
    return min(max(max_number, 2) ** count, INT32_MAX)


# ----------------------------------------------------------------------- task
class CountdownTask(Task):
    """Countdown: reach ``target`` from ``num_numbers`` numbers in 1..``max_number``.

    Static sizes: ``max_steps = num_numbers - 1``; ``max_step_len`` S is the
    longest valid step plus SEP, bounding a value built from k numbers by
    ``max_number**k`` (capped at ``2**31-1``); ``max_prompt_len`` is BOS plus
    the longest prompt; ``max_trace_steps`` (64 by default) caps search traces;
    ``tool_output_len`` is the digits of the largest value plus SEP (0 without
    the calculator).
    """

    option_names = ("num_numbers", "max_number", "min_target", "max_target", "use_all", "tool",
                    "max_trace_steps")

    def __init__(self, num_numbers: int = 4, max_number: int = 99, min_target: int = 10,
                 max_target: int = 100, use_all: bool = True, tool: str | None = None, *,
                 max_trace_steps: int = 64, name: str = "countdown"):
        self.num_numbers = int_option(num_numbers, "num_numbers", 2, MAX_NUM_NUMBERS)
        self.max_number = int_option(max_number, "max_number", 1, INT32_MAX)
        self.min_target = int_option(min_target, "min_target", 0, INT32_MAX)
        self.max_target = int_option(max_target, "max_target", 0, INT32_MAX)
        if self.min_target > self.max_target:
            raise ValueError(f"option min_target={min_target} is larger than max_target={max_target}; "
                             f"make min_target <= max_target")
        if not isinstance(use_all, (bool, np.bool_)):
            raise ValueError(f"option use_all={use_all!r} is invalid: it must be true or false")
        self.use_all = bool(use_all)
        if tool not in TOOLS:
            raise ValueError(f"option tool={tool!r} is invalid: choose one of {TOOLS}")
        self.tool = tool
        self.max_trace_steps = int_option(max_trace_steps, "max_trace_steps", 1)
        self.name = name
        self.options = dict(num_numbers=self.num_numbers, max_number=self.max_number,
                            min_target=self.min_target, max_target=self.max_target,
                            use_all=self.use_all, tool=self.tool, max_trace_steps=self.max_trace_steps)

        n, m = self.num_numbers, self.max_number
        self.max_steps = n - 1
        self.min_steps = n - 1 if self.use_all else 1  # with use_all every solution takes n - 1 steps
        self.value_bound = _bound(m, n)
        digits = lambda v: len(str(v))  # noqa: E731
        # per pair of operand sizes: "a op b=" (what the model writes with the calculator) and its result
        steps = [(digits(_bound(m, i)) + digits(_bound(m, j)) + 2, digits(_bound(m, i + j)))
                 for i in range(1, n) for j in range(1, n - i + 1)]
        self.max_step_len = max(written + result for written, result in steps) + 1  # + SEP
        self._written_len = max(written for written, _ in steps)
        self.max_prompt_len = 1 + n * digits(m) + (n - 1) + 1 + digits(self.max_target) + 1
        self.tool_output_len = digits(self.value_bound) + 1 if tool else 0
        self.num_difficulties = len(DIFFICULTY_THRESHOLDS) + 1
        self._pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j], np.int32)
        self._all_problems: list[tuple[tuple[int, ...], int]] | None = None

    def __repr__(self):
        return f"CountdownTask(name={self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __eq__(self, other):
        return type(other) is type(self) and (self.name, self.options) == (other.name, other.options)

    def __hash__(self):
        return hash((type(self).__name__, self.name, tuple(self.options.items())))

    # ---------------------------------------------------------------- problems
    def problem_key(self, problem: Problem) -> tuple:
        return tuple(sorted(problem["numbers"])), int(problem["target"])

    def _example(self) -> str:
        return '{"numbers": [4, 9, 10, 13], "target": 24}'

    def check_problem(self, obj: Any, *, where: str = "problem") -> Problem:
        """Shape, type and range checks (no solvability); returns the canonical problem."""
        n, m = self.num_numbers, self.max_number
        if not isinstance(obj, Mapping):
            raise ProblemError(f"{where}: expected a JSON object like {self._example()}, "
                               f"got {type(obj).__name__} {obj!r}")
        for field in ("numbers", "target"):
            if field not in obj:
                raise ProblemError(f'{where}: missing field "{field}"; write each problem as '
                                   f'{{"numbers": [{n} integers], "target": integer}}, e.g. {self._example()}')
        numbers, target = obj["numbers"], obj["target"]
        if not isinstance(numbers, (list, tuple)):
            raise ProblemError(f'{where}: "numbers" must be a list of {n} integers, got {numbers!r}')
        if len(numbers) != n:
            raise ProblemError(f'{where}: "numbers" has {len(numbers)} numbers {list(numbers)!r} but this '
                               f'task takes {n} (num_numbers={n}); give exactly {n}')
        for i, v in enumerate(numbers):
            if not is_integer(v):
                raise ProblemError(f'{where}: "numbers" item {i + 1} is {v!r}, not an integer; write '
                                   f'whole numbers without quotes or decimal points')
            if not 1 <= v <= m:
                raise ProblemError(f'{where}: number {v} is out of range; numbers must be in 1..{m} '
                                   f'(max_number={m})')
        if not is_integer(target):
            raise ProblemError(f'{where}: "target" is {target!r}, not an integer; write a whole number '
                               f'without quotes or a decimal point')
        lo, hi = self.min_target, self.max_target
        if not lo <= target <= hi:
            allowed = f"{lo}" if lo == hi else f"in {lo}..{hi} (min_target..max_target)"
            raise ProblemError(f"{where}: target {target} is out of range; the target must be {allowed}")
        return {"numbers": [int(v) for v in numbers], "target": int(target)}

    def validate_problem(self, obj: Mapping[str, Any], *, where: str = "problem") -> Problem:
        problem = self.check_problem(obj, where=where)
        if not self.solvable(problem):
            rule = "using every number" if self.use_all else "from any of the numbers"
            raise ProblemError(f"{where}: {_num_list(problem['numbers'])} cannot reach "
                               f"{problem['target']} {rule} with + - * / and whole-number results; "
                               f"remove this problem or fix its numbers or target")
        return problem

    def solvable(self, problem: Problem) -> bool:
        numbers, target = problem["numbers"], problem["target"]
        return reaches(numbers, target) if self.use_all else reaches_any(numbers, target)

    def _reaches(self, values: list[int], target: int) -> bool:
        """Whether the target can still be reached from the available ``values`` (not done)."""
        if self.use_all:
            return reaches(values, target)
        return len(values) >= 2 and reaches_any(values, target)

    def difficulty(self, problem: Problem) -> int:
        numbers, target = problem["numbers"], problem["target"]
        children = {}
        for a, op, b, c in self._moves(list(numbers)):
            rest = list(numbers)
            rest.remove(a)
            rest.remove(b)
            children.setdefault(tuple(sorted(rest + [c])), c)
        good = 0
        for child, c in children.items():
            if len(child) == 1 or (not self.use_all and c == target):
                good += (c == target)
            else:
                good += self._reaches(list(child), target)
        f = good / max(len(children), 1)
        for level, threshold in enumerate(DIFFICULTY_THRESHOLDS):
            if f >= threshold:
                return level
        return len(DIFFICULTY_THRESHOLDS)

    def _space(self) -> int:
        n, m = self.num_numbers, self.max_number
        return math.comb(m + n - 1, n) * (self.max_target - self.min_target + 1)

    def generate(self, seed: int, n: int, *, difficulty: int | None = None,
                 exclude: Iterable[Problem] = ()) -> list[Problem]:
        n = int_option(n, "n", 0)
        if difficulty is not None:
            difficulty = int_option(difficulty, "difficulty", 0, self.num_difficulties - 1)
        seen = {self.problem_key(p) for p in exclude}
        rng = np.random.default_rng(seed)
        out: list[Problem] = []

        def offer(numbers: list[int], target: int) -> None:
            key = (tuple(sorted(numbers)), target)
            if key in seen:
                return
            seen.add(key)
            problem = {"numbers": numbers, "target": target}
            if self.solvable(problem) and (difficulty is None or self.difficulty(problem) == difficulty):
                out.append(problem)

        if self._space() <= _ENUMERATE_LIMIT:
            if self._all_problems is None:
                self._all_problems = [
                    (ms, t) for ms in itertools.combinations_with_replacement(range(1, self.max_number + 1),
                                                                              self.num_numbers)
                    for t in range(self.min_target, self.max_target + 1)]
            for index in rng.permutation(len(self._all_problems)):
                if len(out) == n:
                    break
                ms, t = self._all_problems[index]
                offer([ms[i] for i in rng.permutation(len(ms))], t)
            attempts = len(self._all_problems)
        else:
            attempts, limit = 0, 10_000 + 1_000 * n
            while len(out) < n and attempts < limit:
                numbers = rng.integers(1, self.max_number + 1, size=(256, self.num_numbers))
                targets = rng.integers(self.min_target, self.max_target + 1, size=256)
                for row, t in zip(numbers.tolist(), targets.tolist()):
                    attempts += 1
                    offer(row, t)
                    if len(out) == n:
                        break
        if len(out) < n:
            level = "" if difficulty is None else f" at difficulty {difficulty}"
            raise ValueError(f"{self.name}: found only {len(out)} of the {n} distinct solvable problems "
                             f"asked for{level} (after {attempts} candidates, {len(seen) - len(out)} "
                             f"excluded, duplicate or unsuitable); ask for fewer or widen the options")
        return out

    # -------------------------------------------------------------------- text
    def prompt(self, problem: Problem) -> str:
        return ",".join(str(v) for v in problem["numbers"]) + f">{problem['target']}\n"

    @staticmethod
    def _moves(values: list[int]):
        """Canonical moves from the available values: (a, op, b, c), a >= b, distinct (a, op, b).

        Order: pairs of positions (i < j) in list order, then ``+ - * /``.
        """
        seen = set()
        for i, j in itertools.combinations(range(len(values)), 2):
            a, b = max(values[i], values[j]), min(values[i], values[j])
            for op in OPS:
                c, _ = apply_op(a, op, b)
                if c is not None and (a, op, b) not in seen:
                    seen.add((a, op, b))
                    yield a, op, b, c

    def solve(self, problem: Problem) -> str | None:
        """A shortest solution (deterministic), or None.

        With ``use_all`` every solution has ``num_numbers - 1`` steps: take the
        first canonical move (see ``_moves``) after which the target is still
        reachable. Without it, breadth-first search over canonical moves.
        """
        problem = self.check_problem(problem)
        if not self.solvable(problem):
            return None
        target = problem["target"]
        if self.use_all:
            chain = _Chain(problem["numbers"], target, True)
            lines = []
            while not chain.done:
                for a, op, b, c in self._moves(chain.available):
                    rest = chain.available
                    rest.remove(a)
                    rest.remove(b)
                    if self._reaches(rest + [c], target):
                        chain.move(a, b, c)
                        lines.append(f"{a}{op}{b}={c}\n")
                        break
                else:
                    raise AssertionError(f"solver lost the way on {problem}")  # reachable() disagrees
            return "".join(lines)
        level = [(tuple(problem["numbers"]), "")]
        while level:
            nxt, seen = [], set()
            for values, text in level:
                for a, op, b, c in self._moves(list(values)):
                    line = f"{a}{op}{b}={c}\n"
                    if c == target:
                        return text + line
                    rest = list(values)
                    rest.remove(a)
                    rest.remove(b)
                    rest.append(c)
                    if len(rest) >= 2 and tuple(sorted(rest)) not in seen:
                        seen.add(tuple(sorted(rest)))
                        nxt.append((tuple(rest), text + line))
            level = nxt
        return None  # not reached: solvable() said yes

    def _promise(self, values: list[int], result: int, target: int) -> tuple[int, int]:
        """Search-order key of a move that left ``values`` (its result ``result``); lower first."""
        best = min(abs(v - target) for v in values)
        if len(values) > 1:
            for _, _, _, c in self._moves(values):
                best = min(best, abs(c - target))
        return best, abs(result - target)

    def search_trace(self, problem: Problem, *, max_steps: int | None = None) -> str:
        """Depth-first search with ``#`` backtracking, stopping when solved.

        Move order at every state: the canonical moves (``_moves``), keeping
        the first of those that give the same multiset of numbers, sorted by
        ``_promise`` (a one-step look-ahead: how close the best next step
        from the resulting numbers gets to the target, then how close the
        move's own result is; ties keep canonical order). Every tried step is
        written, final steps included; a step that ends the chain unsolved (a
        dead end) is followed by ``#``, and a state whose moves all failed is
        left with ``#``. The trace is cut at ``max_steps`` lines (default
        ``max_trace_steps``): a cut trace is unsolved, as is the full trace of
        an unsolvable problem.
        """
        problem = self.check_problem(problem)
        cap = self.max_trace_steps if max_steps is None else int_option(max_steps, "max_steps", 0)
        target = problem["target"]
        lines: list[str] = []

        class _Full(Exception):
            pass

        def write(line: str) -> None:
            lines.append(line + "\n")
            if len(lines) >= cap:
                raise _Full

        def dfs(values: list[int]) -> bool:
            children = {}
            for a, op, b, c in self._moves(values):
                rest = list(values)
                rest.remove(a)
                rest.remove(b)
                rest.append(c)
                children.setdefault(tuple(sorted(rest)), (a, op, b, c, rest))
            order = sorted(children.values(), key=lambda move: self._promise(move[4], move[3], target))
            for a, op, b, c, rest in order:
                write(f"{a}{op}{b}={c}")
                if len(rest) == 1 or (not self.use_all and c == target):
                    if c == target:
                        return True
                    write("#")
                    continue
                if dfs(rest):
                    return True
                write("#")
            return False

        if cap > 0:
            try:
                dfs(list(problem["numbers"]))
            except _Full:
                pass
        return "".join(lines)

    def verify(self, problem: Problem, text: str) -> Verdict:
        return self._replay(problem, text)[1]

    def solvable_after(self, problem: Problem, text: str) -> bool:
        """Exact: whether the chain ``text`` (valid steps so far) can still end solved.

        Solved chains are solvable, invalid or dead-ended ones are not; otherwise the
        remaining numbers decide (the same check the generator uses, ``reaches``).
        """
        chain, verdict = self._replay(problem, text)
        if verdict.solved:
            return True
        if verdict.num_valid_steps < len(split_steps(text)) or chain.dead:
            return False
        return self._reaches(chain.available, problem["target"])

    def _replay(self, problem: Problem, text: str) -> tuple["_Chain", Verdict]:
        """Runs ``text`` through the verifier's chain: (the chain where it stopped, the verdict)."""
        problem = self.check_problem(problem)
        target = problem["target"]
        chain = _Chain(problem["numbers"], target, self.use_all)
        lines = split_steps(text)
        num_undos = 0

        def bad(k: int, line: str, why: str) -> tuple[_Chain, Verdict]:
            return chain, Verdict(False, f"step {k} {_show(line)}: {why}", k - 1, chain.last)

        for k, line in enumerate(lines, 1):
            if chain.solved:
                return chain, Verdict(False, f"text after the solution was complete (step {k})", k - 1, chain.last)
            if line == "#":
                if not chain.stack:
                    return bad(k, line, "nothing to undo")
                chain.undo()
                num_undos += 1
                continue
            if chain.dead:
                return bad(k, line, f"step {k - 1} left {chain.last}, not the target {target}; "
                                    f'only "#" (undo) may follow a dead end')
            match = _STEP_RE.fullmatch(line)
            if match is None:
                return bad(k, line, "not of the form a op b=c (ops + - * /, whole numbers, no spaces)")
            for s in (match[1], match[3], match[4]):
                if not _NUMBER_RE.fullmatch(s):
                    return bad(k, line, f"{s} has a leading zero")
            a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            i = chain.find(a)
            if i < 0:
                return bad(k, line, f"{a} is not available (available: {_num_list(chain.available)})")
            if chain.find(b, skip=i) < 0:
                which = f"a second {b}" if a == b else f"{b}"
                return bad(k, line, f"{which} is not available (available: {_num_list(chain.available)})")
            result, why = apply_op(a, op, b)
            if result is None:
                return bad(k, line, why)
            if result != c:
                return bad(k, line, f"{a}{op}{b} is {result}, not {c}")
            chain.move(a, b, c)
        n = len(lines)
        if chain.solved:
            extra = f" ({len(chain.stack)} on the final path, {num_undos} undone)" if num_undos else ""
            return chain, Verdict(True, f"solved in {n} steps{extra}", n, chain.last)
        if chain.dead:
            return chain, Verdict(False, f"step {n} leaves {chain.last}, not the target {target}", n, chain.last)
        left = chain.available
        return chain, Verdict(False, f"incomplete: {len(left)} numbers remain ({_num_list(left)})", n, chain.last)

    def parse_prompt(self, text: str, *, where: str = "problem") -> Problem:
        """``"4,9,10,13>24"`` (the prompt) or ``"4 9 10 13 -> 24"``."""
        m = re.fullmatch(r"\s*([\d,\s]+?)\s*(?:->|>)\s*(\d+)\s*", text)
        if not m:
            raise ProblemError(f'{where}: {text!r} is not a problem; write the numbers and the target as '
                               f'"4 9 10 13 -> 24", "4,9,10,13>24" or {self._example()}')
        numbers = [int(v) for v in re.split(r"[,\s]+", m.group(1).strip())]
        return self.validate_problem({"numbers": numbers, "target": int(m.group(2))}, where=where)

    @property
    def tool_trigger(self) -> int | None:
        return tok.EQUALS if self.tool else None

    def legal_written_len(self) -> int:
        """With the calculator, ``a op b=`` of the longest operands a chain can hold; without it, S."""
        return self._written_len if self.tool else self.max_step_len

    def tool_written(self, steps):
        """With the calculator: the tokens after a step's ``=`` (PAD excluded)."""
        if self.tool is None:
            return super().tool_written(steps)
        seen = jnp.cumsum(steps == tok.EQUALS, axis=-1) > 0
        return seen & (steps != tok.EQUALS) & (steps != tok.PAD)

    def tool_mask(self, text: str) -> np.ndarray:
        """With the calculator: True on the characters after each line's first ``=``, newline included."""
        mask = np.zeros((len(text),), bool)
        if self.tool is None:
            return mask
        start = 0
        for line in text.split("\n"):
            eq = line.find("=")
            if eq >= 0:
                mask[start + eq + 1: min(start + len(line) + 1, len(text))] = True
            start += len(line) + 1
        return mask

    def _walk(self, problem: Problem, rng: np.random.Generator) -> tuple[str, bool]:
        """Canonical moves (``_moves``) chosen uniformly at random until the chain ends: (text, solved)."""
        chain = _Chain(problem["numbers"], problem["target"], self.use_all)
        lines = []
        while not chain.done:
            moves = list(self._moves(chain.available))
            a, op, b, c = moves[rng.integers(len(moves))]
            chain.move(a, b, c)
            lines.append(f"{a}{op}{b}={c}\n")
        return "".join(lines), chain.solved

    def random_walk(self, problem: Problem, rng: np.random.Generator) -> str | None:
        return self._walk(self.check_problem(problem), rng)[0]

    def negative_example(self, problem: Problem, rng: np.random.Generator) -> str | None:
        """Legal steps chosen at random that end unsolved (or stop early); without the calculator, half
        the time a solution prefix with one wrong result instead.

        With the calculator the tool writes every result, so a wrong result is a state no chain reaches:
        only walks are drawn (None when 16 walks all solve the problem).
        """
        problem = self.check_problem(problem)
        if self.tool or rng.random() < 0.5:
            for _ in range(16 if self.tool else 4):
                walk, solved = self._walk(problem, rng)
                if not solved:
                    return walk
            if self.tool:
                return None
        solution = self.solve(problem)
        if not solution:
            return None
        lines = split_steps(solution)
        k = int(rng.integers(len(lines)))
        lhs, c = lines[k].split("=")
        wrong = int(c) + int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
        wrong = wrong if wrong >= 0 and wrong != int(c) else int(c) + int(rng.integers(1, 11))
        return "".join(line + "\n" for line in lines[:k]) + f"{lhs}={wrong}\n"

    # --------------------------------------------------------------- JAX side
    def init_state(self, problem: Problem) -> TaskState:
        """Fixed-shape numpy state; N = ``num_numbers``, D = N - 1 (undo stack depth).

        Keys: ``values`` int32[N] and ``alive`` bool[N] (the slots), ``target``
        int32[], ``depth`` int32[] (steps on the current path), ``done``,
        ``solved``, ``invalid`` bool[], ``stack_values`` int32[D, N] and
        ``stack_alive`` bool[D, N] (the slots before each step on the path).
        """
        problem = self.check_problem(problem)
        n = self.num_numbers
        return {
            "values": np.asarray(problem["numbers"], np.int32),
            "alive": np.ones((n,), bool),
            "target": np.int32(problem["target"]),
            "depth": np.int32(0),
            "done": np.bool_(False),
            "solved": np.bool_(False),
            "invalid": np.bool_(False),
            "stack_values": np.zeros((n - 1, n), np.int32),
            "stack_alive": np.zeros((n - 1, n), bool),
        }

    def step(self, state: TaskState, step_tokens):
        n = self.num_numbers
        step_tokens = jnp.asarray(step_tokens, jnp.int32)
        terminated, end = jtx.step_end(step_tokens)
        parsed, a, op, b, c = jtx.parse_expression(step_tokens, end, with_result=True)
        values, alive, depth = state["values"], state["alive"], state["depth"]
        slots = jnp.arange(n)
        has_a = alive & (values == a)
        slot_a = jnp.argmax(has_a)
        has_b = alive & (values == b) & (slots != slot_a)
        slot_b = jnp.argmax(has_b)
        arith_ok, result = jtx.apply_op(a, op, b)
        is_move = (terminated & parsed & jnp.any(has_a) & jnp.any(has_b) & arith_ok & (result == c)
                   & ~state["done"])
        is_undo = (terminated & jtx.is_undo(step_tokens, end) & (depth > 0)
                   & ~state["solved"] & ~state["invalid"])
        valid = is_move | is_undo

        # After a move.
        top = jnp.clip(depth, 0, n - 2)
        moved_values = jnp.where(slots == slot_a, c, values)
        moved_alive = alive & (slots != slot_b)
        left = jnp.sum(moved_alive)
        hit = c == state["target"]
        if self.use_all:
            moved_solved, moved_done = (left == 1) & hit, left == 1
        else:
            moved_solved, moved_done = hit, hit | (left == 1)
        # After an undo.
        below = jnp.clip(depth - 1, 0, n - 2)

        def pick(move, undo, otherwise):
            return jnp.where(is_move, move, jnp.where(is_undo, undo, otherwise))

        new_state = {
            "values": pick(moved_values, state["stack_values"][below], values),
            "alive": pick(moved_alive, state["stack_alive"][below], alive),
            "target": state["target"],
            "depth": pick(depth + 1, depth - 1, depth).astype(jnp.int32),
            "done": pick(moved_done, False, True),
            "solved": pick(moved_solved, False, False),
            "invalid": state["invalid"] | ~valid,
            "stack_values": jnp.where(is_move, state["stack_values"].at[top].set(values),
                                      state["stack_values"]),
            "stack_alive": jnp.where(is_move, state["stack_alive"].at[top].set(alive),
                                     state["stack_alive"]),
        }
        reward = jnp.where(new_state["solved"], 1.0, 0.0).astype(jnp.float32)
        return new_state, valid, new_state["done"], reward

    def legal_steps(self, state: TaskState):
        """Every move as step tokens: (int32[K, S], bool[K]), K = N*(N-1)*4.

        Candidate k is the ordered slot pair ``k // 4`` (pairs (i, j), i != j,
        in row-major order) with op ``OPS[k % 4]``. It is valid when both slots
        are alive, the arithmetic is legal, the chain is not done, and no
        earlier candidate writes the same step (duplicate numbers). Invalid
        candidates are all PAD (so ``step`` rejects them).
        """
        i = jnp.asarray(np.repeat(self._pairs[:, 0], 4))
        j = jnp.asarray(np.repeat(self._pairs[:, 1], 4))
        op = jnp.asarray(np.tile(np.arange(4, dtype=np.int32), len(self._pairs)))
        a, b = state["values"][i], state["values"][j]
        ok, c = jtx.apply_op(a, op, b)
        legal = state["alive"][i] & state["alive"][j] & ok & ~state["done"]
        same = (a[:, None] == a[None, :]) & (op[:, None] == op[None, :]) & (b[:, None] == b[None, :])
        earlier = jnp.tril(jnp.ones((len(op), len(op)), bool), -1)
        valid = legal & ~jnp.any(same & earlier & legal[None, :], axis=1)
        tokens = jtx.render_step(a, op, b, c, self.max_step_len)
        return jnp.where(valid[:, None], tokens, tok.PAD), valid

    def tool_output(self, state: TaskState, step_tokens, length):
        """The calculator: the result of ``a op b`` then SEP, or ``?`` SEP.

        ``?`` when the text before ``=`` is not ``a op b`` with canonical whole
        numbers, the arithmetic is illegal (negative, division by zero or
        inexact, above ``2**31-1``), or the result does not fit the output
        (``tool_output_len - 1`` digits) or the step (``length`` + digits + SEP
        > S). Operand availability is not checked (``step`` does that). If even
        ``?`` SEP does not fit in S, the caller truncates and the step is invalid.
        """
        if self.tool is None:
            return super().tool_output(state, step_tokens, length)
        size, s = self.tool_output_len, self.max_step_len
        step_tokens = jnp.asarray(step_tokens, jnp.int32)
        length = jnp.asarray(length, jnp.int32)
        parsed, a, op, b, _ = jtx.parse_expression(step_tokens, length - 1, with_result=False)
        ends_in_equals = step_tokens[jnp.clip(length - 1, 0, s - 1)] == tok.EQUALS
        arith_ok, c = jtx.apply_op(a, op, b)
        digits = jtx.num_digits(c)
        good = (parsed & ends_in_equals & (length >= 1) & arith_ok
                & (digits + 1 <= size) & (length + digits + 1 <= s))
        unknown = jnp.full((size,), tok.PAD, jnp.int32).at[0].set(tok.QUESTION).at[1].set(tok.SEP)
        forced = jnp.where(good, jtx.render_number(c, size), unknown)
        return forced, jnp.where(good, digits + 1, 2).astype(jnp.int32)


def game24(**options) -> CountdownTask:
    """Game24: four numbers in 1..13, target 24 (Countdown with fixed ranges)."""
    fixed = {"num_numbers": 4, "max_number": 13, "min_target": 24, "max_target": 24}
    for key in options:
        if key in fixed:
            raise ValueError(f"option {key!r} is fixed for game24 ({key}={fixed[key]}); valid options: "
                             f"{', '.join(k for k in CountdownTask.option_names if k not in fixed)}")
    return CountdownTask(**fixed, **options, name="game24")
