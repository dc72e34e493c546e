"""Test-time compute scaling: strategies x budgets x difficulty (Snell et al. 2024, in miniature).

"Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling
Model Parameters" (arXiv 2408.03314) asks how to spend inference compute:
sampling many chains and ranking them with a verifier, or searching step by
step with a process verifier, and finds that the best choice depends on the
question's difficulty. This module repeats the study with the project's
reasoning core on Countdown-4 and Game24 held-out problems:

1. a trained model per task (a run workdir, or a small SFT model trained
   here with ``--train``);
2. difficulty: each problem's pass@1 estimated from the model's own samples,
   cut into ``num_bins`` equal-size quantile bins (bin 1 easiest);
3. every strategy of ``alphareason.eval`` at budgets doubling
   from 1 to ``max_generations`` generations' worth of model token forwards;
4. the compute-optimal policy: per bin and budget, the strategy and setting
   with the best accuracy on the selection split (validation) among those
   whose mean spend fits the budget, reported on the test split; and its
   efficiency ratio: the compute best-of-N needs to reach that accuracy
   divided by the compute the compute-optimal policy spends;
5. which of the paper's qualitative findings hold here.

Compute is matched in actual token forwards, not nominal budgets: a
strategy's point is plotted at the mean token forwards it spent, and the
compute-optimal policy at budget x may use any (strategy, setting) whose
mean spend is <= x. Strategies that use the exact verifier (``+verifier``)
are shown as references and are never chosen by the compute-optimal policy.

Outputs in OUT: ``scaling.json`` (everything), ``scaling.md`` (tables and the
findings), ``scaling_<task>.png`` (accuracy vs compute per bin, log x) and
``results.jsonl`` (one row per task, strategy, budget and problem).

  alphareason scaling --config configs/scaling_reduced.py --out runs/scaling_reduced --train
  alphareason scaling --config configs/scaling_full.py --out runs/scaling_full --train   # GPU / TPU
  python experiments/test_time_scaling.py --config configs/scaling_reduced.py --out DIR --train
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

FINDINGS = {
    "beam_small_budgets": "beam search beats best-of-N at small budgets and loses its lead at large ones",
    "easy_prefers_best_of_n": "on the easy bins best-of-N is as good as or better than beam search",
    "hardest_gains_little": "the hardest bin gains little from more test-time compute",
    "compute_optimal_efficiency": "the compute-optimal policy needs several times (the paper: >4x) less "
                                  "compute than best-of-N for the same accuracy",
}


# ------------------------------------------------------------------ analysis
def difficulty_bins(pass_at_1: np.ndarray, num_bins: int, *, seed: int = 0) -> np.ndarray:
    """int[n] in 1..num_bins (1: easiest): equal-size quantile bins of pass@1.

    Problems are ordered by pass@1, highest first, ties in a seeded random
    order, and cut into ``num_bins`` groups whose sizes differ by at most one
    (the paper's five quantiles of the model's own pass@1).
    """
    p = np.asarray(pass_at_1, np.float64)
    n = len(p)
    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins} must be >= 1")
    tiebreak = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tiebreak, -p))
    bins = np.empty((n,), np.int64)
    bins[order] = 1 + (np.arange(n) * num_bins) // max(n, 1)
    return bins


def value_auc(values: np.ndarray, solved: np.ndarray) -> float | None:
    """P(value of a solved chain > value of an unsolved one), ties half (None without both kinds).

    0.5 means the value head cannot tell them apart, so ranking by it is a random choice.
    """
    v, y = np.asarray(values, np.float64).ravel(), np.asarray(solved, bool).ravel()
    pos, neg = v[y], v[~y]
    if not len(pos) or not len(neg):
        return None
    ranks = np.empty(len(v))
    order = np.argsort(v, kind="stable")
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):  # average ranks of ties
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def summarize(solved: np.ndarray, spent: np.ndarray, bins: np.ndarray, mask: np.ndarray,
              num_bins: int) -> dict[str, list]:
    """Accuracy, mean token forwards and count per bin, then over all bins (the last entry)."""
    acc, mean_spent, count = [], [], []
    for k in list(range(1, num_bins + 1)) + [0]:
        sel = mask & ((bins == k) if k else True)
        n = int(sel.sum())
        count.append(n)
        acc.append(float(np.mean(solved[sel])) if n else float("nan"))
        mean_spent.append(float(np.mean(spent[sel])) if n else float("nan"))
    return {"acc": acc, "spent": mean_spent, "n": count}


def best_under(points: Sequence[dict], k: int, budget: float, *, split: str = "select") -> dict | None:
    """The learned (no verifier) point with the best ``split`` accuracy in bin index ``k`` among those
    whose mean spend there is <= ``budget``; ties go to the cheaper one. None if none fits."""
    eligible = [p for p in points if not p["verifier"] and p[split]["n"][k] > 0
                and p[split]["spent"][k] <= budget]
    if not eligible:
        return None
    return max(eligible, key=lambda p: (p[split]["acc"][k], -p[split]["spent"][k]))


def compute_needed(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute at which an accuracy curve first reaches ``target``.

    ``curve``: (mean token forwards, accuracy) points. Accuracy is made
    monotone (running maximum in order of compute) and interpolated linearly
    in log compute between points. Returns None if the curve never reaches
    ``target``; the first point's compute if it already does there.
    """
    pts = sorted((float(s), float(a)) for s, a in curve if np.isfinite(s) and np.isfinite(a) and s > 0)
    best = -np.inf
    prev = None
    for s, a in pts:
        a = max(a, best)
        if a >= target:
            if prev is None or prev[1] >= target or a == prev[1] or a == target:
                return s
            frac = (target - prev[1]) / (a - prev[1])
            return float(np.exp(np.log(prev[0]) + frac * (np.log(s) - np.log(prev[0]))))
        best, prev = a, (s, a)
    return None


