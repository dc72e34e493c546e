"""Token-level text helpers for the tasks' jittable step transitions.

Everything here works on ONE step's tokens ``int32[S]`` (vmap for batches) or
broadcasts over leading axes where said, with vectorised ``jnp`` ops only (no
loops over S), because the search calls a task's ``step`` B*K times per
expansion. Numbers are non-negative decimal integers up to ``INT32_MAX``;
anything larger does not parse, matching the Python verifiers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from alphareason import tokenizer as tok

INT32_MAX = 2**31 - 1
HASH = tok.char_id("#")
PAD, SEP, DIGIT0, EQUALS, PLUS, DIVIDE = tok.PAD, tok.SEP, tok.DIGIT0, tok.EQUALS, tok.PLUS, tok.DIVIDE
OPS = "+-*/"  # op index i has token PLUS + i (the tokenizer keeps them contiguous)
assert [tok.char_id(c) for c in OPS] == list(range(PLUS, PLUS + 4))
_POW10 = np.array([10**k for k in range(10)], np.int32)


def num_digits(x):
    """Decimal digits of non-negative int32 ``x`` (any shape); 0 has one digit."""
    x = jnp.asarray(x)
    return 1 + jnp.sum(x[..., None] >= _POW10[1:], axis=-1).astype(jnp.int32)


def _first(mask):
    """Index of the first True along the last axis (its size when there is none)."""
    size = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(size), size), axis=-1).astype(jnp.int32)


def step_end(step_tokens):
    """Where one step's text ends.

    Args:
      step_tokens: int32[S].
    Returns:
      (ok: bool[], end: int32[]): ``end`` is the index of the first SEP; ``ok``
      is False when there is no SEP or a token after it is not PAD.
    """
    size = step_tokens.shape[-1]
    end = _first(step_tokens == SEP)
    ok = (end < size) & jnp.all((jnp.arange(size) <= end) | (step_tokens == PAD))
    return ok, end


def is_undo(step_tokens, end):
    """True when the step text (before ``end``) is exactly ``#``."""
    return (end == 1) & (step_tokens[0] == HASH)


def parse_numbers(step_tokens, starts, stops):
    """Values of the spans tokens[starts[k]:stops[k]] as canonical decimals.

    Args:
      step_tokens: int32[S].
      starts, stops: int32[k].
    Returns:
      (ok: bool[k], value: int32[k]); not ok for an empty span, a non-digit,
      a leading zero or a value above ``INT32_MAX`` (value 0 then).
    """
    size = step_tokens.shape[-1]
    idx = jnp.arange(size)
    starts, stops = starts[:, None], stops[:, None]
    inside = (idx >= starts) & (idx < stops)  # [k, S]
    is_digit = (step_tokens >= DIGIT0) & (step_tokens <= DIGIT0 + 9)
    digit = jnp.where(is_digit, step_tokens - DIGIT0, 0)
    place = stops - 1 - idx  # power of ten of each position
    # The last five digits (lo) and the at most five before them (hi): nothing
    # overflows int32 while checking the bound.
    low = place < 5
    weight = jnp.asarray(_POW10)[jnp.clip(jnp.where(low, place, place - 5), 0, 4)]
    term = jnp.where(inside & (place < 10), digit * weight, 0)
    lo = jnp.sum(jnp.where(low, term, 0), axis=-1)
    hi = jnp.sum(jnp.where(low, 0, term), axis=-1)
    length = (stops - starts)[:, 0]
    first = step_tokens[jnp.clip(starts[:, 0], 0, size - 1)]
    ok = ((length >= 1) & (length <= 10) & jnp.all(~inside | is_digit, axis=-1)
          & ((length == 1) | (first != DIGIT0))
          & ((hi < 21474) | ((hi == 21474) & (lo <= 83647))))
    value = jnp.minimum(hi, 21474) * 100_000 + jnp.minimum(lo, 99_999)
    return ok, jnp.where(ok, value, 0).astype(jnp.int32)


