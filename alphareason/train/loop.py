"""The AlphaZero loop: SFT warm start, then iterations of self-play -> learning -> evaluation.

``run_training(config, workdir)`` is what ``alphareason train`` (and the
README's demo) runs:

1. SFT on demonstrations (``train.steps``; skipped when 0), resumable.
2. Evaluation of the starting point (iteration 0): policy-only greedy and
   MCTS solve rates on held-out problems.
3. For each iteration: self-play actors solve freshly generated training
   problems with search (exploring by sampling moves from the search policy)
   and write every move into the replay buffer; the learner takes
   ``learner_steps`` steps on batches drawn from replay; the network is
   evaluated; a checkpoint (model, optimizer, replay, iteration) is written.

Every random choice of an iteration is derived from ``(seed, iteration,
phase)``, and checkpoints are written only at iteration boundaries, so a run
killed at any point and restarted with the same command redoes the
interrupted iteration exactly: its final metrics equal an uninterrupted
run's.

Algorithms (``selfplay.algorithm``), all under the same compute accounting:
  * ``alphazero``: policy distillation of ``action_weights`` + value to outcome
    (+ optional SFT term);
  * ``expert_iteration``: SFT on the trajectories that search solved (ReST /
    STaR style), value to outcome;
  * ``sft_only``: no search; the learner continues SFT on demonstrations.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason.config import ConfigDict, ConfigError
from alphareason.data import BatchIterator, build_dataset, collate, encode_example
from alphareason.model import count_params
from alphareason.parallel import make_mesh, replicate, shard_batch
from alphareason.search.env import EnvConfig
from alphareason.search.episodes import EpisodeRunner, prompt_lengths
from alphareason.search.evaluate import EvalSettings, Evaluator
from alphareason.search.mcts import SearchConfig, Searcher
from alphareason.tasks import Task
from alphareason.train.checkpoint import Checkpointer
from alphareason.train.learner import VALUE_TARGETS, selfplay_loss
from alphareason.train.metrics import MetricsWriter, read_metrics
from alphareason.train.progress import Progress
from alphareason.train.replay import ReplayBuffer
from alphareason.train.sft import (TrainingDiverged, data_dir, make_data_spec, make_model_config, make_optimizer,
                                   make_task, restore_into, snapshot, split_problems, train_sft)

ALGORITHMS = ("alphazero", "expert_iteration", "sft_only")


# ------------------------------------------------------------------ config
def env_config(config: ConfigDict) -> EnvConfig:
    s = config.search
    return EnvConfig(num_candidates=s.num_candidates, candidates=s.candidates, temperature=s.candidate_temperature,
                     length_normalize=s.length_normalize)


def search_config(config: ConfigDict, *, num_simulations: int | None = None, policy: str | None = None) -> SearchConfig:
    """The config's ``search`` section as a ``SearchConfig`` (configs of older runs lack the newer keys)."""
    s = config.search
    return SearchConfig(policy=policy or s.policy, num_simulations=num_simulations or s.num_simulations,
                        max_num_considered_actions=s.max_num_considered_actions, gumbel_scale=s.gumbel_scale,
                        value_scale=s.get("value_scale", SearchConfig.value_scale),
                        rescale_values=s.get("rescale_values", SearchConfig.rescale_values),
                        pb_c_init=s.pb_c_init, dirichlet_alpha=s.dirichlet_alpha,
                        dirichlet_fraction=s.dirichlet_fraction, max_depth=s.get("max_depth", 0) or None)


