"""How far can the policy over legal steps go with exact targets, at the loop's learner budget?

The tabula-rasa setting's policy-only rate (greedy over the legal steps) is
far below its search's. Is that the search's targets, or this network and
this much training? This experiment keeps everything of a self-play run's
learner but the target:

* the network a run starts from (``train.steps=0``: the random
  initialisation of its seed), the learner's objective (policy term only),
  optimizer, schedule, batch size and number of steps
  (``selfplay.iterations x selfplay.learner_steps``);
* the target at each state is exact: uniform over the legal steps after
  which the remaining numbers can still reach the target (the task's solver,
  an oracle no self-play target sees);
* the states are those of walks that take such a step at random from fresh
  training problems (never validation or test ones): the states a policy
  that never errs visits, ``--problems`` problems, each state once
  (default: the loop's problems, ``iterations x episodes_per_iteration``).

Every ``--eval-every`` steps it measures the study's policy-only rate on the
run's test problems (``test_greedy``: the same evaluator, key and problems as
the loop's). A loop far below this curve at the same step is limited by its
targets; one near it, by the network and its budget.

  python experiments/policy_ceiling.py --workdir runs/study/countdown4_zero/seed1/alphazero \\
      --out benchmarks/results/study/countdown4_zero/policy_ceiling/seed1.json

``--set KEY=VALUE`` (repeatable, as ``--config.`` takes it) changes the
run's config first, to find what lifts the ceiling: the learner's rate or
batch (``selfplay.learning_rate``, ``selfplay.learner_batch_size``), or the
network (``model.*``, a fresh initialisation of that shape). With
``--problems`` and ``--steps`` these separate data, compute and capacity.

The JSON holds the curve (the test rate, the training loss and the share of
training states whose most likely legal step is a correct one), the
settings, and with ``--against FILE`` (the loop's ``test_greedy_<it>.jsonl``)
McNemar's test of the last evaluation against it, paired over problems.
The last evaluation's per-problem results go next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from alphareason import tokenizer as tok


def exact_targets(env, task, problems: Sequence[dict], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """States with exact policy targets: the state rows (``tokens`` int32[N, T], ``length`` int32[N]), the
    task's legal steps as candidates (``candidates`` int32[N, K, S]), ``cand_valid`` bool[N, K] and
    ``action_weights`` float32[N, K]: 1 on the legal steps after which the problem is still solvable."""
    inputs = env.after(list(problems), list(texts))
    steps, valid = jax.vmap(task.legal_steps)(jax.tree.map(jnp.asarray, inputs["task_state"]))
    steps, valid = np.asarray(steps), np.asarray(valid)
    weights = np.zeros(valid.shape, np.float32)
    for n, (p, text) in enumerate(zip(problems, texts)):
        for k in np.flatnonzero(valid[n]):
            weights[n, k] = float(task.solvable_after(p, text + tok.decode(steps[n, k])))
    return {"tokens": np.asarray(inputs["tokens"]), "length": np.asarray(inputs["length"]),
            "candidates": steps, "cand_valid": valid, "action_weights": weights}


def optimal_walks(env, task, problems: Sequence[dict], rng: np.random.Generator,
                  chunk: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The live states of one walk a problem that takes a random correct step (one after which the problem
    is still solvable) until solved: the states a policy that never errs visits, the prompt included, each
    with its exact targets (``exact_targets``). Returns (targets with leaves [N, ...], problem index int32[N],
    depth int32[N])."""
    frontier = [(i, "") for i in range(len(problems))]
    parts, index, depths, depth = [], [], [], 0
    while frontier:
        following = []
        for s in range(0, len(frontier), chunk):
            rows = frontier[s: s + chunk]
            part = exact_targets(env, task, [problems[i] for i, _ in rows], [t for _, t in rows])
            parts.append(part)
            index.append(np.array([i for i, _ in rows], np.int32))
            depths.append(np.full(len(rows), depth, np.int32))
            for n, (i, text) in enumerate(rows):
                good = np.flatnonzero(part["action_weights"][n] > 0)
                if good.size == 0:  # not solvable from here (no generated problem's prompt is): nowhere to go
                    continue
                text = text + tok.decode(part["candidates"][n, rng.choice(good)])
                if not task.verify(problems[i], text).solved:
                    following.append((i, text))
        frontier, depth = following, depth + 1
    return ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(index),
            np.concatenate(depths))


