"""The reasoning environment for mctx: states are token sequences, actions are steps.

A node (the mctx embedding, ``Node``) holds the token sequence so far, the
task state, and the K candidate actions proposed at that node, never a KV
cache: mctx keeps one embedding per node for ``[B, num_simulations + 1]``
nodes, so it must stay small.

What an action is (``EnvConfig.candidates``):
  * ``"sample"`` (default): a whole reasoning step, K of them sampled from the
    policy through the KV cache (each up to S tokens, stopping at the step
    separator; with the calculator tool the task writes the tokens after ``=``);
  * ``"enumerate"``: a whole step, the task's legal steps (K is the task's
    count), scored by the policy through the KV cache;
  * ``"tokens"``: one token (token-level search, S = 1 and K = the
    vocabulary). The task transition runs when a step is complete (its
    separator chosen, or S tokens written); the calculator's output is
    appended right after a chosen ``=``.

Expanding a node (``ReasoningEnv.expand``):
  1. prefill the node's tokens into a fresh KV cache (one pass over the
     prefix; its last position gives the value head's estimate and, for
     token actions, the prior over the vocabulary);
  2. propose the K candidates (see above). Enumerated candidates skip step 1:
     one parallel pass over the prefix and all K steps scores them and gives
     the value at the prefix's last token;
  3. check every candidate with the task's JAX transition; invalid ones and
     duplicates get a large negative prior logit (mctx masks invalid actions
     only at the root, so they are masked here too);
  4. prior logits = the candidates' log-likelihoods under the policy
     (optionally divided by their number of model-written tokens).
A terminal node proposes nothing and costs nothing (its value is 0 by
definition), and neither does a node at the search's depth limit
(``max_depth``), which only needs its value: mctx never selects an action
there, it evaluates such a node again (same prefix, same value, same cost)
whenever a simulation reaches it.

Taking an action (``recurrent_fn``) appends the chosen candidate, applies the
task transition (reward 1 for a solved chain of thought, 0 otherwise; an
invalid step is terminal with reward 0) and expands the new node. A chain of
thought that has no room for another step in the model's context ends there
(terminal, reward 0 unless that step solved it). Terminal nodes get discount
0 and value 0; a node below a terminal one is a copy of it (reward 0,
discount 0, value 0), so whatever mctx does there cannot change the search's
values.

Compute accounting: ``Node.token_forwards`` is what expanding the node cost
in model token forwards, tokens pushed through the transformer: the prefix
(prefill) plus every candidate token decoded (tool tokens included, they are
fed through the model too). Lanes of the batched computation that do no
useful work (terminal nodes, candidates of a node at the depth limit) are not
counted, as in ``alphareason.model.sampling``.

In the shape comments ``B`` is the batch size, ``K`` the number of
candidates, ``C`` the tokens of one candidate (S for steps, 1 for tokens),
``S`` the tokens per step and ``T`` the maximum sequence length.
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

from alphareason import tokenizer as tok
from alphareason.model import Tool, tile_cache
from alphareason.model.sampling import sample_step
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
    token_forwards: jax.Array  # int32[B]: model token forwards spent expanding this node
    network_value: jax.Array  # float32[B]: the value head here, also at terminal nodes (where the search uses 0)


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
        consults the verifier, for test-time strategies; that node's prefill
        is then charged, since its output is used).
    """

    num_candidates: int = 8
    candidates: str = "sample"
    temperature: float = 1.0
    top_p: float = 1.0
    length_normalize: bool = False
    terminal_reward: str = "verifier"


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
        self.task, self.graphdef, self.config = task, graphdef, config
        self.seq_len = seq_len
        self.step_len = task.max_step_len
        self.max_depth = max_depth
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
    def expand(self, params, key, inputs: dict[str, Any]) -> tuple[jax.Array, jax.Array, Node]:
        """Evaluates nodes and proposes their candidates.

        Args:
          params: the model's state (``nnx.split``).
          key: PRNG key for sampling the candidates.
          inputs: ``INPUT_KEYS`` with leaves ``[B, ...]``, optionally ``solved``
            bool[B] and ``depth`` int32[B] (default 0: a search root).
        Returns: (prior_logits float32[B, K], value float32[B], Node).
        """
        model = nnx.merge(self.graphdef, params)
        tokens, length, done, task_state = inputs["tokens"], inputs["length"], inputs["done"], inputs["task_state"]
        B, K, S = tokens.shape[0], self.num_candidates, self.step_len
        depth = inputs.get("depth", jnp.zeros_like(length))
        solved = inputs.get("solved", jnp.zeros_like(done))
        propose = ~done if self.max_depth is None else ~done & (depth < self.max_depth)  # [B]
        mode = self.config.candidates
        if mode != "enumerate":  # enumerated steps are scored together with their prefix (no cache needed)
            logits, value_logits, cache = model.prefill(tokens, length, model.init_cache(B, self.seq_len))
        if mode == "tokens":
            cands = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, :, None], (B, K, 1))
            rep = {k: jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), inputs[k])
                   for k in ("tokens", "length", "step_start", "task_state")}
            legal = self._push_token(rep, cands.reshape(B * K))["valid"].reshape(B, K)
            legal &= (cands[..., 0] != tok.PAD) & (cands[..., 0] != tok.BOS)
            cand_length = jnp.broadcast_to(propose[:, None], (B, K)).astype(jnp.int32)
            logprob = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            num_sampled = jnp.ones((B, K), jnp.int32)
            decoded = jnp.zeros((B,), jnp.int32)
            valid = legal & propose[:, None]
        else:
            state_k = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), task_state)
            if mode == "sample":
                cache_k, logits_k, propose_k = tile_cache(cache, K), jnp.repeat(logits, K, 0), jnp.repeat(propose, K)
                sample = sample_step(model, cache_k, logits_k, key, max_step_len=S,
                                     temperature=self.config.temperature, top_p=self.config.top_p,
                                     tool=task_tool(self.task, state_k), active=propose_k)
                cands = sample.tokens.reshape(B, K, S)
                cand_length = sample.length.reshape(B, K)
                logprob = sample.logprob.reshape(B, K)
                num_sampled = sample.num_sampled.reshape(B, K)
            else:
                steps, _ = jax.vmap(self.task.legal_steps)(task_state)  # [B, K, S]
                cands = jnp.where(propose[:, None, None], steps, tok.PAD)
                # All K steps of a row in one parallel pass over [prefix | step_0 | ... | step_{K-1}],
                # which also gives the value at the prefix's last token (what a prefill would).
                logprob, num_sampled, value_logits = score_candidates(model, self.task, tokens, length, cands)
                cand_length = jnp.sum(cands != tok.PAD, -1).astype(jnp.int32)
            decoded = cand_length.sum(-1)
            _, legal_k, _, _ = jax.vmap(self.task.step)(state_k, cands.reshape(B * K, S))
            valid = legal_k.reshape(B, K) & ~first_duplicates(cands) & propose[:, None]
        if self.config.length_normalize:
            logprob = logprob / jnp.maximum(num_sampled, 1)
        prior_logits = jnp.where(valid, logprob, NEG_INF)
        network_value = jax.nn.sigmoid(value_logits.astype(jnp.float32))
        value = jnp.where(done, 0.0, network_value)
        node = Node(tokens=tokens, length=length, step_start=inputs["step_start"], depth=depth,
                    task_state=task_state, done=done, solved=solved, candidates=cands, cand_length=cand_length,
                    cand_valid=valid, cand_logprob=logprob,
                    token_forwards=jnp.where(done, 0, length + decoded).astype(jnp.int32),
                    network_value=network_value)
        return prior_logits, value, node

    def root_fn(self, params, key, inputs: dict[str, Any]) -> mctx.RootFnOutput:
        """mctx's root: expands ``inputs`` (``INPUT_KEYS``) at depth 0."""
        prior_logits, value, node = self.expand(params, key, {k: inputs[k] for k in INPUT_KEYS})
        return mctx.RootFnOutput(prior_logits=prior_logits, value=value, embedding=node)

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

    def recurrent_fn(self, params, key, action, node: Node):
        """mctx's recurrent function: (params, key, action[B], Node) -> (RecurrentFnOutput, Node)."""
        nxt = self.transition(node, action)
        prior_logits, value, child = self.expand(
            params, key, {k: nxt[k] for k in INPUT_KEYS + ("solved", "depth")})
        reward = nxt["reward"]
        if self.config.terminal_reward == "value":
            ended_here = child.done & ~node.done
            reward = jnp.where(ended_here, child.network_value, 0.0).astype(jnp.float32)
            child = child.replace(token_forwards=child.token_forwards + jnp.where(ended_here, child.length, 0))
        out = mctx.RecurrentFnOutput(
            reward=reward, discount=jnp.where(nxt["done"], 0.0, 1.0).astype(jnp.float32),
            prior_logits=prior_logits, value=value)
        return out, child


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


def task_tool(task: Task, state) -> Tool | None:
    """The task's tool for a batch of task states (leaves ``[B, ...]``), as ``sample_step`` takes it."""
    if task.tool_trigger is None:
        return None
    return Tool(trigger=task.tool_trigger, width=task.tool_output_len,
                output=lambda steps, length: jax.vmap(task.tool_output)(state, steps, length))


def score_candidates(model, task: Task, tokens, length, candidates):
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
      ``prefill`` gives them).
    """
    logits, value_logits = model.score_continuations(tokens, length, candidates)  # [B, K, S, V], [B]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), candidates[..., None], -1)[..., 0]
    scored = (candidates != tok.PAD) & ~task.tool_written(candidates)
    return (jnp.sum(jnp.where(scored, logp, 0.0), -1), jnp.sum(scored, -1, dtype=jnp.int32),
            value_logits.astype(jnp.float32))


def _example_problem(task: Task) -> Problem:
    return task.generate(0, 1)[0]
