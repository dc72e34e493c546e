"""Sampling reasoning steps with the KV cache, inside ``jit``.

Two samplers, both with static shapes (a ``lax.while_loop`` over at most
``S = max_step_len`` positions that stops as soon as every row has ended its
step) and both writing whole steps (tokens up to and including the step
separator ``SEP``, or ``EOS``):

* ``sample_step``: one step per row (a chain of thought's next step; the
  chain decoder). With ``group_rows`` the rows run in groups, each with its
  own loop, so rows that finished early stop costing once their group is
  done.
* ``sample_candidates``: K candidate steps per row from one shared prefix
  cache (a search node's proposals; ``Transformer.decode_branches``, no copy
  of the prefix per candidate), either K independent samples or, with
  ``distinct``, K distinct steps sampled without replacement by stochastic
  beam search (Kool, van Hoof and Welling 2019, "Stochastic Beams and Where
  to Find Them"), with each step's inclusion probability for the prior's
  correction.

A tool (``Tool``: the task's calculator) may force the tokens after its
trigger token; the network itself knows no task syntax.

Compute accounting, two figures: ``token_forwards`` counts the tokens a
sampler needed (the (row, token) pairs of the steps it wrote); the lanes it
computed (``lane_forwards`` per row, ``iterations`` x rows for the
candidates) include every row of the batched call in every loop iteration,
finished and inactive rows too: that is what the hardware computed.
``prefill_token_forwards`` gives the needed count for a prefill.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from alphareason.model.rows import run_in_groups
from alphareason.model.transformer import KVCache, Transformer
from alphareason.tokenizer import BOS, EOS, PAD, SEP

# output(state, step_tokens int32[B, S], length int32[B]) -> (forced int32[B, F], count int32[B])
ToolFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@struct.dataclass
class Tool:
    """A tool as the sampler sees it (built by the task's side, e.g. ``search.env.task_tool``); a pytree.

    Attributes:
      trigger: the token id after which the tool writes (the calculator: ``=``).
      output: ``(state, step_tokens int32[B, S], length int32[B]) -> (forced
        int32[B, F], count int32[B])``: the tokens the tool writes after a
        step that ends in ``trigger``, for rows in ``state``.
      width: F, the width of ``forced``.
      state: what ``output`` needs per row (the task's states; leaves
        ``[B, ...]``), or None. Samplers that split their rows into groups
        split it with them.
    """

    trigger: int = struct.field(pytree_node=False)
    output: ToolFn = struct.field(pytree_node=False)
    width: int = struct.field(pytree_node=False)
    state: Any = None

    def __call__(self, step_tokens, length):
        return self.output(self.state, step_tokens, length)


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
    token_forwards: jax.Array  # int32[], active (row, token) pairs pushed through decode (needed)
    lane_forwards: jax.Array  # int32[B], lanes computed for each row: its group's loop iterations


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
                tool: Tool | None = None, value_logits: jax.Array | None = None, active: jax.Array | None = None,
                group_rows: int | None = None) -> StepSample:
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
      group_rows: None (one loop over all rows, until the last row ends its
        step) or the rows per group: each group runs its own loop and stops
        when its rows are done; a group without an active row costs nothing.
        Needs one key per row (then the samples do not depend on the
        grouping).

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
    active = jnp.ones((batch,), bool) if active is None else jnp.asarray(active, bool)
    value_logits = jnp.zeros((batch,), jnp.float32) if value_logits is None else value_logits.astype(jnp.float32)
    options = dict(max_step_len=max_step_len, temperature=temperature, top_p=top_p, greedy=greedy)
    if group_rows is None or group_rows >= batch:
        return _sample_step_rows(model, cache, logits, key, tool, value_logits, active, **options)
    if not per_row_keys(key):
        raise ValueError("sample_step with group_rows needs one key per row (a typed key array of shape [B])")
    rows = dict(cache=cache, logits=logits, key=key, tool=tool, value_logits=value_logits, active=active)

    def run(r):
        out = _sample_step_rows(model, r["cache"], r["logits"], r["key"], r["tool"], r["value_logits"],
                                r["active"], **options)
        # every leaf a row axis for run_in_groups; the total is recomputed from the lengths below
        return out.replace(token_forwards=jnp.zeros_like(out.length)), out.lane_forwards

    out, lanes = run_in_groups(run, active, rows, group_rows=group_rows, compact=False)
    # A skipped group (no active row) returns zeros: its rows keep their prefix, logits and value.
    ran = lanes > 0
    keep = lambda new, old: jnp.where(ran.reshape(ran.shape + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
    return out.replace(cache=jax.tree.map(keep, out.cache, cache), logits=keep(out.logits, logits.astype(jnp.float32)),
                       value_logits=keep(out.value_logits, value_logits),
                       tokens=jnp.where(ran[:, None], out.tokens, PAD), token_forwards=jnp.sum(out.length),
                       lane_forwards=lanes)


def _sample_step_rows(model, cache, logits, key, tool, value_logits, active, *, max_step_len, temperature, top_p,
                      greedy) -> StepSample:
    """``sample_step`` over all rows in one loop (see there)."""
    batch, vocab = logits.shape
    width = tool.width if tool is not None else 1
    rows = jnp.arange(batch)
    state = dict(
        i=jnp.int32(0), key=key, cache=cache, done=~active, stopped=jnp.zeros((batch,), bool),
        logits=logits.astype(jnp.float32), value_logits=value_logits,
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
            forced, count = tool(n["tokens"], n["length"])
            n["forced"] = jnp.where(call_tool[:, None], forced.astype(jnp.int32), s["forced"])
            n["forced_left"] = jnp.where(call_tool, jnp.clip(count, 0, width), n["forced_left"])
            n["forced_pos"] = jnp.where(call_tool, 0, n["forced_pos"])
        return n

    s = jax.lax.while_loop(keep_going, write_one_token, state)
    return StepSample(tokens=s["tokens"], length=s["length"], logprob=s["logprob"],
                      num_sampled=s["num_sampled"], stopped=s["stopped"], logits=s["logits"],
                      value_logits=s["value_logits"], cache=s["cache"], token_forwards=s["token_forwards"],
                      lane_forwards=jnp.full((batch,), s["i"], jnp.int32))


# ------------------------------------------------------- K candidates per row
@struct.dataclass
class CandidateSample:
    """K candidate steps for each of ``B`` rows (``S`` = max_step_len)."""

    tokens: jax.Array  # int32[B, K, S], each step, PAD after it
    length: jax.Array  # int32[B, K], tokens written (sampled + forced); 0: no step (fewer than K exist)
    logprob: jax.Array  # f32[B, K], sum of untempered log-probs of the model-written tokens
    num_sampled: jax.Array  # int32[B, K], tokens chosen by the model (forced tool tokens excluded)
    stopped: jax.Array  # bool[B, K], the step ended with SEP or EOS
    value_logits: jax.Array  # f32[B, K], the value head at each step's last token
    log_inclusion: jax.Array  # f32[B, K], log P(step in the sample); 0 for independent samples
    iterations: jax.Array  # int32[], loop iterations: each computed B * K token forwards
    token_forwards: jax.Array  # int32[B], tokens pushed for live candidates (needed; with ``distinct`` it
    #                           includes the tokens of beams pruned on the way: ``sum(length)`` or more)


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (-inf at 0)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_inclusion_probability(log_prob, threshold):
    """log P(G > threshold) for G ~ Gumbel(log_prob): ``log(1 - exp(-exp(log_prob - threshold)))``.

    With sampling without replacement by Gumbel-top-k, ``threshold`` the
    (K+1)-th largest perturbed log-probability, this is the probability that
    an item is among the K drawn (Kool et al. 2019; Vieira 2017), the
    correction that makes ``p / inclusion`` an unbiased weight. A threshold of
    -inf (every item was drawn) gives 0. Shapes broadcast.
    """
    x = log_prob - threshold
    value = jnp.where(x < -30.0, x, jnp.log(-jnp.expm1(-jnp.exp(jnp.minimum(x, 30.0)))))
    return jnp.where(jnp.isneginf(threshold), 0.0, jnp.where(jnp.isneginf(log_prob), -jnp.inf, value))


def stochastic_beam_step(score, log_prob, extending, next_log_prob, gumbel, threshold):
    """One step of stochastic beam search (Kool et al. 2019) for every row: the K beams of the next step.

    Every beam's perturbed log-probability ``score`` (a Gumbel sample
    located at its log-probability) is the maximum of its children's, so the
    children's scores are drawn conditioned on that maximum; the next beams
    are the K best among the extending beams' children and the finished
    beams (kept as they are). Repeated until every beam is finished, this
    draws K distinct sequences without replacement, exactly as the K largest
    Gumbel-perturbed sequence log-probabilities would.

    Args:
      score: f32[B, K], each beam's perturbed log-probability (-inf: no beam).
      log_prob: f32[B, K], each beam's log-probability under the sampler.
      extending: bool[B, K], beams that take another token (the others are
        finished, or empty where ``score`` is -inf).
      next_log_prob: f32[B, K, V], log-probability of each next token.
      gumbel: f32[B, K, V], standard Gumbel noise.
      threshold: f32[B], the largest perturbed log-probability pruned so far.
    Returns:
      ``(parent int32[B, K], choice int32[B, K], score f32[B, K], threshold
      f32[B])``: new beam k continues beam ``parent`` with token ``choice``
      (``V``: the parent is a finished beam, kept unchanged); its score (-inf:
      fewer than K sequences exist); the threshold with this step's best
      pruned score (the (K+1)-th) included.
    """
    batch, num, vocab = next_log_prob.shape
    child_log_prob = log_prob[..., None] + next_log_prob  # [B, K, V]
    g = child_log_prob + gumbel
    z = jnp.max(g, axis=-1, keepdims=True)
    t = score[..., None]
    # Gumbel(child_log_prob) conditioned on its maximum over the children being t (Kool et al., appendix B).
    v = t - g + log1mexp(jnp.minimum(g - z, 0.0))
    conditioned = t - jnp.maximum(v, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(v)))
    children = jnp.where(extending[..., None] & jnp.isfinite(child_log_prob) & jnp.isfinite(t), conditioned,
                         -jnp.inf)
    kept = jnp.where(~extending & jnp.isfinite(score), score, -jnp.inf)[..., None]
    pool = jnp.concatenate([children, kept], -1).reshape(batch, num * (vocab + 1))
    top, index = jax.lax.top_k(pool, num + 1)
    parent, choice = index[:, :num] // (vocab + 1), index[:, :num] % (vocab + 1)
    return (parent.astype(jnp.int32), choice.astype(jnp.int32), top[:, :num],
            jnp.maximum(threshold, top[:, num]))


def sampling_log_probs(logits, *, temperature, top_p) -> jax.Array:
    """The distribution ``choose_tokens`` samples from, as log-probabilities (-inf: never chosen). [..., V]."""
    logits = logits.at[..., jnp.array([PAD, BOS])].set(-jnp.inf) / temperature
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        shape = logits.shape
        logits = top_p_filter(logits.reshape(-1, shape[-1]), top_p).reshape(shape)
    return jax.nn.log_softmax(logits, axis=-1)


def sample_candidates(model: Transformer, prefix: KVCache, logits: jax.Array, keys: jax.Array, *,
                      num_candidates: int, max_step_len: int, temperature=1.0, top_p=1.0,
                      tool: Tool | None = None, distinct: bool = False,
                      active: jax.Array | None = None) -> CandidateSample:
    """Writes K candidate steps for each row's prefix, all K reading the prefix's one cache.

    Args:
      model: the transformer.
      prefix: the prefixes (``B`` rows); never written.
      logits: f32[B, V], the output at each prefix's last position.
      keys: one typed PRNG key per row, [B]: a row's candidates depend only
        on its key and its prefix.
      num_candidates: K.
      max_step_len: S; a step reaching S tokens without SEP/EOS is truncated.
      temperature, top_p: the sampling distribution (never PAD or BOS);
        ``logprob`` is under the untempered model distribution.
      tool: optional ``Tool`` over the ``B * K`` candidate rows (row ``b * K +
        k``), as in ``sample_step``.
      distinct: False: K independent samples (duplicates possible); True: K
        distinct steps drawn without replacement by stochastic beam search
        (fewer, with ``length`` 0 for the rest, when fewer than K steps have
        a nonzero probability), with ``log_inclusion`` their probability of
        being drawn.
      active: bool[B] or None (all): rows that propose nothing write nothing.
    Returns:
      A ``CandidateSample``.
    """
    batch, vocab = logits.shape
    K, S = num_candidates, max_step_len
    if K < 1 or S < 1:
        raise ValueError(f"num_candidates={K} and max_step_len={S} must be positive")
    width = tool.width if tool is not None else 1
    active = jnp.ones((batch,), bool) if active is None else jnp.asarray(active, bool)
    beams = jnp.arange(K)[None, :]
    live = active[:, None] & ((beams == 0) if distinct else jnp.ones((1, K), bool))  # distinct: one beam at first
    state = dict(
        i=jnp.int32(0), branches=model.init_branches(batch, K, S),
        logits=jnp.broadcast_to(logits.astype(jnp.float32)[:, None], (batch, K, vocab)),
        value_logits=jnp.zeros((batch, K), jnp.float32), live=live, stopped=jnp.zeros((batch, K), bool),
        tokens=jnp.full((batch, K, S), PAD, jnp.int32), length=jnp.zeros((batch, K), jnp.int32),
        logprob=jnp.zeros((batch, K), jnp.float32), num_sampled=jnp.zeros((batch, K), jnp.int32),
        forced=jnp.zeros((batch, K, width), jnp.int32), forced_left=jnp.zeros((batch, K), jnp.int32),
        forced_pos=jnp.zeros((batch, K), jnp.int32),
        score=jnp.where(live, 0.0, -jnp.inf), sample_log_prob=jnp.zeros((batch, K), jnp.float32),
        threshold=jnp.full((batch,), -jnp.inf, jnp.float32), pushed=jnp.zeros((batch,), jnp.int32))
    per_beam = ("branches", "logits", "value_logits", "live", "stopped", "tokens", "length", "logprob", "num_sampled",
                "forced", "forced_left", "forced_pos", "sample_log_prob")

    def keep_going(s):
        return (s["i"] < S) & jnp.any(s["live"])

    def write_one_token(s):
        i = s["i"]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        forcing = s["live"] & (s["forced_left"] > 0)
        forced_token = jnp.take_along_axis(s["forced"], jnp.minimum(s["forced_pos"], width - 1)[..., None], -1)[..., 0]
        n = dict(s)
        if distinct:
            sampler = sampling_log_probs(s["logits"], temperature=temperature, top_p=top_p)
            only_forced = jnp.where(jax.nn.one_hot(forced_token, vocab, dtype=bool), 0.0, -jnp.inf)
            next_log_prob = jnp.where(forcing[..., None], only_forced, sampler)
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (K, vocab)))(step_keys)
            parent, choice, score, n["threshold"] = stochastic_beam_step(
                s["score"], s["sample_log_prob"], s["live"], next_log_prob, gumbel, s["threshold"])
            for name in per_beam:
                n[name] = jax.tree.map(lambda x: _take_beams(x, parent), s[name])
            forcing = _take_beams(forcing, parent)
            exists = jnp.isfinite(score)
            writing = exists & (choice < vocab)
            token = jnp.where(writing, choice, PAD)
            step_log_prob = jnp.take_along_axis(_take_beams(next_log_prob, parent),
                                                jnp.minimum(choice, vocab - 1)[..., None], -1)[..., 0]
            n["sample_log_prob"] = n["sample_log_prob"] + jnp.where(writing, step_log_prob, 0.0)
            n["score"] = score
            for name in ("length", "num_sampled", "forced_left"):  # a slot without a sequence holds nothing
                n[name] = jnp.where(exists, n[name], 0)
            n["logprob"] = jnp.where(exists, n["logprob"], 0.0)
            n["stopped"] = n["stopped"] & exists
            n["tokens"] = jnp.where(exists[..., None], n["tokens"], PAD)
        else:
            writing = s["live"]
            chosen = jax.vmap(lambda k, lg: choose_tokens(lg, k, temperature=temperature, top_p=top_p))(
                step_keys, s["logits"])
            token = jnp.where(writing, jnp.where(forcing, forced_token, chosen), PAD)
        sampled = writing & ~forcing
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(n["logits"], axis=-1), token[..., None], -1)[..., 0]
        new_logits, new_values, branches = model.decode_branches(token, prefix, n["branches"], i, writing)
        ended = writing & ((token == SEP) | (token == EOS))
        n.update(
            i=i + 1, branches=branches, live=writing & ~ended, stopped=n["stopped"] | ended,
            pushed=s["pushed"] + jnp.sum(writing, axis=-1, dtype=jnp.int32),
            logits=jnp.where(writing[..., None], new_logits, n["logits"]),
            value_logits=jnp.where(writing, new_values, n["value_logits"]),
            tokens=n["tokens"].at[:, :, i].set(jnp.where(writing, token, n["tokens"][:, :, i])),
            length=n["length"] + writing,
            logprob=n["logprob"] + jnp.where(sampled, token_logprob, 0.0),
            num_sampled=n["num_sampled"] + sampled,
            forced_left=n["forced_left"] - (forcing & writing), forced_pos=n["forced_pos"] + (forcing & writing))
        if tool is not None:
            call_tool = sampled & (token == tool.trigger) & ~ended
            forced, count = tool(n["tokens"].reshape(batch * K, S), n["length"].reshape(batch * K))
            n["forced"] = jnp.where(call_tool[..., None], forced.astype(jnp.int32).reshape(batch, K, width),
                                    n["forced"])
            n["forced_left"] = jnp.where(call_tool, jnp.clip(count.reshape(batch, K), 0, width), n["forced_left"])
            n["forced_pos"] = jnp.where(call_tool, 0, n["forced_pos"])
        return n

    s = jax.lax.while_loop(keep_going, write_one_token, state)
    if distinct:
        log_inclusion = jnp.where(s["length"] > 0,
                                  log_inclusion_probability(s["sample_log_prob"], s["threshold"][:, None]), 0.0)
    else:
        log_inclusion = jnp.zeros((batch, K), jnp.float32)
    return CandidateSample(tokens=s["tokens"], length=s["length"], logprob=s["logprob"], num_sampled=s["num_sampled"],
                           stopped=s["stopped"], value_logits=s["value_logits"], log_inclusion=log_inclusion,
                           iterations=s["i"], token_forwards=s["pushed"])


def _take_beams(x, parent):
    """Row b's beams reordered: ``x[b, parent[b, k]]`` for every leaf ``x`` [B, K, ...]."""
    index = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)
