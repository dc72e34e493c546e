"""Tasks: hand-written verdicts, solvers, search traces, generators and options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alphareason import tokenizer as tok
from alphareason.tasks import (ArithmeticTask, CountdownTask, ProblemError, Verdict, get_task,
                               run_transition)
from alphareason.tasks import countdown as cd
from alphareason.tasks.base import split_steps

EXAMPLE = {"numbers": [4, 9, 10, 13], "target": 24}
COUNTDOWN = get_task("countdown")
GAME24 = get_task("game24")
ANY_TARGET = get_task("countdown", use_all=False)
ARITHMETIC = get_task("arithmetic")


# ------------------------------------------------------------- verdicts
@pytest.mark.parametrize("text, verdict", [
    ("13-9=4\n10-4=6\n6*4=24\n", Verdict(True, "solved in 3 steps", 3, 24)),
    ("13-9=4\n10-4=6\n6*4=24", Verdict(True, "solved in 3 steps", 3, 24)),  # no final newline
    ("13-9=4\n10-4=7\n", Verdict(False, 'step 2 "10-4=7": 10-4 is 6, not 7', 1, 4)),
    ("5+9=14\n", Verdict(False, 'step 1 "5+9=14": 5 is not available (available: 4, 9, 10, 13)', 0, None)),
    ("13-9=4\n10-4=6\n", Verdict(False, "incomplete: 2 numbers remain (6, 4)", 2, 6)),
    ("", Verdict(False, "incomplete: 4 numbers remain (4, 9, 10, 13)", 0, None)),
    ("13-9=4\n10-4=6\n6*4=24\n6+4=10\n",
     Verdict(False, "text after the solution was complete (step 4)", 3, 24)),
    ("13-9=4\n10-4=6\n6*4=24\n#\n", Verdict(False, "text after the solution was complete (step 4)", 3, 24)),
    ("13+10=23\n23+4=27\n27-9=18\n", Verdict(False, "step 3 leaves 18, not the target 24", 3, 18)),
    ("13-9=4\n10-4=6\n6+4=10\n#\n6*4=24\n",
     Verdict(True, "solved in 5 steps (3 on the final path, 1 undone)", 5, 24)),
    ("13-9=4\n10-4=6\n6+4=10\n6*4=24\n",
     Verdict(False, 'step 4 "6*4=24": step 3 left 10, not the target 24; only "#" (undo) may follow a dead end',
             3, 10)),
    ("13-9=4\n#\n#\n", Verdict(False, 'step 3 "#": nothing to undo', 2, None)),
    ("#\n", Verdict(False, 'step 1 "#": nothing to undo', 0, None)),
    ("13-9=4\n#\n", Verdict(False, "incomplete: 4 numbers remain (4, 9, 10, 13)", 2, None)),
    # After 13-9=4 there are two 4s: the result takes the first one's slot.
    ("13-9=4\n4+4=8\n", Verdict(False, "incomplete: 2 numbers remain (8, 10)", 2, 8)),
    ("13-9=4\n4+4=8\n8+8=16\n",
     Verdict(False, 'step 3 "8+8=16": a second 8 is not available (available: 8, 10)', 2, 8)),
    ("10-9=1\n13-4=9\n9/1=9\n", Verdict(False, "step 3 leaves 9, not the target 24", 3, 9)),
])
def test_countdown_verdicts(text, verdict):
    assert COUNTDOWN.verify(EXAMPLE, text) == verdict
    solved, num_valid, _ = run_transition(COUNTDOWN, EXAMPLE, text)
    assert (solved, num_valid) == (verdict.solved, verdict.num_valid_steps)


@pytest.mark.parametrize("line, why", [
    ("10/4=2", "10/4 is not a whole number"),
    ("10/0=0", "0 is not available (available: 4, 9, 10, 13)"),
    ("4-9=5", "4-9 is negative"),
    ("9-4=6", "9-4 is 5, not 6"),
    ("24+0=24", "24 is not available (available: 4, 9, 10, 13)"),
    ("04+9=13", "04 has a leading zero"),
    ("4+9=013", "013 has a leading zero"),
    ("4 + 9=13", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),
    ("4+9", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),
    ("", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),
    ("4+9=13=13", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),
    ("4+4=8", "a second 4 is not available (available: 4, 9, 10, 13)"),
    ("4^9=13", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),
    ("４+9=13", "not of the form a op b=c (ops + - * /, whole numbers, no spaces)"),  # full-width digit
])
def test_countdown_bad_first_step(line, why):
    verdict = COUNTDOWN.verify(EXAMPLE, line + "\n")
    assert verdict == Verdict(False, f'step 1 "{line}": {why}', 0, None)
    assert run_transition(COUNTDOWN, EXAMPLE, line + "\n") == (False, 0, True)


def test_division_by_zero():
    problem = {"numbers": [4, 4, 9, 13], "target": 24}
    text = "4-4=0\n9/0=0\n"
    assert COUNTDOWN.verify(problem, text) == Verdict(False, 'step 2 "9/0=0": 9/0 divides by zero', 1, 0)
    assert run_transition(COUNTDOWN, problem, text) == (False, 1, True)
    assert COUNTDOWN.verify(problem, "4-4=0\n0/9=0\n").num_valid_steps == 2


def test_countdown_overflow_is_invalid_in_both():
    task = get_task("countdown", num_numbers=3, max_number=99_999, min_target=0, max_target=10)
    problem = {"numbers": [99_999, 99_999, 1], "target": 0}
    text = "99999*99999=9999800001\n"
    assert task.verify(problem, text) == Verdict(
        False, f'step 1 "{text[:-1]}": 99999*99999 is 9999800001, larger than 2147483647', 0, None)
    assert run_transition(task, problem, text) == (False, 0, True)
    # A wrapped-around int32 product must not be accepted either.
    wrapped = (99_999 * 99_999) % 2**32
    assert run_transition(task, problem, f"99999*99999={wrapped}\n")[:2] == (False, 0)
    ok = "99999-99999=0\n0*1=0\n"
    assert task.verify(problem, ok).solved and run_transition(task, problem, ok) == (True, 2, True)


def test_countdown_without_use_all():
    assert ANY_TARGET.verify(EXAMPLE, "10+13=23\n") == Verdict(False, "incomplete: 3 numbers remain (4, 9, 23)",
                                                               1, 23)
    assert ANY_TARGET.verify(EXAMPLE, "13-9=4\n10-4=6\n6*4=24\n") == Verdict(True, "solved in 3 steps", 3, 24)
    problem = {"numbers": [4, 9, 10, 13], "target": 23}
    assert ANY_TARGET.verify(problem, "13+10=23\n") == Verdict(True, "solved in 1 steps", 1, 23)
    assert ANY_TARGET.verify(problem, "13+10=23\n4+9=13\n").reason == "text after the solution was complete (step 2)"
    assert COUNTDOWN.verify(problem, "13+10=23\n") == Verdict(False, "incomplete: 3 numbers remain (4, 9, 23)",
                                                              1, 23)
    dead = "4+9=13\n13+10=23\n23*13=299\n"
    assert ANY_TARGET.verify(EXAMPLE, dead) == Verdict(False, "step 3 leaves 299, not the target 24", 3, 299)
    assert run_transition(ANY_TARGET, EXAMPLE, dead) == (False, 3, True)
    assert run_transition(ANY_TARGET, problem, "13+10=23\n") == (True, 1, True)


def test_game24_is_countdown_with_fixed_ranges():
    assert GAME24.name == "game24"
    assert (GAME24.num_numbers, GAME24.max_number, GAME24.min_target, GAME24.max_target) == (4, 13, 24, 24)
    assert GAME24.verify(EXAMPLE, "13-9=4\n10-4=6\n6*4=24\n").solved
    with pytest.raises(ProblemError, match="target 25 is out of range; the target must be 24"):
        GAME24.validate_problem({"numbers": [4, 9, 10, 13], "target": 25})
    with pytest.raises(ProblemError, match=r"number 14 is out of range; numbers must be in 1\.\.13"):
        GAME24.validate_problem({"numbers": [4, 9, 10, 14], "target": 24})


def test_prompts():
    assert COUNTDOWN.prompt(EXAMPLE) == "4,9,10,13>24\n"
    assert COUNTDOWN.prompt({"numbers": [13, 4, 10, 9], "target": 24}) == "13,4,10,9>24\n"
    assert ARITHMETIC.prompt({"a": 123, "b": 45}) == "123*45\n"
    for task, problem in ((COUNTDOWN, {"numbers": [99] * 4, "target": 100}),
                          (GAME24, {"numbers": [13] * 4, "target": 24}),
                          (ARITHMETIC, {"a": 999, "b": 999})):
        assert len(tok.encode(task.prompt(problem), bos=True)) == task.max_prompt_len


def test_static_sizes():
    assert (COUNTDOWN.max_step_len, COUNTDOWN.max_steps, COUNTDOWN.max_prompt_len) == (19, 3, 17)
    assert (GAME24.max_step_len, GAME24.max_steps, GAME24.max_prompt_len) == (14, 3, 16)
    assert (ARITHMETIC.max_step_len, ARITHMETIC.max_steps, ARITHMETIC.max_prompt_len) == (20, 5, 9)
    assert get_task("countdown", tool="calculator").tool_output_len == 9
    assert get_task("game24", tool="calculator").tool_output_len == 6
    assert COUNTDOWN.tool_output_len == 0
    # The longest valid steps fit S exactly.
    assert len("9801*9801=96059601\n") == COUNTDOWN.max_step_len
    assert COUNTDOWN.verify({"numbers": [99, 99, 99, 99], "target": 100},
                            "99*99=9801\n99*99=9801\n9801*9801=96059601\n").num_valid_steps == 3
    assert len("169*169=28561\n") == GAME24.max_step_len
    assert len("98901+899100=998001\n") == ARITHMETIC.max_step_len


def test_split_steps():
    assert split_steps("") == []
    assert split_steps("\n") == [""]
    assert split_steps("a\nb") == split_steps("a\nb\n") == ["a", "b"]
    assert split_steps("a\n\n") == ["a", ""]


# ------------------------------------------------------------- arithmetic
def test_arithmetic_solution_format():
    assert ARITHMETIC.solve({"a": 123, "b": 45}) == "123*5=615\n123*40=4920\n615+4920=5535\n"
    assert ARITHMETIC.solve({"a": 123, "b": 7}) == "123*7=861\n"
    assert ARITHMETIC.solve({"a": 123, "b": 105}) == (
        "123*5=615\n123*0=0\n123*100=12300\n615+0=615\n615+12300=12915\n")
    assert ARITHMETIC.search_trace({"a": 123, "b": 45}) == ARITHMETIC.solve({"a": 123, "b": 45})
    assert ARITHMETIC.search_trace({"a": 123, "b": 45}, max_steps=1) == "123*5=615\n"


@pytest.mark.parametrize("text, verdict", [
    ("123*5=615\n123*40=4920\n615+4920=5535\n", Verdict(True, "solved in 3 steps", 3, 5535)),
    ("123*5=615\n123*40=4900\n", Verdict(False, 'step 2 "123*40=4900": 123*40 is 4920, not 4900', 1, 4900)),
    ("123*5=615\n123*4=492\n", Verdict(False, 'step 2 "123*4=492": expected "123*40=4920"', 1, 492)),
    ("123*45=5535\n", Verdict(False, 'step 1 "123*45=5535": expected "123*5=615"', 0, 5535)),
    ("123*5=615\n", Verdict(False, "incomplete: 1 of 3 steps done", 1, 615)),
    ("", Verdict(False, "incomplete: 0 of 3 steps done", 0, None)),
    ("123*5=615\n123*40=4920\n615+4920=5535\n1+1=2\n",
     Verdict(False, "text after the solution was complete (step 4)", 3, 2)),
    ("123*5=615\n#\n123*5=615\n123*40=4920\n615+4920=5535\n", Verdict(True, "solved in 5 steps", 5, 5535)),
    ("#\n", Verdict(False, 'step 1 "#": nothing to undo', 0, None)),
])
def test_arithmetic_verdicts(text, verdict):
    problem = {"a": 123, "b": 45}
    assert ARITHMETIC.verify(problem, text) == verdict
    assert run_transition(ARITHMETIC, problem, text)[:2] == (verdict.solved, verdict.num_valid_steps)


def test_arithmetic_options():
    with pytest.raises(ValueError, match="max_digits_a=5 is invalid: it must be an integer in 1..4"):
        get_task("arithmetic", max_digits_a=5)
    with pytest.raises(ValueError, match="arithmetic task has no tool"):
        get_task("arithmetic", tool="calculator")
    task = get_task("arithmetic", max_digits_a=4, max_digits_b=4)
    assert task.num_difficulties == 16 and task.max_steps == 7
    assert task.difficulty({"a": 7, "b": 1234}) == 3
    assert task.difficulty({"a": 1234, "b": 7}) == 12
    with pytest.raises(ProblemError, match=r'"b" = 10000 is out of range; it must be in 0\.\.9999'):
        task.validate_problem({"a": 1, "b": 10000})


# ------------------------------------------------------------- options
def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'chess'; valid tasks: countdown, game24, arithmetic"):
        get_task("chess")
    with pytest.raises(ValueError, match="unknown option 'numbers' for task 'countdown'; valid options: "
                                         "num_numbers, max_number"):
        get_task("countdown", numbers=4)
    with pytest.raises(ValueError, match="option num_numbers=1 is invalid"):
        get_task("countdown", num_numbers=1)
    with pytest.raises(ValueError, match="option num_numbers=True is invalid"):
        get_task("countdown", num_numbers=True)
    with pytest.raises(ValueError, match="option max_number='99' is invalid"):
        get_task("countdown", max_number="99")
    with pytest.raises(ValueError, match="min_target=50 is larger than max_target=20"):
        get_task("countdown", min_target=50, max_target=20)
    with pytest.raises(ValueError, match=r"option tool='abacus' is invalid: choose one of \(None, 'calculator'\)"):
        get_task("countdown", tool="abacus")
    with pytest.raises(ValueError, match="option use_all=1 is invalid"):
        get_task("countdown", use_all=1)
    with pytest.raises(ValueError, match=r"option 'max_number' is fixed for game24 \(max_number=13\); "
                                         "valid options: use_all, tool, max_trace_steps"):
        get_task("game24", max_number=20)
    with pytest.raises(ValueError, match="unknown option 'colour' for task 'game24'"):
        get_task("game24", colour=1)
    assert get_task("countdown") == CountdownTask() and hash(get_task("countdown")) == hash(CountdownTask())
    assert get_task("countdown") != get_task("game24")
    assert get_task("arithmetic", max_digits_b=2) == ArithmeticTask(max_digits_b=2)


# ------------------------------------------------------------- solvers
def _brute_force(numbers, target, use_all):
    """Tries every chain of steps (independent of the task's solver)."""
    def rec(values):
        for i, j in itertools.permutations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            for c in (a + b, a - b if a >= b else None, a * b, a // b if b and a % b == 0 else None):
                if c is None or c > 2**31 - 1:
                    continue
                if (not use_all and c == target) or (not rest and c == target):
                    return True
                if rest and rec(rest + [c]):
                    return True
        return False
    return rec(list(numbers))


def test_reachable_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(120):
        n = int(rng.integers(2, 5))
        m = int(rng.choice([4, 13, 99]))
        numbers = rng.integers(1, m + 1, n).tolist()
        target = int(rng.integers(0, 3 * m))
        for use_all in (True, False):
            task = CountdownTask(num_numbers=n, max_number=m, min_target=0, max_target=3 * m, use_all=use_all)
            problem = {"numbers": numbers, "target": target}
            assert task.solvable(problem) == _brute_force(numbers, target, use_all), (problem, use_all)


def test_game24_has_1346_solvable_multisets():
    solvable = [ms for ms in itertools.combinations_with_replacement(range(1, 14), 4)
                if GAME24.solvable({"numbers": list(ms), "target": 24})]
    assert len(solvable) == 1346
    assert len(GAME24.generate(3, 1346)) == 1346
    with pytest.raises(ValueError, match="found only 1346 of the 1347"):
        GAME24.generate(3, 1347)


@pytest.mark.parametrize("task", [COUNTDOWN, ANY_TARGET, GAME24], ids=["countdown", "any_target", "game24"])
def test_solve_and_search_trace(task):
    for problem in task.generate(5, 25):
        solution = task.solve(problem)
        verdict = task.verify(problem, solution)
        assert verdict.solved, (problem, solution, verdict)
        trace = task.search_trace(problem)
        lines = split_steps(trace)
        assert len(lines) <= task.max_trace_steps
        assert task.verify(problem, trace).solved or len(lines) == task.max_trace_steps
        full = task.search_trace(problem, max_steps=10**6)  # depth-first search is complete
        assert task.verify(problem, full).solved, (problem, full)
        assert full.startswith(trace)
        if task.use_all:
            assert verdict.num_valid_steps == task.max_steps
    # A shortest solution without use_all may stop early.
    assert ANY_TARGET.solve({"numbers": [4, 9, 10, 13], "target": 23}) == "13+10=23\n"


def test_search_trace_backtracks_and_unsolvable():
    trace = COUNTDOWN.search_trace(EXAMPLE, max_steps=10**6)
    assert "#\n" in trace and COUNTDOWN.verify(EXAMPLE, trace).solved
    assert COUNTDOWN.search_trace(EXAMPLE) == "".join(trace.splitlines(keepends=True)[:64])
    unsolvable = {"numbers": [1, 1, 1, 1], "target": 50}
    assert COUNTDOWN.solve(unsolvable) is None
    full = COUNTDOWN.search_trace(unsolvable, max_steps=10**6)
    assert COUNTDOWN.verify(unsolvable, full) == Verdict(False, "incomplete: 4 numbers remain (1, 1, 1, 1)",
                                                          len(split_steps(full)), None)
    assert COUNTDOWN.search_trace(EXAMPLE, max_steps=0) == ""
    assert COUNTDOWN.search_trace(EXAMPLE) == COUNTDOWN.search_trace(EXAMPLE)


def test_negative_examples_are_not_solutions():
    rng = np.random.default_rng(0)
    for task in (COUNTDOWN, ANY_TARGET, ARITHMETIC):
        for problem in task.generate(1, 20):
            text = task.negative_example(problem, rng)
            assert text is not None and not task.verify(problem, text).solved


def test_random_walks_take_legal_steps_until_the_chain_ends():
    rng = np.random.default_rng(0)
    ends = set()
    for task in (COUNTDOWN, ANY_TARGET):
        for problem in task.generate(2, 30):
            text = task.random_walk(problem, rng)
            lines = split_steps(text)
            verdict = task.verify(problem, text)
            assert verdict.num_valid_steps == len(lines)  # every step legal
            for d in range(1, len(lines)):  # no earlier state ends the chain
                assert not task.verify(problem, "".join(x + "\n" for x in lines[:d])).solved
            if task.use_all:
                assert len(lines) == len(problem["numbers"]) - 1  # one number left: the chain is over
            ends.add(verdict.solved)
    assert ends == {True, False}  # both endings occur
    assert ARITHMETIC.random_walk(ARITHMETIC.generate(0, 1)[0], rng) is None  # no legal-step listing


# ------------------------------------------------------------- generators
@pytest.mark.parametrize("task", [COUNTDOWN, ANY_TARGET, GAME24, ARITHMETIC],
                         ids=["countdown", "any_target", "game24", "arithmetic"])
def test_generator(task):
    problems = task.generate(7, 60)
    assert problems == task.generate(7, 60)
    assert problems != task.generate(8, 60)
    keys = [task.problem_key(p) for p in problems]
    assert len(set(keys)) == 60
    for p in problems:
        assert task.validate_problem(p) == p
        assert 0 <= task.difficulty(p) < task.num_difficulties
        assert task.verify(p, task.solve(p)).solved
    excluded = task.generate(7, 30, exclude=problems[:30])
    assert not {task.problem_key(p) for p in excluded} & set(keys[:30])
    for level in range(task.num_difficulties):
        chosen = task.generate(11, 5, difficulty=level)
        assert len(chosen) == 5 and all(task.difficulty(p) == level for p in chosen)
    with pytest.raises(ValueError, match="difficulty"):
        task.generate(0, 1, difficulty=task.num_difficulties)


def test_countdown_problem_key_is_a_multiset():
    a = COUNTDOWN.problem_key({"numbers": [4, 9, 10, 13], "target": 24})
    assert a == COUNTDOWN.problem_key({"numbers": [13, 10, 9, 4], "target": 24})
    assert a != COUNTDOWN.problem_key({"numbers": [4, 9, 10, 13], "target": 25})
    assert not any(sorted(p["numbers"]) == [4, 9, 10, 13] and p["target"] == 24
                   for p in GAME24.generate(0, 1345, exclude=[{"numbers": [13, 10, 9, 4], "target": 24}]))


def test_difficulty_levels():
    # f = fraction of distinct first moves that keep 24 reachable.
    assert GAME24.difficulty({"numbers": [1, 2, 3, 4], "target": 24}) == 0
    assert GAME24.difficulty({"numbers": [1, 1, 1, 8], "target": 24}) == 1  # (1+1+1)*8 only
    assert GAME24.difficulty({"numbers": [1, 2, 7, 12], "target": 24}) == 2
    assert GAME24.difficulty({"numbers": [3, 3, 8, 8], "target": 24}) == 2  # unsolvable with whole numbers
    levels = [COUNTDOWN.difficulty(p) for p in COUNTDOWN.generate(0, 300)]
    assert set(levels) == {0, 1, 2}
