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
simulations are sized for a worst case: every expansion reads at most
``generation_cost`` new tokens and samples ``K`` candidates of at most
``max_step_len`` tokens, and every episode runs ``max_steps`` searches.
(With tree KV reuse a child reads only its step, so this bound is loose.)

Budgets are in needed token forwards; every strategy also reports the
token forwards its problems computed (``computed_token_forwards``: padded
prompts, idle lanes of batched calls, finished candidates), and the FLOPs
of those.

``TokenCountingModel`` wraps a model to count the same forwards
independently, from inside every model entry point, both the tokens needed
and the lanes computed (padding included), so a test can compare it with
what a strategy or a search reports.
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
    """Host-side tally of token forwards, fed by ``TokenCountingModel`` (via ``jax.debug.callback``).

    Two figures: ``needed`` counts the tokens whose results are used (the
    project's rule: tokens, not lanes) and ``computed`` every lane the
    hardware pushed through the network (padding, inactive rows and idle
    positions of a batched call included). ``total`` is ``needed``.
    """

    def __init__(self):
        self.prefill = 0
        self.decode = 0
        self._computed = 0

    @property
    def total(self) -> int:
        return self.needed

    @property
    def needed(self) -> int:
        jax.effects_barrier()
        return self.prefill + self.decode

    @property
    def computed(self) -> int:
        jax.effects_barrier()
        return self._computed

    def reset(self) -> None:
        jax.effects_barrier()
        self.prefill = self.decode = self._computed = 0

    def _add_prefill(self, n, lanes):
        self.prefill += int(np.sum(n))
        self._computed += int(np.sum(lanes))

    def _add_decode(self, n, lanes):
        self.decode += int(np.sum(n))
        self._computed += int(np.sum(lanes))


class TokenCountingModel(nnx.Module):
    """A transformer that counts the token forwards it computes into a ``TokenCounter``.

    Needed tokens: ``prefill`` the prompt lengths of its active rows,
    ``decode`` the active rows, ``extend`` the new tokens, ``decode_branches``
    the active continuations, ``score_continuations`` the prefixes and the
    continuations' tokens. Computed lanes: the full shape of every call
    (``B x T`` for a prefill, ``B`` for a decode step, ``B x C`` for a chunk,
    ``B x K`` for a branch step, ``B x (T + K x S)`` for a scoring pass).
    Counting happens on the host through ``jax.debug.callback``, so it works
    inside ``jit``, ``vmap``, loops and conditionals (a skipped branch counts
    nothing); it is for tests and audits, not for speed. ``nnx.split`` it
    like a model.
    """

    def __init__(self, model, counter: TokenCounter):
        self.model = model
        self.counter = counter

    @property
    def config(self):
        return self.model.config

    def init_cache(self, batch_size: int, max_len: int | None = None):
        return self.model.init_cache(batch_size, max_len)

    def init_branches(self, batch_size: int, num_branches: int, length: int):
        return self.model.init_branches(batch_size, num_branches, length)

    def _count(self, add, needed, lanes):
        jax.debug.callback(add, jnp.asarray(needed, jnp.int32), jnp.asarray(lanes, jnp.int32))

    def __call__(self, tokens):
        self._count(self.counter._add_prefill, tokens.size, tokens.size)
        return self.model(tokens)

    def prefill(self, tokens, lengths, cache, active=None):
        out = self.model.prefill(tokens, lengths, cache)
        lengths = jnp.asarray(lengths, jnp.int32)
        used = lengths if active is None else jnp.where(active, lengths, 0)
        self._count(self.counter._add_prefill, jnp.sum(used), tokens.size)
        return out

    def score_continuations(self, tokens, lengths, continuations, **options):
        out = self.model.score_continuations(tokens, lengths, continuations, **options)
        n = jnp.sum(jnp.asarray(lengths, jnp.int32)) + jnp.sum(continuations != tok.PAD, dtype=jnp.int32)
        self._count(self.counter._add_prefill, n, tokens.size + continuations.size)  # prefixes and continuations
        return out

    def decode(self, tokens, cache, active=None):
        out = self.model.decode(tokens, cache, active)
        n = tokens.shape[0] if active is None else jnp.sum(jnp.asarray(active, jnp.int32))
        self._count(self.counter._add_decode, n, tokens.shape[0])
        return out

    def extend(self, tokens, cache, num_new):
        out = self.model.extend(tokens, cache, num_new)
        self._count(self.counter._add_decode, jnp.sum(jnp.asarray(num_new, jnp.int32)), tokens.size)
        return out

    def decode_branches(self, tokens, prefix, branches, slot, active=None):
        out = self.model.decode_branches(tokens, prefix, branches, slot, active)
        n = tokens.size if active is None else jnp.sum(jnp.asarray(active, jnp.int32))
        self._count(self.counter._add_decode, n, tokens.size)
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
