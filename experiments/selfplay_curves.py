"""Self-play learning curves: AlphaZero vs expert iteration vs SFT only, at matched compute.

Runs the loop (``alphareason.train.loop.run_training``) once per algorithm
from the SAME SFT warm start (trained once, then copied), with the same
actors, search budget, learner steps and evaluation, and writes:

* ``OUT/curves.png``: held-out solve rate, policy only (greedy) and MCTS, per
  iteration and against cumulative self-play compute (model token forwards);
* ``OUT/curves.json`` and ``OUT/curves.md``: the same numbers as a table.

Every run is resumable: rerunning the same command continues where it stopped.
Runs add up in ``OUT``: a later invocation with other ``--algorithms`` or
``--variant`` runs keeps the earlier runs in the table, and wall times are
summed over invocations.

  python experiments/selfplay_curves.py --config configs/countdown_tiny.py --out runs/curves_tiny
  python experiments/selfplay_curves.py --config configs/game24.py --out runs/curves_game24 \\
      --config.selfplay.iterations=6
  python experiments/selfplay_curves.py --out runs/ablation --algorithms alphazero \\
      --variant no_rescale search.rescale_values=False
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Sequence

ALGORITHMS = ("alphazero", "expert_iteration", "sft_only")


def run_curves(config_path: str, out: str, *, algorithms: Sequence[str] = ALGORITHMS,
               overrides: Sequence[str] = (), variants: dict[str, Sequence[str]] | None = None,
               progress: bool = True) -> dict:
    """One run per algorithm, then one per ``variants`` entry (name -> extra overrides, e.g.
    ``{"no_rescale": ["search.rescale_values=False"]}``), all from the same SFT start."""
    from alphareason.config import load_config
    from alphareason.train.loop import run_training
    from alphareason.train.metrics import read_metrics
    from alphareason.train.sft import train_sft

    os.makedirs(out, exist_ok=True)
    base = load_config(config_path, overrides)
    # Every run's config is loaded (and refused if wrong) before any training.
    extras = {a: [f"selfplay.algorithm={a}"] for a in algorithms}
    for name, extra in (variants or {}).items():
        if name in extras or name == "sft":
            raise ValueError(f"variant name {name!r} is taken (by an algorithm or the shared SFT start); "
                             f"give each variant its own name")
        extras[name] = list(extra)
    configs = {name: load_config(config_path, list(overrides) + extra) for name, extra in extras.items()}
    for name, config in configs.items():
        changed = [k for k in ("task", "data", "model", "train") if config[k].to_dict() != base[k].to_dict()]
        if changed:
            raise ValueError(f"run {name!r} changes the {', '.join(changed)} section(s); every run here starts "
                             f"from one shared SFT model, so a variant may only change search/selfplay/eval")
    # Wall times add up over every invocation into this folder (a rerun resumes; it does not start the clock over).
    previous = {}
    if os.path.exists(os.path.join(out, "curves.json")):
        with open(os.path.join(out, "curves.json")) as f:
            previous = json.load(f)
    # One SFT warm start shared by every algorithm.
    sft_dir = os.path.join(out, "sft")
    t0 = time.time()
    train_sft(base, sft_dir, progress=progress)
    sft_seconds = previous.get("sft_seconds", 0.0) + time.time() - t0
    runs = dict(previous.get("runs", {}))  # runs of earlier invocations stay in the table
    for algorithm, config in configs.items():
        workdir = os.path.join(out, algorithm)
        if not os.path.exists(os.path.join(workdir, "checkpoints", "sft")):
            os.makedirs(workdir, exist_ok=True)
            for part in ("data", os.path.join("checkpoints", "sft")):
                src = os.path.join(sft_dir, part)
                if os.path.exists(src):
                    shutil.copytree(src, os.path.join(workdir, part), dirs_exist_ok=True)
            shutil.copy(os.path.join(sft_dir, "metrics.jsonl"), os.path.join(workdir, "metrics.jsonl"))
        print(f"== {algorithm} ({workdir})", flush=True)
        t0 = time.time()
        run_training(config, workdir, progress=progress)
        rows = read_metrics(workdir, "eval")
        seconds = previous.get("runs", {}).get(algorithm, {}).get("seconds", 0.0) + time.time() - t0
        runs[algorithm] = {"seconds": seconds, "overrides": extras[algorithm], "iterations": [
            {k: r.get(k) for k in ("step", "greedy_solve_rate", "mcts_solve_rate", "selfplay_token_forwards",
                                   "learner_examples")} for r in rows]}
    result = {"config": config_path, "overrides": list(overrides), "name": base.name,
              "eval_problems": base.eval.num_problems, "eval_simulations": base.selfplay.eval_simulations,
              "sft_seconds": sft_seconds, "runs": runs}
    with open(os.path.join(out, "curves.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "curves.md"), "w") as f:
        f.write(markdown_table(result))
    plot_curves(result, os.path.join(out, "curves.png"))
    print(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    sims = result["eval_simulations"]
    lines = [f"Held-out solve rate on {result['eval_problems']} problems ({result['name']}); "
             f"self-play compute in model token forwards.", "",
             f"| algorithm | iteration | greedy (policy only) | MCTS@{sims} | self-play token forwards |",
             "|---|---:|---:|---:|---:|"]
    for algorithm, run in result["runs"].items():
        for r in run["iterations"]:
            lines.append(f"| {algorithm} | {r['step']} | {r['greedy_solve_rate']:.1%} | {r['mcts_solve_rate']:.1%} "
                         f"| {int(r.get('selfplay_token_forwards') or 0):,} |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for algorithm, run in result["runs"].items():
        rows = run["iterations"]
        steps = [r["step"] for r in rows]
        line, = axes[0].plot(steps, [r["greedy_solve_rate"] for r in rows], marker="o", label=f"{algorithm} greedy")
        axes[0].plot(steps, [r["mcts_solve_rate"] for r in rows], marker="s", linestyle="--", color=line.get_color(),
                     label=f"{algorithm} MCTS@{result['eval_simulations']}")
        compute = [int(r.get("selfplay_token_forwards") or 0) for r in rows]
        if compute[-1] > 0:
            axes[1].plot(compute, [r["greedy_solve_rate"] for r in rows], marker="o", color=line.get_color(),
                         label=f"{algorithm} greedy")
            axes[1].plot(compute, [r["mcts_solve_rate"] for r in rows], marker="s", linestyle="--",
                         color=line.get_color(), label=f"{algorithm} MCTS")
    axes[0].set_xlabel("iteration (0 = SFT warm start; same learner steps for every algorithm)")
    axes[1].set_xlabel("cumulative self-play compute (model token forwards)")
    for ax in axes:
        ax.set_ylabel("held-out solve rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: no data hidden
    fig.suptitle(f"{result['name']}: policy-only and MCTS solve rate during self-play")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/countdown_tiny.py")
    p.add_argument("--out", required=True)
    p.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS), choices=ALGORITHMS + ("grpo",))
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an extra run from the same SFT start: a name, then its config overrides "
                        "(repeatable), e.g. --variant no_rescale search.rescale_values=False")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    variants = {v[0]: v[1:] for v in args.variant}
    run_curves(args.config, args.out, algorithms=args.algorithms, overrides=overrides, variants=variants,
               progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any work; see alphareason/host_memory.py
    raise SystemExit(main())
