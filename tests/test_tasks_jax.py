"""The JAX side of the tasks: legal-step generator, calculator tool, jit + vmap."""

from __future__ import annotations

import functools
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alphareason import tokenizer as tok
from alphareason.tasks import get_task
from alphareason.tasks.base import split_steps

COUNTDOWN = get_task("countdown", tool="calculator")
SMALL = get_task("countdown", num_numbers=3, max_number=6, min_target=0, max_target=40, use_all=False)
ARITHMETIC = get_task("arithmetic")


def ref_apply(a: int, op: str, b: int) -> int | None:
    c = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
         "/": lambda: a // b if b and a % b == 0 else -1}[op]()
    return c if 0 <= c <= 2**31 - 1 else None


def ref_legal_lines(values: list[int]) -> set[str]:
    return {f"{a}{op}{b}={ref_apply(a, op, b)}"
            for i, a in enumerate(values) for j, b in enumerate(values) if i != j
            for op in "+-*/" if ref_apply(a, op, b) is not None}


@functools.lru_cache(maxsize=None)
def compiled(task, what):
    if what == "step":
        return jax.jit(task.step)
    if what == "step_each":  # one state, many candidate steps
        return jax.jit(jax.vmap(task.step, in_axes=(None, 0)))
    if what == "legal":
        return jax.jit(task.legal_steps)
    if what == "tool":
        return jax.jit(task.tool_output)
    if what == "batch_step":
        return jax.jit(jax.vmap(task.step))
    if what == "batch_legal":
        return jax.jit(jax.vmap(task.legal_steps))
    if what == "batch_tool":
        return jax.jit(jax.vmap(task.tool_output))
    raise ValueError(what)


def encode(task, line):
    return tok.encode_padded(line + "\n", task.max_step_len)


