"""Problem files: JSON Lines, one problem per line, validated by the task.

``{"numbers": [4, 9, 10, 13], "target": 24}`` for Countdown / Game24,
``{"a": 123, "b": 45}`` for arithmetic. Blank lines are skipped; every error
names the file, the line number and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from alphareason.tasks.base import Problem, ProblemError, Task


def read_problems(path: str | os.PathLike, task: Task) -> list[Problem]:
    """Reads and validates a JSONL problem file; raises ``ProblemError`` naming the bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProblemError(f"{path}: no such problem file; check the path") from None
    except UnicodeDecodeError as e:
        raise ProblemError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"save the file as UTF-8 JSON Lines") from None
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); write one JSON "
                               f"object per line, e.g. {json.dumps(task.generate(0, 1)[0])}") from None
        problems.append(task.validate_problem(obj, where=where))
    return problems


def write_problems(path: str | os.PathLike, problems: Iterable[Problem]) -> None:
    """Writes problems as JSON Lines (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem) + "\n")
