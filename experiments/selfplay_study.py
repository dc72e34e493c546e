"""Self-play studies: algorithms x seeds at matched compute, reported on the test split.

  # one (algorithm, seed) at a time (resumable; results copied into RESULTS when it finishes):
  python experiments/selfplay_study.py run --config configs/countdown_tiny.py \\
      --results benchmarks/results/study/countdown_tiny --algorithms alphazero sft_only --seeds 0 1 2
  # the table, plot and paired tests from whatever runs are present:
  python experiments/selfplay_study.py report --results benchmarks/results/study/countdown_tiny

``--sft-from SEED WORKDIR`` starts a seed from an SFT run already trained
(same task, model and train config; the data config may differ and is recorded).
``alphazero`` runs first for each seed: the other algorithms are matched to
its compute (``grpo`` through ``grpo.token_budget``). Learner ablations at
equal learner steps instead: ``--unmatched --reference NAME`` with
``--variant NAME key=value ...``. See ``alphareason.train.study``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Sequence[str] | None = None) -> int:
    from alphareason.provenance import process_code_version
    from alphareason.train import study
    process_code_version()  # the code the runs start with, which their run.json records
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) algorithms x seeds of one setting")
    r.add_argument("--config", required=True, help="the setting: a config file (configs/*.py)")
    r.add_argument("--results", required=True, help="where each finished run's result files go (committed)")
    r.add_argument("--runs", default="", help="work directories (default: runs/study/<results folder name>)")
    r.add_argument("--algorithms", nargs="+", default=["alphazero", "expert_iteration", "sft_only"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--test-problems", type=int, default=1000)
    r.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an extra algorithm: NAME and its config overrides (repeatable)")
    r.add_argument("--unmatched", action="store_true",
                   help="no compute matching: every algorithm runs its config's learner steps (learner ablations)")
    r.add_argument("--reference", default="alphazero", help="the algorithm the paired tests compare with")
    r.add_argument("--sft-from", nargs=2, action="append", default=[], metavar=("SEED", "WORKDIR"),
                   help="start SEED from the SFT checkpoint of an earlier run with the same task, model and "
                        "train config (recorded in every run.json; repeatable)")
    r.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("report", help="aggregate the runs present: study.json, study.md, study.png")
    g.add_argument("--results", required=True)
    g.add_argument("--title", default=None, help="the report's heading (default: the one it has already)")
    g.add_argument("--reference", default="alphazero", help="the algorithm the paired tests compare with")
    args = p.parse_args(rest)
    if args.command == "report":
        out = study.report(args.results, title=args.title, reference=args.reference)
        print(study.markdown(out))
        return 0
    variants = {v[0]: v[1:] for v in args.variant}
    sft_from = {int(seed): workdir for seed, workdir in args.sft_from}
    runs = args.runs or os.path.join("runs", "study", os.path.basename(os.path.normpath(args.results)))
    order = sorted(args.algorithms, key=lambda a: a != study.REFERENCE)  # the reference first: others match it
    for seed in args.seeds:
        for algorithm in order:
            study.run_one(args.config, overrides, algorithm, seed, runs=runs, results=args.results,
                          variants=variants, test_problems=args.test_problems, progress=not args.no_progress,
                          matched=not args.unmatched, sft_from=sft_from.get(seed, ""))
    out = study.report(args.results, reference=args.reference)
    print(study.markdown(out))
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
