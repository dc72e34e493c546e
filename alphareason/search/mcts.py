"""MCTS over reasoning steps: Gumbel MuZero (default) or PUCT, one jitted function.

``Searcher(task, graphdef, env_config, search_config, seq_len=T)`` compiles
one search per input shape (``jax.jit`` caches it) and is called as
``searcher(params, keys, inputs)`` with one PRNG key per problem. Each
problem's search runs under ``jax.vmap`` with its own key, so a problem's
tree depends only on that problem, its key and the parameters: a batch of one
and a batch of many give the same tree.

Compute is counted exactly: every node's expansion records the token
forwards it made (prefix prefill + candidate decoding), and without a depth
limit mctx expands each of the ``num_simulations`` new nodes exactly once, so
the search's cost per problem is the sum over the tree's nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import mctx
from flax import struct

from alphareason.search.env import EnvConfig, Node, ReasoningEnv
from alphareason.tasks import Task

POLICIES = ("gumbel", "puct")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Settings of one search (see ``mctx.gumbel_muzero_policy`` / ``mctx.muzero_policy``)."""

    policy: str = "gumbel"
    num_simulations: int = 16
    max_num_considered_actions: int = 8  # Gumbel: actions sampled without replacement at the root
    gumbel_scale: float = 1.0
    pb_c_init: float = 1.25  # PUCT
    dirichlet_alpha: float = 0.3  # PUCT root noise
    dirichlet_fraction: float = 0.25
    puct_temperature: float = 1.0  # PUCT: temperature of action_weights over visit counts

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"search.policy={self.policy!r}; choose one of {POLICIES}")
        if self.num_simulations < 1:
            raise ValueError(f"search.num_simulations must be >= 1, got {self.num_simulations}")


@struct.dataclass
class SearchResult:
    """The outcome of one search per problem (``B`` problems, ``K`` candidates)."""

    action: jax.Array  # int32[B]: mctx's selected action
    action_weights: jax.Array  # float32[B, K]: the improved policy (training target)
    visit_counts: jax.Array  # int32[B, K]: root children's visits
    search_value: jax.Array  # float32[B]: root value after the search
    network_value: jax.Array  # float32[B]: value head at the root
    root: Node  # root embedding: candidates, their validity and log-likelihoods
    token_forwards: jax.Array  # int32[B]: model token forwards of the whole search
    tree: Any = None  # mctx.Tree with leaves [B, N+1, ...] when keep_tree=True


class Searcher:
    """A compiled search for one task, model graph and setting."""

    def __init__(self, task: Task, graphdef, env_config: EnvConfig, search_config: SearchConfig, *,
                 seq_len: int, keep_tree: bool = False):
        self.task = task
        self.env = ReasoningEnv(task, graphdef, env_config, seq_len=seq_len)
        self.config = search_config
        self.keep_tree = keep_tree
        self._jitted = jax.jit(self._search)

    @property
    def num_candidates(self) -> int:
        return self.env.num_candidates

    def __call__(self, params, keys, inputs: dict[str, Any]) -> SearchResult:
        """Searches from ``inputs`` (see ``ReasoningEnv.initial``); ``keys``: one PRNG key per row."""
        return self._jitted(params, keys, inputs)

    def _search(self, params, keys, inputs):
        return jax.vmap(lambda k, x: self._search_one(params, k, x))(keys, inputs)

    def _search_one(self, params, key, inputs):
        """One problem, run as an mctx batch of 1; returns its result without the batch axis."""
        inputs = jax.tree.map(lambda x: x[None], inputs)
        root_key, search_key = jax.random.split(key)
        root = self.env.root_fn(params, root_key, inputs)
        valid = root.embedding.cand_valid
        # Mask invalid candidates at the root unless none is valid (then mctx's
        # softmax would be undefined; every action then ends the episode unsolved).
        invalid = jnp.where(jnp.any(valid, -1, keepdims=True), ~valid, False)
        c = self.config
        if c.policy == "gumbel":
            out = mctx.gumbel_muzero_policy(
                params, search_key, root, self.env.recurrent_fn, num_simulations=c.num_simulations,
                invalid_actions=invalid,
                max_num_considered_actions=min(c.max_num_considered_actions, self.num_candidates),
                gumbel_scale=c.gumbel_scale)
        else:
            out = mctx.muzero_policy(
                params, search_key, root, self.env.recurrent_fn, num_simulations=c.num_simulations,
                invalid_actions=invalid, pb_c_init=c.pb_c_init, dirichlet_alpha=c.dirichlet_alpha,
                dirichlet_fraction=c.dirichlet_fraction, temperature=c.puct_temperature)
        tree = out.search_tree
        forwards = root.embedding.token_forwards + jnp.sum(tree.embeddings.token_forwards[:, 1:], axis=-1)
        summary = tree.summary()
        result = SearchResult(
            action=out.action, action_weights=out.action_weights, visit_counts=summary.visit_counts,
            search_value=summary.value, network_value=root.value, root=root.embedding,
            token_forwards=forwards, tree=tree if self.keep_tree else None)
        return jax.tree.map(lambda x: x[0], result)
