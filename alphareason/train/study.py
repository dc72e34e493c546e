"""Self-play studies: algorithms compared at matched compute, over seeds, on a test split.

A study is one setting (a config file and overrides) x algorithms x seeds.
Each (algorithm, seed) run

* starts from its seed's SFT warm start, trained once (``RUNS/seed<s>/sft``)
  and copied, so the algorithms of a seed differ only in what they do after
  it (a setting without demonstrations, ``train.steps=0``, starts from the
  seed's random network), or from an earlier run's SFT checkpoint
  (``sft_from``, ``adopt_sft``: same task, model and train config; the
  data config may differ, and the differences go into every ``run.json``);
* runs the loop (``run_training``) with ``seed=s`` and ``eval.test_problems``
  set: every iteration writes per-problem greedy results on the **test**
  split, which is reported and never used to choose settings (the
  validation split is for that);
* is matched in compute: ``alphazero`` runs first with the config's learner
  steps; every other algorithm gets the learner steps that make its total
  computed token forwards per iteration (self-play + learner, padding
  included) equal alphazero's of the same seed, from its own learner step's
  cost and alphazero's self-play cost; ``grpo``, whose learner cost depends
  on its rollouts, gets alphazero's mean per-iteration total as its
  ``grpo.token_budget`` (its iterations play problems until rollouts +
  learner reach it). The actual totals are recorded and plotted, so any
  mismatch shows;
* copies its small result files (``metrics.jsonl``, per-problem test
  results of every iteration, ``run.json`` with the commit that ran it) to
  ``RESULTS/<algorithm>/seed<s>/``
  when it finishes, so a study can run in pieces and be committed run by run.

``report(RESULTS)`` aggregates whichever runs are present: per iteration and
algorithm the mean test solve rate (policy only, greedy) over seeds with a
95% t interval, against the mean total compute; and at the last iteration an
exact McNemar test of every algorithm against the reference (``alphazero``, or
``reference``: for ablations run with ``matched=False``) on the same test
problems, pooled over the seeds both have. It writes ``study.json``,
``study.md`` and ``study.png``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from alphareason.config import ConfigDict, ConfigError, config_json, load_config
from alphareason.eval.stats import mcnemar, mean_interval
from alphareason.provenance import process_code_version

REFERENCE = "alphazero"
# The diagnostics on held-out (validation) states that each iteration's eval row carries
# (``eval.value.value_report``): the value head's AUC against exact solvability V* at the step ends the
# policy's samples reach and at those of random legal walks, at the prompt against whether greedy
# decoding solves the problem, and the policy's probability of writing a legal step next.
# The walks' AUC pooled over depths is partly a depth effect (deeper states are less often solvable and
# valued lower), so the first two depths are rows of their own.
VALUE_DIAGNOSTICS = {"value_auc_vstar": "AUC vs V* at step ends", "value_auc_vstar_walks": "AUC vs V* on legal walks",
                     "value_auc_vstar_walks_depth1": "AUC vs V* on legal walks, after step 1",
                     "value_auc_vstar_walks_depth2": "AUC vs V* on legal walks, after step 2",
                     "value_prompt_auc_greedy": "prompt AUC vs free greedy decoding",
                     "value_prompt_auc_policy": "prompt AUC vs greedy over the legal steps",
                     "policy_legal_mass": "policy's mass on legal steps"}
# What each algorithm name means as config overrides (variants add their own on top).
ALGORITHM_OVERRIDES = {
    "alphazero": ["selfplay.algorithm=alphazero"],
    "alphazero_pure": ["selfplay.algorithm=alphazero", "selfplay.policy_weight=1.0", "selfplay.sft_weight=0.0",
                       "selfplay.value_weight=1.0"],
    # AlphaZero whose learner also continues SFT on the demonstrations, weight 1 (chosen before any run).
    "alphazero_anchored": ["selfplay.algorithm=alphazero", "selfplay.sft_weight=1.0",
                           "selfplay.sft_source=demonstrations"],
    "expert_iteration": ["selfplay.algorithm=expert_iteration"],
    "sft_only": ["selfplay.algorithm=sft_only"],
    "grpo": ["selfplay.algorithm=grpo"],
}


def run_name(algorithm: str, seed: int) -> str:
    return os.path.join(algorithm, f"seed{seed}")


def algorithm_config(config_path: str, overrides: Sequence[str], algorithm: str, seed: int,
                     variants: dict[str, Sequence[str]] | None = None) -> ConfigDict:
    """The config of one run: the setting, the algorithm's (or variant's) overrides, the seed."""
    extra = (variants or {}).get(algorithm)
    if extra is None:
        if algorithm not in ALGORITHM_OVERRIDES:
            raise ConfigError(f"algorithm {algorithm!r}: choose one of {', '.join(ALGORITHM_OVERRIDES)} or define "
                              f"it as a variant (--variant NAME key=value ...)")
        extra = ALGORITHM_OVERRIDES[algorithm]
    return load_config(config_path, list(overrides) + list(extra) + [f"seed={seed}"])


def learner_step_cost(config: ConfigDict, task) -> int:
    """Token forwards of one learner step of ``config``'s algorithm: ``loop.learner_token_forwards`` of a batch
    with the shapes the loop's learner batches have (the values do not matter)."""
    from alphareason.run import env_config, make_model_config
    from alphareason.search.env import ReasoningEnv
    from alphareason.train.loop import (learner_batch_parts, learner_candidate_width, learner_token_forwards,
                                        learns_tree_values)
    sp, T = config.selfplay, make_model_config(config, task).max_len
    B = sp.learner_batch_size
    moves, sft = learner_batch_parts(sp)
    batch: dict[str, Any] = {"sft": {"tokens": np.zeros((B, T), np.int32)}} if sft else {}
    if moves:
        K = ReasoningEnv(task, None, env_config(config), seq_len=T).num_candidates
        W = learner_candidate_width(config, task) or task.max_step_len
        batch.update(tokens=np.zeros((B, T), np.int32), candidates=np.zeros((B, K, W), np.int32))
    if learns_tree_values(sp):
        batch["tree_states"] = {"tokens": np.zeros((B, T), np.int32)}
    return learner_token_forwards(batch)


