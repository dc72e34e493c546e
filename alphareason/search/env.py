"""The reasoning environment for mctx: states are token sequences, actions are steps.

A node (the mctx embedding, ``Node``) holds the token sequence so far, the
task state, and the K candidate steps proposed at that node, never a KV
cache: mctx keeps one embedding per node for ``[B, num_simulations + 1]``
nodes, so it must stay small.

Expanding a node (``ReasoningEnv.expand``):
  1. prefill the node's tokens into a fresh KV cache (one pass over the
     prefix; its last position gives the value head's estimate);
  2. tile the cache K times and sample K candidate steps through it (each up
     to S tokens, stopping at the step separator), or take the task's legal
     steps (``candidates="enumerate"``) and score them through the cache;
  3. check every candidate with the task's JAX transition; invalid ones and
     duplicates get a large negative prior logit (mctx masks invalid actions
     only at the root, so they are masked here too);
  4. prior logits = the candidates' log-likelihoods under the policy
     (optionally divided by their length).

Taking an action (``recurrent_fn``) appends the chosen candidate, applies the
task transition (reward 1 for a solved chain of thought, 0 otherwise; an
invalid step is terminal with reward 0) and expands the new node. Terminal
nodes get discount 0 and value 0; a node below a terminal one is a copy of
it, so whatever mctx does there cannot change the search's values.

In the shape comments ``B`` is the batch size, ``K`` the number of candidate
steps, ``S`` the tokens per step and ``T`` the maximum sequence length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import mctx
import numpy as np
from flax import nnx, struct

from alphareason import tokenizer as tok
from alphareason.model import tile_cache
from alphareason.model.sampling import sample_step
from alphareason.tasks import Problem, Task

NEG_INF = -1e9  # prior logit of a masked candidate (finite: mctx takes softmaxes)


@struct.dataclass
class Node:
    """One search node per batch row (the mctx embedding)."""

    tokens: jax.Array  # int32[B, T]: BOS, prompt, steps so far; PAD after
    length: jax.Array  # int32[B]
    task_state: Any  # task pytree, leaves [B, ...]
    done: jax.Array  # bool[B]: terminal node
    solved: jax.Array  # bool[B]: terminal with reward 1
    candidates: jax.Array  # int32[B, K, S]: the proposed next steps
    cand_length: jax.Array  # int32[B, K]: tokens in each candidate
    cand_valid: jax.Array  # bool[B, K]: legal under the task and not a duplicate
    cand_logprob: jax.Array  # float32[B, K]: log-likelihood of each candidate under the policy
    token_forwards: jax.Array  # int32[B]: model token forwards spent expanding this node


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """How nodes are expanded.

    Attributes:
      num_candidates: K, candidate steps per node (``"enumerate"``: the task's count).
      candidates: ``"sample"`` (from the policy) or ``"enumerate"`` (task's legal steps).
      temperature: sampling temperature for the candidates.
      top_p: nucleus sampling threshold for the candidates.
      length_normalize: divide the prior's log-likelihood by the candidate's sampled tokens.
    """

    num_candidates: int = 8
    candidates: str = "sample"
    temperature: float = 1.0
    top_p: float = 1.0
    length_normalize: bool = False


class ReasoningEnv:
    """Builds ``root_fn`` / ``recurrent_fn`` for a task and a model graph."""

    def __init__(self, task: Task, graphdef, config: EnvConfig, *, seq_len: int):
        if config.candidates not in ("sample", "enumerate"):
            raise ValueError(f"search.candidates={config.candidates!r}; choose 'sample' or 'enumerate'")
        self.task, self.graphdef, self.config = task, graphdef, config
        self.seq_len = seq_len
        self.step_len = task.max_step_len
        needed = task.max_prompt_len + task.max_steps * task.max_step_len
        if seq_len < needed:
            raise ValueError(f"the model's context ({seq_len} tokens) is shorter than the {needed} a "
                             f"chain of thought of task {task.name} can take (prompt {task.max_prompt_len} + "
                             f"{task.max_steps} steps x {task.max_step_len}); raise model.max_len")
        if config.candidates == "enumerate":
            try:
                tokens, _ = jax.eval_shape(task.legal_steps, task.init_state(_example_problem(task)))
            except NotImplementedError as e:
                raise ValueError(f"search.candidates='enumerate' needs a legal-step generator: {e}") from e
            self.num_candidates = tokens.shape[0]
        else:
            if config.num_candidates < 1:
                raise ValueError(f"search.num_candidates must be >= 1, got {config.num_candidates}")
            self.num_candidates = config.num_candidates

    # ------------------------------------------------------------- inputs
    def initial(self, problems: list[Problem]) -> dict[str, Any]:
        """Root inputs for a list of problems (numpy): tokens, length, task_state, done."""
        T = self.seq_len
        tokens = np.full((len(problems), T), tok.PAD, np.int32)
        length = np.zeros((len(problems),), np.int32)
        for i, p in enumerate(problems):
            ids = tok.encode(self.task.prompt(p), bos=True)
            tokens[i, : len(ids)] = ids
            length[i] = len(ids)
        states = [self.task.init_state(p) for p in problems]
        task_state = jax.tree.map(lambda *xs: np.stack(xs), *states)
        return {"tokens": tokens, "length": length, "task_state": task_state,
                "done": np.zeros((len(problems),), bool)}

    # ------------------------------------------------------------ expansion
    def expand(self, params, key, tokens, length, task_state, done, solved=None) -> tuple[jax.Array, jax.Array, Node]:
        """Evaluates nodes and proposes their candidate steps.

        Returns: (prior_logits float32[B, K], value float32[B], Node).
        """
        model = nnx.merge(self.graphdef, params)
        B, K, S = tokens.shape[0], self.num_candidates, self.step_len
        cache = model.init_cache(B, self.seq_len)
        logits, value_logits, cache = model.prefill(tokens, length, cache)
        cache_k = tile_cache(cache, K)
        logits_k = jnp.repeat(logits, K, axis=0)
        state_k = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), task_state)
        if self.config.candidates == "sample":
            tool_fn = None
            if self.task.tool is not None:
                def tool_fn(step_tokens, step_length):
                    return jax.vmap(self.task.tool_output)(state_k, step_tokens, step_length)
            sample = sample_step(model, cache_k, logits_k, key, max_step_len=S,
                                 temperature=self.config.temperature, top_p=self.config.top_p,
                                 tool_fn=tool_fn, tool_output_len=self.task.tool_output_len)
            cands = sample.tokens.reshape(B, K, S)
            cand_length = sample.length.reshape(B, K)
            logprob = sample.logprob.reshape(B, K)
            num_sampled = sample.num_sampled.reshape(B, K)
            decode_forwards = cand_length.sum(-1)
        else:
            cands, legal = jax.vmap(self.task.legal_steps)(task_state)  # [B, K, S], [B, K]
            flat = cands.reshape(B * K, S)
            tool = after_equals(flat) if self.task.tool else jnp.zeros_like(flat, bool)
            logprob, cand_length_flat = score_steps(model, cache_k, logits_k, flat, tool)
            logprob = logprob.reshape(B, K)
            cand_length = cand_length_flat.reshape(B, K)
            num_sampled = jnp.sum((~tool) & (flat != tok.PAD), -1).reshape(B, K)
            decode_forwards = cand_length.sum(-1)
        _, legal_k, _, _ = jax.vmap(self.task.step)(state_k, cands.reshape(B * K, S))
        valid = legal_k.reshape(B, K) & ~first_duplicates(cands) & ~done[:, None]
        if self.config.length_normalize:
            logprob = logprob / jnp.maximum(num_sampled, 1)
        prior_logits = jnp.where(valid, logprob, NEG_INF)
        value = jax.nn.sigmoid(value_logits.astype(jnp.float32))
        node = Node(tokens=tokens, length=length, task_state=task_state, done=done,
                    solved=jnp.zeros_like(done) if solved is None else solved,
                    candidates=cands, cand_length=cand_length, cand_valid=valid, cand_logprob=logprob,
                    token_forwards=(length + decode_forwards).astype(jnp.int32))
        return prior_logits, value, node

    def root_fn(self, params, key, inputs: dict[str, Any]) -> mctx.RootFnOutput:
        prior_logits, value, node = self.expand(params, key, inputs["tokens"], inputs["length"],
                                                inputs["task_state"], inputs["done"])
        value = jnp.where(inputs["done"], 0.0, value)
        return mctx.RootFnOutput(prior_logits=prior_logits, value=value, embedding=node)

    def transition(self, node: Node, action) -> dict[str, Any]:
        """Takes candidate ``action[B]`` at each node: the child's inputs, reward and flags.

        A node below a terminal one is a copy of it (reward 0, still done).
        Returns a dict with tokens, length, task_state, done, solved (the next
        node's inputs) and reward float32[B], valid bool[B].
        """
        step = jnp.take_along_axis(node.candidates, action[:, None, None], axis=1)[:, 0]  # [B, S]
        step_length = jnp.take_along_axis(node.cand_length, action[:, None], axis=1)[:, 0]
        new_state, valid, step_done, reward = jax.vmap(self.task.step)(node.task_state, step)
        parent_done = node.done

        def keep_parent(new, old):
            mask = parent_done.reshape(parent_done.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, old, new)

        reward = jnp.where(parent_done, 0.0, reward.astype(jnp.float32))
        return {
            "tokens": jnp.where(parent_done[:, None], node.tokens, append_steps(node.tokens, node.length, step)),
            "length": jnp.where(parent_done, node.length, node.length + step_length),
            "task_state": jax.tree.map(keep_parent, new_state, node.task_state),
            "done": parent_done | step_done | ~valid,
            "solved": jnp.where(parent_done, node.solved, reward > 0),
            "reward": reward,
            "valid": valid & ~parent_done,
        }

    def recurrent_fn(self, params, key, action, node: Node):
        """mctx's recurrent function: (params, key, action[B], Node) -> (RecurrentFnOutput, Node)."""
        nxt = self.transition(node, action)
        prior_logits, value, child = self.expand(params, key, nxt["tokens"], nxt["length"], nxt["task_state"],
                                                 nxt["done"], nxt["solved"])
        done = nxt["done"]
        out = mctx.RecurrentFnOutput(
            reward=nxt["reward"], discount=jnp.where(done, 0.0, 1.0).astype(jnp.float32),
            prior_logits=prior_logits, value=jnp.where(done, 0.0, value))
        return out, child


def append_steps(tokens, length, step):
    """Writes ``step`` (int32[B, S], PAD-padded) at each row's ``length``: -> int32[B, T]."""
    return jax.vmap(lambda t, n, s: jax.lax.dynamic_update_slice(t, s, (n,)))(tokens, length, step)


def first_duplicates(cands) -> jax.Array:
    """bool[B, K]: candidate k equals an earlier candidate j < k of the same row."""
    same = jnp.all(cands[:, :, None, :] == cands[:, None, :, :], axis=-1)  # [B, K, K]
    K = cands.shape[1]
    earlier = jnp.tril(jnp.ones((K, K), bool), k=-1)
    return jnp.any(same & earlier[None], axis=-1)


def after_equals(steps) -> jax.Array:
    """bool[N, S]: tokens after the step's ``=`` (what the calculator tool writes)."""
    seen = jnp.cumsum(steps == tok.EQUALS, axis=-1) > 0
    return seen & (steps != tok.EQUALS) & (steps != tok.PAD)


def score_steps(model, cache, logits, steps, tool_mask):
    """Teacher-forces ``steps`` through a cache; log-likelihood of the model-written tokens.

    Args:
      cache: a KV cache of the prefixes, one row per step.
      logits: float32[N, V], the model's outputs at each prefix's last position.
      steps: int32[N, S], PAD after the step.
      tool_mask: bool[N, S], tokens written by a tool (not scored).
    Returns:
      (logprob float32[N], length int32[N]): summed log-probabilities and tokens per step.
    """
    length = jnp.sum(steps != tok.PAD, axis=-1).astype(jnp.int32)

    def body(i, carry):
        logits, cache, total = carry
        token = steps[:, i]
        active = i < length
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], -1)[:, 0]
        total = total + jnp.where(active & ~tool_mask[:, i], logp, 0.0)
        new_logits, _, cache = model.decode(token, cache, active)
        logits = jnp.where(active[:, None], new_logits, logits)
        return logits, cache, total

    _, _, total = jax.lax.fori_loop(0, steps.shape[1], body, (logits, cache, jnp.zeros(steps.shape[:1], jnp.float32)))
    return total, length


def _example_problem(task: Task) -> Problem:
    return task.generate(0, 1)[0]
