"""Candidate-scoring benchmark: ``Transformer.score_continuations`` against a dense-mask forward of the same pattern.

``alphareason bench scoring --out FILE.json [--quick] [--config.KEY=VALUE ...]``
measures, in one run on this machine, the one pass that scores K candidate
steps of each prefix (``search.env.score_candidates``: the enumerated search
and the self-play learner), with the model of ``configs/countdown4.py`` at
three shapes:

* ``enumerated_search_written`` and ``enumerated_search_whole_steps``: search
  nodes' rows over Countdown-4's 48 legal steps (16 rows, T = the model's
  context, K = 48, S = the written width ``Task.legal_written_len()``, as
  the search reads them, or the whole step width, as it read them before);
* ``learner``: a learner batch of replayed moves (64 rows, K = 16 sampled
  steps of S = the task's step width).

For each: the forward and its gradient (of a sum of squares of the residual
stream, so every position counts), with ``score_continuations``'s blocked
attention (``ContinuationMask``: the prefix causally, each continuation over
the prefix and its own tokens) and with the reference it replaced, the same
tokens and positions through the blocks under a dense ``[T + K*S, T + K*S]``
boolean mask. It records the best wall time of each, their ratio and the
largest absolute difference of the outputs (the two compute the same
function). Token forwards per row are ``T + K*S`` for both.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason.provenance import machine_info, process_code_version


def dense_mask(lengths, T: int, K: int, S: int):
    """bool[B, T + K*S, T + K*S]: ``ContinuationMask``'s pattern written out (the reference)."""
    batch = lengths.shape[0]
    idx = jnp.arange(T)
    prefix_q = jnp.concatenate([jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T)),
                                jnp.zeros((batch, T, K * S), bool)], -1)
    to_prefix = jnp.broadcast_to((idx[None, :] < lengths[:, None])[:, None, :], (batch, K * S, T))
    kq, sq = jnp.repeat(jnp.arange(K), S), jnp.tile(jnp.arange(S), K)
    own = (kq[:, None] == kq[None, :]) & (sq[None, :] <= sq[:, None])
    cont_q = jnp.concatenate([to_prefix, jnp.broadcast_to(own[None], (batch, K * S, K * S))], -1)
    return jnp.concatenate([prefix_q, cont_q], 1)


def residual_stream(model, tokens, lengths, continuations, *, blocked: bool):
    """[B, T + K*S, D]: the blocks' output over the scoring pass, with the blocked or the dense attention."""
    seq, positions, mask = model.continuation_inputs(tokens, lengths, continuations)
    if not blocked:
        mask = dense_mask(lengths, mask.prefix_len, mask.num_continuations, continuations.shape[2])
    return model._run_blocks(seq, positions, mask)[0]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def measure(graphdef, params, *, rows: int, T: int, K: int, S: int, repeats: int, seed: int = 0) -> dict:
    """Forward and gradient seconds, blocked against dense, at one shape (random prefixes and candidates)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    tokens = jax.random.randint(k1, (rows, T), 4, 30, jnp.int32)
    lengths = jax.random.randint(k2, (rows,), max(1, T // 4), T + 1, jnp.int32)
    conts = jax.random.randint(k3, (rows, K, S), 4, 30, jnp.int32)
    out: dict = {"rows": rows, "prefix_len": T, "num_continuations": K, "continuation_len": S,
                 "token_forwards_per_row": T + K * S}
    results = {}
    for name, blocked in (("blocked", True), ("dense", False)):
        fwd = jax.jit(lambda p, blocked=blocked: residual_stream(nnx.merge(graphdef, p), tokens, lengths, conts,
                                                                   blocked=blocked))
        grad = jax.jit(jax.grad(lambda p, blocked=blocked: jnp.sum(
            residual_stream(nnx.merge(graphdef, p), tokens, lengths, conts, blocked=blocked) ** 2)))
        results[name] = np.asarray(fwd(params))
        jax.block_until_ready(grad(params))
        out[f"{name}_forward_seconds"] = _best(lambda: fwd(params), repeats)
        out[f"{name}_gradient_seconds"] = _best(lambda: grad(params), repeats)
    out["forward_speedup"] = out["dense_forward_seconds"] / out["blocked_forward_seconds"]
    out["gradient_speedup"] = out["dense_gradient_seconds"] / out["blocked_gradient_seconds"]
    out["max_abs_difference"] = float(np.max(np.abs(results["blocked"] - results["dense"])))
    return out


def run_scoring_bench(out_path: str, *, quick: bool = False, config_path: str = "configs/countdown4.py",
                      overrides=()) -> dict:
    from alphareason.config import load_config
    from alphareason.model import Transformer, count_params
    from alphareason.run import make_model_config, make_task

    config = load_config(config_path, overrides)
    task = make_task(config)
    mcfg = make_model_config(config, task)
    graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(config.seed)))
    T, S, W = int(mcfg.max_len), task.max_step_len, task.legal_written_len()
    K_legal = task.legal_steps(task.init_state(task.generate(0, 1)[0]))[0].shape[0]
    repeats = 1 if quick else 5
    scale = 4 if quick else 1
    shapes = {
        "enumerated_search_written": dict(rows=16 // scale, T=T, K=K_legal, S=W),
        "enumerated_search_whole_steps": dict(rows=16 // scale, T=T, K=K_legal, S=S),
        "learner": dict(rows=64 // scale, T=T, K=config.search.num_candidates, S=S),
    }
    result = {"code": process_code_version(), "machine": machine_info(), "config": config_path,
              "overrides": list(overrides), "quick": quick, "parameters": count_params(nnx.merge(graphdef, params)),
              "note": "best of repeats after compilation; the ratios are measured within the run", "shapes": {}}
    t0 = time.time()
    for name, shape in shapes.items():
        row = measure(graphdef, params, repeats=repeats, **shape)
        result["shapes"][name] = row
        print(f"{name}: {shape}: forward {row['dense_forward_seconds'] * 1e3:.0f} -> "
              f"{row['blocked_forward_seconds'] * 1e3:.0f} ms ({row['forward_speedup']:.1f}x), gradient "
              f"{row['dense_gradient_seconds'] * 1e3:.0f} -> {row['blocked_gradient_seconds'] * 1e3:.0f} ms "
              f"({row['gradient_speedup']:.1f}x), max |difference| {row['max_abs_difference']:.1e}", flush=True)
    before, after = result["shapes"]["enumerated_search_whole_steps"], result["shapes"]["enumerated_search_written"]
    result["enumerated_search_speedup"] = {  # the search's scoring pass as it was (dense, whole steps) and is
        "forward": before["dense_forward_seconds"] / after["blocked_forward_seconds"],
        "token_forwards_ratio": before["token_forwards_per_row"] / after["token_forwards_per_row"]}
    print(f"enumerated search's scoring pass, dense mask over whole steps -> blocked over written tokens: "
          f"{result['enumerated_search_speedup']['forward']:.1f}x", flush=True)
    result["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result
