"""Sampling one reasoning step per row with the KV cache, inside ``jit``.

``sample_step`` is the policy's proposal mechanism for the search: from the
network's output at the end of a prefix it writes one step (tokens up to and
including the step separator ``SEP``, or ``EOS``) per row, with static shapes
(a ``lax.while_loop`` over at most ``S = max_step_len`` positions) so it can
run under ``jit`` and ``vmap``-free batched search. A tool (``Tool``: the
task's calculator) may force the tokens after its trigger token; the network
itself knows no task syntax.

Compute accounting: ``token_forwards`` counts the (row, token) pairs actually
pushed through ``decode`` for active rows. Padded lanes (rows that already
finished their step, or were inactive from the start) still run through the
batched computation but are not counted, matching the project's rule of
counting tokens, not lanes. ``prefill_token_forwards`` gives the count for a
prefill.
"""

from __future__ import annotations

from typing import Callable

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from alphareason.model.transformer import KVCache, Transformer
from alphareason.tokenizer import BOS, EOS, PAD, SEP

# output(step_tokens int32[B, S], length int32[B]) -> (forced int32[B, F], count int32[B])
ToolFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool as the sampler sees it (built by the task's side, e.g. ``search.env.task_tool``).

    Attributes:
      trigger: the token id after which the tool writes (the calculator: ``=``).
      output: ``(step_tokens int32[B, S], length int32[B]) -> (forced int32[B,
        F], count int32[B])``: the tokens the tool writes after a step that
        ends in ``trigger``.
      width: F, the width of ``forced``.
    """

    trigger: int
    output: ToolFn
    width: int


@struct.dataclass
class StepSample:
    """One sampled reasoning step per row. ``B`` rows, ``S`` = max_step_len."""

    tokens: jax.Array  # int32[B, S], the step, PAD after it
    length: jax.Array  # int32[B], tokens written (sampled + forced)
    logprob: jax.Array  # f32[B], sum of untempered log-probs of the sampled tokens (search prior)
    num_sampled: jax.Array  # int32[B], tokens chosen by the model (forced tool tokens excluded)
    stopped: jax.Array  # bool[B], the step ended with SEP or EOS (False: truncated at S, or inactive)
    logits: jax.Array  # f32[B, V], output at the step's last token (ready for the next step)
    value_logits: jax.Array  # f32[B], value logit at the step's last token
    cache: KVCache  # prefix + step
    token_forwards: jax.Array  # int32[], active (row, token) pairs pushed through decode


def prefill_token_forwards(lengths: jax.Array) -> jax.Array:
    """Token forwards spent by a prefill of ragged rows: ``sum(lengths)`` (int32[])."""
    return jnp.sum(jnp.asarray(lengths, jnp.int32))


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Keeps the smallest set of tokens whose probability reaches ``top_p``; -inf elsewhere.

    logits: f32[B, V]. The most likely token is always kept.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def per_row_keys(key) -> bool:
    """True for a key array of shape [B] (one typed PRNG key per row), False for a single key."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def fold_in(key, data):
    """``jax.random.fold_in`` for a single key or for one key per row."""
    if per_row_keys(key):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
    return jax.random.fold_in(key, data)


def choose_tokens(logits, key, *, temperature=1.0, top_p=1.0, greedy=False) -> jax.Array:
    """logits f32[B, V] -> int32[B]: argmax, or a temperature + top-p sample.

    PAD and BOS are never chosen: they are not text a step can contain.
    ``key`` is one PRNG key, or one typed key per row (shape [B]): then row
    b's token depends only on its own key and logits, not on the batch.
    """
    logits = logits.at[:, jnp.array([PAD, BOS])].set(-jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        scaled = top_p_filter(scaled, top_p)
    if per_row_keys(key):
        return jax.vmap(jax.random.categorical)(key, scaled).astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def sample_step(model: Transformer, cache: KVCache, logits: jax.Array, key: jax.Array, *,
                max_step_len: int, temperature=1.0, top_p=1.0, greedy: bool = False,
                tool: Tool | None = None, value_logits: jax.Array | None = None, active: jax.Array | None = None) -> StepSample:
    """Writes one reasoning step per row, starting after the prefix in ``cache``.

    Args:
      model: the transformer (may be an ``nnx.merge`` inside ``jit``).
      cache: the prefix of every row (``B`` rows).
      logits: f32[B, V], the model's output at each prefix's last position
        (from ``prefill``, ``decode`` or a previous ``sample_step``).
      key: PRNG key; the same key gives the same samples. A typed key array
        of shape [B] gives each row its own key (its samples then do not
        depend on the other rows or on B).
      max_step_len: S, the most tokens a step may take; a row that reaches S
        tokens without SEP/EOS is truncated (``stopped`` False).
      temperature, top_p, greedy: how tokens are chosen (never PAD or BOS).
        The returned ``logprob`` is always under the untempered, unfiltered
        model distribution (the full softmax over the vocabulary).
      tool: optional ``Tool``, whose ``output`` is called every iteration.
        When a row's last model-chosen token is ``tool.trigger``, its next
        ``min(count, F)`` tokens are ``forced[:count]`` instead of model
        choices. Forced tokens are fed through ``decode`` (and count as token
        forwards) but add nothing to ``logprob`` or ``num_sampled``; a forced
        SEP/EOS ends the step like a sampled one.
      value_logits: f32[B], optional value at the prefix's last position
        (returned for rows that write nothing).
      active: bool[B] or None (all). Inactive rows write nothing and keep
        their cache.

    Returns:
      A ``StepSample``; its ``cache`` holds prefix + step (the final SEP was
      fed through ``decode``), its ``logits``/``value_logits`` are the outputs
      at the step's last token.
    """
    batch, vocab = logits.shape
    if max_step_len <= 0:
        raise ValueError(f"max_step_len={max_step_len} must be positive")
    if tool is not None and tool.width <= 0:
        raise ValueError("a tool needs width > 0 (the width of its forced-token buffer)")
    width = tool.width if tool is not None else 1
    rows = jnp.arange(batch)
    done = jnp.zeros((batch,), bool) if active is None else ~jnp.asarray(active, bool)
    state = dict(
        i=jnp.int32(0), key=key, cache=cache, done=done, stopped=jnp.zeros((batch,), bool),
        logits=logits.astype(jnp.float32),
        value_logits=(jnp.zeros((batch,), jnp.float32) if value_logits is None
                      else value_logits.astype(jnp.float32)),
        tokens=jnp.full((batch, max_step_len), PAD, jnp.int32), length=jnp.zeros((batch,), jnp.int32),
        logprob=jnp.zeros((batch,), jnp.float32), num_sampled=jnp.zeros((batch,), jnp.int32),
        forced=jnp.zeros((batch, width), jnp.int32), forced_left=jnp.zeros((batch,), jnp.int32),
        forced_pos=jnp.zeros((batch,), jnp.int32), token_forwards=jnp.int32(0))

    def keep_going(s):
        return (s["i"] < max_step_len) & jnp.any(~s["done"])

    def write_one_token(s):
        i, writing = s["i"], ~s["done"]  # every writing row has length == i
        forcing = writing & (s["forced_left"] > 0)
        chosen = choose_tokens(s["logits"], fold_in(s["key"], i),
                               temperature=temperature, top_p=top_p, greedy=greedy)
        forced_token = s["forced"][rows, jnp.minimum(s["forced_pos"], width - 1)]
        token = jnp.where(writing, jnp.where(forcing, forced_token, chosen), PAD)
        sampled = writing & ~forcing
        token_logprob = jax.nn.log_softmax(s["logits"], axis=-1)[rows, token]

        new_logits, new_values, cache = model.decode(token, s["cache"], writing)
        ended = writing & ((token == SEP) | (token == EOS))
        n = dict(s)
        n.update(
            i=i + 1, cache=cache, done=s["done"] | ended, stopped=s["stopped"] | ended,
            logits=jnp.where(writing[:, None], new_logits, s["logits"]),
            value_logits=jnp.where(writing, new_values, s["value_logits"]),
            tokens=s["tokens"].at[:, i].set(token), length=s["length"] + writing,
            logprob=s["logprob"] + jnp.where(sampled, token_logprob, 0.0),
            num_sampled=s["num_sampled"] + sampled,
            forced_left=s["forced_left"] - forcing, forced_pos=s["forced_pos"] + forcing,
            token_forwards=s["token_forwards"] + jnp.sum(writing, dtype=jnp.int32))
        if tool is not None:
            call_tool = sampled & (token == tool.trigger) & ~ended
            forced, count = tool.output(n["tokens"], n["length"])
            n["forced"] = jnp.where(call_tool[:, None], forced.astype(jnp.int32), s["forced"])
            n["forced_left"] = jnp.where(call_tool, jnp.clip(count, 0, width), n["forced_left"])
            n["forced_pos"] = jnp.where(call_tool, 0, n["forced_pos"])
        return n

    s = jax.lax.while_loop(keep_going, write_one_token, state)
    return StepSample(tokens=s["tokens"], length=s["length"], logprob=s["logprob"],
                      num_sampled=s["num_sampled"], stopped=s["stopped"], logits=s["logits"],
                      value_logits=s["value_logits"], cache=s["cache"], token_forwards=s["token_forwards"])
