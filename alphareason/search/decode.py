"""The chain decoder: whole chains of thought, step by step, without a tree.

``ChainDecoder`` is the one place where chains of thought are written by the
policy alone: greedy decoding, sampling, N chains per problem under a compute
budget (best-of-N, voting), step-level beam search guided by the value head,
and Stream-of-Search traces. Every step goes through ``model.sample_step``
(the KV cache; the task's tool writes its tokens), then the task's JAX
transition judges it and stops the chains that are done.

One jitted loop per shape: prefill each problem's prompt once, copy its
cache into ``N`` lanes, then rounds in which every live lane writes one step.
The loop ends when every lane is done (a ``while_loop``: traces may take far
fewer steps than their bound).

Budget. Lane ``j`` of problem ``b`` may write a step only if the problem's
spending so far (prompt + every decoded token) plus ``S`` tokens for it and
for every live lane before it fits ``budget``; a lane refused is cut (never
selected). Without a budget no lane is cut.

Beam search (``beam_width`` M > 1): before every round after the first the
slots are refilled by ``beam_sources``: the best ``N / M`` unfinished chains
by the value head continue with ``M`` copies each; finished chains keep
their slots.

Traces (``traces=True``, Stream of Search): a dead end does not end the
chain, the model may undo it with ``"#"`` and go on, for up to the task's
``max_trace_steps`` steps or until the context is full; the chain ends when
solved, at an invalid step (an EOS included) or when one more step might not
fit (then it is cut, unsolved).

Randomness: problem ``b``'s key is ``keys[b]``; lane ``j`` uses
``fold_in(keys[b], j)`` and round ``r`` folds in ``r``, so a problem's
chains do not depend on its batch, and the first ``n`` lanes of an N-lane
decode (without beam search and budget) are an n-lane decode's.

Compute: ``spent`` counts the tokens a problem needed (its prompt and every
token its lanes wrote); ``computed`` every lane the hardware pushed through
the network for it: the prompt's padded width T, and for every round each
lane's share of the step loop (its row group's iterations, finished and
cut lanes included). With ``group_rows`` the lanes run in groups that stop
separately (``model.sample_step``).

On a mesh (``ChainDecoder(mesh=...)``) the problems are split over the
devices and each device decodes its own with a full copy of the parameters
(``parallel.per_shard``): the chains are the single-device chains.

Shapes: ``B`` problems, ``N`` lanes per problem, ``T`` the context, ``S``
the tokens per step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alphareason import parallel
from alphareason import tokenizer as tok
from alphareason.model import tile_cache
from alphareason.model.sampling import sample_step
from alphareason.search.env import append_steps, task_tool
from alphareason.tasks import Task

NO_BUDGET = 2 ** 30


def beam_sources(value: jax.Array, expandable: jax.Array, frozen: jax.Array, beam_width: int):
    """Which lane every slot copies for the next round of beam search (jittable).

    Finished chains (``frozen``) keep their slots. The other slots are filled
    in order with ``beam_width`` copies each of the best expandable chains
    (highest ``value`` first, ties to the lower lane): with nothing frozen,
    N/M beams of M copies. Slots left over when too few chains can be
    expanded are emptied.

    Args:
      value: f32[B, N]; expandable, frozen: bool[B, N] (disjoint).
    Returns:
      (src int32[B, N], filled bool[B, N]).
    """
    N = value.shape[1]
    score = jnp.where(expandable, value, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)
    num_beams = jnp.sum(expandable, axis=1, keepdims=True)
    free = ~frozen
    beam = (jnp.cumsum(free, axis=1) - 1) // beam_width
    src = jnp.where(frozen, jnp.arange(N)[None], jnp.take_along_axis(order, jnp.clip(beam, 0, N - 1), axis=1))
    return src.astype(jnp.int32), frozen | (free & (beam < num_beams))


class ChainDecoder:
    """Writes chains of thought for one task and model graph; compiled once per shape and setting.

    ``decoder(params, keys, inputs, lanes=N, budget=..., greedy=..., temperature=...)``
    with ``inputs`` as ``ReasoningEnv.initial`` gives them and one PRNG key
    per problem. ``traces``: write search traces (see the module docstring);
    ``max_steps`` defaults to the task's ``max_trace_steps`` for traces, else
    its ``max_steps``. ``mesh``: split the problems over its devices (the
    number of problems must divide by them); the outputs are then global
    arrays (``parallel.to_host`` brings them to every process).
    """

    def __init__(self, task: Task, graphdef, *, seq_len: int, traces: bool = False, max_steps: int | None = None,
                 group_rows: int | None = None, mesh=None):
        self.task, self.graphdef, self.seq_len, self.traces = task, graphdef, seq_len, traces
        self.group_rows = group_rows
        self.max_steps = max_steps or (task.max_trace_steps if traces else task.max_steps)
        self.mesh = mesh
        self._jitted = jax.jit(self._decode if mesh is None else self._decode_per_shard,
                               static_argnames=("lanes", "beam_width", "greedy", "top_p"))

    def __call__(self, params, keys, inputs: dict[str, Any], *, lanes: int = 1, budget: int | None = None,
                 beam_width: int = 1, greedy: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0) -> dict[str, jax.Array]:
        """Decodes ``lanes`` chains per problem.

        Args:
          params: the model's state (``nnx.split``).
          keys: one typed PRNG key per problem, [B].
          inputs: ``tokens`` int32[B, T], ``length`` int32[B], ``task_state``.
          budget: token forwards allowed per problem (None: no limit).
        Returns (``B`` problems, ``N`` lanes):
          tokens int32[B, N, T], length int32[B, N];
          candidate bool[B, N]: holds a chain the budget did not cut;
          value f32[B, N]: the value head at the chain's end;
          solved bool[B, N]: ended solved by the task's transition;
          done bool[B, N]: ended (solved, dead end, invalid, or cut);
          logprob f32[B, N]: of the model-written tokens;
          cut bool[B, N]: a step was refused for lack of budget;
          spent int32[B]: prompt + every decoded token of the problem;
          lane_forwards int32[B, N]: decoded tokens per lane; prompt int32[B];
          computed int32[B]: token forwards computed for the problem (the
          padded prompt and every lane's loop iterations); lane_computed
          int32[B, N] and prompt_computed int32[B], its parts.
        """
        tokens, length, task_state = inputs["tokens"], inputs["length"], inputs["task_state"]
        if self.mesh is not None:
            keys, tokens, length, task_state = parallel.shard_batch((keys, tokens, length, task_state), self.mesh)
        return self._jitted(params, keys, tokens, length, task_state,
                            jnp.int32(NO_BUDGET if budget is None else budget),
                            jnp.float32(max(temperature, 1e-6)), lanes=lanes, beam_width=beam_width,
                            greedy=bool(greedy), top_p=float(top_p))

    def _decode_per_shard(self, params, keys, tokens, length, task_state, budget, temperature, **static):
        """``_decode`` on each device for its own problems (parameters, budget and temperature whole)."""
        def local(params, budget, temperature, keys, tokens, length, task_state):
            return self._decode(params, keys, tokens, length, task_state, budget, temperature, **static)
        return parallel.per_shard(local, self.mesh, num_replicated=3)(params, budget, temperature, keys, tokens,
                                                                      length, task_state)

    def _decode(self, params, keys, tokens, length, task_state, budget, temperature, *, lanes, beam_width,
                greedy, top_p):
        task, S, N, T = self.task, self.task.max_step_len, lanes, self.seq_len
        model = nnx.merge(self.graphdef, params)
        B = tokens.shape[0]
        logits, value_logits, cache = model.prefill(tokens, length, model.init_cache(B, T))
        rep = lambda x: jnp.repeat(x, N, axis=0)  # noqa: E731
        lane_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(N)))(keys)
        lane_keys = lane_keys.reshape(B * N)
        BN = B * N
        carry = dict(cache=tile_cache(cache, N), logits=rep(logits), value_logits=rep(value_logits),
                     tokens=rep(tokens), length=rep(length), state=jax.tree.map(rep, task_state),
                     done=jnp.zeros((BN,), bool), solved=jnp.zeros((BN,), bool), holds=jnp.ones((BN,), bool),
                     cut=jnp.zeros((BN,), bool), lane_forwards=jnp.zeros((BN,), jnp.int32),
                     lane_computed=jnp.zeros((BN,), jnp.int32),
                     logprob=jnp.zeros((BN,), jnp.float32), spent=length.astype(jnp.int32))

        def reselect(c):
            value = jax.nn.sigmoid(c["value_logits"]).reshape(B, N)
            expandable = (c["holds"] & ~c["done"]).reshape(B, N)
            frozen = (c["holds"] & c["done"]).reshape(B, N)
            src, filled = beam_sources(value, expandable, frozen, beam_width)
            flat = (jnp.arange(B)[:, None] * N + src).reshape(BN)
            take = lambda x: jnp.take(x, flat, axis=0)  # noqa: E731
            n = dict(c)
            for name in ("logits", "value_logits", "tokens", "length", "done", "solved", "holds", "cut", "logprob"):
                n[name] = take(c[name])
            n["state"] = jax.tree.map(take, c["state"])
            n["cache"] = jax.tree.map(take, c["cache"])  # every cache leaf is batch-first
            filled = filled.reshape(BN)
            n["holds"] = n["holds"] & filled
            n["done"] = n["done"] | ~filled
            return n

        def one_round(r, c):
            if beam_width > 1:
                c = jax.lax.cond(r > 0, reselect, lambda c: c, c)
            done = c["done"]
            if self.traces:  # a step that might not fit ends the chain (cut, unsolved)
                done = done | (c["length"] + S > T)
            live = (~done).reshape(B, N)
            need = c["spent"][:, None] + S * jnp.cumsum(live, axis=1)
            allowed = (live & (need <= budget)).reshape(BN)
            cut = ~done & ~allowed
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(lane_keys, r)
            sample = sample_step(model, c["cache"], c["logits"], step_keys, max_step_len=S,
                                 temperature=temperature, top_p=top_p, greedy=greedy,
                                 tool=task_tool(task, c["state"]), value_logits=c["value_logits"], active=allowed,
                                 group_rows=self.group_rows)
            new_state, valid, step_done, reward = jax.vmap(task.step)(c["state"], sample.tokens)

            def keep(new, old):
                mask = allowed.reshape(allowed.shape + (1,) * (new.ndim - 1))
                return jnp.where(mask, new, old)

            # A trace goes on after a dead end (done by a valid step, reward 0): "#" may undo it.
            ends = (reward > 0) | ~valid if self.traces else step_done | ~valid
            written = jnp.where(allowed, sample.length, 0)
            n = dict(c)
            n.update(
                tokens=jnp.where(allowed[:, None], append_steps(c["tokens"], c["length"], sample.tokens), c["tokens"]),
                length=c["length"] + written, state=jax.tree.map(keep, new_state, c["state"]),
                solved=jnp.where(allowed, reward > 0, c["solved"]),
                done=done | cut | (allowed & ends),
                holds=c["holds"] & ~cut, cut=c["cut"] | cut,
                lane_forwards=c["lane_forwards"] + written, lane_computed=c["lane_computed"] + sample.lane_forwards,
                logprob=c["logprob"] + jnp.where(allowed, sample.logprob, 0.0),
                spent=c["spent"] + written.reshape(B, N).sum(axis=1),
                logits=sample.logits, value_logits=sample.value_logits, cache=sample.cache)
            return n

        _, c = jax.lax.while_loop(lambda rc: (rc[0] < self.max_steps) & ~jnp.all(rc[1]["done"]),
                                  lambda rc: (rc[0] + 1, one_round(rc[0], rc[1])), (jnp.int32(0), carry))
        shape = lambda x: x.reshape((B, N) + x.shape[1:])  # noqa: E731
        return {"tokens": shape(c["tokens"]), "length": shape(c["length"]), "candidate": shape(c["holds"]),
                "value": shape(jax.nn.sigmoid(c["value_logits"].astype(jnp.float32))),
                "solved": shape(c["solved"] & c["done"]), "done": shape(c["done"]), "logprob": shape(c["logprob"]),
                "spent": c["spent"], "lane_forwards": shape(c["lane_forwards"]), "prompt": length.astype(jnp.int32),
                "cut": shape(c["cut"]), "lane_computed": shape(c["lane_computed"]),
                "prompt_computed": jnp.full((B,), tokens.shape[1], jnp.int32),
                "computed": tokens.shape[1] + shape(c["lane_computed"]).sum(axis=1)}


class LegalStepDecoder:
    """Policy-only decoding over the task's legal steps: no search, no free generation.

    At every step each chain takes the legal step (``Task.legal_steps``) the
    policy finds most likely: the argmax of the prior the search uses with
    ``search.candidates="enumerate"`` (``search.env.score_legal_steps``: the
    log-likelihood of the step's model-written tokens, optionally divided by
    their number). This is "the policy alone" for a network trained only by
    search over legal steps (tabula rasa), which may never have learnt to
    write a step's text itself.

    Returns what ``ChainDecoder`` returns for one lane per problem; a step
    needs the scoring pass over the prefix and every legal step's tokens, and
    computes it for every row at its padded size (``computed``) while any
    row is still live. ``mesh``: the problems are split over its devices, as
    ``ChainDecoder``'s (each device steps until its own rows are done).
    """

    def __init__(self, task: Task, graphdef, *, seq_len: int, length_normalize: bool = False, mesh=None):
        self.task, self.graphdef, self.seq_len = task, graphdef, seq_len
        self.length_normalize, self.mesh = length_normalize, mesh
        self._jitted = jax.jit(self._decode if mesh is None else
                               lambda params, *rows: parallel.per_shard(self._decode, mesh)(params, *rows))

    def __call__(self, params, keys, inputs: dict[str, Any], **unused) -> dict[str, jax.Array]:
        del keys, unused  # deterministic
        rows = (inputs["tokens"], inputs["length"], inputs["task_state"])
        if self.mesh is not None:
            rows = parallel.shard_batch(rows, self.mesh)
        return self._jitted(params, *rows)

    def _decode(self, params, tokens, length, task_state):
        from alphareason.search.env import score_legal_steps
        task = self.task
        model = nnx.merge(self.graphdef, params)
        B = tokens.shape[0]

        def one_step(c):
            live = ~c["done"]
            steps, legal = jax.vmap(task.legal_steps)(c["state"])  # [B, K, S], [B, K]
            steps = jnp.where(live[:, None, None] & legal[..., None], steps, tok.PAD)
            logprob, num_scored, value_logits = score_legal_steps(model, task, c["tokens"], c["length"], steps)
            if self.length_normalize:
                logprob = logprob / jnp.maximum(num_scored, 1)
            choice = jnp.argmax(jnp.where(legal, logprob, -jnp.inf), axis=-1)
            step = jnp.take_along_axis(steps, choice[:, None, None], axis=1)[:, 0]  # [B, S]
            new_state, valid, step_done, reward = jax.vmap(task.step)(c["state"], step)
            move = live & jnp.any(legal, -1)
            step_length = jnp.sum(step != tok.PAD, -1).astype(jnp.int32)
            scored = steps[..., :task.legal_written_len()]  # what the scoring pass reads of each step
            cost = jnp.where(live, c["length"] + jnp.sum(scored != tok.PAD, (1, 2)), 0).astype(jnp.int32)
            computed = jnp.int32(c["tokens"].shape[1] + steps.shape[1] * task.legal_written_len())  # every row
            keep = lambda n, o: jnp.where(move.reshape(move.shape + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
            return dict(
                i=c["i"] + 1, state=jax.tree.map(keep, new_state, c["state"]),
                tokens=jnp.where(move[:, None], append_steps(c["tokens"], c["length"], step), c["tokens"]),
                length=c["length"] + jnp.where(move, step_length, 0),
                done=c["done"] | ~move | (move & (step_done | ~valid)),
                solved=jnp.where(move, reward > 0, c["solved"]),
                logprob=c["logprob"] + jnp.where(move, jnp.max(jnp.where(legal, logprob, -jnp.inf), -1), 0.0),
                value_logits=jnp.where(live, value_logits, c["value_logits"]), spent=c["spent"] + cost,
                computed=c["computed"] + computed)

        carry = dict(i=jnp.int32(0), state=task_state, tokens=tokens, length=length, done=jnp.zeros((B,), bool),
                     solved=jnp.zeros((B,), bool), logprob=jnp.zeros((B,), jnp.float32),
                     value_logits=jnp.zeros((B,), jnp.float32), spent=jnp.zeros((B,), jnp.int32),
                     computed=jnp.zeros((B,), jnp.int32))
        c = jax.lax.while_loop(lambda c: (c["i"] < task.max_steps) & ~jnp.all(c["done"]), one_step, carry)
        one = lambda x: x[:, None]  # noqa: E731  (one lane)
        return {"tokens": one(c["tokens"]), "length": one(c["length"]), "candidate": jnp.ones((B, 1), bool),
                "value": one(jax.nn.sigmoid(c["value_logits"])), "solved": one(c["solved"] & c["done"]),
                "done": one(c["done"]), "logprob": one(c["logprob"]), "spent": c["spent"],
                "lane_forwards": one(c["spent"]), "prompt": jnp.zeros((B,), jnp.int32),
                "cut": jnp.zeros((B, 1), bool), "lane_computed": one(c["computed"]),
                "prompt_computed": jnp.zeros((B,), jnp.int32), "computed": c["computed"]}
