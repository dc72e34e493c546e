"""Problem files: reading, writing and the error messages for bad lines."""

from __future__ import annotations

import pytest

from alphareason.tasks import ProblemError, get_task, read_problems, write_problems

COUNTDOWN = get_task("countdown")
GAME24 = get_task("game24")
ARITHMETIC = get_task("arithmetic")
GOOD = '{"numbers": [4, 9, 10, 13], "target": 24}'


def test_round_trip(tmp_path):
    for task in (COUNTDOWN, GAME24, ARITHMETIC):
        problems = task.generate(0, 25)
        path = tmp_path / task.name / "problems.jsonl"
        write_problems(path, problems)
        assert read_problems(path, task) == problems
        assert path.read_text().count("\n") == 25


def test_blank_lines_and_extra_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(f"\n{GOOD}\n   \n" '{"numbers": [1, 2, 3, 4], "target": 24, "id": 7}\n\n')
    assert read_problems(path, COUNTDOWN) == [{"numbers": [4, 9, 10, 13], "target": 24},
                                              {"numbers": [1, 2, 3, 4], "target": 24}]


@pytest.mark.parametrize("task, bad, message", [
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13], "target": 24', r"line 3: invalid JSON \(.*\); write one JSON object"),
    (COUNTDOWN, "[4, 9, 10, 13]", r"line 3: expected a JSON object like"),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13]}', r'line 3: missing field "target"; write each problem as'),
    (COUNTDOWN, '{"target": 24}', r'line 3: missing field "numbers"'),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13], "target": "24"}', r"line 3: \"target\" is '24', not an integer"),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13], "target": 24.0}', r'line 3: "target" is 24.0, not an integer'),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13], "target": true}', r'line 3: "target" is True, not an integer'),
    (COUNTDOWN, '{"numbers": [4, 9.5, 10, 13], "target": 24}', r'line 3: "numbers" item 2 is 9.5, not an integer'),
    (COUNTDOWN, '{"numbers": [4, false, 10, 13], "target": 24}', r'"numbers" item 2 is False, not an integer'),
    (COUNTDOWN, '{"numbers": "4 9 10 13", "target": 24}', r'line 3: "numbers" must be a list of 4 integers'),
    (COUNTDOWN, '{"numbers": [4, 9, 10], "target": 24}',
     r'line 3: "numbers" has 3 numbers \[4, 9, 10\] but this task takes 4 \(num_numbers=4\); give exactly 4'),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13, 1], "target": 24}', r'"numbers" has 5 numbers'),
    (COUNTDOWN, '{"numbers": [4, 9, 100, 13], "target": 24}',
     r"line 3: number 100 is out of range; numbers must be in 1\.\.99 \(max_number=99\)"),
    (COUNTDOWN, '{"numbers": [4, 9, 0, 13], "target": 24}', r"line 3: number 0 is out of range"),
    (COUNTDOWN, '{"numbers": [4, 9, 10, 13], "target": 101}',
     r"line 3: target 101 is out of range; the target must be in 10\.\.100 \(min_target\.\.max_target\)"),
    (COUNTDOWN, '{"numbers": [1, 1, 1, 1], "target": 50}',
     r"line 3: 1, 1, 1, 1 cannot reach 50 using every number with \+ - \* / and whole-number results; "
     r"remove this problem or fix its numbers or target"),
    (GAME24, '{"numbers": [3, 3, 8, 8], "target": 24}', r"line 3: 3, 3, 8, 8 cannot reach 24"),
    (GAME24, '{"numbers": [4, 9, 10, 13], "target": 23}', r"line 3: target 23 is out of range; the target must be 24"),
    (ARITHMETIC, '{"a": 123}', r'line 3: missing field "b"'),
    (ARITHMETIC, '{"a": 123, "b": 4.5}', r'line 3: "b" is 4.5, not an integer'),
    (ARITHMETIC, '{"a": 1234, "b": 45}', r'line 3: "a" = 1234 is out of range; it must be in 0\.\.999'),
    (ARITHMETIC, '{"a": -1, "b": 45}', r'line 3: "a" = -1 is out of range'),
])
def test_bad_lines_name_file_line_and_fix(tmp_path, task, bad, message):
    path = tmp_path / "bad.jsonl"
    good = GOOD if task is not ARITHMETIC else '{"a": 12, "b": 34}'
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(ProblemError, match=message) as info:
        read_problems(path, task)
    assert str(info.value).startswith(f"{path} line 3: ")


def test_missing_file(tmp_path):
    with pytest.raises(ProblemError, match="no such problem file; check the path"):
        read_problems(tmp_path / "nope.jsonl", COUNTDOWN)


def test_unsolvable_without_use_all_message(tmp_path):
    task = get_task("countdown", use_all=False)
    path = tmp_path / "p.jsonl"
    path.write_text('{"numbers": [1, 1, 1, 1], "target": 50}\n')
    with pytest.raises(ProblemError, match=r"p.jsonl line 1: 1, 1, 1, 1 cannot reach 50 from any of the numbers"):
        read_problems(path, task)
