"""Compute accounting for test-time strategies: budgets in model token forwards, and an independent counter.

A budget is a number of **model token forwards** per problem (tokens pushed
through the transformer, prefill and decode both, as counted in
``model/sampling.py``, ``search/env.py`` and ``search/decode.py``). Every
strategy derives its size (chains, beams or simulations) from the budget and
a per-generation cost estimate, never spends more than the budget, and
reports exactly what it spent.

``generation_cost`` (the budget unit, "one generation") is the most one chain
of thought can cost: the longest prompt plus ``max_steps`` steps of
``max_step_len`` tokens. The sampling strategies prefill each prompt once and
sample their N chains through copies of its KV cache, so N chains cost
``prompt + sum(chain tokens)``; ``N = (budget - max_prompt_len) //
cost_estimate``. MCTS cannot stop in the middle of a search, so its
simulations are sized for the worst case: every expansion prefills at most
``generation_cost`` tokens and samples ``K`` candidates of at most
``max_step_len`` tokens, and every episode runs ``max_steps`` searches.

``TokenCountingModel`` wraps a model to count the same forwards
independently, from inside ``prefill`` / ``decode`` / ``score_continuations``,
so a test can compare it with what a strategy reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason import tokenizer as tok

def lanes_for_budget(budget: int, *, prompt_cost: int, chain_cost: float) -> int:
    """N chains that fit a budget: ``(budget - prompt_cost) // chain_cost`` (0: not even one)."""
    return max(0, int((budget - prompt_cost) // max(chain_cost, 1)))


def simulations_for_budget(budget: int, *, moves: int, expansion_cost: int) -> int:
    """Simulations per move such that ``moves * (sims + 1) * expansion_cost <= budget`` (0: none fit)."""
    return max(0, budget // (moves * expansion_cost) - 1)


class TokenCounter:
    """Host-side tally of token forwards, fed by ``TokenCountingModel`` (via ``jax.debug.callback``)."""

    def __init__(self):
        self.prefill = 0
        self.decode = 0

    @property
    def total(self) -> int:
        jax.effects_barrier()
        return self.prefill + self.decode

    def reset(self) -> None:
        jax.effects_barrier()
        self.prefill = self.decode = 0

    def _add_prefill(self, n):
        self.prefill += int(np.sum(n))

    def _add_decode(self, n):
        self.decode += int(np.sum(n))


class TokenCountingModel(nnx.Module):
    """A transformer that counts the token forwards it computes into a ``TokenCounter``.

    ``prefill`` counts the prompt lengths (``sum(lengths)``), ``decode`` the
    active rows (all rows when ``active`` is None): the project's rule of
    counting tokens, not padded lanes. Counting happens on the host through
    ``jax.debug.callback``, so it works inside ``jit``, ``vmap`` and loops;
    it is for tests and audits, not for speed. ``nnx.split`` it like a model.
    """

    def __init__(self, model, counter: TokenCounter):
        self.model = model
        self.counter = counter

    @property
    def config(self):
        return self.model.config

    def init_cache(self, batch_size: int, max_len: int | None = None):
        return self.model.init_cache(batch_size, max_len)

    def __call__(self, tokens):
        jax.debug.callback(self.counter._add_prefill, jnp.asarray(tokens.size, jnp.int32))
        return self.model(tokens)

    def prefill(self, tokens, lengths, cache):
        out = self.model.prefill(tokens, lengths, cache)
        jax.debug.callback(self.counter._add_prefill, jnp.sum(jnp.asarray(lengths, jnp.int32)))
        return out

    def score_continuations(self, tokens, lengths, continuations):
        out = self.model.score_continuations(tokens, lengths, continuations)
        n = jnp.sum(jnp.asarray(lengths, jnp.int32)) + jnp.sum(continuations != tok.PAD, dtype=jnp.int32)
        jax.debug.callback(self.counter._add_prefill, n)  # the prefixes and the continuations' tokens
        return out

    def decode(self, tokens, cache, active=None):
        out = self.model.decode(tokens, cache, active)
        n = jnp.int32(tokens.shape[0]) if active is None else jnp.sum(jnp.asarray(active, jnp.int32))
        jax.debug.callback(self.counter._add_decode, n)
        return out


def log2_budgets(max_generations: int, *, min_generations: int = 1) -> list[int]:
    """Generations' worth of budget doubling from ``min_generations`` to ``max_generations``: [1, 2, 4, ...]."""
    if max_generations < min_generations or min_generations < 1:
        raise ValueError(f"budgets from {min_generations} to {max_generations} generations: need 1 <= min <= max")
    out, g = [], min_generations
    while g <= max_generations:
        out.append(g)
        g *= 2
    return out