def compute_optimal(points: Sequence[dict], grid: Sequence[int], generations: Sequence[int], num_bins: int,
                    *, baseline: str) -> list[list[dict]]:
    """Per bin, then all bins with one policy, then all bins with each bin's own choice: per budget
    of ``grid``, the compute-optimal choice and its efficiency against ``baseline`` (best-of-N).

    Each point is one strategy at one budget with ``select`` / ``report``
    summaries (see ``summarize``). The choice is the learned point with the
    best ``select`` accuracy whose ``select`` mean spend fits the budget; it
    is reported on ``report``. ``efficiency`` = compute the baseline needs on
    ``report`` to reach the chosen ``report`` accuracy / the chosen ``report``
    spend; when the baseline never gets there (``baseline_reaches`` False)
    ``efficiency_at_least`` is the baseline's largest spend / the chosen
    spend. The last row (index ``num_bins + 1``) is the difficulty-adaptive
    policy of the paper: every bin uses its own choice; accuracy and spend
    are the bins' averages weighted by their problem counts. A bin without
    selection problems gets the choice made on all bins.
    """
    base = [p for p in points if p["label"] == baseline]

    def efficiency(entry: dict, k: int) -> dict:
        curve = [(p["report"]["spent"][k], p["report"]["acc"][k]) for p in base]
        acc, spent = entry["acc_report"], entry["spent_report"]
        need = compute_needed(curve, acc) if acc > 0 else None
        top = max((s for s, _ in curve if np.isfinite(s)), default=None)
        base_here = best_under(base, k, entry["budget"])
        return dict(baseline_acc_report=base_here["report"]["acc"][k] if base_here else None,
                    baseline_needs=need, baseline_reaches=need is not None,
                    efficiency=(need / spent) if (need is not None and spent > 0) else None,
                    efficiency_at_least=(top / spent) if (need is None and acc > 0 and top and spent > 0) else None)

    out = []
    for k in range(num_bins + 1):
        # a bin without selection problems is given the choice made on all bins
        chooser = k if any(p["select"]["n"][k] > 0 for p in points) else num_bins
        row = []
        for budget, g in zip(grid, generations):
            best = best_under(points, chooser, budget)
            entry: dict[str, Any] = {"generations": g, "budget": budget, "label": None}
            if best is not None:
                entry.update(label=best["label"], at_generations=best["generations"],
                             acc_select=best["select"]["acc"][chooser], acc_report=best["report"]["acc"][k],
                             spent_report=best["report"]["spent"][k])
                entry.update(efficiency(entry, k))
            row.append(entry)
        out.append(row)
    counts = np.array([max((p["report"]["n"][k] for p in points), default=0) for k in range(num_bins)], float)
    row = []
    for j, (budget, g) in enumerate(zip(grid, generations)):
        entries = [out[k][j] for k in range(num_bins)]
        entry = {"generations": g, "budget": budget, "label": None}
        use = [k for k in range(num_bins) if counts[k] > 0]
        if use and all(entries[k]["label"] for k in use) and counts.sum() > 0:
            w = counts[use] / counts[use].sum()
            entry.update(label="per-bin: " + ", ".join(f"{k + 1}:{entries[k]['label']}@{entries[k]['at_generations']}"
                                                       for k in use),
                         at_generations=g,
                         acc_select=float(sum(wi * entries[k]["acc_select"] for wi, k in zip(w, use))),
                         acc_report=float(sum(wi * entries[k]["acc_report"] for wi, k in zip(w, use))),
                         spent_report=float(sum(wi * entries[k]["spent_report"] for wi, k in zip(w, use))))
            entry.update(efficiency(entry, num_bins))
        row.append(entry)
    out.append(row)
    return out


