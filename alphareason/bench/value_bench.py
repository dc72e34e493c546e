"""Value benchmark: how well a run's value head predicts solvability and the policy's success.

``alphareason bench value --workdir DIR --out FILE.json`` loads the run's
newest checkpoint, samples chains from its policy on held-out problems and
reports, per depth, the value head's AUC against exact solvability (``V*``,
the task's solver) and against the outcomes of Monte-Carlo rollouts of the
policy, with Brier scores and calibration errors (``eval.value``). The
self-play loop logs the same headline numbers every iteration.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def run_value_bench(out_path: str, *, workdir: str, problems: int = 200, split: str = "validation",
                    chains: int = 2, mc_samples: int = 8, seed: int = 0, search_simulations: int = 0,
                    search_problems: int = 500, overrides=(), phase: str | None = None) -> dict:
    """``phase``: the newest checkpoint of that phase (default: self-play if present, else SFT).
    ``search_simulations > 0``: also MCTS with that many simulations on the first ``search_problems``
    problems, with the learned value and with a constant one (``eval.value.search_with_and_without_value``)."""
    from alphareason.config import apply_overrides, run_config
    from alphareason.eval.value import bootstrap_auc, search_with_and_without_value, value_report, walk_auc_intervals
    from alphareason.run import env_config, load_model, search_config, split_problems
    config = apply_overrides(run_config(workdir), overrides)
    model, task, meta = load_model(config, workdir, phase=phase)
    split_rows = split_problems(config, workdir, split)
    held_out = split_rows[:problems]
    t0 = time.time()
    env = env_config(config)
    policy_solved, policy = None, "greedy"
    if env.candidates == "enumerate":  # the run's policy-only rate is greedy over the legal steps
        from alphareason.eval.heldout import EvalSettings, Evaluator
        rows = Evaluator(model, task, EvalSettings(strategy="greedy", batch_size=100, env=env)).run(
            held_out, jax.random.key(seed))
        policy_solved, policy = np.array([r["solved"] for r in rows]), "greedy over the legal steps"
    report = value_report(model, task, held_out, jax.random.key(seed), chains=chains, mc_samples=mc_samples,
                          temperature=config.search.candidate_temperature, policy_solved=policy_solved,
                          policy=policy)
    result = {"workdir": os.path.abspath(workdir), "checkpoint": {k: meta.get(k) for k in ("phase", "step")},
              "split": split, "seconds": time.time() - t0, **report}
    if report.get("walks"):
        result["walks"]["auc_intervals"] = walk_auc_intervals(report["walks"], seed=seed)
    result["prompt"]["auc_interval"] = bootstrap_auc(
        [result["prompt"]["value"]], result["prompt"]["solved"], np.arange(len(held_out)), seed=seed)
    if search_simulations > 0:
        t0 = time.time()
        result["search"] = search_with_and_without_value(
            model, task, split_rows[:search_problems], jax.random.key(seed), env=env_config(config),
            search=search_config(config, num_simulations=search_simulations), batch_size=100)
        result["search"]["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def run_value_compare(out_path: str, a_path: str, b_path: str) -> dict:
    """Paired bootstrap of two ``bench value`` results' walk AUCs (``eval.value.compare_walk_values``)."""
    from alphareason.eval.value import compare_walk_values
    reports = []
    for path in (a_path, b_path):
        with open(path) as f:
            reports.append(json.load(f))
    result = {"a": os.path.abspath(a_path), "b": os.path.abspath(b_path),
              "a_workdir": reports[0].get("workdir"), "b_workdir": reports[1].get("workdir"),
              "walks": compare_walk_values(*reports)}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_compare(result: dict) -> str:
    """One line per depth: each walk AUC with its interval, the difference, its interval and p."""
    lines = [f"walk AUC against V*, a = {result['a']}, b = {result['b']} (95% intervals, problems resampled):"]
    for name, r in result["walks"].items():
        if r is None:
            lines.append(f"{name:>6}  -  (one class only)")
            continue
        (a, b), ((la, ha), (lb, hb)) = r["auc"], r["interval"]
        dl, dh = r["difference_interval"]
        lines.append(f"{name:>6}  a {a:.3f} [{la:.3f}, {ha:.3f}]  b {b:.3f} [{lb:.3f}, {hb:.3f}]  "
                     f"b - a {r['difference']:+.3f} [{dl:+.3f}, {dh:+.3f}]  p = {r['p_value']:.3g}")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """A table: states, solvable fraction, AUCs, Brier per depth."""
    def f(x):
        return "   -" if x is None else f"{x:.3f}"
    head = f"{'depth':>6} {'states':>7} {'V*=1':>6} {'mean v':>7} {'mean mc':>8} {'AUC V*':>7} {'AUC mc':>7} {'Brier mc':>9}"
    lines = [head, "-" * len(head)]
    rows = [(str(d), r) for d, r in result["depths"].items()] + [("all", result["all"])]
    for name, r in rows:
        lines.append(f"{name:>6} {r['states']:>7} {f(r.get('solvable')):>6} {r['mean_value']:>7.3f} "
                     f"{r['mean_mc']:>8.3f} {f(r.get('auc_vstar')):>7} {f(r.get('auc_mc')):>7} {r['brier_mc']:>9.3f}")
    prompt = result.get("prompt") or {"policy": "greedy", "solve_rate": result["greedy_solve_rate"]}
    ci = prompt.get("auc_interval")
    ci = f" [{ci['interval'][0][0]:.3f}, {ci['interval'][0][1]:.3f}]" if ci else ""
    lines.append(f"prompt: AUC against {prompt['policy']} solving the problem "
                 f"{f(result.get('prompt_auc_policy', result['prompt_auc_greedy']))}{ci} "
                 f"(it solves {prompt['solve_rate']:.1%}; {sum(prompt.get('solved', [])):.0f} problems)")
    if result.get("walks"):
        w = result["walks"]
        lines.append(f"states along {w['walks_per_problem']} random legal walks a problem, against V* "
                     "(AUC's 95% interval, problems resampled):")
        intervals = w.get("auc_intervals", {})
        for name, r in [(str(d), r) for d, r in w["depths"].items()] + [("all", w["all"])]:
            ci = intervals.get(name)
            ci = f"  [{ci['interval'][0][0]:.3f}, {ci['interval'][0][1]:.3f}]" if ci else ""
            lines.append(f"{name:>6} {r['states']:>7} {f(r.get('solvable')):>6} {r['mean_value']:>7.3f} "
                         f"{'':>8} {f(r.get('auc_vstar')):>7}{ci}")
    if "search" in result:
        s = result["search"]
        lines.append(f"MCTS@{s['simulations']} on {s['problems']} problems: {s['learned']:.1%} with the learned "
                     f"value, {s['constant']:.1%} with a constant one (McNemar p = {s['paired']['p_value']:.3g})")
    return "\n".join(lines)