def validate_config(config: ConfigDict, task: Task) -> None:
    """Refuses inconsistent configs before any work starts."""
    sp = config.selfplay
    if sp.algorithm not in ALGORITHMS:
        raise ConfigError(f"selfplay.algorithm={sp.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if sp.value_target not in VALUE_TARGETS:
        raise ConfigError(f"selfplay.value_target={sp.value_target!r}; choose one of {', '.join(VALUE_TARGETS)}")
    if sp.iterations < 0 or sp.episodes_per_iteration <= 0 or sp.actor_batch_size <= 0:
        raise ConfigError("selfplay.iterations must be >= 0 and episodes_per_iteration, actor_batch_size > 0")
    moves_per_iteration = sp.episodes_per_iteration * task.max_steps
    if sp.algorithm != "sft_only" and sp.replay_capacity < moves_per_iteration:
        raise ConfigError(
            f"selfplay.replay_capacity={sp.replay_capacity} is smaller than one iteration's data (up to "
            f"{sp.episodes_per_iteration} episodes x {task.max_steps} moves = {moves_per_iteration}); raise it "
            f"to at least {moves_per_iteration} or lower selfplay.episodes_per_iteration")
    devices = jax.device_count()
    for name in ("actor_batch_size", "learner_batch_size"):
        if sp[name] % devices:
            raise ConfigError(f"selfplay.{name}={sp[name]} is not divisible by the {devices} devices; "
                              f"use a multiple of {devices}")
    if config.search.num_candidates < 1 or config.search.num_simulations < 1:
        raise ConfigError("search.num_candidates and search.num_simulations must be >= 1")
    mcfg = make_model_config(config, task)  # raises if the context is too short for the task
    needed = task.max_prompt_len + task.max_steps * task.max_step_len
    if mcfg.max_len < needed:
        raise ConfigError(f"the model's context ({mcfg.max_len}) cannot hold a prompt and {task.max_steps} "
                          f"candidate steps of {task.max_step_len} tokens ({needed}); raise model.max_len")
    try:
        search_config(config)  # validates the policy name and the numbers
    except ValueError as e:
        raise ConfigError(str(e)) from e
    depth = config.search.get("max_depth", 0)
    if depth and depth < task.min_steps:
        raise ConfigError(f"search.max_depth={depth} is below the {task.min_steps} steps every solution of task "
                          f"{task.name} takes: the search could never see a reward; raise it or set 0 (no limit)")
    if config.search.candidates not in ("sample", "enumerate"):
        raise ConfigError(f"search.candidates={config.search.candidates!r}; choose 'sample' or 'enumerate'")


# ------------------------------------------------------------------- pieces
def selfplay_problems(task: Task, config: ConfigDict, iteration: int, exclude: list[dict]) -> list[dict]:
    """Fresh training problems for one iteration (never a held-out one); curriculum optional."""
    sp = config.selfplay
    difficulty = None
    if sp.get("curriculum", False) and task.num_difficulties > 1:
        difficulty = min(task.num_difficulties - 1, iteration * task.num_difficulties // max(sp.iterations, 1))
    return task.generate(config.seed * 1_000 + 17 + iteration, sp.episodes_per_iteration,
                         difficulty=difficulty, exclude=exclude)


def sft_batch_from_trajectories(task: Task, traj: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Solved trajectories (token sequences) -> an SFT batch, encoded exactly as demonstrations are
    (``data.encode_example``: targets after the prompt, tool-written characters masked, EOS at the end)."""
    from alphareason import tokenizer as tok
    seq_len = traj["tokens"].shape[1]
    examples = []
    for tokens, prompt_length, length in zip(traj["tokens"], traj["prompt_length"], traj["length"]):
        prompt = tok.decode(tokens[:prompt_length])
        text = tok.decode(tokens[prompt_length:length])
        examples.append(encode_example(task, prompt, text, True, seq_len))
    return collate(examples)


def make_learner_step(graphdef, config: ConfigDict, task: Task) -> Callable:
    sp = config.selfplay
    algorithm = sp.algorithm
    weights = {"alphazero": (sp.policy_weight, sp.value_weight, sp.sft_weight),
               "expert_iteration": (0.0, sp.value_weight, 1.0),
               "sft_only": (0.0, 0.0, 1.0)}[algorithm]

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def objective(m):
            return selfplay_loss(m, batch, policy_weight=weights[0], value_weight=weights[1],
                                 sft_weight=weights[2], value_target=sp.value_target,
                                 tool=task.tool is not None, length_normalize=config.search.length_normalize,
                                 policy_target=sp.get("policy_target", "softmax"))

        (_, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0)


def calibration(values: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Brier score and expected calibration error of value predictions against outcomes."""
    if len(values) == 0:
        return {"value_brier": float("nan"), "value_ece": float("nan")}
    idx = np.minimum((values * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(values[m].mean() - outcomes[m].mean())
    return {"value_brier": float(np.mean((values - outcomes) ** 2)), "value_ece": float(ece)}


# ---------------------------------------------------------------- the loop
def run_training(config: ConfigDict, workdir: str, *, progress: bool = True, log: Callable[[str], None] = print,
                 stop_after_iterations: int | None = None,
                 interrupt: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Runs or resumes the whole job; returns the per-iteration table rows.

    ``interrupt(phase, iteration)`` (tests) is called when a phase starts and
    after every actor batch ("selfplay") and learner step ("learn"); it may
    raise to simulate a kill there. ``stop_after_iterations`` ends the call
    early.
    """
    workdir = os.path.abspath(workdir)
    task = make_task(config)
    validate_config(config, task)
    t_start = time.time()
    sft = train_sft(config, workdir, progress=progress, log=log)
    sp = config.selfplay
    model = sft.model
    mcfg = model.config
    validation = split_problems(config, workdir, "validation")
    eval_problems = validation[: config.eval.num_problems]
    exclude = validation + split_problems(config, workdir, "test")  # never self-play on a held-out problem

    optimizer = make_optimizer(model, learning_rate=sp.learning_rate, steps=max(sp.iterations * sp.learner_steps, 2),
                               warmup_steps=min(50, sp.learner_steps), weight_decay=config.train.weight_decay,
                               grad_clip=config.train.grad_clip)
    graphdef, state = nnx.split((model, optimizer))
    searcher = Searcher(task, nnx.split(model)[0], env_config(config), search_config(config), seq_len=mcfg.max_len)
    replay = ReplayBuffer(sp.replay_capacity, seq_len=mcfg.max_len, num_candidates=searcher.num_candidates,
                          step_len=task.max_step_len)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "selfplay"))
    writer = MetricsWriter(workdir)
    iteration, totals = 0, {"selfplay_token_forwards": 0, "learner_examples": 0}
    if ckpt.latest_step() is not None:
        items, meta = ckpt.restore_items({"state": snapshot(state), "replay": replay.state_dict()})
        state = restore_into(state, items["state"])
        replay.load_state_dict(items["replay"])
        iteration, totals = int(meta["iteration"]), dict(meta["totals"])
        writer.truncate_after(lambda r: r.get("phase") not in ("selfplay", "eval") or r["step"] <= iteration)
        log(f"resumed self-play after iteration {iteration} ({ckpt.directory})")
    mesh = make_mesh()  # learner batches split over the data axis; parameters replicated
    state = replicate(state, mesh)
    evaluator = Evaluator(nnx.merge(graphdef, state)[0], task, EvalSettings(
        strategy="greedy", batch_size=min(config.eval.batch_size, len(eval_problems)), env=env_config(config),
        search=search_config(config, num_simulations=sp.eval_simulations),
        traces=config.data.demonstrations == "traces"))
    mcts_evaluator = Evaluator(nnx.merge(graphdef, state)[0], task, EvalSettings(
        strategy="mcts", batch_size=min(config.eval.batch_size, len(eval_problems)), env=env_config(config),
        search=search_config(config, num_simulations=sp.eval_simulations)))

    def evaluate(it: int) -> dict[str, Any]:
        model_now = nnx.merge(graphdef, state)[0]
        t0 = time.time()
        evaluator.set_params(model_now)
        mcts_evaluator.set_params(model_now)
        key = jax.random.key(config.seed + 99)
        greedy = evaluator.run(eval_problems, key)
        mcts = mcts_evaluator.run(eval_problems, key)
        values = {"greedy_solve_rate": float(np.mean([r["solved"] for r in greedy])),
                  "mcts_solve_rate": float(np.mean([r["solved"] for r in mcts])),
                  "mcts_token_forwards_per_problem": float(np.mean([r["token_forwards"] for r in mcts])),
                  "eval_seconds": time.time() - t0, **totals}
        return writer.write(it, "eval", values)

    if iteration == 0 and not read_metrics(workdir, "eval"):
        row = evaluate(0)
        log(f"iteration 0 (SFT start): greedy {row['greedy_solve_rate']:.1%}, "
            f"MCTS@{sp.eval_simulations} {row['mcts_solve_rate']:.1%}")
    learner_step = make_learner_step(graphdef, config, task)
    demo_batches = None
    if sp.algorithm == "sft_only":
        builder = build_dataset(make_data_spec(config), data_dir(config, workdir))
        demo_batches = builder.as_data_source(split="train")

    runner = EpisodeRunner(searcher, action_temperature=sp.action_temperature,
                           place=lambda tree: shard_batch(tree, mesh))  # problems split over the data axis
    end = sp.iterations if stop_after_iterations is None else min(sp.iterations, iteration + stop_after_iterations)
    while iteration < end:
        it = iteration + 1
        timings = {}
        # ---------------------------------------------------------- self-play
        t0 = time.time()
        sp_metrics: dict[str, Any] = {}
        if interrupt:
            interrupt("selfplay", it)
        if sp.algorithm != "sft_only":
            problems = selfplay_problems(task, config, it, exclude)
            params = nnx.state(nnx.merge(graphdef, state)[0])
            bar = Progress(total=len(problems), desc=f"iter {it}/{sp.iterations} self-play", enabled=progress,
                           unit="episode")
            solved, net_values, outcomes, forwards = [], [], [], 0
            key = jax.random.key(config.seed * 7919 + it)
            B = sp.actor_batch_size
            for start in range(0, len(problems), B):
                chunk = problems[start: start + B]
                padded = chunk + [chunk[0]] * (B - len(chunk))
                batch = runner.run(params, padded, jax.random.fold_in(key, start),
                                   problem_ids=np.arange(start, start + B))
                batch = _truncate(batch, len(chunk))
                replay.add_episodes(batch, prompt_lengths=prompt_lengths(task, batch.problems))
                solved.extend(batch.solved.tolist())
                forwards += int(batch.token_forwards.sum())
                if batch.moves:
                    first = batch.moves[0]
                    net_values.extend(first.network_value[: len(chunk)].tolist())
                    outcomes.extend(batch.solved.astype(np.float32).tolist())
                bar.update(len(chunk))
                bar.set_postfix(solved=f"{np.mean(solved):.1%}")
                if interrupt:
                    interrupt("selfplay", it)
            bar.close()
            totals["selfplay_token_forwards"] += forwards
            sp_metrics = {"selfplay_solve_rate": float(np.mean(solved)), "selfplay_episodes": len(problems),
                          "replay_size": replay.size, "replay_trajectories": replay.num_trajectories,
                          **calibration(np.asarray(net_values), np.asarray(outcomes))}
        timings["selfplay_seconds"] = time.time() - t0
        # ----------------------------------------------------------- learning
        t0 = time.time()
        if interrupt:
            interrupt("learn", it)
        rng = np.random.default_rng([config.seed, it, 1])
        bar = Progress(total=sp.learner_steps, desc=f"iter {it}/{sp.iterations} learning", enabled=progress)
        pending = []
        demo_iter = None
        if demo_batches is not None:
            demo_iter = BatchIterator(demo_batches, task, batch_size=sp.learner_batch_size, seq_len=mcfg.max_len,
                                      seed=config.seed + it, position=0)
        for _ in range(sp.learner_steps):
            batch = _learner_batch(replay, rng, sp, task, demo_iter, mcfg.max_len)
            if batch is None:
                break
            state, metrics = learner_step(state, shard_batch(batch, mesh))
            pending.append(metrics)
            bar.update(1)
            if interrupt:
                interrupt("learn", it)
        bar.close()
        learn = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]} if pending else {}
        if learn and not np.isfinite(learn["loss"]):
            raise TrainingDiverged(
                f"self-play learner loss became {learn['loss']} in iteration {it}; the checkpoint after "
                f"iteration {iteration} is kept. Lower --config.selfplay.learning_rate and rerun to resume.")
        totals["learner_examples"] += len(pending) * sp.learner_batch_size
        timings["learn_seconds"] = time.time() - t0
        timings["learner_steps_per_s"] = len(pending) / max(timings["learn_seconds"], 1e-9)
        if sp_metrics:
            timings["episodes_per_s"] = sp_metrics["selfplay_episodes"] / max(timings["selfplay_seconds"], 1e-9)
        writer.write(it, "selfplay", {**sp_metrics, **{f"learn_{k}": v for k, v in learn.items()}, **timings})
        # --------------------------------------------------------- evaluation
        row = evaluate(it)
        # --------------------------------------------------------- checkpoint
        t0 = time.time()
        if interrupt:
            interrupt("checkpoint", it)
        ckpt.save(it, snapshot(state), {"iteration": it, "phase": "selfplay", "totals": totals,
                                        "step": it}, replay=replay.state_dict())
        writer.write(it, "timing", {"checkpoint_seconds": time.time() - t0})
        iteration = it
        log(f"iteration {it}: greedy {row['greedy_solve_rate']:.1%}, MCTS@{sp.eval_simulations} "
            f"{row['mcts_solve_rate']:.1%}"
            + (f", self-play solved {sp_metrics['selfplay_solve_rate']:.1%}" if sp_metrics else ""))
    writer.close()
    rows = read_metrics(workdir, "eval")
    log("")
    log(format_iterations(rows, config, time.time() - t_start))
    return {"iterations": rows, "parameters": count_params(model)}


def _truncate(batch, n: int):
    """Drops the padding rows of an episode batch."""
    import dataclasses as dc
    moves = [dc.replace(m, **{f.name: getattr(m, f.name)[:n] for f in dc.fields(m)}) for m in batch.moves]
    return dc.replace(batch, problems=batch.problems[:n], texts=batch.texts[:n], verdicts=batch.verdicts[:n],
                      solved=batch.solved[:n], token_forwards=batch.token_forwards[:n], moves=moves,
                      num_steps=batch.num_steps[:n])


def _learner_batch(replay: ReplayBuffer, rng, sp, task, demo_iter, seq_len):
    if sp.algorithm == "sft_only":
        return {"sft": next(demo_iter)}
    batch: dict[str, Any] = {}
    if replay.size == 0:
        return None
    moves = replay.sample_moves(rng, sp.learner_batch_size)
    batch.update({k: moves[k] for k in ("tokens", "length", "candidates", "cand_valid", "action_weights",
                                        "search_value", "outcome")})
    needs_sft = sp.algorithm == "expert_iteration" or sp.sft_weight > 0
    if needs_sft:
        traj = replay.sample_trajectories(rng, sp.learner_batch_size)
        if traj is None:
            if sp.algorithm == "expert_iteration":
                return None  # nothing solved yet: expert iteration has nothing to imitate
        else:
            batch["sft"] = sft_batch_from_trajectories(task, traj)
    return batch


def format_iterations(rows: list[dict[str, Any]], config: ConfigDict, seconds: float) -> str:
    sims = config.selfplay.eval_simulations
    head = (f"{'iteration':>9} {'greedy (policy only)':>21} {f'MCTS@{sims}':>9} "
            f"{'self-play tok fwd':>18}")
    lines = [f"{config.name}: held-out solve rates per iteration "
             f"({config.selfplay.algorithm}, {config.search.policy}, {seconds / 60:.1f} min)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['step']:>9} {r['greedy_solve_rate']:>21.1%} {r['mcts_solve_rate']:>9.1%} "
                     f"{int(r.get('selfplay_token_forwards', 0)):>18,}")
    return "\n".join(lines)
