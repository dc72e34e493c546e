"""Does the self-play learner over-fit its replay? Held-out moves while it trains on a finished run's data.

The loop's learner draws ``learner_steps x learner_batch_size`` moves per
iteration from a replay that gained ``episodes_per_iteration`` episodes of
new moves: on Countdown-4 (``configs/countdown4.py``) 100 x 64 = 6,400 draws
from 768 new moves, 8.3 per move in the first iteration. This experiment
takes the replay of a finished AlphaZero run, holds out the moves of a
random quarter of the first iteration's problems (never trained on), and
trains from the run's SFT start, with the run's own learner (loss,
optimizer and its schedule, batch size), on

* ``iteration1``: the first iteration's other moves (the data the run's
  first learner phase had, less the held-out quarter);
* ``all_iterations``: those and every later iteration's moves of the other
  problems (3-4x the data; the later moves come from later policies).

Every ``--every`` steps it measures the learner's loss terms on the held-out
moves and on as many training moves (a fixed sample), and at the start, the
middle and the end greedy decoding (policy only) and optionally MCTS on the
run's validation problems, per problem. A held-out loss that rises while
the training loss falls is over-fitting; the two arms tell whether more
distinct data (lower reuse) removes it.

  python experiments/sample_reuse.py run --source runs/study/countdown4/seed0/alphazero \\
      --results benchmarks/results/sample_reuse/countdown4
  python experiments/sample_reuse.py report --results benchmarks/results/sample_reuse/countdown4

``run`` writes ``RESULTS/<arm>.json`` for each arm as it finishes and skips
arms whose file exists; ``report`` writes ``sample_reuse.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARMS = ("iteration1", "all_iterations")
MOVE_KEYS = ("tokens", "length", "candidates", "cand_valid", "action_weights", "cand_log_inclusion",
             "search_value", "outcome", "td_lambda")
CURVE_KEYS = ("loss", "policy_loss", "value_loss", "target_agreement", "policy_entropy", "value_brier")


def prompt_keys(tokens: np.ndarray, length: np.ndarray) -> list[str]:
    """The problem of each move: its text up to the end of the prompt's line. tokens int32[N, T], length int32[N]."""
    from alphareason import tokenizer as tok
    keys = []
    for t, n in zip(tokens, length):
        text = tok.decode(t[:n])
        if "\n" not in text:
            raise ValueError(f"a replayed state has no complete prompt line: {text!r}")
        keys.append(text[: text.index("\n") + 1])
    return keys


def iteration_bounds(source: str, record: str = "replay_size") -> list[tuple[int, int]]:
    """[(first, end)] replay rows of each self-play iteration, from the run's ``replay_size`` records
    (``replay_trajectories``: the rows of the solved-trajectory ring)."""
    from alphareason.train.metrics import read_metrics
    sizes = [int(r[record]) for r in sorted(read_metrics(source, "selfplay"), key=lambda r: r["step"])]
    if not sizes:
        raise ValueError(f"{source} has no self-play iterations in its metrics.jsonl")
    return list(zip([0] + sizes[:-1], sizes))


