"""Does training change the policy's ranking of legal steps? Legal-step greedy on a study's test split.

Greedy decoding (the study's "policy only") writes each step token by token,
so a step the policy would never rank first among the legal ones can still
come out, and a chain can end on an illegal step (a number that is not
available, a division that is not whole). The self-play learner, though,
trains the policy's distribution over whole candidate steps. This experiment
measures the policy at that level: at every step the legal step (``Task.
legal_steps``) whose model-written tokens the policy finds most likely
(``search.decode.LegalStepDecoder``, the "policy only" of the tabula-rasa
setting), no search, no value.

For every seed of a study's work directories it evaluates the seed's SFT
start and every algorithm's last self-play checkpoint on the run's test
problems, and writes the per-problem results next to the study's own, as
``RESULTS/<algorithm>/seed<s>/test_legal_greedy_<iteration>.jsonl`` (the
start is iteration 0 of every algorithm). ``selfplay_study.py report`` then
adds them to its tables: the rate per iteration over seeds, and paired tests
of the last iteration against the start and against the reference.

  python experiments/legal_step_policy.py --runs runs/study/countdown4 \\
      --results benchmarks/results/study/countdown4 --seeds 2

A run whose search enumerates legal steps (``search.candidates=enumerate``)
is skipped: its own greedy evaluation already is legal-step greedy.

Checkpoints live only in the work directories (``runs/``, not kept), so run
it on the machine that ran the study, before they go. Files that exist are
not evaluated again.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULT = "test_legal_greedy_{}.jsonl"


def evaluate(workdir: str, phase: str, test_problems: int, out: str, log=print) -> float:
    """Legal-step greedy of ``workdir``'s ``phase`` checkpoint on its first ``test_problems`` test problems;
    writes the per-problem rows to ``out`` and returns the solve rate."""
    import jax
    import numpy as np

    from alphareason.config import apply_overrides, run_config
    from alphareason.eval.heldout import EvalSettings, Evaluator, write_results
    from alphareason.run import env_config, load_model, split_problems
    config = apply_overrides(run_config(workdir), ["search.candidates=enumerate"])
    model, task, meta = load_model(config, workdir, phase=phase)
    problems = split_problems(config, workdir, "test")[:test_problems]
    if len(problems) < test_problems:
        raise ValueError(f"{workdir} has {len(problems)} test problems, fewer than --test-problems={test_problems}")
    t0 = time.time()
    settings = EvalSettings(strategy="greedy", batch_size=min(config.eval.batch_size, len(problems)),
                            env=env_config(config))
    rows = Evaluator(model, task, settings).run(problems, jax.random.key(config.seed + 99))
    write_results(rows, out)
    rate = float(np.mean([r["solved"] for r in rows]))
    log(f"{workdir} ({phase}, iteration {meta.get('iteration', 0)}): legal-step greedy {rate:.1%} of "
        f"{len(rows)} test problems ({time.time() - t0:.0f} s)")
    return rate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="the study's work directories (runs/study/<name>)")
    p.add_argument("--results", required=True, help="the study's results folder (the files go next to its own)")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--test-problems", type=int, default=1000)
    args = p.parse_args(argv)
    from alphareason.checkpoint import Checkpointer
    from alphareason.config import run_config
    from alphareason.run import checkpoint_dir
    for seed in args.seeds:
        seed_dir = os.path.join(args.runs, f"seed{seed}")
        algorithms = sorted(os.path.relpath(d, seed_dir).split(os.sep)[0]  # <algorithm>/checkpoints/selfplay
                            for d in glob.glob(os.path.join(seed_dir, "*", "checkpoints", "selfplay")))
        algorithms = [a for a in algorithms if os.path.isdir(os.path.join(args.results, a, f"seed{seed}"))]
        if not algorithms:
            raise FileNotFoundError(f"no finished self-play run of seed {seed} under {seed_dir} with results in "
                                    f"{args.results}: run the study first")
        start = None
        for algorithm in algorithms:
            workdir = os.path.join(seed_dir, algorithm)
            if run_config(workdir).search.candidates == "enumerate":
                print(f"{workdir}: its search enumerates legal steps, so the study's own greedy evaluation "
                      f"(test_greedy_*.jsonl) already is legal-step greedy; nothing to add")
                continue
            folder = os.path.join(args.results, algorithm, f"seed{seed}")
            first = os.path.join(folder, RESULT.format(0))
            if not os.path.exists(first):
                if start is None:  # the seed's SFT start: the same checkpoint in every algorithm's work directory
                    start = first
                    evaluate(workdir, "sft", args.test_problems, first)
                else:
                    shutil.copy(start, first)
            else:
                start = start or first
            iteration = Checkpointer(checkpoint_dir(workdir, "selfplay")).latest_step()  # saved at its iteration
            last = os.path.join(folder, RESULT.format(iteration))
            if not os.path.exists(last):
                evaluate(workdir, "selfplay", args.test_problems, last)
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
