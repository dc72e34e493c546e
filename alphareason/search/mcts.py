"""MCTS over reasoning steps: Gumbel MuZero (default) or PUCT, one jitted function.

``Searcher(task, graphdef, env_config, search_config, seq_len=T)`` compiles
one search per input shape (``jax.jit`` caches it) and is called as
``searcher(params, keys, inputs)`` with one PRNG key per problem. Each
problem's search runs under ``jax.vmap`` with its own key, so a problem's
tree depends only on that problem, its key and the parameters: a batch of one
and a batch of many give the same tree. (The model calls inside are batched
over all problems at once by the environment's ``custom_vmap`` rule.)
Settings are checked when the ``Searcher`` is built, before anything is
compiled; a batch whose trees would not fit ``max_tree_gib`` is refused
before its search starts.

The nodes' prefix caches live in a ``KVPool`` beside mctx's tree (mctx
would move every node's embedding, caches included, at every simulation),
carried by the simulation loop (mctx's ``loop_fn``, ours) and handed to the
expansion of each simulation.

Compute is counted exactly, both what the search needed and what the
hardware computed: every expansion records both on its node
(``Node.token_forwards``, ``Node.computed_forwards``) and marks the node
``fresh``; the simulation loop adds the fresh records to the problem's
totals after every simulation and clears the mark.
So a node mctx evaluates again (at ``max_depth``) is counted every time, and
the computed figure includes every padded and idle lane the problem's rows
took in the batched calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import mctx
from flax import nnx, struct

from alphareason import parallel
from alphareason.search.env import EnvConfig, KVPool, Node, ReasoningEnv
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
    max_tree_gib: float = 4.0  # the most memory one device's search trees may hold (KV caches included)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"search.policy={self.policy!r}; choose one of {POLICIES}")
        if self.num_simulations < 1:
            raise ValueError(f"search.num_simulations must be >= 1, got {self.num_simulations}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"search.max_depth={self.max_depth} must be >= 1 (or None for no limit)")
        if not self.value_scale > 0:
            raise ValueError(f"search.value_scale must be > 0, got {self.value_scale}")
        if not self.max_tree_gib > 0:
            raise ValueError(f"search.max_tree_gib must be > 0, got {self.max_tree_gib}")
        if self.max_num_considered_actions < 1:
            raise ValueError(f"search.max_num_considered_actions must be >= 1, got {self.max_num_considered_actions}")


@struct.dataclass
class SearchResult:
    """The outcome of one search per problem (``B`` problems, ``K`` candidates)."""

    action: jax.Array  # int32[B]: mctx's selected action
    action_weights: jax.Array  # float32[B, K]: the improved policy (training target)
    visit_counts: jax.Array  # int32[B, K]: root children's visits
    search_value: jax.Array  # float32[B]: root value after the search
    search_solved: jax.Array  # bool[B]: the tree holds a solved chain: the root's state is proven solvable
    network_value: jax.Array  # float32[B]: value head at the root
    root: Node  # root embedding: candidates, their validity and log-likelihoods
    token_forwards: jax.Array  # int32[B]: model token forwards the search needed (charged to the problem)
    computed_token_forwards: jax.Array  # int32[B]: token forwards computed for it (padding and idle lanes included)
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
        self._node_bytes: int | None = None

    @property
    def num_candidates(self) -> int:
        return self.env.num_candidates

    def node_bytes(self, params) -> int:
        """Bytes of one node: its embedding, mctx's statistics and its slot of the ``KVPool``."""
        if self._node_bytes is None:
            example = jax.tree.map(jnp.asarray, self.env.initial([self.task.generate(0, 1)[0]]))
            key = jax.eval_shape(jax.random.key, 0)  # shapes only: nothing is compiled or run
            out = jax.eval_shape(self.env.root_fn, params, key, example)
            embedding = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out.embedding))
            statistics = 4 * (6 + 6 * self.num_candidates)  # mctx: 6 per-node and 6 per-edge 4-byte fields
            self._node_bytes = int(embedding + statistics + self.env.slot_bytes(params))
        return self._node_bytes

    def tree_bytes(self, params, batch_size: int) -> int:
        """Bytes the trees of a batch of ``batch_size`` problems hold: ``B x (N + 1)`` nodes."""
        return batch_size * (self.config.num_simulations + 1) * self.node_bytes(params)

    def check_memory(self, params, batch_size: int, shards: int = 1) -> None:
        """Raises ``ValueError`` when one device's trees exceed ``max_tree_gib``, naming what fits.

        ``shards``: the devices the batch's rows are split over (a mesh's size); each holds its share.
        """
        budget = self.config.max_tree_gib * 2 ** 30
        rows = -(-batch_size // shards)
        need = self.tree_bytes(params, rows)
        if need <= budget:
            return
        per_node, N = self.node_bytes(params), self.config.num_simulations
        sims = int(budget // (rows * per_node)) - 1
        batch = int(budget // ((N + 1) * per_node)) * shards
        cfg = nnx.merge(self.env.graphdef, params).config
        per_width = 2 * cfg.num_layers * jnp.dtype(cfg.dtype).itemsize * self.env.seq_len  # cache bytes per d_model
        rest = per_node - (per_width * cfg.d_model if self.env.uses_cache else 0)
        width = int((budget / (rows * (N + 1)) - rest) // per_width)
        fits = ([f"{sims} simulations at batch {batch_size}"] if sims >= 1 else []) + \
               ([f"batch {batch} at {N} simulations"] if batch >= 1 else []) + \
               [f"a model with d_model <= {max(width, 0)} ({cfg.num_layers} layers) at this batch and simulations"]
        where = f" on each of {shards} devices ({rows} problems each)" if shards > 1 else ""
        raise ValueError(
            f"the search trees of a batch of {batch_size} problems x {N + 1} nodes ({N} simulations) would hold "
            f"{need / 2 ** 30:.2f} GiB{where} ({per_node / 1024:.1f} KiB per node, with the keys and values of the "
            f"node's prefix: {cfg.num_layers} layers x 2 x {self.env.seq_len} positions x d_model {cfg.d_model}), "
            f"over search.max_tree_gib={self.config.max_tree_gib:g}. What fits: {'; or '.join(fits)}; "
            f"or raise search.max_tree_gib")

    def __call__(self, params, keys, inputs: dict[str, Any]) -> SearchResult:
        """Searches from ``inputs`` (see ``ReasoningEnv.initial``); ``keys``: one PRNG key per row.

        The tree is always computed (one compilation serves ``keep_tree`` both
        ways); it is dropped here unless ``keep_tree``. A batch whose trees
        would exceed ``max_tree_gib`` raises ``ValueError`` before anything runs.
        """
        self.check_memory(params, int(jax.tree.leaves(inputs)[0].shape[0]), 1 if self.mesh is None else self.mesh.size)
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
        c = self.config
        prior_logits, value, embedding, cache = self.env.expand_root(params, root_key, inputs)
        root = mctx.RootFnOutput(prior_logits=prior_logits, value=value, embedding=embedding)
        pool = self.env.init_pool(params, c.num_simulations + 1)  # this search's node caches (one lane)
        if pool is not None:  # the root's in slot 0
            pool = jax.tree.map(lambda a, r: a.at[0].set(r[0]), pool, KVPool(k=cache.k, v=cache.v))
        valid = embedding.cand_valid
        # Mask invalid candidates at the root unless none is valid (then mctx's
        # softmax would be undefined; every action then ends the episode unsolved).
        invalid = jnp.where(jnp.any(valid, -1, keepdims=True), ~valid, False)
        channel: dict[str, Any] = {}

        def recurrent_fn(params, key, action, node):
            out, child, channel["pool"] = self.env.expand_child(params, key, action, node, channel["pool"],
                                                                channel["slot"])
            return out, child

        loop_fn = functools.partial(_simulation_loop, pool=pool, channel=channel)
        if c.policy == "gumbel":
            out = mctx.gumbel_muzero_policy(
                params, search_key, root, recurrent_fn, num_simulations=c.num_simulations,
                invalid_actions=invalid, max_depth=c.max_depth,
                max_num_considered_actions=min(c.max_num_considered_actions, self.num_candidates),
                gumbel_scale=c.gumbel_scale,
                qtransform=functools.partial(mctx.qtransform_completed_by_mix_value, value_scale=c.value_scale,
                                             rescale_values=c.rescale_values), loop_fn=loop_fn)
        else:
            out = mctx.muzero_policy(
                params, search_key, root, recurrent_fn, num_simulations=c.num_simulations,
                invalid_actions=invalid, max_depth=c.max_depth, pb_c_init=c.pb_c_init,
                dirichlet_alpha=c.dirichlet_alpha, dirichlet_fraction=c.dirichlet_fraction,
                temperature=c.puct_temperature, loop_fn=loop_fn)
        tree = out.search_tree
        summary = tree.summary()
        result = SearchResult(
            action=out.action, action_weights=out.action_weights,
            visit_counts=summary.visit_counts.astype(jnp.int32),
            search_value=summary.value, search_solved=jnp.any(tree.embeddings.solved, axis=-1),
            network_value=root.value, root=embedding,
            token_forwards=channel["needed"], computed_token_forwards=channel["computed"], tree=tree)
        return jax.tree.map(lambda x: x[0], result)


def _simulation_loop(lower, upper, body, init, *, pool, channel: dict):
    """mctx's simulation loop (its ``loop_fn``: a ``fori_loop``), carrying the ``KVPool`` and the compute totals.

    mctx hands ``recurrent_fn`` only the parent's embedding, so the pool
    travels beside mctx's state: before each simulation it is put in
    ``channel["pool"]`` with the slot of the node this simulation creates
    (``channel["slot"]``: simulation i creates node i + 1), the expansion
    inside mctx's body replaces it with the pool it wrote, and the loop
    carries that on. After each simulation the nodes marked ``fresh`` (the
    one just expanded, and the root after the first) add their
    ``token_forwards`` and ``computed_forwards`` to per-problem totals and the
    mark is cleared; the totals (int32[B] each) are left in
    ``channel["needed"]`` and ``channel["computed"]``. Everything happens in
    the caller's trace.
    """
    batch = init[1].node_visits.shape[0]  # mctx's batch: 1 (one search per vmap lane)

    def simulation(i, carry):
        state, pool, needed, computed = carry
        channel["pool"], channel["slot"] = pool, jnp.full((batch,), i + 1, jnp.int32)
        key, tree = body(i, state)
        pool = channel.pop("pool")
        emb = tree.embeddings
        needed = needed + jnp.sum(jnp.where(emb.fresh, emb.token_forwards, 0), axis=-1)
        computed = computed + jnp.sum(jnp.where(emb.fresh, emb.computed_forwards, 0), axis=-1)
        tree = tree.replace(embeddings=emb.replace(fresh=jnp.zeros_like(emb.fresh)))
        return (key, tree), pool, needed, computed

    zeros = jnp.zeros((batch,), jnp.int32)
    state, _, channel["needed"], channel["computed"] = jax.lax.fori_loop(lower, upper, simulation,
                                                                         (init, pool, zeros, zeros))
    return state
