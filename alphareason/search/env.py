"""The reasoning environment for mctx: states are token sequences, actions are steps.

A node (the mctx embedding, ``Node``) holds the token sequence so far, the
task state and the K candidate actions proposed at that node. For sampled
steps and token-level search the keys and values of its prefix live beside
the tree, one slot per node in a ``KVPool`` that the ``Searcher``'s
simulation loop carries (mctx gathers and scatters whole embeddings every
simulation, so a cache inside the embedding would be copied each time).
``Searcher`` refuses a tree that would not fit its memory budget before it
starts.

What an action is (``EnvConfig.candidates``):
  * ``"sample"`` (default): a whole reasoning step, K of them sampled from the
    policy (each up to S tokens, stopping at the step separator; with the
    calculator tool the task writes the tokens after ``=``): K distinct steps
    drawn without replacement (``distinct``, the default; stochastic beam
    search) or K independent samples;
  * ``"enumerate"``: a whole step, the task's legal steps (K is the task's
    count), scored by the policy;
  * ``"tokens"``: one token (token-level search, S = 1 and K = the
    vocabulary). The task transition runs when a step is complete (its
    separator chosen, or S tokens written); the calculator's output is
    appended right after a chosen ``=``.

Expanding a node costs the model only what is new (tree KV reuse):
  * the root: a prefill of the prompt, then the K candidates sampled on its
    cache (``sample_candidates``: the K candidates read the one prefix cache);
  * a child: its step pushed through the network on the parent's cache
    (``Transformer.extend``: S tokens, no prefill), then its K candidates. Its
    value is the value head at the end of its step, which the parent's
    sampling already computed (``cand_value_logits``);
  * a terminal node, a copy below one, and a node at the depth limit
    (``max_depth``) cost nothing: their values come from the verifier or the
    parent, and they propose nothing;
  * enumerated steps: one parallel pass over the prefix and the
    model-written part of all K legal steps (``score_candidates``; no cache).
    A child's value is the value head at its own prefix's last token, from
    its own pass; only where a child that proposes nothing needs one (a
    depth limit, ``terminal_reward="value"``) are whole steps scored, for
    their end values.
Every candidate is then checked with the task's JAX transition; invalid ones
and duplicates get a large negative prior logit (mctx masks invalid actions
only at the root, so they are masked here too). Prior logits = the
candidates' log-likelihoods under the policy (optionally divided by their
number of model-written tokens), minus, for distinct samples, the log of
their probability of being drawn (the importance correction for sampling
without replacement).

Batching. The search runs one problem per ``jax.vmap`` lane (``Searcher``),
but an expansion sees the whole batch: ``root_fn`` and ``recurrent_fn`` are
``custom_vmap`` functions whose batched rule runs the model on all problems'
nodes at once, in row groups (``model.rows.run_in_groups``): the nodes that
need the model are moved to the front, the groups without one are skipped,
and each group's sampling loop stops when its own candidates are done.

Taking an action (``recurrent_fn``) appends the chosen candidate, applies the
task transition (reward 1 for a solved chain of thought, 0 otherwise; an
invalid step is terminal with reward 0) and expands the new node. A chain of
thought that has no room for another step in the model's context ends there
(terminal, reward 0 unless that step solved it). Terminal nodes get discount
0 and value 0; a node below a terminal one is a copy of it (reward 0,
discount 0, value 0), so whatever mctx does there cannot change the search's
values.

Compute accounting, per expansion: ``Node.token_forwards`` is what the
expansion needed (model token forwards: the prompt or the new step, plus
every candidate token decoded, tool tokens included) and
``Node.computed_forwards`` what the hardware computed for it: every lane of
the batched calls it rode in (the prompt's padded width, the step's padded
width S, K candidates x the iterations its group's loop ran), padding, idle
rows and finished candidates included.

In the shape comments ``B`` is the batch size, ``K`` the number of
candidates, ``C`` the tokens of one candidate (S for steps, 1 for tokens),
``S`` the tokens per step, ``T`` the maximum sequence length and ``V`` the
vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import mctx
import numpy as np
from flax import nnx, struct

from jax.custom_batching import custom_vmap

from alphareason import tokenizer as tok
from alphareason.model import KVCache, Tool
from alphareason.model.rows import run_in_groups
from alphareason.model.sampling import sample_candidates
from alphareason.tasks import Problem, Task, split_steps

NEG_INF = -1e9  # prior logit of a masked candidate (finite: mctx takes softmaxes)
CANDIDATE_MODES = ("sample", "enumerate", "tokens")
TERMINAL_REWARDS = ("verifier", "value")
INPUT_KEYS = ("tokens", "length", "step_start", "task_state", "done")  # a state, as ``initial`` returns it


@struct.dataclass
class Node:
    """One search node per batch row (the mctx embedding)."""

    tokens: jax.Array  # int32[B, T]: BOS, prompt, steps so far; PAD after
    length: jax.Array  # int32[B]
    step_start: jax.Array  # int32[B]: where the unfinished step begins (== length between steps)
    depth: jax.Array  # int32[B]: actions from the search's root
    task_state: Any  # task pytree, leaves [B, ...]: the state after the last complete step
    done: jax.Array  # bool[B]: terminal node
    solved: jax.Array  # bool[B]: terminal with reward 1
    candidates: jax.Array  # int32[B, K, C]: the proposed actions (PAD-padded steps, or single tokens)
    cand_length: jax.Array  # int32[B, K]: tokens in each candidate (0: nothing proposed)
    cand_valid: jax.Array  # bool[B, K]: legal under the task and not a duplicate
    cand_logprob: jax.Array  # float32[B, K]: log-likelihood under the policy (length-normalised if asked)
    cand_log_inclusion: jax.Array  # float32[B, K]: log P(drawn) of a distinct sample (0 otherwise); prior = logprob - this
    cand_value_logits: jax.Array  # float32[B, K]: value head at each candidate step's end (0 for token actions)
    token_forwards: jax.Array  # int32[B]: model token forwards this expansion needed
    computed_forwards: jax.Array  # int32[B]: token forwards computed for this expansion (lanes, padding included)
    network_value: jax.Array  # float32[B]: the value head here (0 where nothing computed it: a finished root)
    fresh: jax.Array  # bool[B]: set by every expansion (the Searcher counts and clears it)
    slot: jax.Array  # int32[B]: where the node's prefix keys/values are in the search's ``KVPool``


@struct.dataclass
class KVPool:
    """The keys and values of every node's prefix, one slot per node (``M`` slots), outside mctx's tree.

    mctx gathers and scatters whole node embeddings every simulation, so the
    caches live here instead: an expansion reads its parent's slot and writes
    its child's only inside a row group that runs, and a search whose new
    nodes are all terminal moves none of it. Leaves are batch first.
    """

    k: tuple[jax.Array, ...]  # L arrays [M, H, T, Dh] per search ([B, M, H, T, Dh] for B searches)
    v: tuple[jax.Array, ...]

    def read(self, rows, slots, lengths) -> KVCache:
        """The caches at ``slots`` int32[G] of rows ``rows`` int32[G], holding ``lengths`` int32[G] positions."""
        return KVCache(k=tuple(a[rows, slots] for a in self.k), v=tuple(a[rows, slots] for a in self.v),
                       lengths=lengths)

    def write(self, rows, slots, cache: KVCache) -> "KVPool":
        """``cache`` (G rows) stored at ``slots`` of rows ``rows``."""
        return KVPool(k=tuple(a.at[rows, slots].set(c) for a, c in zip(self.k, cache.k)),
                      v=tuple(a.at[rows, slots].set(c) for a, c in zip(self.v, cache.v)))


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """How nodes are expanded.

    Attributes:
      num_candidates: K, candidate steps per node with ``candidates="sample"``
        (``"enumerate"``: the task's count; ``"tokens"``: the vocabulary size).
      candidates: ``"sample"`` (steps from the policy), ``"enumerate"`` (the
        task's legal steps) or ``"tokens"`` (token-level search).
      temperature: sampling temperature for the candidates.
      top_p: nucleus sampling threshold for the candidates.
      length_normalize: divide the prior's log-likelihood by the candidate's
        model-written tokens (tool tokens excluded).
      terminal_reward: what a step that ends the chain earns: ``"verifier"``
        (the task's exact verdict, 1 solved / 0 not) or ``"value"`` (the
        value head's estimate at the end of that step: search that never
        consults the verifier, for test-time strategies; for sampled and
        enumerated steps the parent computed it, for token actions the
        node's extension is then charged).
      distinct: sampled candidates are K distinct steps drawn without
        replacement (stochastic beam search; the prior is corrected by each
        step's probability of being drawn), not K independent samples, of
        which a peaked policy repeats its favourite.
      group_rows: the most candidate rows (nodes x K) one batched model call
        of an expansion holds; the batch's nodes run in groups of this size,
        and groups without a node that needs the model are skipped. A group
        decodes until its longest candidate step ends, so smaller groups
        waste less on a trained network's mostly finished nodes and larger
        ones batch more: of 8 / 32 / 128, 32 ran fastest with the demo's
        network at batch 64 (8 close behind) and far ahead of 8 with an
        untrained one (``benchmarks/results/search_group_rows/``).
    """

    num_candidates: int = 8
    candidates: str = "sample"
    temperature: float = 1.0
    top_p: float = 1.0
    length_normalize: bool = False
    terminal_reward: str = "verifier"
    distinct: bool = True
    group_rows: int = 32


class ReasoningEnv:
    """Builds ``root_fn`` / ``recurrent_fn`` for a task and a model graph.

    ``seq_len`` is T, the model's context (``ModelConfig.max_len``);
    ``max_depth`` the search's depth limit (None: none), whose nodes are only
    evaluated. Bad settings raise ``ValueError`` here, before any compilation.
    """

    def __init__(self, task: Task, graphdef, config: EnvConfig, *, seq_len: int, max_depth: int | None = None):
        if config.terminal_reward not in TERMINAL_REWARDS:
            raise ValueError(f"terminal_reward={config.terminal_reward!r}; choose one of {', '.join(TERMINAL_REWARDS)}")
        if config.candidates not in CANDIDATE_MODES:
            raise ValueError(f"search.candidates={config.candidates!r}; choose one of {', '.join(CANDIDATE_MODES)}")
        if config.group_rows < 1:
            raise ValueError(f"group_rows={config.group_rows} must be >= 1")
        if config.candidates == "sample" and not config.temperature > 0:
            raise ValueError(f"search.candidate_temperature={config.temperature} must be > 0 for sampled candidates")
        self.task, self.graphdef, self.config = task, graphdef, config
        self.seq_len = seq_len
        self.step_len = task.max_step_len
        self.max_depth = max_depth
        # Enumerated steps: every child that proposes scores its own prefix, whose last token is its step's end,
        # so its value comes from that pass and the parent scores only the model-written part of each legal
        # step (``Task.legal_written_len``). A child that proposes nothing (at the depth limit) or a terminal
        # one whose network value is its reward needs its value from the parent: then whole steps are scored
        # (``scores_whole_steps``: True).
        self.scores_whole_steps = config.terminal_reward == "value" or max_depth is not None
        needed = task.context_len() - 1  # the prompt and max_steps steps; no EOS after a search's chain
        if seq_len < needed:
            raise ValueError(f"the model's context (max_len={seq_len} tokens) cannot hold a chain of thought of "
                             f"task {task.name}: prompt {task.max_prompt_len} + {task.max_steps} steps x "
                             f"S={task.max_step_len} tokens = {needed}; raise model.max_len to at least {needed} "
                             f"(0 derives it from the task)")
        if max_depth is not None and max_depth < 1:
            raise ValueError(f"search.max_depth={max_depth} must be >= 1 (or None for no limit)")
        if config.candidates == "enumerate":
            try:
                tokens, _ = jax.eval_shape(task.legal_steps, task.init_state(_example_problem(task)))
            except NotImplementedError as e:
                raise ValueError(f"search.candidates='enumerate' needs a legal-step generator: {e}; "
                                 f"use candidates='sample'") from e
            self.num_candidates, self.candidate_len = tokens.shape[0], self.step_len
        elif config.candidates == "tokens":
            self.num_candidates, self.candidate_len = tok.VOCAB_SIZE, 1
        else:
            if config.num_candidates < 1:
                raise ValueError(f"search.num_candidates must be >= 1, got {config.num_candidates}")
            self.num_candidates, self.candidate_len = config.num_candidates, self.step_len
        self._expand_roots = _over_rows(self._root_rows)
        self._expand_children = _over_rows(self._child_rows, lane_args=(2,))  # (action, node, pool, slot)

    @property
    def max_actions(self) -> int:
        """The most actions one chain of thought takes: steps, or tokens for token-level search."""
        per_step = self.step_len if self.config.candidates == "tokens" else 1
        return self.task.max_steps * per_step

    # ------------------------------------------------------------- inputs
    def initial(self, problems: list[Problem]) -> dict[str, Any]:
        """Root inputs for a list of problems (numpy): see ``INPUT_KEYS``.

        Raises ``ValueError`` (a ``ProblemError``) naming the problem when the
        task rejects one.
        """
        if not problems:
            raise ValueError("no problems to search: give at least one")
        problems = [self.task.validate_problem(p, where=f"problem {i} ({p!r})") for i, p in enumerate(problems)]
        T = self.seq_len
        tokens = np.full((len(problems), T), tok.PAD, np.int32)
        length = np.zeros((len(problems),), np.int32)
        for i, p in enumerate(problems):
            ids = tok.encode(self.task.prompt(p), bos=True)
            tokens[i, : len(ids)] = ids
            length[i] = len(ids)
        states = [self.task.init_state(p) for p in problems]
        task_state = jax.tree.map(lambda *xs: np.stack(xs), *states)
        return {"tokens": tokens, "length": length, "step_start": length.copy(), "task_state": task_state,
                "done": np.zeros((len(problems),), bool)}

    def after(self, problems: list[Problem], texts: list[str]) -> dict[str, Any]:
        """Inputs of the states reached by valid steps ``texts[i]`` (one per problem) from the roots.

        The task state comes from the task's JAX transition over the steps,
        so these states are exactly what a search would reach by taking
        them. Raises ``ValueError`` for a text that does not fit the context.
        """
        inputs = self.initial(problems)
        S, T = self.step_len, self.seq_len
        lines = [split_steps(t) for t in texts]
        D = max([len(x) for x in lines] + [1])
        steps = np.full((len(problems), D, S), tok.PAD, np.int32)
        for i, ls in enumerate(lines):
            for d, line in enumerate(ls):
                steps[i, d] = tok.encode_padded(line + "\n", S)
            ids = tok.encode(texts[i])
            start = int(inputs["length"][i])
            if start + len(ids) > T:
                raise ValueError(f"state {texts[i]!r} of problem {problems[i]} does not fit the context ({T})")
            inputs["tokens"][i, start: start + len(ids)] = ids
            inputs["length"][i] = start + len(ids)
        num_steps = np.array([len(x) for x in lines], np.int32)
        state, done = _advance(self.task, jax.tree.map(jnp.asarray, inputs["task_state"]), jnp.asarray(steps),
                               jnp.asarray(num_steps))
        inputs["task_state"] = jax.tree.map(np.asarray, state)
        inputs["step_start"] = inputs["length"].copy()
        inputs["done"] = np.asarray(done)
        return inputs

    # ------------------------------------------------------------ expansion
    @property
    def uses_cache(self) -> bool:
        """Whether nodes keep their prefix's keys and values (sampled steps and token actions)."""
        return self.config.candidates != "enumerate"

    def init_pool(self, params, num_slots: int) -> KVPool | None:
        """An empty ``KVPool`` of ``num_slots`` node caches for one search (None when nodes keep no cache)."""
        if not self.uses_cache:
            return None
        cache = nnx.merge(self.graphdef, params).init_cache(num_slots, self.seq_len)
        return KVPool(k=cache.k, v=cache.v)

    def slot_bytes(self, params) -> int:
        """Bytes of one node's cache in the ``KVPool`` (0 when nodes keep none)."""
        if not self.uses_cache:
            return 0
        c = nnx.merge(self.graphdef, params).config
        return 2 * c.num_layers * self.seq_len * c.d_model * jnp.dtype(c.dtype).itemsize

    @property
    def chunk_len(self) -> int:
        """The tokens one action appends: a step (S), or a token and the tool's output after it."""
        if self.config.candidates != "tokens":
            return self.step_len
        return min(self.step_len, 1 + (self.task.tool_output_len if self.task.tool_trigger is not None else 0))

    def _group_nodes(self) -> int:
        """Nodes per row group: ``group_rows`` candidate rows, K per node (one for token actions)."""
        per_node = 1 if self.config.candidates == "tokens" else self.num_candidates
        return max(1, self.config.group_rows // per_node)

    def expand(self, params, key, inputs: dict[str, Any]) -> tuple[jax.Array, jax.Array, Node]:
        """Evaluates root nodes and proposes their candidates (``expand_root`` without the caches).

        Args:
          params: the model's state (``nnx.split``).
          key: PRNG key for sampling the candidates (split over the rows; under
            ``jax.vmap``, one per lane).
          inputs: ``INPUT_KEYS`` with leaves ``[B, ...]``, optionally ``solved``
            bool[B] and ``depth`` int32[B] (default 0: a search root).
        Returns: (prior_logits float32[B, K], value float32[B], Node).
        """
        return self.expand_root(params, key, inputs)[:3]

    def expand_root(self, params, key, inputs: dict[str, Any]):
        """``expand`` that also returns the roots' prefix caches (``KVCache`` [B], None for enumerated steps)."""
        return self._expand_roots(params, key, inputs)

    def root_fn(self, params, key, inputs: dict[str, Any]) -> mctx.RootFnOutput:
        """mctx's root: expands ``inputs`` (``INPUT_KEYS``) at depth 0 (in slot 0 of the ``KVPool``)."""
        prior_logits, value, node = self.expand(params, key, {k: inputs[k] for k in INPUT_KEYS})
        return mctx.RootFnOutput(prior_logits=prior_logits, value=value, embedding=node)

    def _root_rows(self, params, keys, inputs):
        """``expand_root`` over rows, with one key per row [B] (see ``_over_rows``)."""
        model = nnx.merge(self.graphdef, params)
        tokens, length, done, task_state = inputs["tokens"], inputs["length"], inputs["done"], inputs["task_state"]
        B, T = tokens.shape
        depth = inputs.get("depth", jnp.zeros_like(length))
        solved = inputs.get("solved", jnp.zeros_like(done))
        propose = ~done if self.max_depth is None else ~done & (depth < self.max_depth)
        rows = dict(keys=keys, tokens=tokens, length=length, task_state=task_state, propose=propose)
        mode = self.config.candidates

        def work(r):
            if mode == "enumerate":
                return self._score_enumerated(model, r)
            logits, value_logits, cache = model.prefill(r["tokens"], r["length"],
                                                        model.init_cache(r["length"].shape[0], T), r["needs"])
            out, lanes, needed = self._propose(model, r, logits, cache)
            return dict(out, value_logits=value_logits, needed=jnp.where(r["needs"], r["length"], 0) + needed), lanes + T

        rows["needs"] = ~done
        out, computed = run_in_groups(work, ~done, rows, group_rows=self._group_nodes())
        out["value_logits"] = jnp.where(done, -jnp.inf, out["value_logits"])  # a finished root: not computed, 0
        cache = out.pop("cache", None)
        prior_logits, value, node = self._node(inputs, depth, solved, propose, out, computed,
                                               jnp.zeros_like(length))
        return prior_logits, value, node, cache

    def _propose(self, model, r, logits, cache):
        """The candidates of rows ``r`` from their prefix's ``logits`` [G, V] and ``cache``.

        Returns (outputs, lanes int32[G] computed per row, needed int32[G] candidate tokens decoded).
        """
        G = logits.shape[0]
        K, S = self.num_candidates, self.step_len
        if self.config.candidates == "tokens":
            out = dict(logprob=jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache=cache)
            return out, jnp.zeros((G,), jnp.int32), jnp.zeros((G,), jnp.int32)
        state_k = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), r["task_state"])
        cs = sample_candidates(model, cache, logits, r["keys"], num_candidates=K, max_step_len=S,
                               temperature=self.config.temperature, top_p=self.config.top_p,
                               tool=task_tool(self.task, state_k), distinct=self.config.distinct,
                               active=r["propose"])
        out = dict(candidates=cs.tokens, cand_length=cs.length, logprob=cs.logprob, num_sampled=cs.num_sampled,
                   log_inclusion=cs.log_inclusion, cand_value_logits=cs.value_logits, cache=cache)
        return out, jnp.full((G,), K * cs.iterations, jnp.int32), cs.token_forwards

    def _score_enumerated(self, model, r):
        """Enumerated candidates of rows ``r``: one pass over each prefix and its K legal steps."""
        steps, _ = jax.vmap(self.task.legal_steps)(r["task_state"])  # [G, K, S]
        cands = jnp.where(r["propose"][:, None, None], steps, tok.PAD)
        cand_length = jnp.sum(cands != tok.PAD, -1).astype(jnp.int32)
        if self.scores_whole_steps:
            read = cands
            logprob, num_sampled, value_logits, step_values = score_candidates(
                model, self.task, r["tokens"], r["length"], read, step_values=True)
        else:  # the children's values come from their own passes (``expand_child``)
            read = cands[..., :self.task.legal_written_len()]
            logprob, num_sampled, value_logits = score_candidates(model, self.task, r["tokens"], r["length"], read)
            step_values = jnp.zeros_like(logprob)
        T = r["tokens"].shape[1]
        out = dict(candidates=cands, cand_length=cand_length, logprob=logprob, num_sampled=num_sampled,
                   cand_value_logits=step_values, value_logits=value_logits,
                   needed=jnp.where(r["propose"], r["length"], 0) + jnp.sum(read != tok.PAD, (-2, -1)))
        lanes = jnp.full(r["length"].shape, T + read.shape[1] * read.shape[2], jnp.int32)
        return out, lanes

    def expand_child(self, params, key, action, node: Node, pool: KVPool | None, slot):
        """Takes ``action`` at ``node`` and expands the child (mctx's ``recurrent_fn``, with the pool).

        The parent's prefix is read from ``pool`` at ``node.slot``; the child's
        (parent + its step) is written at ``slot``, the child's own. One search
        lane: ``action``, ``slot`` int32[1], ``node`` one row, ``pool`` that
        search's (under ``jax.vmap`` over searches, as the ``Searcher`` calls
        it, the lanes' rows are expanded together).
        Returns (mctx.RecurrentFnOutput, child Node, pool).
        """
        return self._expand_children(params, key, action, node, pool, slot)

    def recurrent_fn(self, params, key, action, node: Node):
        """mctx's recurrent function, for enumerated steps (nodes keep no cache; the ``Searcher`` threads the
        ``KVPool`` of the other modes through ``expand_child``)."""
        if self.uses_cache:
            raise ValueError(f"candidates={self.config.candidates!r} keeps each node's keys and values in a KVPool "
                             f"that mctx's recurrent_fn cannot carry; search with Searcher (or call expand_child)")
        out, child, _ = self.expand_child(params, key, action, node, None, node.slot)
        return out, child

    def _child_rows(self, params, keys, action, node: Node, pool, slot):
        """``expand_child`` over rows, with one key per row [B] (see ``_over_rows``)."""
        model = nnx.merge(self.graphdef, params)
        nxt = self.transition(node, action)
        done, depth = nxt["done"], nxt["depth"]
        propose = ~done if self.max_depth is None else ~done & (depth < self.max_depth)
        mode, C = self.config.candidates, self.chunk_len
        rows = dict(keys=keys, tokens=nxt["tokens"], length=nxt["length"], task_state=nxt["task_state"],
                    propose=propose)
        if mode == "tokens":
            # The new tokens (the token, and the tool's output after it) on top of the parent's cache.
            value_terminal = self.config.terminal_reward == "value"
            needs = ~node.done & (~done | value_terminal)
            at = jnp.clip(node.length[:, None] + jnp.arange(C)[None], 0, self.seq_len - 1)
            rows.update(chunk=jnp.take_along_axis(nxt["tokens"], at, 1), num_new=nxt["length"] - node.length)
        else:
            needs = propose
            rows.update(chunk=jnp.take_along_axis(node.candidates, action[:, None, None], 1)[:, 0],
                        num_new=jnp.take_along_axis(node.cand_length, action[:, None], 1)[:, 0])
        rows["num_new"] = jnp.where(needs, rows["num_new"], 0)  # rows riding along in a group push nothing needed
        rows.update(row=jnp.arange(action.shape[0]), parent_slot=node.slot, parent_length=node.length, slot=slot)

        def work(r, pool):
            if mode == "enumerate":
                return self._score_enumerated(model, r) + (pool,)
            cache = pool.read(r["row"], r["parent_slot"], r["parent_length"])
            logits, value_logits, cache = model.extend(r["chunk"], cache, r["num_new"])
            out, lanes, needed = self._propose(model, r, logits, cache)
            pool = pool.write(r["row"], r["slot"], out.pop("cache"))
            return dict(out, value_logits=value_logits, needed=r["num_new"] + needed), lanes + C, pool

        if pool is None:  # enumerated steps: no caches
            out, computed = run_in_groups(lambda r: work(r, None)[:2], needs, rows, group_rows=self._group_nodes())
        else:
            out, computed, pool = run_in_groups(work, needs, rows, group_rows=self._group_nodes(), carry=pool)
        if mode == "enumerate" and not self.scores_whole_steps:  # its own pass: the value at its step's end
            out["value_logits"] = jnp.where(propose, out["value_logits"], -jnp.inf)  # a terminal child: 0
        elif mode != "tokens":  # the value at the end of the step taken, computed when the parent scored it
            out["value_logits"] = jnp.take_along_axis(node.cand_value_logits, action[:, None], 1)[:, 0]
        inputs = {k: nxt[k] for k in INPUT_KEYS}
        prior_logits, value, child = self._node(inputs, depth, nxt["solved"], propose, out, computed, slot)
        reward = nxt["reward"]
        if self.config.terminal_reward == "value":
            ended_here = child.done & ~node.done
            reward = jnp.where(ended_here, child.network_value, 0.0).astype(jnp.float32)
        out = mctx.RecurrentFnOutput(
            reward=reward, discount=jnp.where(nxt["done"], 0.0, 1.0).astype(jnp.float32),
            prior_logits=prior_logits, value=value)
        return out, child, pool

    def _node(self, inputs, depth, solved, propose, out, computed, slot):
        """Masks the candidates and assembles (prior_logits [B, K], value [B], Node) from the rows' outputs."""
        tokens, length, done, task_state = inputs["tokens"], inputs["length"], inputs["done"], inputs["task_state"]
        B, K, S = tokens.shape[0], self.num_candidates, self.step_len
        if self.config.candidates == "tokens":
            cands = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, :, None], (B, K, 1))
            rep = {k: jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), inputs[k])
                   for k in ("tokens", "length", "step_start", "task_state")}
            legal = self._push_token(rep, cands.reshape(B * K))["valid"].reshape(B, K)
            legal &= (cands[..., 0] != tok.PAD) & (cands[..., 0] != tok.BOS)
            cand_length = jnp.broadcast_to(propose[:, None], (B, K)).astype(jnp.int32)
            logprob, num_sampled = out["logprob"], jnp.ones((B, K), jnp.int32)
            log_inclusion = cand_values = jnp.zeros((B, K), jnp.float32)
            valid = legal & propose[:, None]
        else:
            cands, cand_length = out["candidates"], out["cand_length"]
            logprob, num_sampled, cand_values = out["logprob"], out["num_sampled"], out["cand_value_logits"]
            log_inclusion = out.get("log_inclusion", jnp.zeros((B, K), jnp.float32))
            state_k = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), task_state)
            _, legal_k, _, _ = jax.vmap(self.task.step)(state_k, cands.reshape(B * K, S))
            valid = legal_k.reshape(B, K) & ~first_duplicates(cands) & propose[:, None] & (cand_length > 0)
        if self.config.length_normalize:
            logprob = logprob / jnp.maximum(num_sampled, 1)
        prior_logits = jnp.where(valid, logprob - log_inclusion, NEG_INF)
        network_value = jax.nn.sigmoid(out["value_logits"].astype(jnp.float32))
        value = jnp.where(done, 0.0, network_value)
        node = Node(tokens=tokens, length=length, step_start=inputs["step_start"], depth=depth,
                    task_state=task_state, done=done, solved=solved, candidates=cands, cand_length=cand_length,
                    cand_valid=valid, cand_logprob=logprob, cand_log_inclusion=log_inclusion,
                    cand_value_logits=cand_values.astype(jnp.float32), token_forwards=out["needed"].astype(jnp.int32),
                    computed_forwards=computed, network_value=network_value, fresh=jnp.ones((B,), bool),
                    slot=jnp.asarray(slot, jnp.int32))
        return prior_logits, value, node

    # ----------------------------------------------------------- transition
    def transition(self, node: Node, action) -> dict[str, Any]:
        """Takes candidate ``action[B]`` at each node: the child's inputs, reward and flags.

        A node below a terminal one is a copy of it (reward 0, still done).
        Returns a dict with ``INPUT_KEYS``, ``solved`` and ``depth`` (the next
        node's inputs) and reward float32[B], valid bool[B].
        """
        S, T = self.step_len, self.seq_len
        state = {k: getattr(node, k) for k in ("tokens", "length", "step_start", "task_state")}
        if self.config.candidates == "tokens":
            token = jnp.take_along_axis(node.candidates[..., 0], action[:, None], axis=1)[:, 0]
            nxt = self._push_token(state, token)
        else:
            step = jnp.take_along_axis(node.candidates, action[:, None, None], axis=1)[:, 0]  # [B, S]
            step_length = jnp.take_along_axis(node.cand_length, action[:, None], axis=1)[:, 0]
            new_state, valid, step_done, reward = jax.vmap(self.task.step)(node.task_state, step)
            new_length = node.length + step_length
            nxt = {"tokens": append_steps(node.tokens, node.length, step), "length": new_length,
                   "step_start": new_length, "task_state": new_state, "valid": valid,
                   "done": step_done | ~valid, "reward": reward.astype(jnp.float32)}
        # A chain with no room left for another step ends here (appends stay inside T).
        nxt["done"] = nxt["done"] | (nxt["step_start"] + S > T)
        parent_done = node.done

        def keep_parent(new, old):
            mask = parent_done.reshape(parent_done.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, old, new)

        reward = jnp.where(parent_done, 0.0, nxt["reward"])
        out = {k: jax.tree.map(keep_parent, nxt[k], state[k]) for k in state}
        out.update(done=parent_done | nxt["done"], solved=jnp.where(parent_done, node.solved, reward > 0),
                   depth=node.depth + 1, reward=reward, valid=nxt["valid"] & ~parent_done)
        return out

    def _push_token(self, state: dict[str, Any], token) -> dict[str, Any]:
        """Token-level transition: appends ``token`` int32[B] to the unfinished step.

        After a model-written ``=`` the task's tool output is appended too. A
        step is complete at SEP or EOS, or when it reaches S tokens (then it is
        judged, and rejected, as a truncated step); a complete step goes through
        the task transition. An incomplete step is valid, not done, reward 0.
        Returns tokens, length, step_start, task_state, valid, done, reward.
        """
        task, S = self.task, self.step_len
        tokens, length, start, task_state = state["tokens"], state["length"], state["step_start"], state["task_state"]
        B = tokens.shape[0]
        rows, pos = jnp.arange(B), jnp.arange(S)[None, :]
        step_len = length - start
        step = jax.vmap(lambda t, s: jax.lax.dynamic_slice(t, (s,), (S,)))(tokens, start)
        step = jnp.where(pos < step_len[:, None], step, tok.PAD)
        step = jnp.where(pos == step_len[:, None], token[:, None], step)
        step_len = step_len + 1
        if task.tool_trigger is not None:
            forced, count = jax.vmap(task.tool_output)(task_state, step, step_len)
            n = jnp.where(token == task.tool_trigger, jnp.clip(count, 0, S - step_len), 0)
            offset = pos - step_len[:, None]
            write = (offset >= 0) & (offset < n[:, None])
            step = jnp.where(write, jnp.take_along_axis(forced, jnp.clip(offset, 0, forced.shape[1] - 1), 1), step)
            step_len = step_len + n
        last = step[rows, jnp.clip(step_len - 1, 0, S - 1)]
        complete = (last == tok.SEP) | (last == tok.EOS) | (step_len >= S)
        new_state, valid, step_done, reward = jax.vmap(task.step)(task_state, step)
        new_length = start + step_len

        def if_complete(new, old):
            mask = complete.reshape(complete.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        return {"tokens": append_steps(tokens, start, step), "length": new_length,
                "step_start": jnp.where(complete, new_length, start),
                "task_state": jax.tree.map(if_complete, new_state, task_state),
                "valid": ~complete | valid, "done": complete & (step_done | ~valid),
                "reward": jnp.where(complete, reward, 0.0).astype(jnp.float32)}

def append_steps(tokens, length, step):
    """Writes ``step`` (int32[B, S], PAD-padded) at each row's ``length``: -> int32[B, T].

    Needs ``length + S <= T`` (the environment ends a chain before that).
    """
    return jax.vmap(lambda t, n, s: jax.lax.dynamic_update_slice(t, s, (n,)))(tokens, length, step)


def first_duplicates(cands) -> jax.Array:
    """bool[B, K]: candidate k equals an earlier candidate j < k of the same row."""
    same = jnp.all(cands[:, :, None, :] == cands[:, None, :, :], axis=-1)  # [B, K, K]
    K = cands.shape[1]
    earlier = jnp.tril(jnp.ones((K, K), bool), k=-1)
    return jnp.any(same & earlier[None], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _advance(task: Task, state, steps, num_steps):
    """The task state after ``num_steps[b]`` of ``steps[b]`` (int32[B, D, S]); and whether it is done."""
    def one(carry, d):
        state, done = carry
        new, valid, step_done, _ = jax.vmap(task.step)(state, steps[:, d])
        take = d < num_steps
        keep = lambda n, o: jnp.where(take.reshape(take.shape + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
        return (jax.tree.map(keep, new, state), jnp.where(take, step_done | ~valid, done)), None

    done = jnp.zeros(num_steps.shape, bool)
    (state, done), _ = jax.lax.scan(one, (state, done), jnp.arange(steps.shape[1]))
    return state, done


def _over_rows(impl, *, lane_args: tuple[int, ...] = ()):
    """``impl(params, keys [B], *rows)`` as a function of one key, batched over problems as one call.

    Called as ``f(params, key, *rows)`` (mctx's convention: one key for the
    batch), it runs ``impl`` with the key split over the rows (a single row
    keeps the key itself). Under ``jax.vmap`` (the ``Searcher`` runs one
    problem per lane, each an mctx batch of 1) its rule flattens the lanes'
    rows into one batch with each lane's key, so ``impl``'s row groups,
    conditionals and loops run once over every problem's nodes instead of
    being vmapped (which would turn a skipped group into a computed one and
    an early exit into a wait for the slowest lane).

    ``lane_args`` (indices into ``rows``) are per search lane, without a row
    axis (the ``KVPool``: a leading axis of size 1 under ``vmap`` makes XLA
    copy the whole pool to change its layout); they need one row per lane.
    """

    def rows_of(args):
        return [a for i, a in enumerate(args) if i not in lane_args]

    def check_one_row(n):
        if lane_args and n != 1:
            raise ValueError(f"a search lane holds {n} rows; its KV pool is per lane and needs 1 (vmap over problems)")

    @custom_vmap
    def f(params, key, *args):
        n = jax.tree.leaves(rows_of(args))[0].shape[0]
        check_one_row(n)
        args = [jax.tree.map(lambda x: x[None], a) if i in lane_args else a for i, a in enumerate(args)]
        out = impl(params, key[None] if n == 1 else jax.random.split(key, n), *args)
        return _drop_lane_axis(out, lane_args)

    @f.def_vmap
    def rule(axis_size, in_batched, params, key, *args):
        if any(jax.tree.leaves(in_batched[0])):
            raise NotImplementedError("a search vmapped over model parameters is not supported")
        keys = key if in_batched[1] else jax.random.split(key, axis_size)
        args = tuple(jax.tree.map(lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + x.shape), a, ab)
                     for a, ab in zip(args, in_batched[2:]))
        n = jax.tree.leaves(rows_of(args))[0].shape[1]
        check_one_row(n)
        row_keys = keys if n == 1 else jax.vmap(lambda k: jax.random.split(k, n))(keys).reshape(axis_size * n)
        flat = [a if i in lane_args else jax.tree.map(lambda x: x.reshape((axis_size * n,) + x.shape[2:]), a)
                for i, a in enumerate(args)]
        out = impl(params, row_keys, *flat)
        lanes = out[-1:] if lane_args else ()  # the pool stays [lanes, ...]: no reshape through a size-1 axis
        out = tuple(jax.tree.map(lambda x: x.reshape((axis_size, n) + x.shape[1:]), out[:len(out) - len(lanes)]))
        out = out + lanes
        return out, jax.tree.map(lambda _: True, out)

    return f


def _drop_lane_axis(out, lane_args):
    """``expand_child`` called on one lane: its pool (the last output) without the row axis of 1."""
    if not lane_args:
        return out
    return tuple(out[:-1]) + (jax.tree.map(lambda x: x[0], out[-1]),)


def _tool_output(task: Task, state, steps, length):
    return jax.vmap(task.tool_output)(state, steps, length)


def task_tool(task: Task, state) -> Tool | None:
    """The task's tool for a batch of task states (leaves ``[B, ...]``), as the samplers take it."""
    if task.tool_trigger is None:
        return None
    return Tool(trigger=task.tool_trigger, width=task.tool_output_len, output=functools.partial(_tool_output, task),
                state=state)


def score_candidates(model, task: Task, tokens, length, candidates, *, step_values: bool = False):
    """Log-likelihood of the model-written tokens of K candidate steps per prefix, in one parallel pass.

    The one candidate scorer: the search's enumerated candidates and the
    learner's policy loss both use it. One forward of ``[prefix | cand_0 |
    ... | cand_{K-1}]`` (``Transformer.score_continuations``) gives the same
    numbers as teacher-forcing each step through a tiled KV cache (checked
    against full forwards in the tests) at ``T + K * S`` token forwards per
    row instead of S sequential decodes of K rows, and is several times
    cheaper to differentiate.

    Args:
      tokens: int32[B, T] prefixes; length: int32[B].
      candidates: int32[B, K, S], PAD after each step (all PAD: nothing to score).
    Returns:
      (logprob float32[B, K]: summed over the model-written tokens (the
      task's tool tokens and PAD excluded); num_scored int32[B, K]: how many
      tokens that is; value_logits float32[B] at each prefix's last token, as
      ``prefill`` gives them); with ``step_values`` also float32[B, K], the
      value logit at each candidate's last token (0 for an empty one).
    """
    out = model.score_continuations(tokens, length, candidates, continuation_values=step_values)
    logits, value_logits = out[0], out[1]  # [B, K, S, V], [B]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), candidates[..., None], -1)[..., 0]
    scored = (candidates != tok.PAD) & ~task.tool_written(candidates)
    result = (jnp.sum(jnp.where(scored, logp, 0.0), -1), jnp.sum(scored, -1, dtype=jnp.int32),
              value_logits.astype(jnp.float32))
    if not step_values:
        return result
    last = jnp.maximum(jnp.sum(candidates != tok.PAD, -1) - 1, 0)  # [B, K]
    ends = jnp.take_along_axis(out[2], last[..., None], -1)[..., 0]
    return result + (ends.astype(jnp.float32),)


def score_legal_steps(model, task: Task, tokens, length, steps):
    """``score_candidates`` of legal steps (``Task.legal_steps``; int32[B, K, S], PAD where not legal).

    Only their first ``W = task.legal_written_len()`` tokens are read: the rest is the tool's output or PAD,
    which no score depends on (attention is causal), so the result is the same at ``T + K * W`` token forwards
    a row instead of ``T + K * S``. Returns ``(logprob, num_scored, value_logits)`` as ``score_candidates``.
    """
    return score_candidates(model, task, tokens, length, steps[..., :task.legal_written_len()])


def _example_problem(task: Task) -> Problem:
    return task.generate(0, 1)[0]
