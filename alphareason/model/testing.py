"""Helpers for tests that need a model: a perturbed micro model and jitted entry points.

The entry points take the split model (``graphdef`` static, ``state`` traced),
the pattern the search uses, and live here so that every test module shares
one compilation per (model structure, shapes) pair: on a CPU, compiling
dominates the run time of small-model tests.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from alphareason.model.transformer import ModelConfig, Transformer


def perturbed_model(config: ModelConfig | None = None, *, seed: int = 0, scale: float = 0.2) -> Transformer:
    """A model (default ``ModelConfig.micro()``) with N(0, scale^2) noise added to every parameter.

    At initialisation the value head is zero and the logits are tiny, so
    comparisons at ``atol=1e-5`` would hardly test anything; perturbed
    parameters make every output O(1) and dependent on every weight.
    """
    model = Transformer(config or ModelConfig.micro(), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), params))
    return model


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens):
    """``model(tokens)`` -> (logits [B, T, V], value_logits [B, T])."""
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill(graphdef, state, tokens, lengths, cache_len: int):
    """``model.prefill`` into a fresh cache of ``cache_len`` positions."""
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, lengths, model.init_cache(tokens.shape[0], cache_len))


@functools.partial(jax.jit, static_argnums=0)
def decode(graphdef, state, tokens, cache, active):
    """``model.decode``."""
    return nnx.merge(graphdef, state).decode(tokens, cache, active)
