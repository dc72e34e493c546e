"""Row groups: a batched model call that skips the rows with nothing to do, and counts what it computed.

A batched call costs every row it holds, whether the row needs the result
or not. ``run_in_groups`` splits the rows into groups of a static size and
runs the call once per group inside a loop, under ``lax.cond``: a group in
which no row needs the call costs nothing. With ``compact`` the rows that
need it are first moved to the front (a stable sort), so the idle rows
(a search's finished nodes) gather in the trailing groups and are skipped;
outputs come back in the original row order.

The call also returns, per row, the token forwards it computed for that row
(its lanes: padding and rows that only ride along included), so the total
over rows is what the hardware computed. Rows of skipped groups cost 0; the
copies that pad the last group are charged to the row they copy.

``B`` in shape comments is the number of rows, ``G`` a group's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def group_layout(num_rows: int, group_rows: int) -> tuple[int, int]:
    """(number of groups, rows per group): the fewest groups of at most ``group_rows`` rows, as even as possible."""
    if group_rows < 1:
        raise ValueError(f"group_rows={group_rows} must be >= 1")
    groups = -(-num_rows // group_rows)
    return groups, -(-num_rows // groups)


def run_in_groups(fn: Callable[..., tuple], needs: jax.Array, rows: Any, *, group_rows: int,
                  compact: bool = True, carry: Any = None) -> tuple:
    """Runs ``fn`` over groups of rows, skipping the groups where no row needs it.

    Args:
      fn: ``rows_g -> (out_g, lanes_g)`` on one group (leaves ``[G, ...]``):
        ``out_g`` a pytree with leading axis G, ``lanes_g`` int32[G] the
        token forwards computed for each row of the group. With ``carry``:
        ``(rows_g, carry) -> (out_g, lanes_g, carry)``.
      needs: bool[B], the rows whose results are used.
      rows: the inputs, a pytree with leading axis B.
      group_rows: the most rows in one group (a group holds ``G`` =
        ``group_layout(B, group_rows)[1]`` rows).
      compact: move the rows that need ``fn`` to the front first.
      carry: optional state threaded through the groups that run (e.g. a
        buffer they write into; a skipped group leaves it as it is).
    Returns:
      ``(out, lanes)`` (and the final ``carry`` when given): ``out`` with
      leading axis B in the rows' order (zeros where the row's group was
      skipped) and ``lanes`` int32[B], the token forwards computed for each
      row (padding copies charged to the row they copy).
    """
    threaded = carry is not None
    call = fn if threaded else (lambda r, c: fn(r) + (c,))
    num_rows = needs.shape[0]
    groups, size = group_layout(num_rows, group_rows)

    def skip(shapes):
        return lambda r, c: _zeros(shapes) + (c,)

    if groups == 1:
        shapes = jax.eval_shape(call, rows, carry)[:2]
        out, lanes, carry = jax.lax.cond(jnp.any(needs), call, skip(shapes), rows, carry)
        return (out, lanes, carry) if threaded else (out, lanes)
    padded = groups * size
    order = jnp.argsort(~needs, stable=True) if compact else jnp.arange(num_rows)
    index = jnp.concatenate([order, jnp.full((padded - num_rows,), order[-1])])  # padding copies the last row
    taken = jax.tree.map(lambda x: jnp.take(x, index, axis=0), rows)
    needs_taken = jnp.take(needs, index) & (jnp.arange(padded) < num_rows)
    group = lambda x, g: jax.lax.dynamic_slice_in_dim(x, g * size, size)  # noqa: E731
    shapes = jax.eval_shape(call, jax.tree.map(lambda x: x[:size], taken), carry)[:2]
    init = jax.tree.map(lambda s: jnp.zeros((padded,) + s.shape[1:], s.dtype), shapes)

    def one_group(g, state):
        acc, carry = state
        rows_g = jax.tree.map(lambda x: group(x, g), taken)
        out, lanes, carry = jax.lax.cond(jnp.any(group(needs_taken, g)), call, skip(shapes), rows_g, carry)
        acc = jax.tree.map(lambda a, o: jax.lax.dynamic_update_slice_in_dim(a, o, g * size, 0), acc, (out, lanes))
        return acc, carry

    (out, lanes), carry = jax.lax.fori_loop(0, groups, one_group, (init, carry))
    inverse = jnp.argsort(order)  # row r sits at position inverse[r]
    out = jax.tree.map(lambda x: jnp.take(x, inverse, axis=0), out)
    lanes = jax.ops.segment_sum(lanes, index, num_segments=num_rows).astype(jnp.int32)
    return (out, lanes, carry) if threaded else (out, lanes)


def _zeros(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
