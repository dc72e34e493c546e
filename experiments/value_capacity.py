"""What limits the value head: its targets, its data or its capacity?

Each variant is an SFT run of one setting (no self-play) with some overrides;
its value head is then measured on states the policy reaches from held-out
problems (``alphareason bench value``: AUC against exact solvability V* and
against the policy's Monte-Carlo outcomes), and MCTS with 64 simulations on
500 of them is run with the learned value and with a constant one (the
issue's target: +10 points). Varying one thing at a time
separates the causes:

* targets: ``data.value_label=chain`` (the chain's outcome) against
  ``oracle`` (each state's exact solvability) on the same data;
* data: the config's training problems (4,000 on the demo task) against
  20,000, with more steps;
* capacity: a wider and deeper network on the largest data.

The fit on the training states is read from the run's own SFT metrics (the
value loss and accuracy on its last logged batches), so a value that
memorises its training states but does not generalise shows as a low loss
with a held-out AUC near 0.5.

  python experiments/value_capacity.py run --results benchmarks/results/value_capacity
  python experiments/value_capacity.py report --results benchmarks/results/value_capacity
  # the same on Countdown-4 (its config's 80,000 problems and 6,000 SFT steps: about an hour on 2 cores)
  python experiments/value_capacity.py run --config configs/countdown4.py --variants chain \
      --results benchmarks/results/value_capacity/countdown4

Each variant writes ``RESULTS/<variant>.json`` when it finishes; ``run``
skips variants whose file exists and ``report`` aggregates those present
into ``RESULTS/value_capacity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> config overrides (on top of the config and BASE)
VARIANTS: dict[str, list[str]] = {
    "chain": [],
    "oracle": ["data.value_label='oracle'"],
    "chain_2400": ["train.steps=2400"],
    "chain_20k_600": ["data.train_size=20000"],
    "chain_20k": ["data.train_size=20000", "train.steps=2400"],
    "oracle_20k": ["data.value_label='oracle'", "data.train_size=20000", "train.steps=2400"],
    "oracle_20k_wide": ["data.value_label='oracle'", "data.train_size=20000", "train.steps=2400",
                        "model.d_model=256", "model.num_layers=6", "model.num_heads=8", "model.d_ff=1024",
                        "train.learning_rate=1e-3"],
}
BASE = ["selfplay.iterations=0", "eval.value_problems=0"]


def train_fit(workdir: str, last: int = 4) -> dict[str, float]:
    """The mean SFT value loss / accuracy and policy loss of the last ``last`` logged training batches."""
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if '"phase": "sft"' in x]
    rows = [r for r in rows if "value_loss" in r][-last:]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("value_loss", "value_accuracy", "policy_loss")}


def run_variant(name: str, *, config: str, results: str, runs: str, problems: int, seed: int) -> dict:
    from alphareason.bench.value_bench import run_value_bench
    workdir = os.path.join(runs, name)
    overrides = [f"--config.{o}" for o in BASE + VARIANTS[name] + [f"seed={seed}"]]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "alphareason.cli", "train", "--config", config, "--workdir", workdir,
                    *overrides], check=True)
    sft_seconds = time.time() - t0  # of this call (a resumed run's SFT may have been done before)
    out = os.path.join(results, f"{name}.json")
    tmp = out + ".partial"
    result = run_value_bench(tmp, workdir=workdir, problems=problems, seed=seed, search_simulations=64,
                             search_problems=500)
    result.update(variant=name, config=config, overrides=VARIANTS[name], seed=seed, sft_seconds=sft_seconds,
                  train_fit=train_fit(workdir))
    result.pop("workdir", None)
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    return result


def report(results: str) -> str:
    """A markdown table of the variants present."""
    def f(x):
        return "–" if x is None else f"{x:.3f}"
    lines = ["| variant | overrides | train value loss / acc. | AUC V* after step 1 | AUC mc (all states) "
             "| prompt AUC (greedy solves) | Brier mc | greedy solve rate | MCTS@64 learned / constant value (p) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        path = os.path.join(results, f"{name}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        fit = r["train_fit"]
        s = r.get("search")
        search = "–" if s is None else (f"{s['learned']:.1%} / {s['constant']:.1%} "
                                        f"(p = {s['paired']['p_value']:.2g})")
        lines.append(
            f"| {name} | {' '.join(r['overrides']) or '(the config as it is)'} | {fit['value_loss']:.3f} / "
            f"{fit['value_accuracy']:.3f} | {f(r['after_first_step'].get('auc_vstar'))} | {f(r['all']['auc_mc'])} | "
            f"{f(r['prompt_auc_greedy'])} | {r['all']['brier_mc']:.3f} | {r['greedy_solve_rate']:.1%} | "
            f"{search} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results, "value_capacity.md"), "w") as fh:
        fh.write(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the variants whose results are missing")
    r.add_argument("--config", default="configs/countdown_tiny.py")
    r.add_argument("--results", required=True)
    r.add_argument("--runs", default="", help="work directories (default: runs/<results folder name>)")
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--problems", type=int, default=1000, help="validation problems the states come from")
    r.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("report", help="the table of the variants present")
    g.add_argument("--results", required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        os.makedirs(args.results, exist_ok=True)
        for name in args.variants:
            if os.path.exists(os.path.join(args.results, f"{name}.json")):
                print(f"{name}: done", flush=True)
                continue
            print(f"{name}: running", flush=True)
            runs = args.runs or os.path.join("runs", os.path.basename(os.path.normpath(args.results)))
            run_variant(name, config=args.config, results=args.results, runs=runs, problems=args.problems,
                        seed=args.seed)
    print(report(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