def load_replay(config, source: str, task, seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The replayed moves and solved trajectories of ``source``'s newest self-play checkpoint, oldest first
    (refused if the moves wrapped; the trajectories are returned only if they did not)."""
    from alphareason.checkpoint import Checkpointer
    from alphareason.run import checkpoint_dir, env_config
    from alphareason.search.env import ReasoningEnv
    from alphareason.train.replay import ReplayBuffer
    sp = config.selfplay
    K = ReasoningEnv(task, None, env_config(config), seq_len=seq_len).num_candidates
    replay = ReplayBuffer(sp.replay_capacity, seq_len=seq_len, num_candidates=K, step_len=task.max_step_len,
                          value_lambda=sp.value_lambda)
    items, _ = Checkpointer(checkpoint_dir(source, "selfplay")).restore_items({"replay": replay.restore_template})
    replay.load_state_dict(items["replay"])
    if replay.counters[0] > replay.capacity:
        raise ValueError(f"{source}'s replay overwrote its oldest moves ({int(replay.counters[0])} added, capacity "
                         f"{replay.capacity}); the first iteration's moves are gone")
    wrapped = replay.counters[2] > replay.traj_capacity
    trajectories = {} if wrapped else {k: v[: replay.num_trajectories] for k, v in replay.trajectories.items()}
    return {k: v[: replay.size] for k, v in replay.moves.items()}, trajectories


def split_moves(moves: dict[str, np.ndarray], bounds: list[tuple[int, int]], *, held_fraction: float,
                seed: int) -> dict[str, np.ndarray]:
    """Row indices: ``held`` (all moves of a random ``held_fraction`` of the first iteration's problems),
    ``iteration1`` (the first iteration's other moves), ``all_iterations`` (every move whose problem is not held)."""
    keys = prompt_keys(moves["tokens"], moves["length"])
    first = sorted(set(keys[bounds[0][0]: bounds[0][1]]))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(first, size=max(1, int(round(held_fraction * len(first)))), replace=False).tolist())
    is_held = np.array([k in held for k in keys])
    rows = np.arange(len(keys))
    in_first = rows < bounds[0][1]
    return {"held": rows[is_held & in_first], "iteration1": rows[~is_held & in_first], "all_iterations": rows[~is_held],
            "held_problems": len(held), "first_problems": len(first),
            "held_seen_later": int(np.sum(is_held & ~in_first))}


def _batches(moves, rows: np.ndarray, batch_size: int):
    """``rows`` in batches of ``batch_size``, the last one shorter where they do not divide."""
    for i in range(0, len(rows), batch_size):
        yield {k: moves[k][rows[i: i + batch_size]] for k in MOVE_KEYS}


def run_arm(source: str, arm: str, *, steps: int, every: int, held_fraction: float, val_problems: int,
            mcts_problems: int, seed: int, overrides: Sequence[str] = (), log=print) -> dict[str, Any]:
    import jax
    from flax import nnx

    from alphareason.config import apply_overrides, run_config
    from alphareason.run import load_model, make_optimizer, split_problems
    from alphareason.train.loop import learner_objective, make_evaluator, make_learner_step, sft_batch_from_trajectories
    from alphareason.train.study import failure_kind
    config = apply_overrides(run_config(source), [f"selfplay.{o}" for o in overrides])
    sp = config.selfplay
    if sp.algorithm != "alphazero":
        raise ValueError(f"{source} is a {sp.algorithm} run; this experiment replays an alphazero run's moves")
    model, task, _ = load_model(config, source, phase="sft")
    seq_len = model.config.max_len
    moves, trajectories = load_replay(config, source, task, seq_len)
    bounds = iteration_bounds(source)
    split = split_moves(moves, bounds, held_fraction=held_fraction, seed=seed)
    train_rows, held_rows = split[arm], split["held"]
    traj_rows = None
    if sp.sft_weight > 0:  # the SFT term: the arm's solved trajectories, the held-out problems' left out
        if not trajectories:
            raise ValueError(f"{source}'s replay overwrote its oldest solved trajectories; no SFT term possible")
        held = set(prompt_keys(moves["tokens"][held_rows], moves["length"][held_rows]))
        keys = prompt_keys(trajectories["tokens"], trajectories["length"])
        end = iteration_bounds(source, "replay_trajectories")[0][1] if arm == "iteration1" else len(keys)
        traj_rows = np.array([i for i, k in enumerate(keys[:end]) if k not in held])
    B = sp.learner_batch_size
    rng = np.random.default_rng([seed, 1])
    probe_rows = rng.choice(train_rows, size=min(len(train_rows), len(held_rows)), replace=False)
    optimizer = make_optimizer(model, learning_rate=sp.learning_rate, steps=max(sp.iterations * sp.learner_steps, 2),
                               warmup_steps=min(50, sp.learner_steps), weight_decay=config.train.weight_decay,
                               grad_clip=config.train.grad_clip)
    graphdef, state = nnx.split((model, optimizer))
    step_fn = make_learner_step(graphdef, config, task)
    objective = learner_objective(config, task)
    measure = jax.jit(lambda state, batch: objective(nnx.merge(graphdef, state)[0], batch)[1])

    def losses(rows):  # the mean over rows (each batch's metrics are its rows' means)
        batches = list(_batches(moves, rows, B))
        out = [jax.device_get(measure(state, b)) for b in batches]
        sizes = [len(b["tokens"]) for b in batches]
        return {k: float(np.average([o[k] for o in out], weights=sizes)) for k in CURVE_KEYS if k in out[0]}

    validation = split_problems(config, source, "validation")
    key = jax.random.key(config.seed + 99)  # the loop's evaluation key
    evaluators = {name: (make_evaluator(model, task, config, name, min(n, 200)), n)
                  for name, n in (("greedy", val_problems), ("mcts", mcts_problems)) if n}

    def evaluate():
        out = {}
        for name, (evaluator, n) in evaluators.items():
            evaluator.set_params(nnx.merge(graphdef, state)[0])
            rows = evaluator.run(validation[:n], key)
            out[name] = {"solve_rate": float(np.mean([r["solved"] for r in rows])),
                         "solved": [bool(r["solved"]) for r in rows],
                         "outcomes": [failure_kind(r.get("reason", "")) for r in rows]}
        return out

    t0 = time.time()
    curve, evals = [], {}
    eval_at = sorted({0, steps // 2, steps})
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve.append({"step": step, "train": losses(probe_rows), "held": losses(held_rows)})
            log(f"{arm} step {step}: policy loss train {curve[-1]['train']['policy_loss']:.3f} held "
                f"{curve[-1]['held']['policy_loss']:.3f}; value loss train {curve[-1]['train']['value_loss']:.3f} "
                f"held {curve[-1]['held']['value_loss']:.3f} ({time.time() - t0:.0f} s)")
        if step in eval_at:
            evals[step] = evaluate()
            log(f"{arm} step {step}: " + ", ".join(f"{k} {v['solve_rate']:.1%}" for k, v in evals[step].items()))
        if step == steps:
            break
        idx = rng.choice(train_rows, size=B)
        batch = {k: moves[k][idx] for k in MOVE_KEYS}
        if traj_rows is not None:
            t = rng.choice(traj_rows, size=B)
            batch["sft"] = sft_batch_from_trajectories(task, {k: v[t] for k, v in trajectories.items()})
        state, _ = step_fn(state, batch)
    return {"arm": arm, "overrides": list(overrides), "source": os.path.abspath(source), "steps": steps, "batch_size": B,
            "learning_rate": sp.learning_rate, "train_moves": len(train_rows), "held_moves": len(held_rows),
            "draws_per_train_move": steps * B / len(train_rows),
            "train_solved_trajectories": 0 if traj_rows is None else len(traj_rows),
            "held_problems": split["held_problems"], "first_iteration_problems": split["first_problems"],
            "held_problem_moves_in_later_iterations": split["held_seen_later"],
            "iteration_moves": [b - a for a, b in bounds], "validation_problems": val_problems,
            "mcts_problems": mcts_problems, "eval_simulations": sp.eval_simulations,
            "curve": curve, "evals": {str(k): v for k, v in evals.items()}, "seconds": time.time() - t0,
            "seed": seed}


def report(results: str) -> str:
    from alphareason.eval.stats import mcnemar
    arms = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json")), key=lambda p: (os.path.getmtime(p), p)):
        with open(path) as f:
            arms[os.path.basename(path)[:-len(".json")]] = json.load(f)
    if not arms:
        raise FileNotFoundError(f"no arm results under {results} (run first)")
    lines = ["## Does the learner over-fit its replay?", "",
             "The learner of an AlphaZero run trained again from its SFT start on that run's replayed moves; loss "
             "terms on held-out moves (problems never trained on) and on as many training moves. "
             "`python experiments/sample_reuse.py run`, see its docstring.", "",
             "| arm | training moves | draws per move | step | policy loss train / held | value loss train / held "
             "| target agreement train / held |", "|---|---:|---:|---:|---|---|---|"]
    for name, a in arms.items():
        for row in a["curve"]:
            t, h = row["train"], row["held"]
            lines.append(f"| {name} | {a['train_moves']} | {a['draws_per_train_move']:.1f} | {row['step']} | "
                         f"{t['policy_loss']:.3f} / {h['policy_loss']:.3f} | {t['value_loss']:.3f} / "
                         f"{h['value_loss']:.3f} | {t['target_agreement']:.2f} / {h['target_agreement']:.2f} |")
    lines += ["", "Validation solve rates at the start, middle and end of each arm; the end against the start: "
              "McNemar's exact test on the same problems.", "", "| arm | strategy | problems | "
              "solve rate by step | end against start |", "|---|---|---:|---|---|"]
    for name, a in arms.items():
        steps = sorted(a["evals"], key=int)
        for strategy in a["evals"][steps[0]]:
            rates = ", ".join(f"{s}: {a['evals'][s][strategy]['solve_rate']:.1%}" for s in steps)
            test = mcnemar(np.array(a["evals"][steps[0]][strategy]["solved"]),
                           np.array(a["evals"][steps[-1]][strategy]["solved"]))
            lines.append(f"| {name} | {strategy} | {len(a['evals'][steps[0]][strategy]['solved'])} | {rates} | "
                         f"p = {test['p_value']:.3g} ({test['a_only']} / {test['b_only']} solved only at the start "
                         f"/ the end) |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results, "sample_reuse.md"), "w") as f:
        f.write(text)
    _plot(arms, os.path.join(results, "sample_reuse.png"))
    return text


def _plot(arms: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, term in zip(axes, ("policy_loss", "value_loss")):
        for i, (name, a) in enumerate(arms.items()):
            x = [r["step"] for r in a["curve"]]
            ax.plot(x, [r["train"][term] for r in a["curve"]], color=f"C{i}", ls="--", label=f"{name}, training")
            ax.plot(x, [r["held"][term] for r in a["curve"]], color=f"C{i}", label=f"{name}, held out")
        ax.set_xlabel("learner step")
        ax.set_ylabel(term.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--source", required=True, help="a finished alphazero self-play run (its work directory)")
    r.add_argument("--results", required=True)
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--steps", type=int, default=0, help="learner steps (default: the run's learner_steps)")
    r.add_argument("--every", type=int, default=10, help="measure the held-out loss every this many steps")
    r.add_argument("--held-fraction", type=float, default=0.25)
    r.add_argument("--validation-problems", type=int, default=200)
    r.add_argument("--mcts-problems", type=int, default=0, help="validation problems searched (0: none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--learner", nargs="+", default=[], metavar="KEY=VALUE",
                   help="selfplay.* overrides of the learner (e.g. value_weight=0); the arm's file is "
                        "<arm>__<overrides>.json")
    g = sub.add_parser("report")
    g.add_argument("--results", required=True)
    args = p.parse_args(argv)
    if args.command == "report":
        print(report(args.results))
        return 0
    from alphareason.config import run_config
    steps = args.steps or run_config(args.source).selfplay.learner_steps
    if not 0 < args.held_fraction < 1:
        p.error(f"--held-fraction={args.held_fraction} must be in (0, 1)")
    os.makedirs(args.results, exist_ok=True)
    for arm in args.arms:
        name = "__".join([arm] + [o.replace("=", "-") for o in args.learner])
        out = os.path.join(args.results, f"{name}.json")
        if os.path.exists(out):
            print(f"{arm}: {out} exists, skipped")
            continue
        result = run_arm(args.source, arm, steps=steps, every=args.every, held_fraction=args.held_fraction,
                         val_problems=args.validation_problems, mcts_problems=args.mcts_problems, seed=args.seed,
                         overrides=args.learner)
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(out + ".tmp", out)
    print(report(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