def parse_expression(step_tokens, end, *, with_result: bool):
    """Parses ``a op b=c`` (``with_result``) or ``a op b`` in tokens[:end].

    Args:
      step_tokens: int32[S].
      end: int32[], the number of tokens that make up the expression.
      with_result: whether ``=c`` follows ``a op b``.
    Returns:
      (ok: bool[], a, op, b, c: int32[]) with ``op`` an index into ``OPS``;
      ``c`` is 0 without ``with_result``. Numbers are canonical decimals
      (``0`` or no leading zero) up to ``INT32_MAX``; nothing else may appear.
    """
    inside = jnp.arange(step_tokens.shape[-1]) < end
    op_mask = inside & (step_tokens >= PLUS) & (step_tokens <= DIVIDE)
    eq_mask = inside & (step_tokens == EQUALS)
    o = _first(op_mask)
    e = _first(eq_mask) if with_result else jnp.asarray(end, jnp.int32)
    ok = (jnp.sum(op_mask) == 1) & (jnp.sum(eq_mask) == (1 if with_result else 0)) & (e > o)
    starts = jnp.stack([jnp.int32(0), o + 1, e + 1])
    stops = jnp.stack([o, e, jnp.asarray(end, jnp.int32)])
    count = 3 if with_result else 2
    oks, values = parse_numbers(step_tokens, starts[:count], stops[:count])
    ok = ok & jnp.all(oks)
    c = values[2] if with_result else jnp.int32(0)
    op = jnp.clip(step_tokens[jnp.clip(o, 0, step_tokens.shape[-1] - 1)] - PLUS, 0, 3).astype(jnp.int32)
    return ok, values[0], op, values[1], c


def apply_op(a, op, b):
    """``a OPS[op] b`` on non-negative int32 values (any matching shapes).

    Returns (ok, result): ok is False for a negative result (``a-b`` with
    ``a<b``), division by zero, inexact division, or a result above
    ``INT32_MAX``; result is 0 where not ok.
    """
    safe_b = jnp.maximum(b, 1)
    oks = jnp.stack([a <= INT32_MAX - b,
                     a >= b,
                     (b == 0) | (a <= INT32_MAX // safe_b),
                     (b != 0) & (a % safe_b == 0)])
    results = jnp.stack([a + b, a - b, a * b, a // safe_b])
    pick = jnp.arange(4).reshape((4,) + (1,) * jnp.ndim(op)) == op
    ok = jnp.any(pick & oks, axis=0)
    result = jnp.sum(jnp.where(pick, results, 0), axis=0)
    return ok, jnp.where(ok, result, 0).astype(jnp.int32)


def _digit_tokens(x, length, pos):
    """Token of the ``pos``-th digit (from the left) of ``x`` with ``length`` digits."""
    place = jnp.clip(length - 1 - pos, 0, 9)
    return DIGIT0 + (x // jnp.asarray(_POW10)[place]) % 10


def render_step(a, op, b, c, size: int):
    """Tokens of ``a op b=c`` + SEP, PAD after: int32[..., size] for [...]-shaped inputs.

    Positions beyond ``size`` are cut off (callers size S for valid steps).
    """
    a, op, b, c = (jnp.asarray(v, jnp.int32)[..., None] for v in (a, op, b, c))
    la, lb, lc = num_digits(a), num_digits(b), num_digits(c)
    pos = jnp.arange(size)
    out = jnp.full(jnp.broadcast_shapes(a.shape, (size,)), PAD, jnp.int32)
    out = jnp.where(pos < la, _digit_tokens(a, la, pos), out)
    out = jnp.where(pos == la, PLUS + op, out)
    pb = pos - la - 1
    out = jnp.where((pb >= 0) & (pb < lb), _digit_tokens(b, lb, pb), out)
    out = jnp.where(pos == la + 1 + lb, EQUALS, out)
    pc = pos - la - lb - 2
    out = jnp.where((pc >= 0) & (pc < lc), _digit_tokens(c, lc, pc), out)
    out = jnp.where(pos == la + lb + 2 + lc, SEP, out)
    return out.astype(jnp.int32)


def render_number(x, size: int):
    """Tokens of ``x`` + SEP, PAD after: int32[size]; positions beyond ``size`` are cut off."""
    x = jnp.asarray(x, jnp.int32)
    lx = num_digits(x)
    pos = jnp.arange(size)
    out = jnp.where(pos < lx, _digit_tokens(x, lx, pos), PAD)
    return jnp.where(pos == lx, SEP, out).astype(jnp.int32)