# ------------------------------------------------------------ legal steps
@pytest.mark.parametrize("task", [COUNTDOWN, SMALL], ids=["countdown", "small"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_legal_steps_are_exactly_the_legal_moves(task, seed):
    rng = random.Random(seed)
    problem = rng.choice(task.generate(0, 30))
    state = task.init_state(problem)
    values, stack = list(problem["numbers"]), []
    n, s = task.num_numbers, task.max_step_len
    for _ in range(rng.randint(0, 5)):
        tokens, valid = compiled(task, "legal")(state)
        tokens, valid = np.asarray(tokens), np.asarray(valid)
        assert tokens.shape == (n * (n - 1) * 4, s) and valid.shape == (n * (n - 1) * 4,)
        done = bool(state["done"])
        lines = [tok.decode(row) for row in tokens[valid]]
        assert all(line.endswith("\n") for line in lines)
        lines = [line[:-1] for line in lines]
        assert len(lines) == len(set(lines))  # duplicates are masked
        assert set(lines) == (set() if done else ref_legal_lines(values))
        assert not tokens[~valid].any()  # invalid candidates are all PAD
        # what a scorer reads of a legal step (Task.legal_written_len): every model-written token
        w = task.legal_written_len()
        written = (tokens != tok.PAD) & ~np.asarray(task.tool_written(jnp.asarray(tokens)))
        assert not written[:, w:].any()
        _, stepped_valid, _, _ = compiled(task, "step_each")(state, tokens)
        np.testing.assert_array_equal(np.asarray(stepped_valid), valid)
        # Move on: a random legal step, or undo (the only way on from a dead end).
        if bool(state["solved"]):
            break
        if stack and (done or rng.random() < 0.2):
            line = "#"
            values = stack.pop()
        elif done:
            break
        else:
            line = rng.choice(sorted(lines))
            a, _, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line).groups()
            stack.append(list(values))
            values.remove(int(a))
            values.remove(int(b))
            values.append(int(c))
        state, ok, _, _ = compiled(task, "step")(state, encode(task, line))
        assert bool(ok)


def test_legal_written_len_is_the_longest_step_the_model_writes():
    """The bound is reached: from 99, 99, 99, 99 two steps give 9801 and 9801, whose product is the longest
    legal step the model writes (``9801*9801=``: 10 of the step's 19 tokens); without a tool it is the step."""
    task = get_task("countdown", num_numbers=4, max_number=99, tool="calculator")
    state = task.init_state({"numbers": [99, 99, 99, 99], "target": 50})
    for line in ("99*99=9801", "99*99=9801"):
        state, ok, _, _ = compiled(task, "step")(state, encode(task, line))
        assert bool(ok)
    tokens, valid = map(np.asarray, compiled(task, "legal")(state))
    written = (tokens != tok.PAD) & ~np.asarray(task.tool_written(jnp.asarray(tokens)))
    assert (task.legal_written_len(), task.max_step_len) == (10, 19)
    assert written[valid].sum(-1).max() == 10
    assert "9801*9801=96059601\n" in [tok.decode(t) for t in tokens[valid]]
    assert SMALL.legal_written_len() == SMALL.max_step_len  # no tool: the model writes the whole step


# ------------------------------------------------------------ calculator
def tool_text(task, prefix):
    state = task.init_state(task.generate(0, 1)[0])
    tokens = tok.encode_padded(prefix, task.max_step_len)
    forced, count = compiled(task, "tool")(state, tokens, len(prefix))
    forced = np.asarray(forced)
    assert forced.shape == (task.tool_output_len,)
    assert not forced[int(count):].any()  # PAD after the output
    return tok.decode(forced[:int(count)])


@settings(max_examples=80, deadline=None)
@given(a=st.one_of(st.integers(0, 200), st.integers(0, 10**11)), op=st.sampled_from("+-*/"),
       b=st.one_of(st.integers(0, 200), st.integers(0, 10**11)))
def test_calculator_writes_the_true_result(a, op, b):
    task = COUNTDOWN
    prefix = f"{a}{op}{b}="
    if len(prefix) > task.max_step_len:
        return
    c = ref_apply(a, op, b) if max(a, b) <= 2**31 - 1 else None
    fits = c is not None and len(str(c)) + 1 <= task.tool_output_len and len(prefix) + len(str(c)) + 1 <= \
        task.max_step_len
    assert tool_text(task, prefix) == (f"{c}\n" if fits else "?\n")


@pytest.mark.parametrize("prefix", ["13/0=", "13/2=", "9-13=", "04+1=", "1+04=", "+1=", "1+=", "12=", "=",
                                    "1+2+3=", "1+2", "#=", "99999*99999=", "1 +2=", "1=2+3="])
def test_calculator_question_mark(prefix):
    assert tool_text(COUNTDOWN, prefix) == "?\n"


def test_calculator_examples():
    assert tool_text(COUNTDOWN, "13-9=") == "4\n"
    assert tool_text(COUNTDOWN, "0*0=") == "0\n"
    assert tool_text(COUNTDOWN, "12/4=") == "3\n"
    assert tool_text(COUNTDOWN, "9801*9801=") == "96059601\n"  # the longest result fits F and S
    assert tool_text(COUNTDOWN, "20000*5000=") == "?\n"  # 9 digits do not fit F = 9


def test_calculator_completes_solutions():
    for problem in COUNTDOWN.generate(2, 10):
        for line in split_steps(COUNTDOWN.solve(problem)):
            prefix = line[:line.index("=") + 1]
            assert prefix + tool_text(COUNTDOWN, prefix) == line + "\n"


def test_tool_mask():
    text = "13-9=4\n#\n10-4=6\n6*4=24"
    mask = COUNTDOWN.tool_mask(text)
    assert "".join(ch for ch, m in zip(text, mask) if m) == "4\n6\n24"
    assert [i for i, m in enumerate(mask) if m] == [5, 6, 14, 15, 20, 21]
    assert not get_task("countdown").tool_mask(text).any()
    assert "".join(ch for ch, m in zip("1+2=?\n", COUNTDOWN.tool_mask("1+2=?\n")) if m) == "?\n"
    with pytest.raises(NotImplementedError):
        get_task("countdown").tool_output(None, None, None)


# ------------------------------------------------------------ jit + vmap
def _batch(task, rng):
    problems = task.generate(4, 6)
    states, steps = [], []
    for p in problems:
        state = task.init_state(p)
        lines = split_steps(task.solve(p))
        k = rng.randint(0, len(lines) - 1)
        for line in lines[:k]:
            state = jax.tree.map(np.asarray, compiled(task, "step")(state, encode(task, line))[0])
        options = [lines[k], "#", "1+1=2", lines[k][:-1] + "7", "garbage=="]
        steps.append(encode(task, rng.choice(options)))
        states.append(state)
    return states, steps


@pytest.mark.parametrize("task", [COUNTDOWN, ARITHMETIC], ids=["countdown", "arithmetic"])
def test_jit_vmap_matches_unbatched(task):
    rng = random.Random(0)
    states, steps = _batch(task, rng)
    batched = jax.tree.map(lambda *xs: np.stack(xs), *states)
    out = compiled(task, "batch_step")(batched, np.stack(steps))
    for i, (state, step_tokens) in enumerate(zip(states, steps)):
        single = compiled(task, "step")(state, step_tokens)
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x)[i], np.asarray(y)), out, single)
        for key in state:
            assert out[0][key].dtype == state[key].dtype and out[0][key].shape[1:] == np.shape(state[key])
    if task is COUNTDOWN:
        tokens, valid = compiled(task, "batch_legal")(batched)
        prefixes = [tok.encode_padded("13-9=", task.max_step_len)] * len(states)
        forced, count = compiled(task, "batch_tool")(batched, np.stack(prefixes), jnp.full((len(states),), 5))
        for i, state in enumerate(states):
            t, v = compiled(task, "legal")(state)
            np.testing.assert_array_equal(tokens[i], t)
            np.testing.assert_array_equal(valid[i], v)
            f, c = compiled(task, "tool")(state, prefixes[i], 5)
            np.testing.assert_array_equal(forced[i], f)
            assert int(count[i]) == int(c) == 2


def test_state_shapes_are_fixed():
    for task in (COUNTDOWN, SMALL, ARITHMETIC):
        shapes = None
        for p in task.generate(1, 5):
            state = task.init_state(p)
            assert all(isinstance(v, (np.ndarray, np.generic)) for v in state.values())
            these = {k: (np.shape(v), np.asarray(v).dtype) for k, v in state.items()}
            assert shapes in (None, these)
            shapes = these
