"""Search benchmark: node expansions per second, compute per expansion against its floor, memory per node.

``alphareason bench search --out FILE.json [--workdir RUN]`` measures, in one
run on this machine, the project's ``Searcher`` at the settings of the
TS-LLM comparison (issue 15: Game24, the tiny network, K = 6 candidate steps
of at most S = 14 tokens, 64 simulations, PUCT), at batch 1, 16 and 64:

* node expansions per second (every node of the tree, root included, counts
  once; terminal ones too, as TS-LLM's count does) over the same 64 problems
  and keys at every batch size (64 calls of one problem, 4 of 16, one of 64:
  the same trees, so the rates compare one workload), and per process CPU
  second (the machine is shared: wall time depends on the other processes,
  so the load average is recorded before and after);
* model token forwards per expansion, needed and computed (padding and idle
  rows included), beside the floor: a node that proposes must decode its K
  candidates (K x S) and push its own step through the network (S; the
  root: its prompt), so the floor of a search is the sum of that over the
  nodes that proposed; target: computed <= 1.25 x floor;
* the overhead of the tree: search wall time over a plain loop that makes the
  same model calls (every expansion of the search's own tree, replayed
  without mctx's selection and backup); target <= 1.25;
* bytes per node: the mctx embedding and statistics and the node's slot of
  the KV pool (the whole prefix, T positions: what the search stores), and
  what a paged layout of one step segment per node would store instead (S
  positions, the path gathered at every expansion);
* distinct candidates per depth with the sampler with and without
  replacement at the demo's settings (Gumbel, K = 8, 16 simulations);
* the decoder's own batching ceiling: the KV-cached decoder alone, S tokens
  for K rows (one node) against 64 x K rows, in token forwards per second:
  a search at the floor of token forwards cannot gain more from batching
  on its model calls than that ratio.

Without ``--workdir`` the network is freshly initialised (``--config``,
default Game24; it writes mostly invalid steps, so most nodes are terminal);
with it, the run's trained network on the run's task. TS-LLM's figure (65.8
expansions/s at batch 1, its own MCTS on this machine) is quoted from the
issue; it cannot be rerun here (no network access).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason.config import load_config
from alphareason.model import Transformer, count_params
from alphareason.provenance import machine_info, process_code_version
from alphareason.run import make_model_config, make_task
from alphareason.search.env import EnvConfig
from alphareason.search.mcts import SearchConfig, Searcher

TS_LLM_EXPANSIONS_PER_S = 65.8  # issue 15: TS-LLM's MCTS, batch 1, same settings and network size, this machine


def _block(tree):
    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def _time(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, process CPU seconds of that repeat) over ``repeats`` calls."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        _block(fn())
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


def _network(config_path: str, workdir: str | None, overrides):
    if workdir:
        from alphareason.config import apply_overrides, run_config
        from alphareason.run import load_model
        config = apply_overrides(run_config(workdir), overrides)  # e.g. search settings to compare
        model, task, _ = load_model(config, workdir)
        return config, task, model
    config = load_config(config_path, overrides)
    task = make_task(config)
    return config, task, Transformer(make_model_config(config, task), rngs=nnx.Rngs(0))


def model_only_fn(searcher: Searcher):
    """The search's model work without the tree: its root expanded, then every simulation's expansion replayed.

    Called as ``fn(params, keys, inputs, nodes, parents, actions)`` with the
    search's own tree (``nodes`` its embeddings ``[B, N + 1, ...]``,
    ``parents`` and ``actions`` int32[B, N + 1]: node i + 1 was created by
    simulation i from ``parents[i + 1]`` through ``actions[i + 1]``). The
    expansions are the search's (same rows needing the model, same row
    groups, same KV pool); only mctx's selection and backup are missing.
    Returns the computed token forwards int32[B].
    """
    env, num = searcher.env, searcher.config.num_simulations

    def one(params, key, inputs, nodes, parents, actions):
        inputs = jax.tree.map(lambda x: x[None], inputs)
        _, _, root, cache = env.expand_root(params, key, inputs)
        pool = env.init_pool(params, num + 1)
        if pool is not None:
            pool = jax.tree.map(lambda a, r: a.at[0].set(r[0]), pool, type(pool)(k=cache.k, v=cache.v))

        def body(i, carry):
            pool, computed = carry
            node = jax.tree.map(lambda x: x[parents[i + 1]][None], nodes)
            _, child, pool = env.expand_child(params, jax.random.fold_in(key, i), actions[i + 1][None], node, pool,
                                              jnp.full((1,), i + 1, jnp.int32))
            return pool, computed + child.computed_forwards[0]

        return jax.lax.fori_loop(0, num, body, (pool, root.computed_forwards[0]))[1]

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0)))


def decoder_ceiling(graphdef, params, *, K: int, S: int, T: int, batch: int, repeats: int) -> dict:
    """The KV-cached decoder alone: S greedy tokens after a (T - S)-token prefix for K rows (one node's
    candidates) and for ``batch`` x K rows, in token forwards per second; their ratio bounds what batching
    can gain on the model calls of a search at the floor."""
    from alphareason.bench.model_bench import cached_decoder
    out = {"new_tokens": S, "prompt_len": T - S}
    for name, rows in (("one_node", K), ("batched", batch * K)):
        fn = cached_decoder(graphdef, rows, T - S, S)
        prompt = jax.random.randint(jax.random.key(3), (rows, T - S), 4, 20, jnp.int32)
        _block(fn(params, prompt))
        wall, _ = _time(lambda: fn(params, prompt), max(repeats, 3))
        out[name] = {"rows": rows, "seconds": wall, "token_forwards_per_s": rows * T / wall}
    out["speedup"] = out["batched"]["token_forwards_per_s"] / out["one_node"]["token_forwards_per_s"]
    return out


def distinct_per_depth(tree, max_depth: int) -> list[dict]:
    """Mean distinct candidate steps (all, and valid ones) of the expanded nodes that proposed, per depth."""
    t = jax.tree.map(np.asarray, tree)
    emb = t.embeddings
    rows = []
    for depth in range(max_depth):
        counts, valid = [], []
        for b, i in zip(*np.nonzero((t.node_visits > 0) & ~emb.done & (emb.depth == depth))):
            steps = {emb.candidates[b, i, k].tobytes() for k in range(emb.candidates.shape[2]) if emb.cand_length[b, i, k]}
            counts.append(len(steps))
            valid.append(int(emb.cand_valid[b, i].sum()))
        if counts:
            rows.append({"depth": depth, "nodes": len(counts), "distinct_candidates": float(np.mean(counts)),
                         "distinct_valid_candidates": float(np.mean(valid))})
    return rows


def run_search_bench(out_path: str, *, config_path: str = "configs/game24.py", workdir: str | None = None,
                     quick: bool = False, batch_sizes=(1, 16, 64), num_simulations: int = 64, num_candidates: int = 6,
                     policy: str = "puct", overhead_batch: int = 64, repeats: int = 2, overrides=()) -> dict:
    config, task, model = _network(config_path, workdir, overrides)
    graphdef, params = nnx.split(model)
    T = int(model.config.max_len)
    if quick:
        batch_sizes, overhead_batch, num_simulations, repeats = (1, 4), 4, 8, 1
    K, S, N = num_candidates, task.max_step_len, num_simulations
    problems = task.generate(123, max(batch_sizes + (overhead_batch,)))
    result = {"code": process_code_version(), "machine": machine_info(),
              "config": config_path if not workdir else None, "workdir": workdir, "task": task.name,
              "network": "trained" if workdir else "untrained", "parameters": count_params(model),
              "num_candidates": K, "max_step_len": S, "seq_len": T, "num_simulations": N, "policy": policy,
              "ts_llm_expansions_per_s": TS_LLM_EXPANSIONS_PER_S, "quick": quick, "throughput": []}

    def searcher_for(*, keep_tree=True, distinct=True, k=K, sims=N, search_policy=policy):
        return Searcher(task, graphdef, EnvConfig(num_candidates=k, distinct=distinct,
                                                  temperature=config.search.candidate_temperature,
                                                  group_rows=config.search.group_rows),
                        SearchConfig(policy=search_policy, num_simulations=sims, max_num_considered_actions=k,
                                     max_tree_gib=64.0),
                        seq_len=T, keep_tree=keep_tree)

    searcher = searcher_for()
    W = max(batch_sizes)  # every batch size searches the same W problems with the same keys, W / B calls each
    all_keys = jax.random.split(jax.random.key(0), W)
    for B in batch_sizes:
        chunks = [(jax.tree.map(jnp.asarray, searcher.env.initial(problems[s: s + B])), all_keys[s: s + B])
                  for s in range(0, W, B)]
        t0 = time.perf_counter()
        _block(searcher(params, chunks[0][1], chunks[0][0]))
        first = time.perf_counter() - t0
        swept: dict = {}

        def sweep():  # keeps the timed sweep's results (the same trees every repeat): no extra pass to read them
            swept["results"] = [searcher(params, k, x) for x, k in chunks]
            return swept["results"]

        wall, cpu = _time(sweep, repeats)
        results = [jax.tree.map(np.asarray, r) for r in swept["results"]]
        emb = jax.tree.map(lambda *xs: np.concatenate(xs), *[r.tree.embeddings for r in results])
        visits = np.concatenate([r.tree.node_visits for r in results])
        expanded = visits > 0
        proposing = expanded & ~emb.done
        children = proposing & (emb.depth > 0)
        # The floor: every proposing node decodes K candidates of up to S tokens and pushes its own step (S) or,
        # at the root, its prompt (the prefill's padded width).
        floor = int(proposing.sum()) * K * S + int(children.sum()) * S + int(proposing[:, 0].sum()) * T
        nodes = W * (N + 1)
        needed = sum(int(r.token_forwards.sum()) for r in results)
        computed = sum(int(r.computed_token_forwards.sum()) for r in results)
        row = {"batch_size": B, "problems": W, "calls": len(chunks), "seconds": wall, "cpu_seconds": cpu,
               "compile_seconds": max(first - wall / len(chunks), 0.0),
               "node_expansions": nodes, "expansions_per_s": nodes / wall, "expansions_per_cpu_s": nodes / cpu,
               "proposing_expansions": int(proposing.sum()), "terminal_node_fraction": float(emb.done[expanded].mean()),
               "needed_token_forwards": needed, "computed_token_forwards": computed, "floor_token_forwards": floor,
               "needed_per_expansion": needed / nodes, "computed_per_expansion": computed / nodes,
               "computed_per_proposing_expansion": computed / max(int(proposing.sum()), 1),
               "floor_per_proposing_expansion": floor / max(int(proposing.sum()), 1),
               "computed_token_forwards_per_s": computed / wall,
               "floor_per_expansion_formula": f"K x S + S = {K * S + S} (root: K x S + T = {K * S + T})",
               "computed_over_floor": computed / max(floor, 1)}
        result["throughput"].append(row)
        print(f"batch {B:>3}: {row['expansions_per_s']:.0f} node expansions/s ({row['expansions_per_cpu_s']:.0f} per "
              f"CPU s), computed {row['computed_per_proposing_expansion']:.1f} token forwards per proposing expansion "
              f"(floor {row['floor_per_proposing_expansion']:.1f}; K x S + S = {K * S + S}), computed/floor "
              f"{row['computed_over_floor']:.3f}, terminal nodes {row['terminal_node_fraction']:.0%}", flush=True)
    rows = {r["batch_size"]: r for r in result["throughput"]}
    first_b, last_b = min(rows), max(rows)
    result["batch_speedup"] = {"batch": last_b, "expansions_per_s_ratio": rows[last_b]["expansions_per_s"] /
                               rows[first_b]["expansions_per_s"], "target": 4.0}
    result["versus_ts_llm"] = {"batch": last_b, "ratio": rows[last_b]["expansions_per_s"] / TS_LLM_EXPANSIONS_PER_S,
                               "target": 10.0}
    result["decoder_ceiling"] = decoder_ceiling(graphdef, params, K=K, S=S, T=T, batch=last_b, repeats=repeats)
    print(f"the decoder alone: {result['decoder_ceiling']['speedup']:.2f}x the token forwards/s with "
          f"{last_b} x K rows as with K (the most batching can give the model's share)", flush=True)

    # The tree's overhead: the same model calls without mctx.
    B = overhead_batch
    inputs = jax.tree.map(jnp.asarray, searcher.env.initial(problems[:B]))
    keys = jax.random.split(jax.random.key(1), B)
    res = _block(searcher(params, keys, inputs))
    wall_search, _ = _time(lambda: searcher(params, keys, inputs), repeats)
    plain = model_only_fn(searcher)
    tree = res.tree
    args = (params, keys, inputs, tree.embeddings, tree.parents, tree.action_from_parent)
    plain_computed = _block(plain(*args))
    wall_plain, _ = _time(lambda: plain(*args), repeats)
    result["overhead"] = {"batch_size": B, "num_simulations": N, "search_seconds": wall_search,
                          "model_only_seconds": wall_plain, "ratio": wall_search / wall_plain, "target": 1.25,
                          "search_computed_token_forwards": int(res.computed_token_forwards.sum()),
                          "model_only_computed_token_forwards": int(np.sum(plain_computed))}
    print(f"overhead at batch {B}: search {wall_search:.2f}s / same model calls {wall_plain:.2f}s = "
          f"{wall_search / wall_plain:.3f} (target <= 1.25)", flush=True)

    # Memory per node.
    per_node, slot = searcher.node_bytes(params), searcher.env.slot_bytes(params)
    result["memory"] = {"bytes_per_node": per_node, "kv_slot_bytes_per_node": slot,
                        "embedding_and_statistics_bytes_per_node": per_node - slot,
                        "paged_step_segment_bytes_per_node": slot * S // T,
                        "layout": "whole prefix per node (T positions)",
                        "tree_bytes": {str(b): searcher.tree_bytes(params, b) for b in batch_sizes}}
    print(f"memory: {per_node / 1024:.1f} KiB per node ({slot / 1024:.1f} KiB of it the prefix's keys and values; "
          f"a step segment would be {slot * S // T / 1024:.1f} KiB)", flush=True)

    # Distinct candidates per depth, with and without replacement (the demo's search settings).
    demo_b = 4 if quick else 8
    result["distinct"] = {"policy": "gumbel", "num_candidates": 8, "num_simulations": 4 if quick else 16,
                          "batch_size": demo_b}
    for distinct in (True, False):
        s = searcher_for(distinct=distinct, k=8, sims=result["distinct"]["num_simulations"], search_policy="gumbel")
        inputs = jax.tree.map(jnp.asarray, s.env.initial(problems[:demo_b]))
        res = s(params, jax.random.split(jax.random.key(2), demo_b), inputs)
        result["distinct"]["without_replacement" if distinct else "with_replacement"] = distinct_per_depth(
            res.tree, task.max_steps)
    print("distinct candidates per depth (with / without replacement):",
          [(r["depth"], r["distinct_candidates"]) for r in result["distinct"]["with_replacement"]],
          [(r["depth"], r["distinct_candidates"]) for r in result["distinct"]["without_replacement"]], flush=True)
    result["machine"]["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default="configs/game24.py")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    run_search_bench(args.out, config_path=args.config, quick=args.quick, workdir=args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
