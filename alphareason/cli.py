"""The ``alphareason`` command: parses flags and configs, calls the libraries.

  alphareason train  --config configs/countdown_tiny.py --workdir runs/demo [--config.train.steps=200]
  alphareason eval   --workdir DIR [--problems FILE.jsonl] --strategy greedy|sample|mcts [--out results.jsonl]
  alphareason verify --task countdown FILE.jsonl
  alphareason search --workdir DIR --problem "4 9 10 13 -> 24" [--json tree.json]
  alphareason data build --task countdown --size N [--data-dir DIR]
  alphareason tree tree.json [more.json ...] [--html out.html] [--svg out.svg] [--min-visits N]
  alphareason bench model|search|selfplay|value|scale|scoring --out FILE.json
  alphareason scaling --config configs/scaling_reduced.py --out DIR [--train] [--workdir TASK=DIR]

Multi-process runs (``train``, ``eval``): start the same command on every
host with ``--coordinator-address HOST:PORT --num-processes N --process-id I``
(or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); on Cloud TPU pod slices, SLURM and Open MPI no flag is
needed (docs/scaling.md).

Errors a user can cause are printed as one clear line (exit status 2), not as
a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from alphareason.config import ConfigError


class UsageError(Exception):
    """A mistake in the command line, input files or workdir: printed without a traceback."""


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for a in argv:
        (overrides if a.startswith("--config.") else rest).append(a)
    return rest, overrides


def _task_options(pairs: Sequence[str]) -> dict:
    import ast
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise UsageError(f"--option {p!r} must look like name=value (e.g. num_numbers=4)")
        k, v = p.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _workdir_config(workdir: str, overrides: Sequence[str] = ()):
    from alphareason.config import apply_overrides, run_config
    return apply_overrides(run_config(workdir), overrides)


def _start_processes(args, config) -> None:
    """Joins a multi-process run when the flags or the environment describe one (before any device is used)."""
    from alphareason import parallel
    parallel.initialize_distributed(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                    process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout,
                                    fingerprint=parallel.fingerprint(config.to_dict()))


# ------------------------------------------------------------------ commands
def cmd_train(args, overrides) -> int:
    from alphareason.config import load_config
    from alphareason.train.loop import run_training
    config = load_config(args.config, overrides)
    _start_processes(args, config)
    run_training(config, args.workdir, progress=not args.no_progress)
    return 0


def _eval_settings(config, args):
    from alphareason.eval import EvalSettings
    from alphareason.run import env_config, search_config, traces
    return EvalSettings(strategy=args.strategy, samples=args.samples, temperature=args.temperature,
                        batch_size=args.batch_size, env=env_config(config),
                        search=search_config(config, num_simulations=args.simulations, policy=args.policy),
                        traces=traces(config))


def cmd_eval(args, overrides) -> int:
    import jax
    from alphareason.eval import Evaluator, format_table, summary, write_results
    from alphareason.run import load_model, split_problems
    from alphareason.tasks import read_problems
    from alphareason import parallel
    from alphareason.run import make_mesh
    config = _workdir_config(args.workdir, overrides)
    _start_processes(args, config)
    mesh = make_mesh(config)
    model, task, meta = load_model(config, args.workdir, mesh=mesh, phase=args.phase)
    if args.problems:
        problems = read_problems(args.problems, task)
        source = args.problems
    else:
        problems = split_problems(config, args.workdir, args.split)
        source = f"held-out {args.split} split"
    if args.limit:
        problems = problems[: args.limit]
    evaluator = Evaluator(model, task, _eval_settings(config, args), mesh=mesh)
    rows = evaluator.run(problems, jax.random.key(args.seed))
    if not parallel.is_main_process():  # every process has every row; process 0 reports them
        return 0
    title = (f"{args.strategy} on {len(problems)} problems from {source} "
             f"(checkpoint: {meta.get('phase', '?')} step {meta.get('step', '?')})")
    print(format_table(rows, title=title))
    if args.out:
        write_results(rows, args.out)
        print(f"wrote {len(rows)} results to {args.out}")
    print(json.dumps(summary(rows)))
    return 0


def _get_task(name: str, options: dict):
    """``tasks.get_task`` with an unknown task or option reported as a usage error."""
    from alphareason.tasks import get_task
    try:
        return get_task(name, **options)
    except ValueError as e:
        raise UsageError(f"--task {name}: {e}") from None


def cmd_verify(args, overrides) -> int:
    from alphareason.tasks import ProblemError
    task = _get_task(args.task, _task_options(args.option))
    expected = ("give the JSONL that `alphareason eval --out` wrote "
                "(one JSON object with 'problem' and 'solution' per line)")
    if not os.path.exists(args.file):
        raise UsageError(f"{args.file}: no such results file; {expected}")
    if os.path.isdir(args.file):
        raise UsageError(f"{args.file} is a directory; {expected}")
    failures, claimed_failures, total = 0, 0, 0
    with open(args.file) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            where = f"{args.file} line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object")
            if "problem" not in obj or "solution" not in obj:
                raise UsageError(f"{where}: needs fields 'problem' and 'solution' (the format `alphareason eval "
                                 f"--out` writes); found {sorted(obj)}")
            try:
                problem = task.validate_problem(obj["problem"], where=where)
            except ProblemError as e:
                raise UsageError(str(e))
            verdict = task.verify(problem, obj["solution"])
            claimed = obj.get("solved")
            mark = "ok  " if verdict.solved else "FAIL"
            if not verdict.solved:
                failures += 1
                if claimed:
                    claimed_failures += 1
                    mark = "LIED"
            print(f"{line_no:>5} {mark} {task.prompt(problem).strip():<24} {verdict.reason}")
    if total == 0:
        raise UsageError(f"{args.file} holds no results (no non-empty line); {expected}")
    print(f"{total} lines: {total - failures} solved, {failures} not solved, "
          f"{claimed_failures} claimed solved but failed verification")
    return 1 if claimed_failures else 0


def cmd_search(args, overrides) -> int:
    import jax
    from flax import nnx

    from alphareason.run import load_model
    from alphareason.search.episodes import EpisodeRunner
    from alphareason.search.mcts import Searcher
    from alphareason.search.tree import export_tree
    from alphareason.tasks import ProblemError
    from alphareason.viz.text import format_tree
    config = _workdir_config(args.workdir, overrides)
    model, task, _ = load_model(config, args.workdir)
    try:
        problem = task.parse_problem(args.problem, where="--problem")
    except ProblemError as e:
        raise UsageError(str(e))
    settings = _eval_settings(config, argparse.Namespace(
        strategy="mcts", samples=1, temperature=0.7, batch_size=1, policy=args.policy, simulations=args.simulations))
    graphdef, params = nnx.split(model)
    searcher = Searcher(task, graphdef, settings.env, settings.search, seq_len=model.config.max_len, keep_tree=True)
    key = jax.random.key(args.seed)
    inputs = jax.tree.map(jax.numpy.asarray, searcher.env.initial([problem]))
    first = searcher(params, jax.random.fold_in(jax.random.fold_in(key, 0), 0)[None], inputs)
    tree = export_tree(first, 0, task=task, problem=problem, policy=settings.search.policy)
    episode = EpisodeRunner(searcher).run(params, [problem], key, record=False)
    verdict = episode.verdicts[0]
    print(f"problem: {task.prompt(problem).strip()}   policy: {settings.search.policy}, "
          f"{settings.search.num_simulations} simulations per move")
    print("solution:")
    print("  " + (episode.texts[0].rstrip("\n").replace("\n", "\n  ") or "(no steps)"))
    print(f"verdict: {'SOLVED' if verdict.solved else 'not solved'} - {verdict.reason}")
    print(f"compute: {int(episode.token_forwards[0])} model token forwards")
    print("\nfirst search tree (top levels):")
    print(format_tree(tree, depth=args.depth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tree, f, indent=1)
        print(f"wrote the tree to {args.json} (view it: alphareason tree {args.json} --html tree.html)")
    return 0 if verdict.solved else 1


def cmd_tree(args, overrides) -> int:
    from alphareason.viz.cli import tree_main
    return tree_main(args.path, html=args.html, svg=args.svg, dot=args.dot, depth=args.depth, top=args.top,
                     min_visits=args.min_visits)


def cmd_data(args, overrides) -> int:
    from alphareason.data import build_dataset, make_spec
    from alphareason.tasks import read_problems
    task_options = _task_options(args.option)
    task = _get_task(args.task, task_options)
    for flag, value in (("--size", args.size), ("--heldout", args.heldout)):
        if value < 0:
            raise UsageError(f"{flag} {value}: the number of problems must be >= 0")
    exclude = ()
    if args.exclude:
        exclude = tuple(json.dumps(p, sort_keys=True) for p in read_problems(args.exclude, task))
    spec = make_spec(args.task, task_options, train_size=args.size, validation_size=args.heldout,
                     test_size=args.heldout, seed=args.seed, demonstrations=args.demonstrations, exclude=exclude)
    builder = build_dataset(spec, args.data_dir)
    for split, info in builder.info.splits.items():
        print(f"{split:>10}: {info.num_examples} examples")
    print(f"written to {builder.data_dir}")
    return 0


def cmd_bench(args, overrides) -> int:
    if args.what == "model":
        from alphareason.bench.model_bench import run_model_bench
        result = run_model_bench(args.out, quick=args.quick, overrides=overrides)
    elif args.what == "search":
        from alphareason.bench.search_bench import run_search_bench
        result = run_search_bench(args.out, quick=args.quick, workdir=args.workdir, overrides=overrides)
    elif args.what == "value":
        from alphareason.bench.value_bench import format_compare, format_report, run_value_bench, run_value_compare
        if args.compare:
            for path in args.compare:
                if not os.path.isfile(path):
                    raise UsageError(f"--compare {path}: no such file (a JSON result of `alphareason bench value`)")
            try:
                result = run_value_compare(args.out, *args.compare)
            except ValueError as e:
                raise UsageError(str(e)) from None
            print(format_compare(result))
            return 0
        if not args.workdir:
            raise UsageError("bench value needs --workdir: the trained run whose value head to measure")
        if args.search_simulations < 0:
            raise UsageError(f"--search-simulations {args.search_simulations}: must be >= 0 (0: no search)")
        result = run_value_bench(args.out, workdir=args.workdir, problems=args.problems or 200, overrides=overrides,
                                 search_simulations=args.search_simulations, phase=args.phase)
        print(format_report(result))
        return 0
    elif args.what == "scoring":
        from alphareason.bench.scoring_bench import run_scoring_bench
        result = run_scoring_bench(args.out, quick=args.quick, config_path=args.config or "configs/countdown4.py",
                                   overrides=overrides)
    elif args.what == "scale":
        from alphareason.bench.scale_bench import run_scale_bench
        result = run_scale_bench(args.out, quick=args.quick, overrides=overrides)
    else:
        from alphareason.bench.selfplay_bench import run_selfplay_bench
        result = run_selfplay_bench(args.out, config_path=args.config or "configs/countdown_tiny.py",
                                    overrides=overrides, workdir=args.workdir)
    print(json.dumps(result, indent=1, default=str)[:4000])
    return 0


def cmd_scaling(args, overrides) -> int:
    """Test-time compute scaling (``alphareason.eval.scaling``): strategies x budgets x difficulty."""
    from alphareason.config import load_config
    from alphareason.eval import scaling
    config = load_config(args.config, overrides)
    try:
        workdirs = scaling.parse_workdirs(args.workdir)
        scaling.check_config(config, workdirs=workdirs)
    except ValueError as e:
        raise UsageError(str(e))
    scaling.run_scaling(config, args.out, train=args.train, workdirs=workdirs, progress=not args.no_progress,
                        command="alphareason " + " ".join(sys.argv[1:]))
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphareason", description=__doc__.split("\n")[0],
                                epilog="Config overrides: --config.SECTION.KEY=VALUE (e.g. --config.train.steps=200)")
    sub = p.add_subparsers(dest="command", required=True)

    processes = argparse.ArgumentParser(add_help=False)
    g = processes.add_argument_group("multi-process run (docs/scaling.md)")
    g.add_argument("--coordinator-address", help="HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="processes in the run (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process counts as dead and the others stop (default 100)")

    t = sub.add_parser("train", help="SFT warm start, then AlphaZero self-play iterations (resumable)",
                       parents=[processes])
    t.add_argument("--config", default="configs/countdown_tiny.py")
    t.add_argument("--workdir", required=True)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate the newest checkpoint of a run", parents=[processes])
    e.add_argument("--workdir", required=True)
    e.add_argument("--problems", help="JSONL problem file (default: the held-out split)")
    e.add_argument("--split", default="validation", choices=["validation", "test"])
    e.add_argument("--strategy", default="greedy", choices=["greedy", "sample", "mcts"],
                   help="budgeted test-time strategies (best-of-N, beam, ...): alphareason scaling")
    e.add_argument("--samples", type=int, default=8)
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--simulations", type=int, default=0, help="MCTS simulations per move (default: config)")
    e.add_argument("--policy", choices=["gumbel", "puct"], default=None)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--phase", choices=["selfplay", "sft"],
                   help="the run's newest checkpoint of this phase (default: self-play if present, else SFT)")
    e.add_argument("--out", help="results JSONL (one line per problem)")
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("verify", help="re-check the solutions in a results file with the exact verifier")
    v.add_argument("--task", required=True)
    v.add_argument("--option", action="append", help="task option name=value (repeatable)")
    v.add_argument("file")
    v.set_defaults(fn=cmd_verify)

    s = sub.add_parser("search", help="search one problem and show the tree")
    s.add_argument("--workdir", required=True)
    s.add_argument("--problem", required=True,
                   help='the problem, as the task reads it: "4 9 10 13 -> 24" or a JSON object as in a problem file')
    s.add_argument("--simulations", type=int, default=0)
    s.add_argument("--policy", choices=["gumbel", "puct"], default=None)
    s.add_argument("--depth", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="write the first move's search tree as JSON")
    s.set_defaults(fn=cmd_search)

    from alphareason.viz.cli import add_arguments as add_tree_arguments
    tr = sub.add_parser("tree", help="show saved search trees; write HTML (side by side) / SVG / DOT")
    add_tree_arguments(tr)
    tr.set_defaults(fn=cmd_tree)

    d = sub.add_parser("data", help="build datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    db = dsub.add_parser("build", help="build a TFDS (array_record) dataset of problems and demonstrations")
    db.add_argument("--task", required=True)
    db.add_argument("--option", action="append", help="task option name=value (repeatable)")
    db.add_argument("--size", type=int, required=True)
    db.add_argument("--heldout", type=int, default=200, help="problems in each held-out split")
    db.add_argument("--seed", type=int, default=0)
    db.add_argument("--demonstrations", default="solutions", choices=["solutions", "traces"])
    db.add_argument("--exclude", help="JSONL of problems that must not appear")
    db.add_argument("--data-dir", default="data")
    db.set_defaults(fn=cmd_data)

    b = sub.add_parser("bench", help="benchmarks that write JSON results")
    b.add_argument("what", choices=["model", "search", "selfplay", "value", "scale", "scoring"])
    b.add_argument("--problems", type=int, default=0, help="value: held-out problems to sample states from (200)")
    b.add_argument("--search-simulations", type=int, default=0,
                   help="value: also MCTS with this many simulations (the issue's 64) on 500 held-out problems, "
                        "with the learned value and with a constant one")
    b.add_argument("--phase", choices=["selfplay", "sft"],
                   help="value: the run's newest checkpoint of this phase (default: self-play if present, else SFT)")
    b.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="value: instead of measuring, compare two `bench value` results' walk AUCs on the same "
                        "states (paired bootstrap over problems: B minus A, its 95%% interval and p)")
    b.add_argument("--out", required=True)
    b.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    b.add_argument("--config", help="selfplay: the experiment config (default configs/countdown_tiny.py; "
                                    "configs/countdown_tiny_grpo.py for GRPO); scoring: the model and task "
                                    "(default configs/countdown4.py)")
    b.add_argument("--workdir", help="search: time the search with this trained run's model (default: untrained); "
                                      "selfplay: keep the run in this new directory (default: a temporary one)")
    b.set_defaults(fn=cmd_bench)

    sc = sub.add_parser("scaling", help="test-time compute scaling: strategies x budgets x difficulty (Snell et al.)")
    sc.add_argument("--config", default="configs/scaling_reduced.py", help="configs/scaling_reduced.py or scaling_full.py")
    sc.add_argument("--out", required=True, help="output directory: scaling.md, scaling.json, plots, results")
    sc.add_argument("--train", action="store_true", help="train (or resume) a small SFT model per task in OUT/<task>")
    sc.add_argument("--workdir", action="append", default=[], help="TASK=DIR: evaluate this trained run (repeatable)")
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(fn=cmd_scaling)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the command itself, not a call from Python: may restart with huge pages
        from alphareason.host_memory import reexec_with_huge_pages
        reexec_with_huge_pages()
    from alphareason.provenance import process_code_version
    process_code_version()  # the code this command starts with, which its results record
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    from alphareason.tasks import ProblemError
    from alphareason.checkpoint import CheckpointError
    from alphareason.parallel import DistributedError
    try:
        return args.fn(args, overrides)
    except (UsageError, ConfigError, ProblemError, CheckpointError, DistributedError, FileNotFoundError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library wrote
        print(f"alphareason {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nalphareason {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
