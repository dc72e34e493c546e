"""Search benchmark: throughput, the cost of the tree, memory per node, compile time.

``alphareason bench search --out FILE.json`` measures, in one run on this
machine, for the tiny model config on Countdown (the demo task):

* simulations/s and model token forwards/s at batch 1, 16, 64 and 256;
* the overhead ratio: wall time of a search divided by the wall time of the
  same model calls made in a plain loop without the tree: every node of the
  search's own tree expanded once more (prefill of its prefix + cached
  sampling of its K candidates; terminal nodes, which the search does not
  evaluate, cost as little there as in the search). Target: <= 1.25 at batch
  64 with 64 simulations;
* bytes of tree memory per node (mctx ``Tree`` arrays / nodes);
* compile time (first call minus a steady-state call).

A freshly initialised network is used; it writes mostly invalid steps, which
end the chain of thought, so most nodes below the root are terminal and cost
nothing (``terminal_node_fraction`` in the results): throughput in token
forwards depends on the weights. Timings are the best of several repeats
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason.config import load_config
from alphareason.model import Transformer, count_params
from alphareason.search.env import INPUT_KEYS, EnvConfig, ReasoningEnv
from alphareason.search.mcts import SearchConfig, Searcher
from alphareason.run import make_model_config, make_task


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _setup(config_path: str, *, num_candidates: int, workdir: str | None = None, overrides=()):
    if workdir:  # a trained run: realistic trees (an untrained network's steps are almost all invalid)
        from alphareason.config import run_config
        from alphareason.run import load_model
        config = run_config(workdir)
        model, task, _ = load_model(config, workdir)
        graphdef, params = nnx.split(model)
        env_cfg = EnvConfig(num_candidates=num_candidates, temperature=config.search.candidate_temperature)
        return config, task, model, graphdef, params, env_cfg
    config = load_config(config_path, overrides)
    task = make_task(config)
    mcfg = make_model_config(config, task)
    model = Transformer(mcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    env_cfg = EnvConfig(num_candidates=num_candidates, temperature=config.search.candidate_temperature)
    return config, task, model, graphdef, params, env_cfg


NODE_KEYS = INPUT_KEYS + ("solved", "depth")


def model_only_fn(env: ReasoningEnv):
    """The search's model work without a tree: each given node expanded once, in a plain loop.

    Called as ``fn(params, keys, nodes)`` with ``nodes`` the tree's embeddings
    (``NODE_KEYS``, leaves ``[B, N, ...]``); returns the token forwards int32[B].
    """

    def one(params, key, nodes):
        def body(i, acc):
            inputs = jax.tree.map(lambda x: x[i][None], nodes)
            prior, value, node = env.expand(params, jax.random.fold_in(key, i), inputs)
            return acc + node.token_forwards[0] + 0 * (prior.sum() + value.sum()).astype(jnp.int32)

        return jax.lax.fori_loop(0, nodes["length"].shape[0], body, jnp.int32(0))

    return jax.jit(lambda params, keys, nodes: jax.vmap(lambda k, x: one(params, k, x))(keys, nodes))


def run_search_bench(out_path: str, *, config_path: str = "configs/countdown_tiny.py", quick: bool = False,
                     batch_sizes=(1, 16, 64, 256), throughput_simulations: int = 16,
                     overhead_batch: int = 64, overhead_simulations: int = 64, num_candidates: int = 8,
                     workdir: str | None = None, overrides=()) -> dict:
    config, task, model, graphdef, params, env_cfg = _setup(config_path, num_candidates=num_candidates,
                                                            workdir=workdir, overrides=overrides)
    repeats = 1 if quick else 3
    if quick:
        batch_sizes, overhead_batch, overhead_simulations = (1, 16), 16, 16
    problems_all = task.generate(123, max(batch_sizes + (overhead_batch,)))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
              "config": config_path, "workdir": workdir, "task": task.name, "parameters": count_params(model),
              "num_candidates": num_candidates, "step_len": task.max_step_len, "seq_len": model.config.max_len,
              "throughput": [], "quick": quick}

    def searcher_for(sims, keep_tree=False):
        return Searcher(task, graphdef, env_cfg, SearchConfig(num_simulations=sims,
                                                              max_num_considered_actions=num_candidates),
                        seq_len=model.config.max_len, keep_tree=keep_tree)

    searcher = searcher_for(throughput_simulations)
    for B in batch_sizes:
        env_inputs = jax.tree.map(jnp.asarray, searcher.env.initial(problems_all[:B]))
        keys = jax.random.split(jax.random.key(0), B)
        t0 = time.perf_counter()
        res = _block(searcher(params, keys, env_inputs))
        first = time.perf_counter() - t0
        t = _time(lambda: searcher(params, keys, env_inputs), repeats)
        forwards = int(np.sum(res.token_forwards))
        row = {"batch_size": B, "num_simulations": throughput_simulations, "seconds": t,
               "simulations_per_s": B * throughput_simulations / t, "token_forwards_per_s": forwards / t,
               "token_forwards": forwards, "compile_seconds": max(first - t, 0.0)}
        result["throughput"].append(row)
        print(f"batch {B:>4}: {row['simulations_per_s']:.0f} simulations/s, "
              f"{row['token_forwards_per_s']:.0f} token forwards/s, compile {row['compile_seconds']:.1f}s")

    # Overhead of the tree: same model calls without mctx.
    B, N = overhead_batch, overhead_simulations
    searcher = searcher_for(N, keep_tree=True)
    env_inputs = jax.tree.map(jnp.asarray, searcher.env.initial(problems_all[:B]))
    keys = jax.random.split(jax.random.key(1), B)
    res = _block(searcher(params, keys, env_inputs))
    t_search = _time(lambda: searcher(params, keys, env_inputs), repeats)
    nodes = {k: getattr(res.tree.embeddings, k) for k in NODE_KEYS}
    plain = model_only_fn(searcher.env)
    plain_forwards = _block(plain(params, keys, nodes))
    t_plain = _time(lambda: plain(params, keys, nodes), repeats)
    expanded = np.asarray(res.tree.node_visits) > 0
    terminal = float(np.asarray(res.tree.embeddings.done)[expanded].mean())
    tree_bytes = sum(x.nbytes for x in jax.tree.leaves(res.tree))
    num_nodes = B * (N + 1)
    result["overhead"] = {"batch_size": B, "num_simulations": N, "search_seconds": t_search,
                          "model_only_seconds": t_plain, "ratio": t_search / t_plain, "target": 1.25,
                          "search_token_forwards": int(np.sum(res.token_forwards)),
                          "model_only_token_forwards": int(np.sum(plain_forwards)),
                          "terminal_node_fraction": terminal,
                          "tree_bytes": int(tree_bytes), "tree_bytes_per_node": tree_bytes / num_nodes}
    print(f"overhead at batch {B}, {N} simulations: search {t_search:.2f}s / model calls {t_plain:.2f}s = "
          f"{t_search / t_plain:.3f} (target <= 1.25); tree {tree_bytes / num_nodes:.0f} bytes/node")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default="configs/countdown_tiny.py")
    args = p.parse_args(argv)
    run_search_bench(args.out, config_path=args.config, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
