"""Test-time compute scaling (Snell et al. 2024, in miniature): strategies x budgets x difficulty.

The study itself is ``alphareason.eval.scaling`` (also ``alphareason
scaling``); this script is its command line:

  python experiments/test_time_scaling.py --config configs/scaling_reduced.py --out runs/scaling_reduced --train
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Sequence[str] | None = None) -> int:
    from alphareason.config import load_config
    from alphareason.eval.scaling import parse_workdirs, run_scaling
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if not a.startswith("--config.")]
    overrides = [a for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/scaling_reduced.py")
    p.add_argument("--out", required=True)
    p.add_argument("--train", action="store_true", help="train (or resume) a small SFT model per task first")
    p.add_argument("--workdir", action="append", default=[], help="TASK=DIR: use this trained run for TASK")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(rest)
    config = load_config(args.config, overrides)
    run_scaling(config, args.out, train=args.train, workdirs=parse_workdirs(args.workdir),
                progress=not args.no_progress, command="python experiments/test_time_scaling.py " + " ".join(argv))
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any work; see alphareason/host_memory.py
    sys.exit(main())