def _per_iteration(rows: list[dict], key: str) -> np.ndarray:
    values = np.array([r.get(key, 0) for r in sorted(rows, key=lambda r: r["step"])], np.float64)
    return np.diff(values)


SELFPLAY_COST = ("search", "model", "selfplay.episodes_per_iteration", "selfplay.actor_batch_size",
                 "selfplay.action_temperature", "selfplay.curriculum")


def selfplay_differences(config: ConfigDict, reference: ConfigDict) -> list[str]:
    """The settings in ``SELFPLAY_COST`` (what one iteration's self-play spends depends on them) where
    ``config`` differs from ``reference``: ``["search.num_simulations", ...]``."""
    a, b = config_json(config), config_json(reference)
    out = []
    for key in SELFPLAY_COST:
        section, _, name = key.partition(".")
        x, y = a.get(section, {}), b.get(section, {})
        if name:
            x, y = {name: x.get(name)}, {name: y.get(name)}
        out += [f"{section}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    return out


def matched_learner_steps(reference_rows: list[dict], config: ConfigDict, task) -> int:
    """Learner steps per iteration that spend, with ``config``'s algorithm, what the reference spent."""
    total = _per_iteration(reference_rows, "total_token_forwards").mean()
    selfplay = 0.0 if config.selfplay.algorithm == "sft_only" else \
        _per_iteration(reference_rows, "selfplay_computed_token_forwards").mean()
    return max(1, int(round((total - selfplay) / learner_step_cost(config, task))))


def matched_grpo_budget(reference_rows: list[dict], config: ConfigDict, task) -> tuple[int, int]:
    """GRPO's ``(token_budget, episodes_per_iteration)`` that spend what the reference spent per iteration.

    The episodes are only a cap (the budget stops the iteration): the problems whose chains, at one full
    context each, would spend the budget on rollouts alone (a chain ends at its answer, and the learner
    spends on the chains with signal: the budget is spent before the cap in practice; the loop says so
    if not). A task has finitely many distinct problems, so a cap far above that could not be generated.
    """
    from alphareason.run import make_model_config
    budget = int(round(_per_iteration(reference_rows, "total_token_forwards").mean()))
    chain = config.grpo.group_size * make_model_config(config, task).max_len
    return budget, max(config.selfplay.actor_batch_size, -(-budget // chain))


SFT_FROM = "sft_from.json"  # in a seed's SFT folder: the run its checkpoint was copied from (``sft_from``)


def adopt_sft(config: ConfigDict, source: str, sft_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Copies the SFT checkpoint of an earlier run ``source`` into ``sft_dir`` as a seed's warm start.

    SFT on a large setting takes most of an hour on a CPU; a study may start a seed from a run that
    already trained it. The source must have been trained with the same ``task``, ``model``, ``train``
    and ``seed``; its ``data`` config may differ (e.g. a smaller test split, which moves a few training
    problems): the differences are logged and recorded in ``sft_dir/sft_from.json``, and every run of
    the seed copies that record into its ``run.json``. Nothing is copied if ``sft_dir`` has a
    checkpoint already.
    """
    from alphareason.config import config_json, stored_config_json
    from alphareason.run import checkpoint_dir
    src_ckpt, src_config = checkpoint_dir(source, "sft"), os.path.join(source, "config.json")
    if not (os.path.isdir(src_ckpt) and os.path.exists(src_config)):
        raise ConfigError(f"--sft-from {source}: no SFT run there (expected {src_config} and {src_ckpt}); give a "
                          f"--workdir of `alphareason train` or `sft`")
    stored, current = stored_config_json(src_config), config_json(config)
    differ = [k for k in ("task", "model", "train", "seed") if stored.get(k) != current.get(k)]
    if differ:
        raise ConfigError(f"--sft-from {source}: its {', '.join(differ)} config differs from this study's; a warm "
                          f"start must come from the same SFT (or drop --sft-from and train it)")
    data = {k: [stored["data"].get(k), v] for k, v in current["data"].items() if stored["data"].get(k) != v}
    record = {"source": os.path.abspath(source), "data_differences": data}
    if os.path.isdir(checkpoint_dir(sft_dir, "sft")):
        if not os.path.exists(os.path.join(sft_dir, SFT_FROM)):
            log(f"seed {config.seed}: {sft_dir} has its own SFT start already; --sft-from {source} is not used")
        return record
    shutil.copytree(src_ckpt, checkpoint_dir(sft_dir, "sft"))
    src_metrics = os.path.join(source, "metrics.jsonl")
    if os.path.exists(src_metrics):  # the SFT curve; the source's own evaluations are not this study's
        with open(src_metrics) as f, open(os.path.join(sft_dir, "metrics.jsonl"), "w") as out:
            out.writelines(x for x in f if json.loads(x).get("phase") == "sft")
    with open(os.path.join(sft_dir, SFT_FROM), "w") as f:
        json.dump(record, f, indent=1)
    log(f"seed {config.seed}: SFT start copied from {source}" +
        (f" (data config differs: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in data.items())})" if data else ""))
    return record


def _sft_record(sft_dir: str) -> dict[str, Any]:
    path = os.path.join(sft_dir, SFT_FROM)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {"sft_from": json.load(f)}


def _sft_start(config: ConfigDict, runs: str, seed: int, progress: bool, log: Callable[[str], None],
               sft_from: str = "") -> str:
    from alphareason.train.sft import train_sft
    sft_dir = os.path.join(runs, f"seed{seed}", "sft")
    if sft_from:
        os.makedirs(sft_dir, exist_ok=True)
        adopt_sft(config, sft_from, sft_dir, log)
    train_sft(config, sft_dir, progress=progress, log=log)  # resumes: trains on only if the copy stopped early
    return sft_dir


def start_from_sft(sft_dir: str, workdir: str) -> None:
    """Gives a new run ``workdir`` the seed's SFT start: its dataset, checkpoint and SFT curve.

    Only a run that has not begun: once ``workdir`` has metrics of its own (its own or copied, the copy
    comes last), nothing is copied, so a resumed run keeps what it wrote. A start with no SFT checkpoint
    (``train.steps=0``) therefore does not overwrite a resumed run's metrics either.
    """
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return
    os.makedirs(workdir, exist_ok=True)
    for part in ("data", os.path.join("checkpoints", "sft")):
        if os.path.exists(os.path.join(sft_dir, part)):
            shutil.copytree(os.path.join(sft_dir, part), os.path.join(workdir, part), dirs_exist_ok=True)
    if os.path.exists(os.path.join(sft_dir, "metrics.jsonl")):
        shutil.copy(os.path.join(sft_dir, "metrics.jsonl"), os.path.join(workdir, "metrics.jsonl"))


def run_one(config_path: str, overrides: Sequence[str], algorithm: str, seed: int, *, runs: str, results: str,
            variants: dict[str, Sequence[str]] | None = None, test_problems: int = 1000, progress: bool = True,
            matched: bool = True, sft_from: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) one (algorithm, seed) of a study and copies its results into ``results``.

    ``matched=False`` (ablations of one learner): every algorithm runs its config's own learner steps.
    ``sft_from``: an earlier run whose SFT checkpoint is the seed's warm start (``adopt_sft``)."""
    from alphareason.run import make_task
    from alphareason.train.loop import run_training
    from alphareason.train.metrics import read_metrics
    config = algorithm_config(config_path, list(overrides) + [f"eval.test_problems={test_problems}"], algorithm,
                              seed, variants)
    if config.data.test_size < test_problems:
        raise ConfigError(f"the study reports {test_problems} test problems but data.test_size is "
                          f"{config.data.test_size}; raise data.test_size (or lower --test-problems)")
    code = process_code_version()  # the code this process started with, not the checkout's when it ends
    base = algorithm_config(config_path, list(overrides) + [f"eval.test_problems={test_problems}"], REFERENCE,
                            seed, variants)  # the reference's config: its SFT start is the seed's
    task = make_task(config)
    if algorithm != REFERENCE and matched:
        reference = os.path.join(results, run_name(REFERENCE, seed), "metrics.jsonl")
        if not os.path.exists(reference):
            raise ConfigError(f"{algorithm} seed {seed} is matched in compute to {REFERENCE} seed {seed}, whose "
                              f"results ({reference}) are missing: run {REFERENCE} for this seed first")
        rows = [json.loads(x) for x in open(reference) if '"phase": "eval"' in x]
        if config.selfplay.algorithm == "grpo":
            budget, episodes = matched_grpo_budget(rows, config, task)
            log(f"{algorithm} seed {seed}: {budget:,} token forwards per iteration (at most {episodes} problems) "
                f"match {REFERENCE}'s compute")
            with config.unlocked():
                config.grpo.token_budget, config.selfplay.episodes_per_iteration = budget, episodes
        else:
            differs = selfplay_differences(config, base)
            if differs and config.selfplay.algorithm != "sft_only":
                raise ConfigError(
                    f"{algorithm} changes what self-play spends ({', '.join(differs)}), but matching gives it "
                    f"{REFERENCE}'s self-play compute and only sets its learner steps: its total would not match. "
                    f"Run it with --unmatched and choose selfplay.learner_steps so that the totals agree (the "
                    f"report's compute table shows what each run spent)")
            steps = matched_learner_steps(rows, config, task)
            log(f"{algorithm} seed {seed}: {steps} learner steps per iteration match {REFERENCE}'s compute")
            with config.unlocked():
                config.selfplay.learner_steps = steps
    t0 = time.time()
    sft_dir = _sft_start(base, runs, seed, progress, log, sft_from)
    workdir = os.path.join(runs, f"seed{seed}", algorithm)
    start_from_sft(sft_dir, workdir)
    log(f"== {algorithm} seed {seed} ({workdir})")
    run_training(config, workdir, progress=progress, log=log)
    out = os.path.join(results, run_name(algorithm, seed))
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
    for pattern in ("test_greedy_*.jsonl", "validation_*_*.jsonl"):
        for path in glob.glob(os.path.join(workdir, "results", pattern)):
            shutil.copy(path, out)
    info = {"config": config_path, "overrides": list(overrides), "algorithm": algorithm, "seed": seed,
            "code": code,
            "matched_compute": matched, "variant_overrides": list((variants or {}).get(algorithm, [])),
            "learner_steps": config.selfplay.learner_steps, "search_candidates": config.search.candidates,
            "seconds_this_call": time.time() - t0,
            **({"grpo_token_budget": config.grpo.token_budget,
                "episodes_per_iteration": config.selfplay.episodes_per_iteration}
               if config.selfplay.algorithm == "grpo" else {}),
            **_sft_record(sft_dir),
            "eval": [r for r in read_metrics(workdir, "eval")]}
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------ report
FAILURES = {"solved": "solved", "not available": "a number not available",
            '=?"': "a division that is not whole",  # the calculator writes "?" where the result is not whole
            "not of the form": "malformed step",
            "leaves": "dead end (valid steps, wrong result)", "incomplete": "stopped early",
            "nothing to undo": "bad undo", "after the solution": "text after the solution"}


def failure_kind(reason: str) -> str:
    """The kind of a verifier verdict's reason (``FAILURES``' values; ``other`` if none matches)."""
    for needle, kind in FAILURES.items():
        if needle in reason:
            return kind
    return "other"


def _load_runs(results: str) -> dict[str, dict[int, dict[str, Any]]]:
    """``{algorithm: {seed: {"eval": rows, "test": {iteration: bool[n]}}}}`` for every finished run."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*", "seed*", "run.json"))):
        folder = os.path.dirname(path)
        algorithm, seed = os.path.basename(os.path.dirname(folder)), int(os.path.basename(folder)[4:])
        with open(path) as f:
            info = json.load(f)
        test, kinds = {}, {}
        for p in glob.glob(os.path.join(folder, "test_greedy_*.jsonl")):
            it = int(os.path.basename(p)[len("test_greedy_"):-len(".jsonl")])
            rows = _read_rows(p)
            test[it] = {json.dumps(r["problem"], sort_keys=True): bool(r["solved"]) for r in rows}
            kinds[it] = [failure_kind(r.get("reason", "")) for r in rows]
        runs.setdefault(algorithm, {})[seed] = {"eval": info["eval"], "test": test, "kinds": kinds,
                                                "candidates": run_candidates(info),
                                                "validation_mcts": _per_problem(folder, "validation_mcts"),
                                                "test_legal_greedy": _per_problem(folder, "test_legal_greedy"),
                                                "problems": _problems_played(folder)}
    return runs


def run_candidates(info: dict[str, Any]) -> str | None:
    """The ``search.candidates`` of a study run from its ``run.json``: recorded there, or (runs from before
    it was) read from the config and overrides it records; None where neither says."""
    if "search_candidates" in info:
        return info["search_candidates"]
    if "config" not in info:
        return None
    try:  # load_config takes overrides with or without their --config. prefix
        return load_config(info["config"], [*info.get("overrides", []), *info.get("variant_overrides", [])]
                           ).search.candidates
    except (ConfigError, OSError, ValueError, AttributeError):
        return None


def policy_only(runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    """What the study's policy-only rate decodes: ``greedy`` (free generation), or greedy over the legal
    steps (``LegalStepDecoder``), which is what ``Evaluator`` runs where the search enumerates them."""
    kinds = {run["candidates"] == "enumerate" for seeds in runs.values() for run in seeds.values()}
    if kinds == {True}:
        return "greedy over the legal steps"
    if kinds == {False}:
        return "greedy"
    legal = sorted(a for a, seeds in runs.items() if any(r["candidates"] == "enumerate" for r in seeds.values()))
    return f"greedy, and greedy over the legal steps for {', '.join(legal)}, whose search enumerates them"


def different_starts(runs: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The seeds whose runs do not share one start: their iteration 0 (the seed's SFT start, evaluated
    greedily on the same test problems by every algorithm) solves different problems. A paired test
    between such runs compares two starts as well as two algorithms: an SFT retrained at another commit
    can differ by float rounding that training amplifies. ``[{"seed": s, "groups": [[algorithm, ...], ...]}]``
    (each group shares a start)."""
    out = []
    for seed in sorted({s for seeds in runs.values() for s in seeds}):
        groups: dict[str, list[str]] = {}
        for algorithm in sorted(runs):
            start = runs[algorithm].get(seed, {}).get("test", {}).get(0)
            if start is not None:
                groups.setdefault(json.dumps(sorted(start.items())), []).append(algorithm)
        if len(groups) > 1:
            out.append({"seed": seed, "groups": sorted(groups.values())})
    return out


def _problems_played(folder: str) -> dict[int, int]:
    """``{iteration: problems played in self-play up to it}`` from ``folder/metrics.jsonl`` (the self-play
    records' ``selfplay_episodes``: one episode per problem, or one group of chains for GRPO); ``{}`` where the
    run kept no metrics."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    per_iteration = {r["step"]: int(r.get("selfplay_episodes", 0)) for r in _read_rows(path)
                     if r.get("phase") == "selfplay"}
    total, out = 0, {0: 0}
    for it in sorted(per_iteration):
        total += per_iteration[it]
        out[it] = total
    return out


def _per_problem(folder: str, name: str) -> dict[int, dict[str, bool]]:
    """``{iteration: {problem: solved}}`` from ``folder/<name>_<iteration>.jsonl``."""
    out = {}
    for p in glob.glob(os.path.join(folder, f"{name}_*.jsonl")):
        it = int(os.path.basename(p)[len(name) + 1:-len(".jsonl")])
        out[it] = {json.dumps(r["problem"], sort_keys=True): bool(r["solved"]) for r in _read_rows(p)}
    return out


def _read_rows(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def search_against_start(seeds: dict[int, dict[str, Any]], key: str = "validation_mcts") -> dict[str, Any] | None:
    """Does training change what ``key`` solves (the search on validation problems by default, or
    ``test_legal_greedy``)? Its per-problem results of the last iteration against iteration 0 (the start),
    McNemar's exact test pooled over the seeds that kept them (``<key>_<it>.jsonl``); None where no seed
    has both."""
    start, last, iterations = [], [], []
    for run in seeds.values():
        search = run.get(key, {})
        if 0 not in search or max(search) == 0:
            continue
        it = max(search)
        common = sorted(set(search[0]) & set(search[it]))
        start += [search[0][k] for k in common]
        last += [search[it][k] for k in common]
        iterations.append(it)
    if not start:
        return None
    return {"iterations": iterations, "start": float(np.mean(start)), "last": float(np.mean(last)),
            **mcnemar(np.array(start), np.array(last))}


def _legal_greedy(seeds: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Legal-step greedy on the test split (``experiments/legal_step_policy.py``) over the seeds that have it:
    the rate per iteration they share, mean over seeds, and the last iteration against the start."""
    have = {seed: run for seed, run in seeds.items() if run["test_legal_greedy"]}
    if not have:
        return None
    iterations = sorted(set.intersection(*[set(run["test_legal_greedy"]) for run in have.values()]))
    per_it = []
    for it in iterations:
        rates = [float(np.mean(list(run["test_legal_greedy"][it].values()))) for run in have.values()]
        per_it.append({"iteration": it, "rate": mean_interval(rates), "rates": rates})
    return {"seeds": sorted(have), "iterations": per_it,
            "against_start": search_against_start(have, key="test_legal_greedy")}


def _paired_last(ref: dict[int, dict[str, Any]], runs: dict[int, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """``runs`` against ``ref`` on the per-problem results ``key`` at the last iteration both seeds have:
    McNemar's exact test pooled over seeds, and the per-seed differences with their t interval."""
    a, b, differences = [], [], []
    for seed, run in runs.items():
        if seed not in ref or not run.get(key) or not ref[seed].get(key):
            continue
        it = min(max(run[key]), max(ref[seed][key]))
        if it not in run[key] or it not in ref[seed][key]:
            continue
        common = sorted(set(run[key][it]) & set(ref[seed][key][it]))
        if not common:
            continue
        a += [ref[seed][key][it][k] for k in common]
        b += [run[key][it][k] for k in common]
        differences.append(float(np.mean(b[-len(common):]) - np.mean(a[-len(common):])))
    if not a:
        return None
    return {**mcnemar(np.array(a), np.array(b)), "per_seed_difference": differences,
            "difference": mean_interval(differences)}


SPENT = ("total_token_forwards", "selfplay_computed_token_forwards", "learner_token_forwards", "learner_examples")


def _at(run: dict[str, Any], it: int, key: str, default: Any = None) -> Any:
    """``key`` of ``run``'s eval record of iteration ``it`` (``default`` where it has none)."""
    return next((r.get(key, default) for r in run["eval"] if r["step"] == it), default)


def _spent(seeds: dict[int, dict[str, Any]], it: int) -> dict[str, float]:
    """What the runs spent up to iteration ``it``, mean over seeds: the token forwards of self-play (as
    computed, padding included) and of the learner, the learner's rows (replayed moves, chains or
    demonstrations, counted once per minibatch epoch), and the problems played in self-play (over the seeds
    whose metrics kept them)."""
    out = {}
    for key in SPENT:
        out[key] = float(np.mean([_at(s, it, key, 0) for s in seeds.values()]))
    played = [s["problems"][it] for s in seeds.values() if it in s.get("problems", {})]
    if played:
        out["problems_played"] = float(np.mean(played))
    return out


def _number(x: Any) -> float | None:
    """A finite float, or None (a diagnostic that was not measured, or NaN written as "nan")."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def report(results: str, *, title: str | None = None, reference: str = REFERENCE) -> dict[str, Any]:
    """Aggregates the runs present under ``results``; writes study.json, study.md and study.png there
    (``study_vs_<reference>.*`` for another reference, so the default files are not overwritten).
    Without a ``title`` the report keeps the one its earlier JSON has (a study run rewrites the report
    when it finishes).

    Paired tests compare every algorithm with ``reference`` at the last iteration both have: McNemar's
    exact test on the per-problem results pooled over the seeds both ran, and the difference in solve
    rate per seed with its t interval over seeds (the spread between seeds, which the pooled test
    ignores). They pair the policy-only results on the test split (``paired``), legal-step greedy where it
    was measured (``paired_legal_greedy``) and the search on the validation problems (``paired_search``)."""
    runs = _load_runs(results)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {results} (each writes <algorithm>/seed<s>/run.json)")
    name = "study" if reference == REFERENCE else f"study_vs_{reference}"
    if title is None:
        title = _earlier_title(os.path.join(results, f"{name}.json"))
    out: dict[str, Any] = {"title": title, "algorithms": {}, "paired": {}, "reference": reference,
                           "policy_only": policy_only(runs), "different_starts": different_starts(runs)}
    for algorithm, seeds in runs.items():
        iterations = sorted(set.intersection(*[set(s["test"]) for s in seeds.values()]))
        per_it = []
        for it in iterations:
            rates = [float(np.mean(list(s["test"][it].values()))) for s in seeds.values()]
            val = [_at(s, it, "greedy_solve_rate") for s in seeds.values()]
            search = [_at(s, it, "mcts_solve_rate") for s in seeds.values()]
            kinds = [k for s in seeds.values() for k in s["kinds"][it]]
            spent = _spent(seeds, it)
            value = {}
            for key in VALUE_DIAGNOSTICS:
                x = [_number(_at(s, it, key)) for s in seeds.values()]
                if any(v is not None for v in x):
                    value[key] = mean_interval([v for v in x if v is not None])
            per_it.append({"iteration": it, "test_greedy": mean_interval(rates), "rates": rates,
                           "outcomes": {k: kinds.count(k) / len(kinds) for k in sorted(set(kinds))},
                           "total_token_forwards": spent["total_token_forwards"], "spent": spent,
                           "validation_greedy": mean_interval([v for v in val if v is not None]),
                           "validation_mcts": mean_interval([v for v in search if v is not None]),
                           "value": value})
        out["algorithms"][algorithm] = {"seeds": sorted(seeds), "iterations": per_it,
                                        "search_against_start": search_against_start(seeds),
                                        "legal_greedy": _legal_greedy(seeds)}
    if reference in runs:
        ref = runs[reference]
        for algorithm, seeds in runs.items():
            if algorithm == reference:
                continue
            for key, field in (("test", "paired"), ("test_legal_greedy", "paired_legal_greedy"),
                               ("validation_mcts", "paired_search")):
                paired = _paired_last(ref, seeds, key)
                if paired:
                    out.setdefault(field, {})[algorithm] = {"against": reference, **paired}
    out["value_bench"] = value_bench_rows(results, reference)
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write(markdown(out))
    plot(out, os.path.join(results, f"{name}.png"))
    return out


def value_bench_rows(results: str, reference: str = REFERENCE) -> list[dict[str, Any]]:
    """The value-head measurements kept beside a study: ``RESULTS/value/seed<s>_<name>.json``, each written by
    ``alphareason bench value`` on one run's checkpoint (``<name>``: an algorithm, or ``start`` for the SFT
    start). One row per file, sorted by seed then name: the walk AUCs against ``V*`` with their intervals over
    problems, the prompt AUC against the policy-only outcome, MCTS with the learned against a constant value,
    and, where both files keep the walk states, the paired bootstrap against ``reference`` of the same seed
    (``eval.value.compare_walk_values``). Empty without a ``value`` folder."""
    from alphareason.eval.value import compare_walk_values
    reports = {}
    for path in sorted(glob.glob(os.path.join(results, "value", "seed*_*.json"))):
        m = re.fullmatch(r"seed(\d+)_(.+)\.json", os.path.basename(path))
        if m:
            with open(path) as f:
                reports[int(m.group(1)), m.group(2)] = json.load(f)
    rows = []
    for (seed, name), r in sorted(reports.items()):
        walks = r.get("walks") or {}
        intervals = walks.get("auc_intervals", {})
        row: dict[str, Any] = {"seed": seed, "name": name, "checkpoint": r.get("checkpoint"), "walks": {}}
        for group, summary in [("all", walks.get("all"))] + [(str(d), x) for d, x in walks.get("depths", {}).items()]:
            if summary and summary.get("auc_vstar") is not None:
                ci = intervals.get(group)
                row["walks"][group] = {"auc": summary["auc_vstar"], "interval": ci["interval"][0] if ci else None}
        prompt = r.get("prompt")
        if prompt and prompt.get("auc_interval"):
            row["prompt"] = {"policy": prompt["policy"], "auc": prompt["auc_interval"]["auc"][0],
                             "interval": prompt["auc_interval"]["interval"][0], "solved": int(sum(prompt["solved"]))}
        if r.get("search"):
            row["search"] = {k: r["search"][k] for k in ("simulations", "problems", "learned", "constant")}
            row["search"]["p_value"] = r["search"]["paired"]["p_value"]
        ref = reports.get((seed, reference))
        if name != reference and ref and (walks.get("states") and (ref.get("walks") or {}).get("states")):
            try:
                row["vs_reference"] = {"against": reference, **compare_walk_values(ref, r)}
            except ValueError:  # other walk states (another split or key): nothing to pair
                pass
        rows.append(row)
    return rows


def _value_bench_table(study: dict[str, Any]) -> list[str]:
    """The rows of ``value_bench_rows`` as a caption and a table (empty without them)."""
    rows = study.get("value_bench") or []
    if not rows:
        return []
    ref = study.get("reference", REFERENCE)

    def cell(x):
        if not x:
            return ""
        return f"{x['auc']:.2f}" + (f" [{x['interval'][0]:.2f}, {x['interval'][1]:.2f}]" if x.get("interval") else "")

    def paired(x):
        return "" if not x else (f"{x['difference']:+.2f} [{x['difference_interval'][0]:+.2f}, "
                                 f"{x['difference_interval'][1]:+.2f}], p = {x['p_value']:.2g}")

    lines = ["", "The value head of each measured checkpoint (`alphareason bench value` into `value/seed<s>_<name>.json`; "
             "`start`: the SFT start), on the validation problems: AUC against V* on the states of random legal walks, "
             "pooled and after step 1 and 2, with 95% intervals that resample problems (they cover the choice of "
             "problems, not of seeds); the paired difference from the reference's value of the same seed, on the same "
             "states; the prompt's AUC against whether the policy-only decoding solves the problem (positives: the "
             "problems it solves); MCTS with the learned value against a constant one.", "",
             f"| seed | checkpoint | walk AUC | after step 1 | after step 2 | vs {ref}: pooled | vs {ref}: after step 1 "
             "| prompt AUC (positives) | MCTS, learned / constant value |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, vs = r["walks"], r.get("vs_reference") or {}
        prompt = f"{cell(r['prompt'])} ({r['prompt']['solved']})" if r.get("prompt") else ""
        s = r.get("search")
        search = (f"@{s['simulations']} on {s['problems']}: {s['learned']:.1%} / {s['constant']:.1%}, "
                  f"p = {s['p_value']:.2g}") if s else ""
        lines.append(f"| {r['seed']} | {r['name']} | {cell(w.get('all'))} | {cell(w.get('1'))} | {cell(w.get('2'))} | "
                     f"{paired(vs.get('all'))} | {paired(vs.get('1'))} | {prompt} | {search} |")
    return lines


def _earlier_title(path: str) -> str:
    """The title of the report at ``path`` ("" where there is none or it does not parse)."""
    try:
        with open(path) as f:
            return str(json.load(f).get("title", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _with_interval(x: dict[str, float], form: str) -> str:
    """``mean [low, high]`` in ``form``; one seed has no interval, and shows its value alone."""
    if x["n"] < 2:
        return format(x["mean"], form)
    return f"{format(x['mean'], form)} [{format(x['low'], form)}, {format(x['high'], form)}]"


def _iteration_table(caption: str, its: int, *, before: Sequence[str], after: Sequence[str]) -> list[str]:
    """A caption and the head of a table with one column per iteration, between ``before`` and ``after``."""
    columns = ["algorithm", *before, *(f"iteration {i}" for i in range(its)), *after]
    return ["", caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _outcome_table(study: dict[str, Any]) -> list[str]:
    """How the greedy chains on the test split end (``failure_kind``), at iteration 0 and the last iteration:
    the share of problems, pooled over seeds, one column per kind that occurs."""
    ends = {name: (a["iterations"][0]["outcomes"], a["iterations"][-1]["outcomes"], a["iterations"][-1]["iteration"])
            for name, a in study["algorithms"].items() if a["iterations"] and a["iterations"][0].get("outcomes")}
    if not ends:
        return []
    order = list(dict.fromkeys(FAILURES.values())) + ["other"]
    kinds = [k for k in order if any(k in start or k in last for start, last, _ in ends.values())]
    lines = ["", "How the greedy chains on the test split end, at iteration 0 → the last iteration (the share of "
             "problems, pooled over seeds).", "",
             "| algorithm | last iteration | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
    for name, (start, last, it) in ends.items():
        cells = [f"{start.get(k, 0.0):.1%} → {last.get(k, 0.0):.1%}" for k in kinds]
        lines.append(f"| {name} | {it} | " + " | ".join(cells) + " |")
    return lines


def _compute_table(study: dict[str, Any]) -> list[str]:
    """Where each algorithm's compute went by its last iteration (``_spent``), mean over seeds."""
    rows = {name: a["iterations"][-1] for name, a in study["algorithms"].items()
            if a["iterations"] and a["iterations"][-1].get("spent")}
    if not rows:
        return []
    lines = ["", "Where the compute went by the last iteration, mean over seeds: token forwards of self-play (as "
             "computed, padding included) and of the learner, the problems played in self-play, and the rows the "
             "learner trained on (replayed moves, chains or demonstrations; each counted once per pass).", "",
             "| algorithm | last iteration | self-play | learner | learner's share | problems played | learner rows |",
             "|---|---|---|---|---|---|---|"]
    for name, x in rows.items():
        spent, total = x["spent"], x["total_token_forwards"]
        share = f"{spent['learner_token_forwards'] / total:.0%}" if total else ""
        played = f"{spent['problems_played']:,.0f}" if "problems_played" in spent else ""
        lines.append(f"| {name} | {x['iteration']} | {spent['selfplay_computed_token_forwards']:,.0f} | "
                     f"{spent['learner_token_forwards']:,.0f} | {share} | {played} | "
                     f"{spent['learner_examples']:,.0f} |")
    return lines


def _legal_table(study: dict[str, Any]) -> list[str]:
    """Legal-step greedy on the test split, where ``experiments/legal_step_policy.py`` measured it."""
    rows = {name: a["legal_greedy"] for name, a in study["algorithms"].items() if a.get("legal_greedy")}
    if not rows:
        return []
    ref = study.get("reference", REFERENCE)
    lines = ["", "The policy over legal steps (at every step the legal step the policy finds most likely; no search, "
             "no value: `experiments/legal_step_policy.py`) on the test split, mean over the seeds measured [95% t "
             "interval]; the last iteration against the start, and against the reference, McNemar's exact test "
             "pooled over seeds.", "",
             f"| algorithm | seeds | start | last | last against start | vs {ref} |", "|---|---|---|---|---|---|"]
    for name, legal in rows.items():
        first, last = legal["iterations"][0], legal["iterations"][-1]
        s = legal["against_start"]
        start = (f"{s['start']:.1%} → {s['last']:.1%}, p = {s['p_value']:.3g} ({s['a_only']} / {s['b_only']} solved "
                 f"only at the start / the last iteration)") if s else ""
        paired = study.get("paired_legal_greedy", {}).get(name)
        versus = ""
        if paired:
            d = paired["difference"]
            versus = (f"{_with_interval(d, '+.1%')} over {d['n']} seed{'s' if d['n'] > 1 else ''}; pooled p = "
                      f"{paired['p_value']:.3g}")
        lines.append(f"| {name} | {len(legal['seeds'])} | {_with_interval(first['rate'], '.1%')} (iteration "
                     f"{first['iteration']}) | {_with_interval(last['rate'], '.1%')} (iteration {last['iteration']}) "
                     f"| {start} | {versus} |")
    return lines


def _versus(study: dict[str, Any], field: str, name: str) -> str:
    """The cell of ``name`` against the reference from ``study[field]`` (``report``'s paired tests): the
    difference per seed with its interval, and the pooled McNemar test with its discordant counts."""
    paired = study.get(field, {}).get(name)
    if not paired:
        return ""
    d, ref = paired["difference"], paired["against"]
    return (f"{_with_interval(d, '+.1%')} over {d['n']} seed{'s' if d['n'] > 1 else ''}; pooled p = "
            f"{paired['p_value']:.3g} ({paired['a_only']} / {paired['b_only']} solved only by {ref} / {name})")


def markdown(study: dict[str, Any]) -> str:
    """The study as a table: test solve rate (greedy) per iteration, mean [95% interval] over seeds
    (an interval only where there are two seeds or more)."""
    lines = [f"## {study['title']}" if study["title"] else "## Self-play study", "",
             f"Policy-only ({study.get('policy_only', 'greedy')}) solve rate on the test split, mean over seeds [95% t "
             "interval]; compute is "
             "the mean total token forwards (self-play + learner, as computed) at the last iteration. Against "
             "the reference: the difference in solve rate at the last iteration, mean over seeds [95% t "
             "interval], and McNemar's exact test on the per-problem results pooled over seeds (which treats "
             "seeds as more problems and ignores their spread).", ""]
    for d in study.get("different_starts", []):
        groups = " and ".join("{" + ", ".join(g) + "}" for g in d["groups"])
        lines += [f"**Not one start in seed {d['seed']}:** {groups} start from different SFT checkpoints (their "
                  "iteration-0 test results differ), so paired tests between them compare the starts too. "
                  "Runs from a retrained start belong in a results folder of their own.", ""]
    its = max(len(a["iterations"]) for a in study["algorithms"].values())
    ref = study.get("reference", REFERENCE)
    head = ("| algorithm | seeds | " + " | ".join(f"iteration {i}" for i in range(its))
            + f" | last, per seed | compute | vs {ref} |")
    lines += [head, "|" + "---|" * (its + 5)]
    for name, a in study["algorithms"].items():
        cells = [_with_interval(x["test_greedy"], ".1%") for x in a["iterations"]] + [""] * (its - len(a["iterations"]))
        versus = _versus(study, "paired", name)
        compute = a["iterations"][-1]["total_token_forwards"] if a["iterations"] else 0
        per_seed = ", ".join(f"{r:.1%}" for r in a["iterations"][-1]["rates"]) if a["iterations"] else ""
        lines.append(f"| {name} | {len(a['seeds'])} | " + " | ".join(cells)
                     + f" | {per_seed} | {compute:,.0f} | {versus} |")
    searched = {name: a for name, a in study["algorithms"].items()
                if any(x.get("validation_mcts", {}).get("n") for x in a["iterations"])}
    if searched:
        lines += _iteration_table("The search (MCTS, the run's `selfplay.eval_simulations`) on the validation "
                                  "problems, mean over seeds [95% t interval]; last against start: McNemar's exact "
                                  "test on the per-problem results pooled over the seeds that kept them (runs from "
                                  "before they were kept have none); against the reference: the same test between "
                                  "the two algorithms at the last iteration, with the difference per seed [95% t "
                                  "interval].", its, before=(), after=("last against start", f"vs {ref}"))
        for name, a in searched.items():
            cells = [_with_interval(x["validation_mcts"], ".1%") if x["validation_mcts"]["n"] else ""
                     for x in a["iterations"]] + [""] * (its - len(a["iterations"]))
            s = a.get("search_against_start")
            versus = (f"{s['start']:.1%} → {s['last']:.1%}, p = {s['p_value']:.3g} ({s['a_only']} / {s['b_only']} "
                      f"solved only at the start / the last iteration; {len(s['iterations'])} "
                      f"seed{'s' if len(s['iterations']) > 1 else ''})") if s else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {versus} | {_versus(study, 'paired_search', name)} |")
    lines += _compute_table(study)
    lines += _outcome_table(study)
    lines += _legal_table(study)
    rows = [(name, key, a) for name, a in study["algorithms"].items() for key in VALUE_DIAGNOSTICS
            if any(key in x.get("value", {}) for x in a["iterations"])]
    if rows:
        lines += _iteration_table("The value head and the policy on held-out (validation) states, mean over seeds "
                                  "[95% t interval]: the value's AUC against exact solvability V* at the step ends "
                                  "of the policy's samples and of random legal walks (the states a search over legal "
                                  "steps visits), and at the prompt against whether greedy decoding solves the "
                                  "problem (0.5: no information); the policy's probability of writing a legal step "
                                  "next, averaged over the states.", its,
                                  before=("diagnostic",), after=())
        for name, key, a in rows:
            cells = []
            for x in a["iterations"]:
                v = x.get("value", {}).get(key)
                cells.append(_with_interval(v, ".2f") if v else "")
            cells += [""] * (its - len(a["iterations"]))
            lines.append(f"| {name} | {VALUE_DIAGNOSTICS[key]} | " + " | ".join(cells) + " |")
    lines += _value_bench_table(study)
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, a in study["algorithms"].items():
        x = [i["total_token_forwards"] for i in a["iterations"]]
        y = [i["test_greedy"]["mean"] for i in a["iterations"]]
        lo = [i["test_greedy"]["low"] for i in a["iterations"]]
        hi = [i["test_greedy"]["high"] for i in a["iterations"]]
        ax.plot(x, y, marker="o", label=f"{name} ({len(a['seeds'])} seeds)")
        ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xlabel("total compute (model token forwards: self-play + learner)")
    ax.set_ylabel(f"test solve rate, policy only ({study.get('policy_only', 'greedy')})", fontsize=9)
    ax.set_title(study["title"] or "self-play study", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
