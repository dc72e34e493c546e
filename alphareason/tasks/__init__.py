"""Reasoning tasks: the registry (``get_task``), problem files and the transition runner.

Tasks: ``countdown`` (options ``num_numbers``, ``max_number``, ``min_target``,
``max_target``, ``use_all``, ``tool``, ``max_trace_steps``), ``game24`` (Countdown
with four numbers in 1..13 and target 24; options ``use_all``, ``tool``,
``max_trace_steps``) and ``arithmetic`` (``max_digits_a``, ``max_digits_b``).
"""

from __future__ import annotations

import functools
from typing import Any

from alphareason import tokenizer as tok
from alphareason.tasks.arithmetic import ArithmeticTask
from alphareason.tasks.base import Problem, ProblemError, Task, TaskState, Verdict, split_steps
from alphareason.tasks.countdown import CountdownTask, game24
from alphareason.tasks.problem_files import read_problems, write_problems

__all__ = ["ArithmeticTask", "CountdownTask", "Problem", "ProblemError", "Task", "TaskState", "Verdict",
           "TASK_NAMES", "get_task", "read_problems", "run_transition", "split_steps", "write_problems"]

_GAME24_FIXED = ("num_numbers", "max_number", "min_target", "max_target")
_REGISTRY = {
    "countdown": (CountdownTask, CountdownTask.option_names),
    "game24": (game24, tuple(k for k in CountdownTask.option_names if k not in _GAME24_FIXED)),
    "arithmetic": (ArithmeticTask, ArithmeticTask.option_names),
}
TASK_NAMES = tuple(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` with ``options``; raises ``ValueError`` for unknown names or options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    make, valid = _REGISTRY[name]
    for key in options:
        if key not in valid and not (name == "game24" and key in _GAME24_FIXED) and key != "tool":
            raise ValueError(f"unknown option {key!r} for task {name!r}; valid options: {', '.join(valid)}")
    return make(**options)


@functools.lru_cache(maxsize=64)
def _jitted_step(task: Task):
    import jax  # noqa: PLC0415  (keeps `import alphareason.tasks` light for data tools)
    return jax.jit(task.step)


def run_transition(task: Task, problem: Problem, text: str) -> tuple[bool, int, bool]:
    """Runs ``text`` through the task's JAX transition, one line at a time.

    Each line (``split_steps``) becomes int32[S] step tokens; a line that does
    not fit S or is not in the vocabulary is an invalid step. Stops at the
    first invalid step. Returns ``(solved, num_valid_steps, done)``: solved
    when the last step earned reward 1, done as reported by the last step
    (True after an invalid one; False for an empty text).
    """
    step = _jitted_step(task)
    state = task.init_state(problem)
    num_valid, done, solved = 0, False, False
    for line in split_steps(text):
        try:
            tokens = tok.encode_padded(line + "\n", task.max_step_len)
        except tok.TokenizerError:
            return False, num_valid, True
        state, valid, done, reward = step(state, tokens)
        if not bool(valid):
            return False, num_valid, True
        num_valid += 1
        solved = float(reward) == 1.0
    return solved, num_valid, bool(done)
