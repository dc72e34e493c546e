"""Self-play benchmark: throughput of the loop's phases and the run's peak memory.

``alphareason bench selfplay --out FILE.json [--config.KEY=VALUE ...]`` runs
the AlphaZero loop (``train.loop.run_training``) with the default config
(``configs/countdown_tiny.py``) in a fresh temporary work dir and reports,
from that one run on this machine:

* self-play episodes/s and learner steps/s (per iteration and overall);
  with ``selfplay.algorithm=grpo`` (``--config configs/countdown_tiny_grpo.py``)
  also rollouts (chains) per second; for every algorithm the learner's
  token forwards per second (every row of every pass through the model,
  padding included) and the run's compute in token forwards;
* the fraction of the loop's wall time spent in self-play, learning,
  evaluation and checkpointing (SFT warm start reported separately);
* the peak resident memory of the process (RSS; target <= 4 GiB for the
  default config).

By default the SFT warm start is shortened (``train.steps=200``) and two
iterations are run: the phases' rates do not depend on how long SFT ran.
Pass ``--config.train.steps=600 --config.selfplay.iterations=4`` to time
exactly the README's demo.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from typing import Sequence

from alphareason.provenance import machine_info, process_code_version

DEFAULT_OVERRIDES = ("train.steps=200", "selfplay.iterations=2")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def run_selfplay_bench(out_path: str, *, config_path: str = "configs/countdown_tiny.py",
                       overrides: Sequence[str] = (), workdir: str | None = None) -> dict:
    from alphareason.config import ConfigError, load_config
    from alphareason.train.loop import run_training
    from alphareason.train.metrics import read_metrics

    config = load_config(config_path, list(DEFAULT_OVERRIDES) + list(overrides))
    if workdir is not None and os.path.isdir(workdir) and os.listdir(workdir):
        raise ConfigError(f"{workdir} is not empty: the benchmark times a whole run from scratch (a resumed run "
                         f"would time nothing); give a new --workdir or leave it out")
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="alphareason-selfplay-bench-")
    try:
        t0 = time.time()
        out = run_training(config, workdir, progress=False)
        total = time.time() - t0
        selfplay = read_metrics(workdir, "selfplay")
        evals = read_metrics(workdir, "eval")
        timing = read_metrics(workdir, "timing")
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    phases = {
        "selfplay": sum(r.get("selfplay_seconds", 0.0) for r in selfplay),
        "learning": sum(r.get("learn_seconds", 0.0) for r in selfplay),
        "evaluation": sum(r.get("eval_seconds", 0.0) for r in evals if r["step"] > 0),
        "checkpointing": sum(r.get("checkpoint_seconds", 0.0) for r in timing),
    }
    loop_seconds = sum(phases.values())
    sp = config.selfplay
    episodes = sum(r.get("selfplay_episodes", 0) for r in selfplay)
    learner_steps = sum(r.get("learner_steps", sp.learner_steps) for r in selfplay)  # GRPO: varies per iteration
    totals = evals[-1] if evals else {}
    rss = peak_rss_bytes()
    result = {
        "code": process_code_version(), "machine": machine_info(),
        "config": config_path, "overrides": list(DEFAULT_OVERRIDES) + list(overrides),
        "parameters": out["parameters"], "iterations": len(selfplay),
        "episodes_per_iteration": sp.episodes_per_iteration, "num_simulations": config.search.num_simulations,
        "num_candidates": config.search.num_candidates, "learner_steps_per_iteration": sp.learner_steps,
        "learner_batch_size": sp.learner_batch_size,
        "algorithm": sp.algorithm,
        "episodes_per_s": episodes / max(phases["selfplay"], 1e-9),
        "learner_steps_per_s": learner_steps / max(phases["learning"], 1e-9),
        "learner_tokens_per_s": totals.get("learner_token_forwards", 0) / max(phases["learning"], 1e-9),
        "selfplay_token_forwards": totals.get("selfplay_token_forwards", 0),
        "learner_token_forwards": totals.get("learner_token_forwards", 0),
        "per_iteration": [{k: r[k] for k in ("step", "selfplay_seconds", "learn_seconds", "episodes_per_s",
                                             "learner_steps_per_s", "learner_tokens_per_s", "learner_steps",
                                             "rollouts_per_s", "selfplay_solve_rate") if k in r}
                          for r in selfplay],
        "loop_seconds": loop_seconds,
        "phase_seconds": phases,
        "phase_fraction": {k: v / max(loop_seconds, 1e-9) for k, v in phases.items()},
        "initial_eval_seconds": next((r.get("eval_seconds") for r in evals if r["step"] == 0), None),
        "total_seconds": total,
        "peak_rss_bytes": rss, "peak_rss_gib": rss / 2**30, "peak_rss_target_gib": 4.0,
        "solve_rates": [{k: r[k] for k in ("step", "greedy_solve_rate", "mcts_solve_rate")} for r in evals],
        "note": "the first iteration's phases include compilation",
    }
    if sp.algorithm == "grpo":
        rollouts = sum(r.get("rollouts", 0) for r in selfplay)
        result.update(rollouts_per_s=rollouts / max(phases["selfplay"], 1e-9), group_size=config.grpo.group_size,
                      grpo={k: v for k, v in config.grpo.items()})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    rollouts = f" ({result['rollouts_per_s']:.1f} rollouts/s)" if "rollouts_per_s" in result else ""
    print(f"self-play {result['episodes_per_s']:.2f} episodes/s{rollouts}, learner {result['learner_steps_per_s']:.2f} "
          f"steps/s ({result['learner_tokens_per_s']:.0f} tokens/s); loop time: " + ", ".join(f"{k} {v:.0%}" for k, v in result["phase_fraction"].items())
          + f"; peak RSS {result['peak_rss_gib']:.2f} GiB (target <= 4)")
    return result