def curve_at(points: Sequence[dict], label: str, k: int, split: str) -> dict[int, float]:
    """{generations: accuracy} of one strategy in bin index ``k``."""
    return {p["generations"]: p[split]["acc"][k] for p in points if p["label"] == label}


def paper_findings(points: Sequence[dict], optimal: list[list[dict]], generations: Sequence[int], num_bins: int, *,
                   best_of_n: str, beam: str | None, split: str = "both") -> dict[str, dict]:
    """Checks the paper's qualitative findings on ``split`` (default both splits pooled).

    * beam_small_budgets: mean(beam - best-of-N) over the lower third of the
      budgets above 1 generation is > 0, and over the upper third <= 0;
    * easy_prefers_best_of_n: mean(best-of-N - beam) over budgets > 1 in bins 1-2 >= 0;
    * hardest_gains_little: the last bin's gain (best learned accuracy at the
      largest budget minus at 1 generation) is below half the mean gain of
      the middle bins, or below 0.05;
    * compute_optimal_efficiency: the median efficiency ratio of the
      difficulty-adaptive policy (where defined) is > 1 (the paper: up to 4x).
    Each entry: ``holds`` (True / False / None when it cannot be judged) and the numbers behind it.
    """
    out: dict[str, dict] = {}
    gens = [g for g in generations if g > 1]
    all_k = num_bins
    if beam is None:
        out["beam_small_budgets"] = {"holds": None, "why": "no beam search strategy was run"}
        out["easy_prefers_best_of_n"] = {"holds": None, "why": "no beam search strategy was run"}
    else:
        bon, bm = curve_at(points, best_of_n, all_k, split), curve_at(points, beam, all_k, split)
        both = [g for g in gens if g in bon and g in bm]
        third = max(1, len(both) // 3)
        small = [bm[g] - bon[g] for g in both[:third]]
        large = [bm[g] - bon[g] for g in both[-third:]]
        if not both:
            out["beam_small_budgets"] = {"holds": None, "why": "no budget where both ran"}
        elif max(max(bon[g], bm[g]) for g in both) <= 0:
            out["beam_small_budgets"] = {"holds": None, "why": "neither solves a problem at any budget"}
        else:
            lead_small, lead_large = float(np.mean(small)), float(np.mean(large))
            out["beam_small_budgets"] = {
                "holds": bool(lead_small > 0 and lead_large <= 0), "lead_small": lead_small, "lead_large": lead_large,
                "small_generations": both[:third], "large_generations": both[-third:],
                "partly": bool(lead_small > 0 and lead_large < lead_small)}
        easy, easy_top = [], 0.0
        for k in range(min(2, num_bins)):
            bon_k, bm_k = curve_at(points, best_of_n, k, split), curve_at(points, beam, k, split)
            easy += [bon_k[g] - bm_k[g] for g in gens if g in bon_k and g in bm_k]
            easy_top = max([easy_top] + [max(bon_k[g], bm_k[g]) for g in gens if g in bon_k and g in bm_k])
        hard = []
        for k in range(2, num_bins):
            bon_k, bm_k = curve_at(points, best_of_n, k, split), curve_at(points, beam, k, split)
            hard += [bon_k[g] - bm_k[g] for g in gens if g in bon_k and g in bm_k]
        easy = [d for d in easy if np.isfinite(d)]
        hard = [d for d in hard if np.isfinite(d)]
        out["easy_prefers_best_of_n"] = (
            {"holds": bool(np.mean(easy) >= 0), "best_of_n_minus_beam_easy": float(np.mean(easy)),
             "best_of_n_minus_beam_harder": float(np.mean(hard)) if hard else None}
            if easy and easy_top > 0 else
            {"holds": None, "why": "no budget where both ran" if not easy else "neither solves an easy problem"})
    gains = []
    learned = [p for p in points if not p["verifier"]]
    for k in range(num_bins):
        top = max((p[split]["acc"][k] for p in learned if p["generations"] == generations[-1]), default=np.nan)
        low = max((p[split]["acc"][k] for p in learned if p["generations"] == generations[0]), default=np.nan)
        gains.append(float(top - low))
    middle = [g for g in gains[1:-1] if np.isfinite(g)] or [g for g in gains[:-1] if np.isfinite(g)]
    if not any(g > 0 for g in gains if np.isfinite(g)):
        out["hardest_gains_little"] = {"holds": None, "why": "no bin gains from more compute", "gain_per_bin": gains}
    elif np.isfinite(gains[-1]) and middle:
        out["hardest_gains_little"] = {"holds": bool(gains[-1] < 0.5 * np.mean(middle) or gains[-1] < 0.05),
                                       "gain_per_bin": gains}
    else:
        out["hardest_gains_little"] = {"holds": None, "gain_per_bin": gains}
    adaptive = optimal[-1]
    ratios = [e["efficiency"] for e in adaptive if e.get("efficiency") is not None]
    unreached = sum(1 for e in adaptive if e.get("label") and e.get("acc_report", 0) > 0
                    and not e.get("baseline_reaches"))
    out["compute_optimal_efficiency"] = (
        {"holds": bool(np.median(ratios) > 1), "median_ratio": float(np.median(ratios)),
         "max_ratio": float(max(ratios)),
         "budgets_best_of_n_never_reaches": unreached}
        if ratios else {"holds": None, "why": "no budget with a defined ratio",
                        "budgets_best_of_n_never_reaches": unreached})
    for name, text in FINDINGS.items():
        out[name]["finding"] = text
    return out


# ------------------------------------------------------------------- outputs
def _fmt(x, pct=True) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.0f}"


