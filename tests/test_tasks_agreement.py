"""Property tests: the Python verifier and the JAX step transition agree.

For every task, over solver output, random legal walks (with ``#`` undos),
search traces, corrupted texts and garbage over the vocabulary, ``verify``
and ``run_transition`` must give the same solved flag, the same number of
valid steps (so the same first invalid step) and the same "done".
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphareason import tokenizer as tok
from alphareason.tasks import get_task, run_transition
from alphareason.tasks.base import split_steps

TASKS = {
    "countdown": get_task("countdown"),
    "countdown_any": get_task("countdown", use_all=False),
    "game24": get_task("game24"),
    "small": get_task("countdown", num_numbers=3, max_number=6, min_target=0, max_target=40, use_all=False),
    "arithmetic": get_task("arithmetic"),
}
COUNTDOWNS = [k for k in TASKS if k != "arithmetic"]
POOLS = {name: task.generate(0, 40) for name, task in TASKS.items()}
STEP_CHARS = "0123456789+-*/=#\n"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------ reference model
def ref_apply(a: int, op: str, b: int) -> int | None:
    """Countdown arithmetic, written independently of the task code."""
    c = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
         "/": lambda: a // b if b and a % b == 0 else -1}[op]()
    return c if 0 <= c <= 2**31 - 1 else None


def ref_legal_lines(values: list[int]) -> list[str]:
    """Every distinct legal step text from the multiset ``values``."""
    out = []
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            for op in "+-*/":
                c = None if i == j else ref_apply(a, op, b)
                if c is not None and f"{a}{op}{b}={c}" not in out:
                    out.append(f"{a}{op}{b}={c}")
    return out


def random_walk(task, problem, rng: random.Random, undo_rate: float) -> tuple[str, bool]:
    """A random chain of legal steps with random ``#`` undos; returns (text, solved)."""
    target, use_all = problem["target"], task.use_all
    values, stack, lines = list(problem["numbers"]), [], []
    solved = dead = False
    for _ in range(rng.randint(0, 12)):
        if solved:
            break
        if stack and (dead or rng.random() < undo_rate):
            values, solved, dead = stack.pop(), False, False
            lines.append("#")
            continue
        if dead:
            break
        line = rng.choice(ref_legal_lines(values))
        a, _, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line).groups()
        stack.append(list(values))
        values.remove(int(a))
        values.remove(int(b))
        values.append(int(c))
        lines.append(line)
        hit = int(c) == target
        solved = hit and (len(values) == 1 or not use_all)
        dead = len(values) == 1 and not solved
    return "".join(line + "\n" for line in lines), solved


def corrupt(text: str, rng: random.Random, alphabet: str = STEP_CHARS) -> str:
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(text))
        kind = rng.choice("rid") if text else "i"
        ch = rng.choice(alphabet)
        if kind == "r" and pos < len(text):
            text = text[:pos] + ch + text[pos + 1:]
        elif kind == "d" and pos < len(text):
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + ch + text[pos:]
    return text


def check_agreement(task, problem, text):
    verdict = task.verify(problem, text)
    solved, num_valid, done = run_transition(task, problem, text)
    assert (solved, num_valid) == (verdict.solved, verdict.num_valid_steps), (problem, text, verdict)
    assert done == (not verdict.reason.startswith("incomplete")), (problem, text, verdict)
    return verdict


def texts(name):
    """Strategy: (problem, text) pairs for task ``name`` of every kind."""
    task = TASKS[name]

    @st.composite
    def build(draw):
        problem = draw(st.sampled_from(POOLS[name]))
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        kind = draw(st.sampled_from(["solution", "walk", "trace", "corrupt", "garbage"]))
        if kind == "solution":
            text = task.solve(problem)
        elif kind == "walk":
            text = random_walk(task, problem, rng, 0.3)[0] if name != "arithmetic" else _arith_walk(
                task, problem, rng)
        elif kind == "trace":
            text = task.search_trace(problem, max_steps=rng.randint(0, 80))
        elif kind == "corrupt":
            base = task.solve(problem) if rng.random() < 0.5 else task.search_trace(problem, max_steps=12)
            text = corrupt(base, rng)
        else:
            alphabet = STEP_CHARS if rng.random() < 0.7 else tok.CHARS + "\n"
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.2 and text.endswith("\n"):
            text = text[:-1]  # a missing final newline is accepted by both
        return problem, text

    return build()


def _arith_walk(task, problem, rng):
    """Arithmetic: a solution prefix with random undos (and re-dos)."""
    steps, lines, pos = split_steps(task.solve(problem)), [], 0
    for _ in range(rng.randint(0, 10)):
        if pos and rng.random() < 0.3:
            lines.append("#")
            pos -= 1
        elif pos < len(steps):
            lines.append(steps[pos])
            pos += 1
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------ properties
@pytest.mark.parametrize("name", list(TASKS))
@SETTINGS
@given(data=st.data())
def test_verify_and_transition_agree(name, data):
    problem, text = data.draw(texts(name))
    check_agreement(TASKS[name], problem, text)


@pytest.mark.parametrize("name", COUNTDOWNS)
@SETTINGS
@given(data=st.data())
def test_random_legal_walks(name, data):
    """Legal walks with undos are valid throughout, and solved exactly when the model says so."""
    task = TASKS[name]
    problem = data.draw(st.sampled_from(POOLS[name]))
    text, solved = random_walk(task, problem, random.Random(data.draw(st.integers(0, 2**32 - 1))), 0.25)
    verdict = check_agreement(task, problem, text)
    assert verdict.num_valid_steps == len(split_steps(text))
    assert verdict.solved == solved


@pytest.mark.parametrize("name", COUNTDOWNS)
@SETTINGS
@given(numbers=st.lists(st.integers(1, 13), min_size=4, max_size=4), target=st.integers(0, 60),
       seed=st.integers(0, 2**32 - 1))
def test_any_problem_in_range(name, numbers, target, seed):
    """Problems need not be solvable for the verifier; walks on arbitrary ones agree too."""
    task = TASKS[name]
    numbers = [min(v, task.max_number) for v in numbers[:task.num_numbers]]
    problem = {"numbers": numbers, "target": min(max(target, task.min_target), task.max_target)}
    rng = random.Random(seed)
    text = random_walk(task, problem, rng, 0.2)[0]
    check_agreement(task, problem, text)
    check_agreement(task, problem, corrupt(text, rng))


def test_long_lines_are_invalid_in_both():
    task = TASKS["countdown"]
    problem = {"numbers": [4, 9, 10, 13], "target": 24}
    line = "1" * 30 + "+1=" + "1" * 29 + "2"
    assert len(line) > task.max_step_len
    assert run_transition(task, problem, line + "\n") == (False, 0, True)
    assert task.verify(problem, line + "\n").num_valid_steps == 0
