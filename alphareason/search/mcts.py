"""MCTS over reasoning steps: Gumbel MuZero (default) or PUCT, one jitted function.

``Searcher(task, graphdef, env_config, search_config, seq_len=T)`` compiles
one search per input shape (``jax.jit`` caches it) and is called as
``searcher(params, keys, inputs)`` with one PRNG key per problem. Each
problem's search runs under ``jax.vmap`` with its own key, so a problem's
tree depends only on that problem, its key and the parameters: a batch of one
and a batch of many give the same tree. Settings are checked when the
``Searcher`` is built, before anything is compiled.

Compute is counted exactly: every node's expansion records the token
forwards it made (``Node.token_forwards``: prefix prefill + candidate
decoding), and a node is expanded once, except that with ``max_depth`` mctx
evaluates a node at the depth limit again each time a simulation reaches it
(at the same cost: such a node only prefills its prefix). A node's number of
expansions is its visits minus its children's visits, so the search's cost
per problem is the sum over the tree's nodes of expansions x cost.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import mctx
from flax import struct

from alphareason import parallel
from alphareason.search.env import EnvConfig, Node, ReasoningEnv
from alphareason.tasks import Task

POLICIES = ("gumbel", "puct")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Settings of one search (see ``mctx.gumbel_muzero_policy`` / ``mctx.muzero_policy``).

    ``max_depth``: the most actions a simulation descends from the root (mctx's
    ``max_depth``; None: no limit); the node it reaches there is evaluated by
    the value head and never expanded further.

    ``value_scale`` and ``rescale_values`` (Gumbel only) are those of mctx's
    ``qtransform_completed_by_mix_value``: the improved policy is
    ``softmax(prior_logits + (50 + max visits) * value_scale * q)``. With
    ``rescale_values`` (mctx's default) the completed Q-values are min-max
    normalised over the root's children first, which stretches small
    differences between value-head estimates to the full [0, 1]. Rewards here
    are already in [0, 1] (the exact verifier), so ``rescale_values=False``
    keeps an uninformative value head from reshaping the training targets.
    """

    policy: str = "gumbel"
    num_simulations: int = 16
    max_depth: int | None = None
    max_num_considered_actions: int = 8  # Gumbel: actions sampled without replacement at the root
    gumbel_scale: float = 1.0
    value_scale: float = 0.1  # Gumbel: weight of the completed Q-values in the improved policy
    rescale_values: bool = True  # Gumbel: min-max normalise the completed Q-values
    pb_c_init: float = 1.25  # PUCT
    dirichlet_alpha: float = 0.3  # PUCT root noise
    dirichlet_fraction: float = 0.25
    puct_temperature: float = 1.0  # PUCT: temperature of action_weights over visit counts

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"search.policy={self.policy!r}; choose one of {POLICIES}")
        if self.num_simulations < 1:
            raise ValueError(f"search.num_simulations must be >= 1, got {self.num_simulations}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"search.max_depth={self.max_depth} must be >= 1 (or None for no limit)")
        if not self.value_scale > 0:
            raise ValueError(f"search.value_scale must be > 0, got {self.value_scale}")
        if self.max_num_considered_actions < 1:
            raise ValueError(f"search.max_num_considered_actions must be >= 1, got {self.max_num_considered_actions}")


@struct.dataclass
class SearchResult:
    """The outcome of one search per problem (``B`` problems, ``K`` candidates)."""

    action: jax.Array  # int32[B]: mctx's selected action
    action_weights: jax.Array  # float32[B, K]: the improved policy (training target)
    visit_counts: jax.Array  # int32[B, K]: root children's visits
    search_value: jax.Array  # float32[B]: root value after the search
    network_value: jax.Array  # float32[B]: value head at the root
    root: Node  # root embedding: candidates, their validity and log-likelihoods
    token_forwards: jax.Array  # int32[B]: model token forwards of the whole search (charged to the problem)
    computed_token_forwards: jax.Array  # int32[B]: charged or not: every expansion's prefix + its candidates
    tree: Any = None  # mctx.Tree with leaves [B, N+1, ...] when keep_tree=True


def greedy_action(visit_counts, action_weights) -> jax.Array:
    """The deterministic move: most visits, ties broken by ``action_weights`` (then lowest index).

    visit_counts: [..., K]; action_weights: float32[..., K]. Returns int32[...].
    """
    visits = jnp.asarray(visit_counts)
    weights = jnp.asarray(action_weights, jnp.float32)
    most = visits == jnp.max(visits, axis=-1, keepdims=True)
    return jnp.argmax(jnp.where(most, weights, -1.0), axis=-1).astype(jnp.int32)


def node_expansions(tree: mctx.Tree) -> jax.Array:
    """int32[..., N]: how often mctx expanded each node (0: unused; > 1 only at ``max_depth``)."""
    return jnp.where(tree.node_visits > 0, tree.node_visits - jnp.sum(tree.children_visits, axis=-1), 0)


class Searcher:
    """A compiled search for one task, model graph and setting.

    ``seq_len``: the model's context T (``ModelConfig.max_len``). Raises
    ``ValueError`` for settings that cannot work (before compiling).
    ``mesh`` (optional): the problems are split over its devices and each
    device searches its own with a full copy of the parameters
    (``parallel.per_shard``), so the trees are the single-device trees
    (values to float rounding).
    """

    def __init__(self, task: Task, graphdef, env_config: EnvConfig, search_config: SearchConfig, *,
                 seq_len: int, keep_tree: bool = False, mesh=None):
        depth = search_config.max_depth
        if depth is not None and depth < task.min_steps:
            unit = "tokens" if env_config.candidates == "tokens" else "steps"
            raise ValueError(f"search.max_depth={depth} is below the {task.min_steps} steps every solution of "
                             f"task {task.name} takes, so no simulation could reach a solved step; set "
                             f"max_depth to at least {task.min_steps} {unit} or leave it unset (no limit)")
        self.task = task
        self.env = ReasoningEnv(task, graphdef, env_config, seq_len=seq_len, max_depth=depth)
        self.config = search_config
        self.keep_tree = keep_tree
        self.mesh = mesh
        self._jitted = jax.jit(self._search if mesh is None else parallel.per_shard(self._search, mesh))

    @property
    def num_candidates(self) -> int:
        return self.env.num_candidates

    def __call__(self, params, keys, inputs: dict[str, Any]) -> SearchResult:
        """Searches from ``inputs`` (see ``ReasoningEnv.initial``); ``keys``: one PRNG key per row.

        The tree is always computed (one compilation serves ``keep_tree`` both
        ways); it is dropped here unless ``keep_tree``.
        """
        if self.mesh is not None:
            keys, inputs = parallel.shard_batch((keys, inputs), self.mesh)
        result = self._jitted(params, keys, inputs)
        return result if self.keep_tree else result.replace(tree=None)

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
                invalid_actions=invalid, max_depth=c.max_depth,
                max_num_considered_actions=min(c.max_num_considered_actions, self.num_candidates),
                gumbel_scale=c.gumbel_scale,
                qtransform=functools.partial(mctx.qtransform_completed_by_mix_value, value_scale=c.value_scale,
                                             rescale_values=c.rescale_values))
        else:
            out = mctx.muzero_policy(
                params, search_key, root, self.env.recurrent_fn, num_simulations=c.num_simulations,
                invalid_actions=invalid, max_depth=c.max_depth, pb_c_init=c.pb_c_init,
                dirichlet_alpha=c.dirichlet_alpha, dirichlet_fraction=c.dirichlet_fraction,
                temperature=c.puct_temperature)
        tree = out.search_tree
        expansions = node_expansions(tree)
        forwards = jnp.sum(expansions * tree.embeddings.token_forwards, axis=-1)
        emb = tree.embeddings
        computed = jnp.sum(expansions * (emb.length + jnp.sum(emb.cand_length, -1)), axis=-1)
        summary = tree.summary()
        result = SearchResult(
            action=out.action, action_weights=out.action_weights,
            visit_counts=summary.visit_counts.astype(jnp.int32),
            search_value=summary.value, network_value=root.value, root=root.embedding,
            token_forwards=forwards.astype(jnp.int32), computed_token_forwards=computed.astype(jnp.int32),
            tree=tree)
        return jax.tree.map(lambda x: x[0], result)