def bin_names(num_bins: int) -> list[str]:
    return [f"bin {k}" for k in range(1, num_bins + 1)] + ["all"]


def write_plot(path: str, task_name: str, points: Sequence[dict], optimal: list[list[dict]], num_bins: int,
               labels: Sequence[str]) -> None:
    """Accuracy vs mean token forwards (log x), one panel per bin and one for all, report split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = bin_names(num_bins)
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        for i, label in enumerate(labels):
            pts = sorted((p for p in points if p["label"] == label), key=lambda p: p["generations"])
            xs = [p["report"]["spent"][k] for p in pts]
            ys = [p["report"]["acc"][k] for p in pts]
            if not xs:
                continue
            verifier = pts[0]["verifier"]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, linestyle="--" if verifier else "-",
                    color="0.6" if verifier else colors[i % len(colors)], label=label)
        for row, style, text in ((optimal[k], "-", "compute-optimal"),
                                 (optimal[-1] if k == num_bins else [], ":", "compute-optimal, per bin")):
            opt = [e for e in row if e.get("label")]
            if opt:
                ax.plot([e["spent_report"] for e in opt], [e["acc_report"] for e in opt], color="black",
                        linewidth=2.2, linestyle=style, alpha=0.5, label=text)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{task_name}: {name}", fontsize=9)
        ax.set_xlabel("mean model token forwards per problem", fontsize=8)
        ax.set_ylabel("accuracy (test split)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    last = axes[num_bins // cols][num_bins % cols]
    handles, texts = last.get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=min(4, len(texts)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_markdown(name: str, r: dict) -> list[str]:
    nb = r["num_bins"]
    names = bin_names(nb)
    lines = [f"## {name}", ""]
    lines.append(f"Model: {r['model']['params']:,} parameters ({r['model']['source']}). One generation = "
                 f"{r['generation_cost']} token forwards (prompt <= {r['max_prompt_len']} + "
                 f"{r['max_steps']} steps x {r['max_step_len']} tokens); budgets {r['generations'][0]}-"
                 f"{r['generations'][-1]} generations. Problems: {r['num_select']} selection (validation), "
                 f"{r['num_report']} report (test). Time: {r['seconds']['total']:.0f}s.")
    auc = "n/a (no solved or no unsolved sample)" if r["value_auc"] is None else f"{r['value_auc']:.2f}"
    lines += ["", f"Mean pass@1 {r['mean_pass_at_1']:.3f}. The value head's AUC on those samples (solved vs "
              f"unsolved chains, 0.5 = no better than chance, which makes every learned selection a random "
              f"one): {auc}."]
    lines += ["", f"### Difficulty bins (pass@1 from {r['difficulty_samples']} samples at t={r['temperature']:g})", "",
              "| bin | problems | pass@1 range | mean pass@1 |", "|---|---|---|---|"]
    for b in r["bins"]:
        lines.append(f"| {b['bin']} | {b['count']} | {b['min']:.2f}-{b['max']:.2f} | {b['mean']:.2f} |")
    gens = r["generations"]
    labels = r["labels"]
    for k, bn in enumerate(names):
        lines += ["", f"### Accuracy, test split, {bn} (rows: strategy; columns: budget in generations; "
                  f"cell: accuracy / mean token forwards)", "",
                  "| strategy | " + " | ".join(str(g) for g in gens) + " |",
                  "|---|" + "---|" * len(gens)]
        for label in labels:
            by_g = {p["generations"]: p for p in r["points"] if p["label"] == label}
            cells = [f"{_fmt(by_g[g]['report']['acc'][k])} / {_fmt(by_g[g]['report']['spent'][k], False)}"
                     if g in by_g else "-" for g in gens]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "### Compute-optimal policy (chosen on validation, reported on test) and efficiency vs best-of-N",
              "", "Per budget and bin: the chosen strategy @ the budget it ran with, its test accuracy, best-of-N's "
              "test accuracy at the same budget, and the efficiency ratio = compute best-of-N needs for the chosen "
              "accuracy / compute the choice spends (`>=`: best-of-N never gets there within its largest budget). "
              "`all` uses one policy for every problem; `per-bin` lets each bin use its own choice "
              "(the paper's difficulty-adaptive policy, with difficulty known).", "",
              "| budget | " + " | ".join(names + ["per-bin"]) + " |", "|---|" + "---|" * (len(names) + 1)]
    for j, g in enumerate(gens):
        cells = []
        for k in range(len(names) + 1):
            e = r["compute_optimal"][k][j] if r["compute_optimal"][k] else {}
            if not e.get("label"):
                cells.append("-")
                continue
            if e["efficiency"] is not None:
                ratio = f"{e['efficiency']:.1f}x"
            elif e.get("efficiency_at_least"):
                ratio = f">={e['efficiency_at_least']:.1f}x"
            else:
                ratio = "n/a"
            what = "" if k == len(names) else f"{e['label']}@{e['at_generations']}: "
            cells.append(f"{what}{_fmt(e['acc_report'])} (BoN {_fmt(e['baseline_acc_report'])}, {ratio})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "### The paper's findings here", ""]
    for key, f in r["findings"].items():
        verdict = {True: "holds", False: "does not hold", None: "cannot be judged"}[f["holds"]]
        if key == "beam_small_budgets" and f["holds"] is False and f.get("partly"):
            verdict = "partly holds (beam's lead shrinks but does not vanish)"
        numbers = {k: v for k, v in f.items() if k not in ("holds", "finding", "partly")}
        lines.append(f"- **{f['finding']}**: {verdict}. `{json.dumps(numbers, default=_json_default)}`")
    return lines


def write_outputs(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling.json.tmp"), "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    os.replace(os.path.join(out, "scaling.json.tmp"), os.path.join(out, "scaling.json"))
    lines = ["# Test-time compute scaling (Snell et al. 2024, in miniature)", "",
             f"Command: `{report['command']}`", "",
             f"Setting `{report['settings']['name']}`; total time {report['seconds']:.0f}s on {report['machine']}.",
             "", "Accuracy is judged by each task's exact verifier. Strategies marked `+verifier` use that verifier "
             "to pick among finished chains (oracle references, never chosen by the compute-optimal policy). "
             "Compute is matched in actual model token forwards per problem (prefill + decode).", ""]
    for name, r in report["tasks"].items():
        lines += task_markdown(name, r) + ["", f"![{name}](scaling_{name}.png)", ""]
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ------------------------------------------------------------------ running
def load_problems(config, workdir: str, split: str, limit: int) -> list[dict]:
    """The first ``limit`` distinct problems of a held-out split of the run's dataset."""
    from alphareason.data import load_records
    from alphareason.run import dataset
    seen, out = set(), []
    for r in load_records(dataset(config, workdir).as_data_source(split=split)):
        key = json.dumps(r["problem"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r["problem"])
        if len(out) == limit:
            break
    return out


def check_config(config, *, workdirs: dict[str, str] | None = None) -> None:
    """Raises ``ValueError`` naming the bad setting of a scaling config (before anything runs)."""
    from alphareason.eval.strategy import parse_strategy
    if not config.tasks:
        raise ValueError("config.tasks is empty: name at least one task (e.g. countdown4, game24)")
    for name in config.tasks:
        if name not in config.task_runs:
            raise ValueError(f"task {name!r} of config.tasks has no entry in config.task_runs "
                             f"(known: {', '.join(config.task_runs.keys())})")
    for name in workdirs or {}:
        if name not in config.tasks:
            raise ValueError(f"--workdir {name}=...: {name!r} is not one of the config's tasks "
                             f"({', '.join(config.tasks)})")
    for key in ("num_bins", "problems_per_split", "difficulty_samples", "max_generations", "max_lanes", "mcts_batch"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key}={config[key]} must be >= 1")
    if not config.strategies:
        raise ValueError("config.strategies is empty")
    for text in config.strategies:
        parse_strategy(text, temperature=config.temperature)


def _config_path(path: str) -> str:
    """A training config path as given, or relative to the repository (so OUT can be run from anywhere)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)


def prepare_model(name: str, spec, out: str, *, train: bool, progress: bool, log: Callable[[str], None]):
    """(model, config, workdir, source): the run in ``spec.workdir`` (default OUT/<name>), trained first if asked."""
    from alphareason.config import ConfigError, load_config, run_config
    from alphareason.run import load_model, make_mesh
    from alphareason.train.sft import train_sft
    workdir = spec.workdir or os.path.join(out, name)
    if train:
        config = load_config(_config_path(spec.train_config), list(spec.train_overrides))
        log(f"{name}: SFT training ({spec.train_config}, {config.train.steps} steps) in {workdir}")
        result = train_sft(config, workdir, progress=progress, log=log)
        return result.model, config, workdir, f"SFT {result.steps} steps, {workdir}"
    try:
        config = run_config(workdir)
    except ConfigError:
        raise FileNotFoundError(f"{workdir} holds no trained run (no config.json); pass --train to train a small "
                                f"SFT model there, or --workdir {name}=DIR for an existing run") from None
    model, _, meta = load_model(config, workdir, mesh=make_mesh(config))
    return model, config, workdir, f"{meta.get('phase', '?')} step {meta.get('step', '?')}, {workdir}"


def run_task(name: str, model, task, select: list, report_problems: list, settings, *, log: Callable[[str], None],
             source: str = "", runner=None, mesh=None) -> tuple[dict, list[dict]]:
    """The study on one task: bins, every strategy at every budget, the compute-optimal policy.

    ``mesh``: the devices the strategies' problems are split over (the run config's mesh).
    """
    import jax
    from alphareason.model import count_params
    from alphareason.eval.budget import log2_budgets
    from alphareason.eval.runner import StrategyRunner
    from alphareason.eval.strategy import has_votable_answer, parse_strategy

    t0 = time.time()
    runner = runner or StrategyRunner(model, task, max_lanes=settings.max_lanes, mcts_batch=settings.mcts_batch,
                                      mesh=mesh)
    problems = list(select) + list(report_problems)
    n_sel = len(select)
    is_select = np.arange(len(problems)) < n_sel
    key = jax.random.key(settings.seed)
    num_bins = settings.num_bins

    log(f"{name}: pass@1 of {len(problems)} problems from {settings.difficulty_samples} samples each")
    pool = runner.sample_chains(problems, settings.difficulty_samples, jax.random.fold_in(key, 1),
                                temperature=settings.temperature)
    pass_at_1 = pool["solved"].mean(axis=1)
    auc = value_auc(pool["value"], pool["solved"])
    bins = difficulty_bins(pass_at_1, num_bins, seed=settings.seed)
    t_bins = time.time() - t0
    log(f"{name}: mean pass@1 {pass_at_1.mean():.3f}; bins by pass@1: "
        + ", ".join(f"{k}: {pass_at_1[bins == k].min():.2f}-{pass_at_1[bins == k].max():.2f}"
                    for k in range(1, num_bins + 1) if (bins == k).any())
        + f"; value head AUC {auc if auc is None else round(auc, 3)} ({t_bins:.0f}s)")

    configs = [parse_strategy(s, temperature=settings.temperature) if isinstance(s, str) else s
               for s in settings.strategies]
    skipped = [c.label for c in configs
               if c.name in ("weighted_vote", "majority_vote") and not has_votable_answer(task)]
    configs = [c for c in configs if c.label not in skipped]
    if skipped:
        log(f"{name}: skipping {', '.join(skipped)}: the task's answer is the target it states")
    generations = log2_budgets(settings.max_generations)
    budgets = [runner.budget_for(g) for g in generations]
    mcts_gens = set(settings.mcts_generations or generations)
    results = {}
    for c in configs:
        t = time.time()
        gens = [g for g in generations if c.family != "mcts" or g in mcts_gens]
        if c.family == "sampling":
            # sampling strategies sharing a temperature are served from one set of chains
            continue
        log(f"{name}: {c.label} at {len(gens)} budgets")
        results.update(runner.run_budgets([c], problems, [runner.budget_for(g) for g in gens],
                                          jax.random.fold_in(key, 2), log=log))
        log(f"{name}: {c.label} done ({time.time() - t:.0f}s)")
    sampling = [c for c in configs if c.family == "sampling"]
    if sampling:
        t = time.time()
        log(f"{name}: {', '.join(c.label for c in sampling)} at {len(generations)} budgets")
        results.update(runner.run_budgets(sampling, problems, budgets, jax.random.fold_in(key, 2), log=log))
        log(f"{name}: sampling strategies done ({time.time() - t:.0f}s)")

    points, rows = [], []
    for (label, budget), res in results.items():
        if not res.feasible:
            continue
        g = generations[budgets.index(budget)]
        solved, spent = res.solved, res.token_forwards.astype(np.float64)
        assert (res.token_forwards <= budget).all(), f"{label} overspent its budget {budget}"
        points.append({"label": label, "name": res.config.name, "family": res.config.family,
                       "verifier": res.config.verifier, "generations": g, "budget": budget, "size": res.size,
                       "beam_width": res.beam_width,
                       "mean_computed_token_forwards": float(np.mean(res.computed_token_forwards)),
                       "select": summarize(solved, spent, bins, is_select, num_bins),
                       "report": summarize(solved, spent, bins, ~is_select, num_bins),
                       "both": summarize(solved, spent, bins, np.ones_like(is_select), num_bins)})
        for i, row in enumerate(res.rows(problems, task)):
            rows.append({"task": name, "generations": g, "split": "validation" if is_select[i] else "test",
                         "bin": int(bins[i]), "pass_at_1": float(pass_at_1[i])} | row)
    points.sort(key=lambda p: (p["label"], p["generations"]))
    labels = [c.label for c in configs if any(p["label"] == c.label for p in points)]
    bon = next((c.label for c in configs if c.name == "best_of_n" and not c.verifier), None)
    beam = next((c.label for c in configs if c.name == "beam" and not c.verifier and c.beam_width == 4),
                next((c.label for c in configs if c.name == "beam" and not c.verifier), None))
    optimal = compute_optimal(points, budgets, generations, num_bins, baseline=bon) if bon else \
        [[] for _ in range(num_bins + 1)]
    findings = paper_findings(points, optimal, generations, num_bins, best_of_n=bon, beam=beam) if bon else {}
    bin_rows = [{"bin": k, "count": int((bins == k).sum()), "select": int(((bins == k) & is_select).sum()),
                 "min": float(pass_at_1[bins == k].min()), "max": float(pass_at_1[bins == k].max()),
                 "mean": float(pass_at_1[bins == k].mean())} for k in range(1, num_bins + 1) if (bins == k).any()]
    seconds = {"bins": t_bins, "total": time.time() - t0}
    out = {"num_bins": num_bins, "generations": generations, "budgets": budgets,
           "generation_cost": runner.generation_cost, "max_prompt_len": task.max_prompt_len,
           "max_steps": task.max_steps, "max_step_len": task.max_step_len,
           "num_select": n_sel, "num_report": len(problems) - n_sel, "difficulty_samples": settings.difficulty_samples,
           "temperature": settings.temperature, "mean_chain_forwards": float(pool["chain_forwards"].mean()),
           "mean_pass_at_1": float(pass_at_1.mean()), "value_auc": auc,
           "model": {"params": count_params(model), "source": source},
           "labels": labels, "best_of_n": bon, "beam": beam, "bins": bin_rows,
           "pass_at_1": pass_at_1.tolist(), "bin_of_problem": bins.tolist(), "points": points,
           "compute_optimal": optimal, "findings": findings, "seconds": seconds}
    log(f"{name}: done in {seconds['total']:.0f}s")
    return out, rows


def run_scaling(config, out: str, *, train: bool = False, workdirs: dict[str, str] | None = None,
                progress: bool = True, command: str = "", log: Callable[[str], None] | None = None) -> dict:
    """The whole study for every task of a scaling config (``configs/scaling_*.py``); writes OUT."""
    import platform
    from alphareason.run import make_mesh, make_task

    t0 = time.time()
    log = log or _timestamped(t0)
    check_config(config, workdirs=workdirs)
    os.makedirs(out, exist_ok=True)
    if config.get("compilation_cache", True):
        import jax
        if not jax.config.jax_compilation_cache_dir:  # on a CPU most of a rerun's time would be compiling
            jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    report: dict[str, Any] = {"command": command, "settings": config.to_dict(), "tasks": {},
                              "machine": f"{platform.machine()} CPU x{os.cpu_count()}"}
    rows: list[dict] = []
    for name in config.tasks:
        spec = config.task_runs[name]
        if workdirs and name in workdirs:
            spec = spec.copy_and_resolve_references()
            spec.workdir = workdirs[name]
        model, run_config, workdir, source = prepare_model(name, spec, out, train=train, progress=progress, log=log)
        task = make_task(run_config)
        select = load_problems(run_config, workdir, "validation", config.problems_per_split)
        test = load_problems(run_config, workdir, "test", config.problems_per_split)
        result, task_rows = run_task(name, model, task, select, test, config, log=log, source=source,
                                     mesh=make_mesh(run_config))
        report["tasks"][name] = result
        rows += task_rows
        for task_name, r in report["tasks"].items():
            write_plot(os.path.join(out, f"scaling_{task_name}.png"), task_name, r["points"], r["compute_optimal"],
                       r["num_bins"], r["labels"])
        report["seconds"] = time.time() - t0
        write_outputs(out, report)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")
    report["seconds"] = time.time() - t0
    write_outputs(out, report)
    log(f"wrote {out}/scaling.md, scaling.json, {len(report['tasks'])} plots and results.jsonl "
        f"({report['seconds']:.0f}s)")
    return report


def _timestamped(t0: float) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {message}", flush=True)
    return log


def parse_workdirs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--workdir {item!r} must look like TASK=DIR (e.g. countdown4=runs/cd4)")
        out[name] = path
    return out