def top_step_correct(model, task, config, data: dict[str, np.ndarray]) -> np.ndarray:
    """bool[N]: whether the legal step ``model`` ranks first at each state of ``data`` (as greedy over the
    legal steps does, ``LegalStepDecoder``: the highest log-likelihood of its model-written tokens) is a
    correct one."""
    from alphareason.train.learner import candidate_logits
    logits, _ = candidate_logits(model, task, jnp.asarray(data["tokens"]), jnp.asarray(data["length"]),
                                 jnp.asarray(data["candidates"]), jnp.asarray(data["cand_valid"]),
                                 length_normalize=config.search.length_normalize)
    top = np.asarray(jnp.argmax(logits, -1))
    return np.take_along_axis(data["action_weights"], top[:, None], 1)[:, 0] > 0


def policy_ceiling(workdir: str, *, problems: int = 0, steps: int = 0, eval_every: int = 100,
                   test_problems: int = 0, overrides: Sequence[str] = (),
                   log=print) -> tuple[dict[str, Any], list[dict]]:
    """Trains the policy of the network ``workdir``'s run started from on exact targets (the module's
    docstring); returns (the record, the last evaluation's per-problem rows). ``overrides``
    (``key=value``, as ``--config.`` takes them) change the run's config first: the learner's rate or
    batch (``selfplay.learning_rate``, ``selfplay.learner_batch_size``) or the network (``model.*``, a
    fresh initialisation of the new shape), to find what lifts the ceiling."""
    from flax import nnx

    from alphareason.config import ConfigError, apply_overrides, run_config
    from alphareason.model.transformer import Transformer, count_params
    from alphareason.run import make_model_config, make_optimizer, make_task, split_problems
    from alphareason.search.env import EnvConfig, ReasoningEnv
    from alphareason.train.loop import (learner_candidate_width, learner_token_forwards, make_evaluator,
                                        make_learner_step, selfplay_problems)

    config = apply_overrides(run_config(workdir), overrides)
    if config.search.candidates != "enumerate":
        raise ConfigError(f"{workdir}: search.candidates={config.search.candidates!r}; the ceiling is of the "
                          f"policy over the task's legal steps (a run with search.candidates=enumerate)")
    sp = config.selfplay
    with config.unlocked():  # the policy term alone
        sp.algorithm, sp.value_weight, sp.sft_weight, sp.tree_value_weight = "alphazero", 0.0, 0.0, 0.0
        sp.policy_weight, sp.policy_moves = 1.0, "all"
    task = make_task(config)
    steps = steps or sp.iterations * sp.learner_steps
    problems = problems or sp.iterations * sp.episodes_per_iteration
    held_out = split_problems(config, workdir, "validation") + split_problems(config, workdir, "test")
    test = split_problems(config, workdir, "test")
    test = test[: test_problems or config.eval.test_problems or len(test)]
    if not test:
        raise ConfigError(f"{workdir} has no test problems to measure the policy on (data.test_size)")

    t0 = time.time()
    train, it = [], 0
    while len(train) < problems:  # the loop's fresh problems, iteration by iteration
        train += selfplay_problems(task, config, it, held_out)
        it += 1
    mcfg = make_model_config(config, task)
    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))  # what a run with train.steps=0 starts from
    env = ReasoningEnv(task, nnx.split(model)[0], EnvConfig(num_candidates=1), seq_len=mcfg.max_len)
    data, _, depth = optimal_walks(env, task, train[:problems], np.random.default_rng(config.seed))
    N, K = data["cand_valid"].shape
    data["candidates"] = data["candidates"][..., :learner_candidate_width(config, task)]
    data.update(cand_log_inclusion=np.zeros((N, K), np.float32),  # exact targets: no sampled set to correct for
                **dict.fromkeys(("search_value", "outcome", "td_lambda", "proven"), np.zeros((N,), np.float32)))
    log(f"{N} states of {problems} problems with exact targets ({np.mean(data['action_weights'].sum(-1)):.1f} "
        f"correct of {np.mean(data['cand_valid'].sum(-1)):.1f} legal steps a state; {time.time() - t0:.0f} s)")
    sample = np.random.default_rng(config.seed + 2).choice(N, min(512, N), replace=False)
    probe = {k: data[k][sample] for k in ("tokens", "length", "candidates", "cand_valid", "action_weights")}

    optimizer = make_optimizer(model, learning_rate=sp.learning_rate, steps=max(steps, 2),
                               warmup_steps=min(50, sp.learner_steps), weight_decay=config.train.weight_decay,
                               grad_clip=config.train.grad_clip)
    graph, state = nnx.split((model, optimizer))
    learner_step = make_learner_step(graph, config, task)
    evaluator = make_evaluator(model, task, config, "greedy", min(config.eval.batch_size, len(test)))
    key = jax.random.key(config.seed + 99)  # the loop's evaluation key
    rng = np.random.default_rng(config.seed + 1)
    curve, losses, forwards, rows = [], [], 0, []
    for i in range(steps + 1):
        if i % eval_every == 0 or i == steps:
            current = nnx.merge(graph, state)[0]
            evaluator.set_params(current)
            rows = evaluator.run(test, key)
            row = {"step": i, "seconds": time.time() - t0, "learner_token_forwards": forwards,
                   "test_greedy_solve_rate": float(np.mean([r["solved"] for r in rows])),
                   "training_states_top_step_correct": float(np.mean(top_step_correct(current, task, config, probe))),
                   "policy_loss": float(np.mean(losses)) if losses else None}
            curve.append(row)
            losses = []
            loss = "" if row["policy_loss"] is None else f"; policy loss {row['policy_loss']:.3f}"
            log(f"step {i}: greedy over the legal steps solves {row['test_greedy_solve_rate']:.1%} of {len(rows)} "
                f"test problems; the top step is correct at {row['training_states_top_step_correct']:.1%} of "
                f"{len(sample)} training states{loss} ({row['seconds']:.0f} s)")
        if i == steps:
            break
        rows_of_batch = rng.integers(0, N, sp.learner_batch_size)
        batch = {k: jnp.asarray(v[rows_of_batch]) for k, v in data.items()}
        state, metrics = learner_step(state, batch)
        forwards += learner_token_forwards(batch)
        losses.append(float(metrics["policy_loss"]))
    record = {"workdir": workdir, "config": config.name, "seed": config.seed, "steps": steps,
              "batch_size": sp.learner_batch_size, "learning_rate": sp.learning_rate, "problems": problems,
              "states": N, "states_per_depth": np.bincount(depth).tolist(), "test_problems": len(test),
              "overrides": list(overrides),
              "parameters": count_params(model),
              "curve": curve}
    return record, rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a self-play run with search.candidates=enumerate")
    p.add_argument("--out", required=True, help="the JSON record (the last evaluation's rows go next to it)")
    p.add_argument("--problems", type=int, default=0, help="training problems (default: the loop's)")
    p.add_argument("--steps", type=int, default=0, help="learner steps (default: the loop's)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--test-problems", type=int, default=0,
                   help="default: the loop's eval.test_problems, else the whole split")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a change to the run's config, e.g. selfplay.learning_rate=3e-3 (repeatable)")
    p.add_argument("--against", default="", help="the loop's test_greedy_<it>.jsonl: McNemar's test against it")
    args = p.parse_args(argv)
    from alphareason.eval.heldout import write_results
    from alphareason.eval.stats import mcnemar
    loop = None
    if args.against:  # read first: a wrong file fails before an hour of work
        with open(args.against) as f:
            loop = [json.loads(x) for x in f]
    record, rows = policy_ceiling(args.workdir, problems=args.problems, steps=args.steps,
                                  eval_every=args.eval_every, test_problems=args.test_problems, overrides=args.set,
                                  log=lambda m: print(m, flush=True))
    if loop is not None:
        if [r["problem"] for r in loop[: len(rows)]] != [r["problem"] for r in rows]:
            raise ValueError(f"{args.against} is not on the same test problems in the same order")
        a = np.array([r["solved"] for r in rows], bool)
        b = np.array([r["solved"] for r in loop[: len(rows)]], bool)
        record["against"] = {"file": args.against, "ceiling_solve_rate": float(a.mean()),
                             "loop_solve_rate": float(b.mean()), **mcnemar(a, b)}
        print(f"against {args.against}: {a.mean():.1%} against {b.mean():.1%}, "
              f"McNemar p = {record['against']['p_value']:.2g}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_results(rows, os.path.splitext(args.out)[0] + "_test_greedy.jsonl")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    from alphareason.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
