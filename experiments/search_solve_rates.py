"""Solve rates of greedy decoding, best-of-N and MCTS at 16 / 64 / 256 simulations.

For each task's trained run (and for an untrained network of the same shape)
on ``--problems`` held-out problems (fresh problems that appear in none of
the run's data splits): greedy decoding, MCTS at each number of simulations
(one search before every step), and best-of-N sampling ranked by the value
head with N chosen so that its compute matches each MCTS row. Every row
reports the compute it actually spent in model token forwards per problem.

  python experiments/search_solve_rates.py --run countdown4=runs/scaling_reduced/countdown4 \\
      --run game24=runs/scaling_reduced/game24 --out benchmarks/results/search_solve_rates
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx


def _problems(config, workdir, task, n: int, seed: int) -> list[dict]:
    """``n`` fresh problems: in none of the run's data splits."""
    from alphareason.run import split_problems
    used = [p for split in ("train", "validation", "test") for p in split_problems(config, workdir, split)]
    return task.generate(seed, n, exclude=used)


def _evaluate(model, task, problems, *, strategy, key, simulations=16, samples=1, candidates=8, batch_size=100,
              mode="sample"):
    from alphareason.search.env import EnvConfig
    from alphareason.eval import EvalSettings, Evaluator
    from alphareason.search.mcts import SearchConfig
    settings = EvalSettings(strategy=strategy, samples=samples, temperature=0.7, batch_size=batch_size,
                            env=EnvConfig(num_candidates=candidates, candidates=mode),
                            search=SearchConfig(num_simulations=simulations,
                                                max_num_considered_actions=candidates))
    t0 = time.time()
    rows = Evaluator(model, task, settings).run(problems, key)
    return {"solve_rate": float(np.mean([r["solved"] for r in rows])),
            "token_forwards": float(np.mean([r["token_forwards"] for r in rows])), "seconds": time.time() - t0}


def run(runs: dict[str, str], out: str, *, num_problems: int = 100, simulations: Sequence[int] = (16, 64, 256),
        candidates: int = 8, seed: int = 2024, kinds: Sequence[str] = ("sft", "untrained", "untrained+legal")) -> dict:
    from alphareason.config import run_config
    from alphareason.model import Transformer
    from alphareason.run import load_model
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "solve_rates.json")
    result = {"num_problems": num_problems, "candidates": candidates, "simulations": list(simulations), "tasks": {}}
    if os.path.exists(path):  # add to an earlier run's rows
        with open(path) as f:
            earlier = json.load(f)
        result["tasks"] = earlier["tasks"]
        result["simulations"] = sorted(set(earlier["simulations"]) | set(simulations))
    key = jax.random.key(seed)
    for name, workdir in runs.items():
        config = run_config(workdir)
        trained, task, _ = load_model(config, workdir)
        problems = _problems(config, workdir, task, num_problems, seed)
        untrained = Transformer(trained.config, rngs=nnx.Rngs(0))
        # "+legal": the candidates are the task's legal steps (an untrained network's samples are all invalid).
        models = {"sft": trained, "untrained": untrained, "untrained+legal": untrained}
        result["tasks"].setdefault(name, {})
        for kind in kinds:
            model = models[kind]
            mode = "enumerate" if kind.endswith("+legal") else "sample"
            # Rows already measured (an earlier, interrupted or partial run) are kept, not rerun.
            rows = result["tasks"][name].setdefault(kind, {})
            if "greedy" not in rows:
                rows["greedy"] = _evaluate(model, task, problems, strategy="greedy", key=key)
            print(f"{name} {kind} greedy: {rows['greedy']}", flush=True)
            per_chain = max(rows["greedy"]["token_forwards"], 1.0)
            for sims in simulations:
                if f"mcts@{sims}" in rows:
                    continue
                mcts = _evaluate(model, task, problems, strategy="mcts", key=key, simulations=sims,
                                 candidates=candidates, batch_size=50, mode=mode)
                rows[f"mcts@{sims}"] = mcts
                n = max(1, int(round(mcts["token_forwards"] / per_chain)))
                bon = _evaluate(model, task, problems, strategy="sample", key=key, samples=n,
                                batch_size=max(n, min(4096, 40 * n)))
                rows[f"best_of_{n} (matches mcts@{sims})"] = bon
                print(f"{name} {kind} mcts@{sims}: {mcts}; best-of-{n}: {bon}", flush=True)
                _write_json(path, result)
            _write_json(path, result)
    lines = [f"Solve rate / mean token forwards per problem, {num_problems} fresh held-out problems per task, "
             f"K = {candidates} sampled candidate steps per node, best-of-N ranked by the value head. "
             f"`untrained+legal`: MCTS over the task's legal steps (enumerated by the task; prior from the "
             f"untrained network).", ""]
    for name, by_kind in result["tasks"].items():
        for kind, rows in by_kind.items():
            lines += [f"**{name}, {kind} network**", "", "| strategy | solved | token forwards / problem |",
                      "|---|---:|---:|"]
            lines += [f"| {k} | {v['solve_rate']:.0%} | {v['token_forwards']:,.0f} |" for k, v in rows.items()]
            lines.append("")
    with open(os.path.join(out, "solve_rates.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return result


def _write_json(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="TASK=WORKDIR of a trained run (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--problems", type=int, default=100)
    p.add_argument("--simulations", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--kinds", nargs="+", default=["sft", "untrained", "untrained+legal"],
                   choices=["sft", "untrained", "untrained+legal"])
    args = p.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.run)
    run(runs, args.out, num_problems=args.problems, kinds=args.kinds, simulations=args.simulations)
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any work; see alphareason/host_memory.py
    sys.exit(main())
