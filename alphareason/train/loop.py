"""The AlphaZero loop: SFT warm start, then iterations of self-play -> learning -> evaluation.

``run_training(config, workdir)`` is what ``alphareason train`` (and the
README's demo) runs:

1. SFT on demonstrations (``train.steps``; skipped when 0), resumable.
2. Evaluation of the starting point (iteration 0): policy-only greedy and
   MCTS solve rates on held-out problems.
3. For each iteration, four phases (methods of ``SelfPlayLoop``, each
   returning its metrics): ``selfplay`` (actors solve freshly generated
   training problems with search, exploring by sampling moves from the
   search policy, and write every move into the replay buffer), ``learn``
   (``learner_steps`` steps on batches drawn from replay), ``evaluate``
   (held-out solve rates) and ``save`` (a checkpoint of model, optimizer,
   replay and iteration).

Every random choice of an iteration is derived from ``(seed, iteration,
phase)``, and checkpoints are written only at iteration boundaries, so a run
killed at any point and restarted with the same command redoes the
interrupted iteration exactly: its final metrics equal an uninterrupted
run's.

Every phase runs on the run's mesh (``config.mesh``, built once in
``run_training``): the model and optimizer state split by their logical
axes (FSDP over ``fsdp``), actor, learner and evaluation batches split over
every device. Several processes run the same loop in step: each feeds its
own rows, every one gets every result back, so their replay buffers and
learner batches are identical; process 0 writes logs and metrics, and all of
them write the checkpoints together.

Algorithms (``selfplay.algorithm``), all under the same compute accounting:
  * ``alphazero``: policy distillation of ``action_weights`` + value to outcome
    (+ optional SFT term on its solved episodes or, ``sft_source="demonstrations"``,
    on the demonstrations);
  * ``expert_iteration``: SFT on the trajectories that search solved (ReST /
    STaR style), value to outcome;
  * ``sft_only``: no search; the learner continues SFT on demonstrations;
  * ``grpo``: no search; G chains per problem from the policy, rewarded by the
    verifier, and the clipped group-relative policy gradient
    (``train.grpo``: its actor, buffer and learner; the loop's problems,
    checkpoints, metrics, evaluation and resume are shared).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason import parallel
from alphareason import tokenizer as tok
from alphareason.checkpoint import Checkpointer, restore_into, snapshot
from alphareason.config import ConfigDict, ConfigError
from alphareason.data import BatchIterator, collate, encode_example
from alphareason.eval.heldout import EvalSettings, Evaluator, write_results
from alphareason.eval.value import calibration, flat_metrics, value_report
from alphareason.model import count_params
from alphareason.parallel import shard_batch
from alphareason.run import (check_mesh, checkpoint_dir, dataset, env_config, learns_from_demonstrations, load_model,
                             make_mesh, make_model_config, make_optimizer, make_task, place_state, search_config,
                             split_problems, traces)
from alphareason.search.episodes import EpisodeRunner, prompt_lengths
from alphareason.search.mcts import Searcher
from alphareason.tasks import Task
from alphareason.train import grpo
from alphareason.train.learner import POLICY_MOVES, POLICY_TARGETS, VALUE_TARGETS, selfplay_loss
from alphareason.train.metrics import MetricsWriter, read_metrics
from alphareason.train.progress import Progress
from alphareason.train.replay import ReplayBuffer
from alphareason.train.sft import TrainingDiverged, train_sft

ALGORITHMS = ("alphazero", "expert_iteration", "sft_only", "grpo")
SFT_SOURCES = ("solved", "demonstrations")  # the chains of alphazero's SFT term (selfplay.sft_source)
TREE_STATES_PER_MOVE = 4  # the replay keeps this many proven tree states per move it keeps (tree_value_weight)
# Cumulative counters of a run (checkpointed): episodes' token forwards as charged by the search and as computed
# (padding and finished rows included), the learner's (3 per token for forward + backward), examples learned from.
TOTALS = ("selfplay_token_forwards", "selfplay_computed_token_forwards", "learner_token_forwards", "learner_examples")


# ------------------------------------------------------------------ config
def validate_config(config: ConfigDict, task: Task, mesh=None) -> None:
    """Refuses inconsistent configs before any work starts.

    ``mesh`` (default: ``run.make_mesh(config)``; a ``jax.sharding.AbstractMesh``
    will do) is where the batches must split evenly.
    """
    sp = config.selfplay
    if sp.algorithm not in ALGORITHMS:
        raise ConfigError(f"selfplay.algorithm={sp.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if sp.value_target not in VALUE_TARGETS:
        raise ConfigError(f"selfplay.value_target={sp.value_target!r}; choose one of {', '.join(VALUE_TARGETS)}")
    if sp.iterations < 0 or sp.episodes_per_iteration <= 0 or sp.actor_batch_size <= 0:
        raise ConfigError("selfplay.iterations must be >= 0 and episodes_per_iteration, actor_batch_size > 0")
    if sp.algorithm == "grpo":
        grpo.grpo_settings(config, task)  # its own checks first: GRPO has no token-level policy
    moves_per_iteration = sp.episodes_per_iteration * task.max_steps
    if sp.algorithm not in ("sft_only", "grpo") and sp.replay_capacity < moves_per_iteration:
        raise ConfigError(
            f"selfplay.replay_capacity={sp.replay_capacity} is smaller than one iteration's data (up to "
            f"{sp.episodes_per_iteration} episodes x {task.max_steps} moves = {moves_per_iteration}); raise it "
            f"to at least {moves_per_iteration} or lower selfplay.episodes_per_iteration")
    if config.search.num_candidates < 1 or config.search.num_simulations < 1:
        raise ConfigError("search.num_candidates and search.num_simulations must be >= 1")
    if not 0.0 <= sp.value_lambda <= 1.0:
        raise ConfigError(f"selfplay.value_lambda={sp.value_lambda} must be in [0, 1] (1: the outcome)")
    if sp.policy_target not in POLICY_TARGETS:
        raise ConfigError(f"selfplay.policy_target={sp.policy_target!r}; choose one of {', '.join(POLICY_TARGETS)}")
    if sp.policy_moves not in POLICY_MOVES:
        raise ConfigError(f"selfplay.policy_moves={sp.policy_moves!r}; choose one of {', '.join(POLICY_MOVES)}")
    if sp.sft_source not in SFT_SOURCES:
        raise ConfigError(f"selfplay.sft_source={sp.sft_source!r}; choose one of {', '.join(SFT_SOURCES)}")
    if sp.tree_value_weight < 0:
        raise ConfigError(f"selfplay.tree_value_weight={sp.tree_value_weight} must be >= 0 (0: off)")
    if sp.tree_value_weight > 0 and sp.algorithm not in ("alphazero", "expert_iteration"):
        raise ConfigError(f"selfplay.tree_value_weight={sp.tree_value_weight} fits the value to what the search "
                          f"trees proved, and {sp.algorithm} searches nothing: set it to 0 or use alphazero or "
                          f"expert_iteration")
    if sp.tree_value_weight > 0 and config.search.candidates != "enumerate":
        raise ConfigError(f"selfplay.tree_value_weight={sp.tree_value_weight} needs search.candidates='enumerate': "
                          f"a tree proves a state unsolvable only when its candidates are all the legal steps "
                          f"(with {config.search.candidates!r} candidates its labels would be solvable states only)")
    if sp.sft_source == "demonstrations" and not (sp.algorithm == "alphazero" and sp.sft_weight > 0):
        raise ConfigError(f"selfplay.sft_source='demonstrations' is alphazero's SFT term, which this run does not "
                          f"have (algorithm={sp.algorithm!r}, sft_weight={sp.sft_weight}): set "
                          f"selfplay.algorithm=alphazero and selfplay.sft_weight > 0, or sft_source='solved'")
    model_config = make_model_config(config, task)  # raises if the context is too short for the task
    check_mesh(config, make_mesh(config) if mesh is None else mesh, model_config=model_config,
               batches={"train.batch_size": config.train.batch_size,
                        "selfplay.actor_batch_size": sp.actor_batch_size,
                        "selfplay.learner_batch_size": sp.learner_batch_size})
    search_config(config)  # validates the policy name and the numbers
    depth = config.search.max_depth
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
    if sp.curriculum and task.num_difficulties > 1:
        difficulty = min(task.num_difficulties - 1, iteration * task.num_difficulties // max(sp.iterations, 1))
    return task.generate(config.seed * 1_000 + 17 + iteration, sp.episodes_per_iteration,
                         difficulty=difficulty, exclude=exclude)


def sft_batch_from_trajectories(task: Task, traj: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Solved trajectories (token sequences) -> an SFT batch, encoded exactly as demonstrations are
    (``data.encode_example``: targets after the prompt, tool-written characters masked, EOS at the end)."""
    seq_len = traj["tokens"].shape[1]
    examples = []
    for tokens, prompt_length, length in zip(traj["tokens"], traj["prompt_length"], traj["length"]):
        prompt = tok.decode(tokens[:prompt_length])
        text = tok.decode(tokens[prompt_length:length])
        examples.append(encode_example(task, prompt, text, True, seq_len))
    return collate(examples)


def learner_objective(config: ConfigDict, task: Task) -> Callable:
    """``(model, batch) -> (loss, metrics)``: the learner's loss for the config's algorithm (``selfplay_loss``)."""
    sp = config.selfplay
    weights = {"alphazero": (sp.policy_weight, sp.value_weight, sp.sft_weight),
               "expert_iteration": (0.0, sp.value_weight, 1.0),
               "sft_only": (0.0, 0.0, 1.0)}[sp.algorithm]
    tree_weight = sp.tree_value_weight if learns_tree_values(sp) else 0.0

    def objective(model, batch):
        return selfplay_loss(model, batch, policy_weight=weights[0], value_weight=weights[1],
                             sft_weight=weights[2], value_target=sp.value_target, task=task,
                             length_normalize=config.search.length_normalize,
                             policy_target=sp.policy_target,
                             sampled_set_correction=sp.sampled_set_correction, policy_moves=sp.policy_moves,
                             tree_value_weight=tree_weight)

    return objective


def make_learner_step(graphdef, config: ConfigDict, task: Task, state_sharding=None) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``; ``state_sharding`` keeps the state where it lives."""
    objective = learner_objective(config, task)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        (_, metrics), grads = nnx.value_and_grad(lambda m: objective(m, batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return parallel.jit_state_step(step, state_sharding)


def make_evaluator(model: nnx.Module, task: Task, config: ConfigDict, strategy: str, batch_size: int, *,
                   mesh=None) -> Evaluator:
    """The loop's held-out evaluation of ``strategy``: ``greedy`` (policy only; Stream of Search traces where the
    config writes them) or ``mcts`` (an episode of search, ``selfplay.eval_simulations`` per move)."""
    if strategy not in ("greedy", "mcts"):
        raise ValueError(f"the loop evaluates 'greedy' or 'mcts', not {strategy!r}")
    search = search_config(config, num_simulations=config.selfplay.eval_simulations)
    return Evaluator(model, task, EvalSettings(strategy=strategy, batch_size=batch_size, env=env_config(config),
                                               search=search, traces=strategy == "greedy" and traces(config)),
                     mesh=mesh)


# ---------------------------------------------------------------- the loop
@dataclasses.dataclass
class IterationState:
    """What the loop carries from one iteration to the next (and what a checkpoint restores)."""

    state: Any  # nnx.State of (model, optimizer)
    replay: ReplayBuffer | grpo.RolloutBuffer  # GRPO: the iteration's rollouts
    iteration: int = 0  # iterations completed
    totals: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TOTALS, 0))


class SelfPlayLoop:
    """The self-play iterations after SFT: ``selfplay``, ``learn``, ``evaluate`` and ``save`` phases.

    Built from a config, a work directory and the SFT model; ``run(end)``
    resumes from the newest self-play checkpoint and runs iterations up to
    ``end``. Each phase is a method that returns its metrics, so a notebook
    can drive the loop one phase at a time. ``mesh``: the devices (default:
    the config's ``mesh`` section).
    """

    def __init__(self, config: ConfigDict, workdir: str, model, task: Task, *, progress: bool = True,
                 log: Callable[[str], None] = print, mesh=None):
        sp = config.selfplay
        main = parallel.is_main_process()
        self.config, self.workdir, self.task = config, workdir, task
        self.progress, self.log = progress and main, log if main else (lambda *_: None)
        self.mesh = make_mesh(config) if mesh is None else mesh
        self.seq_len = model.config.max_len
        settings = grpo.grpo_settings(config, task) if sp.algorithm == "grpo" else None
        learner_steps = (grpo.steps_per_iteration(settings, sp.episodes_per_iteration * settings.group_size,
                                                  grpo.learner_row_tokens(task, settings, self.seq_len))
                         if settings else sp.learner_steps)
        optimizer = make_optimizer(model, learning_rate=sp.learning_rate,
                                   steps=max(sp.iterations * learner_steps, 2),
                                   warmup_steps=min(50, learner_steps), weight_decay=config.train.weight_decay,
                                   grad_clip=config.train.grad_clip)
        self.graphdef, state = nnx.split((model, optimizer))
        state = place_state(state, self.mesh)  # FSDP: parameters and moments split over the fsdp axis
        self.grpo, self.reference = None, None
        if settings:  # GRPO: its actor and learner; a rollout buffer instead of replay
            self.grpo = grpo.GRPO(task, nnx.split(model)[0], self.graphdef, settings, seq_len=self.seq_len,
                                  traces=traces(config), place=lambda tree: shard_batch(tree, self.mesh),
                                  state_sharding=parallel.state_shardings(state, self.mesh))
            replay = self.grpo.buffer(sp.episodes_per_iteration)
            if settings.kl_beta:  # the frozen reference: grpo.reference's newest checkpoint, or this run's SFT
                ref_model = load_model(config, config.grpo.reference or workdir,
                                       phase=None if config.grpo.reference else "sft")[0]
                self.reference = place_state(nnx.state(ref_model), self.mesh)
        else:
            tree_values = learns_tree_values(sp)
            searcher = Searcher(task, nnx.split(model)[0], env_config(config), search_config(config),
                                seq_len=self.seq_len, mesh=self.mesh,  # each device searches its own problems
                                keep_tree=tree_values)
            replay = ReplayBuffer(sp.replay_capacity, seq_len=self.seq_len, num_candidates=searcher.num_candidates,
                                  step_len=task.max_step_len, value_lambda=sp.value_lambda,
                                  tree_capacity=TREE_STATES_PER_MOVE * sp.replay_capacity if tree_values else 0)
            self.episodes = EpisodeRunner(searcher, action_temperature=sp.action_temperature, tree_states=tree_values)
        self.ckpt = Checkpointer(checkpoint_dir(workdir, "selfplay"))
        self.writer = MetricsWriter(workdir, enabled=main)
        self.it = IterationState(state=state, replay=replay)
        if self.ckpt.latest_step() is not None:
            self._restore()  # into the shardings of this run's mesh, whatever mesh wrote it
        validation = split_problems(config, workdir, "validation")
        self.eval_problems = validation[: config.eval.num_problems]
        self.test_problems = split_problems(config, workdir, "test")[: config.eval.test_problems]
        self.exclude = validation + split_problems(config, workdir, "test")  # never self-play on held-out problems
        batch = min(config.eval.batch_size, len(self.eval_problems))
        self.evaluators = {name: make_evaluator(model, task, config, name, batch, mesh=self.mesh)
                           for name in ("greedy", "mcts")}
        self.learner_step = self.grpo.learner_step if self.grpo else make_learner_step(
            self.graphdef, config, task, state_sharding=parallel.state_shardings(self.it.state, self.mesh))
        self.demo_task = make_task(config, demonstrations=True)
        self.demonstrations = (dataset(config, workdir, self.demo_task, demonstrations=True).as_data_source(split="train")
                               if learns_from_demonstrations(sp) else None)

    # ------------------------------------------------------------ helpers
    @property
    def model(self):
        return nnx.merge(self.graphdef, self.it.state)[0]

    def _restore(self) -> None:
        items, meta = self.ckpt.restore_items({"state": snapshot(self.it.state),
                                                "replay": self.it.replay.restore_template})
        self.it.state = restore_into(self.it.state, items["state"])
        self.it.replay.load_state_dict(items["replay"])
        self.it.iteration, self.it.totals = int(meta["iteration"]), {**dict.fromkeys(TOTALS, 0), **meta["totals"]}
        done = self.it.iteration
        self.writer.truncate_after(lambda r: r.get("phase") not in ("selfplay", "eval") or r["step"] <= done)
        self.log(f"resumed self-play after iteration {done} ({self.ckpt.directory})")

    # ------------------------------------------------------------- phases
    def selfplay(self, it: int) -> dict[str, Any]:
        """Plays ``episodes_per_iteration`` episodes on fresh training problems into the replay buffer."""
        config, sp, task = self.config, self.config.selfplay, self.task
        if sp.algorithm == "sft_only":
            return {}
        if self.grpo is not None:
            return self._grpo_selfplay(it)
        t0 = time.time()
        problems = selfplay_problems(task, config, it, self.exclude)
        params = nnx.state(self.model)
        bar = Progress(total=len(problems), desc=f"iter {it}/{sp.iterations} self-play", enabled=self.progress,
                       unit="episode")
        solved, net_values, outcomes, forwards, computed, moves = [], [], [], 0, 0, 0
        key = jax.random.key(config.seed * 7919 + it)
        B = sp.actor_batch_size
        for start in range(0, len(problems), B):
            chunk = problems[start: start + B]
            batch = self.play_batch(params, chunk, jax.random.fold_in(key, start), start)
            moves += self.it.replay.add_episodes(batch, prompt_lengths=prompt_lengths(task, batch.problems))
            solved.extend(batch.solved.tolist())
            forwards += int(batch.token_forwards.sum())
            computed += int(batch.computed_token_forwards.sum())
            if batch.moves:
                net_values.extend(batch.moves[0].network_value[: len(chunk)].tolist())
                outcomes.extend(batch.solved.astype(np.float32).tolist())
            bar.update(len(chunk))
            bar.set_postfix(solved=f"{np.mean(solved):.1%}")
        bar.close()
        self.it.totals["selfplay_token_forwards"] += forwards
        self.it.totals["selfplay_computed_token_forwards"] += computed
        seconds = time.time() - t0
        # How often the coming learner phase draws each new sample (moves; solved chains for the SFT term):
        # far above 1, it fits this iteration's few hundred moves (experiments/sample_reuse.py).
        draws, (use_moves, use_chains) = sp.learner_steps * sp.learner_batch_size, learner_batch_parts(sp)
        reuse = {**({"learner_draws_per_new_move": draws / max(moves, 1)} if use_moves else {}),
                 **({"learner_draws_per_new_solved_chain": draws / max(int(np.sum(solved)), 1)} if use_chains else {})}
        return {"selfplay_solve_rate": float(np.mean(solved)), "selfplay_episodes": len(problems),
                "selfplay_moves": moves, **reuse,
                "replay_size": self.it.replay.size, "replay_trajectories": self.it.replay.num_trajectories,
                **{f"value_{k}": x for k, x in calibration(np.asarray(net_values), np.asarray(outcomes)).items()},
                "selfplay_seconds": seconds, "episodes_per_s": len(problems) / max(seconds, 1e-9)}

    def play_batch(self, params, problems: list[dict], key, first_id: int):
        """One actor batch: episodes for ``problems`` (padded to ``actor_batch_size``), padding dropped."""
        B = self.config.selfplay.actor_batch_size
        padded = problems + [problems[0]] * (B - len(problems))
        batch = self.episodes.run(params, padded, key, problem_ids=np.arange(first_id, first_id + B))
        return _truncate(batch, len(problems))

    def _grpo_selfplay(self, it: int) -> dict[str, Any]:
        """GRPO's actors: G chains for each of ``episodes_per_iteration`` fresh problems, into the rollout buffer.

        With ``grpo.token_budget`` the actor batches stop once the rollouts' computed forwards plus what the
        learner will spend on the chains with signal (``GRPO.learner_cost``) reach the budget: the batch
        boundary nearest to it, judged by the mean cost of the batches so far.
        """
        config, sp = self.config, self.config.selfplay
        budget = self.grpo.settings.token_budget
        t0 = time.time()
        problems = selfplay_problems(self.task, config, it, self.exclude)
        params = nnx.state(self.model)
        bar = Progress(total=len(problems), desc=f"iter {it}/{sp.iterations} rollouts", enabled=self.progress,
                       unit="problem")
        key = jax.random.key(config.seed * 7919 + it)
        self.it.replay.clear()
        forwards = computed = played = spent = signal = 0
        for batches, start in enumerate(range(0, len(problems), sp.actor_batch_size), start=1):
            chunk = problems[start: start + sp.actor_batch_size]
            rows = self.play_groups(params, chunk, key, start)
            self.it.replay.add(rows)
            forwards += int(rows["token_forwards"].sum())
            computed += int(rows["computed_token_forwards"].sum())
            played += len(chunk)
            signal += int(rows["signal"].sum())
            bar.update(len(chunk))
            if budget:
                spent = computed + self.grpo.learner_cost(signal, reference=self.reference is not None)
                if spent + spent / batches / 2 >= budget:
                    break
        bar.close()
        if budget and spent + spent / batches / 2 < budget:
            self.log(f"iteration {it}: GRPO spent {spent:,} of its {budget:,} token forwards on all "
                     f"{played} problems; raise selfplay.episodes_per_iteration to spend the budget")
        budget_metrics = {"grpo_token_budget": budget, "grpo_budget_spent": spent} if budget else {}
        self.it.totals["selfplay_token_forwards"] += forwards
        self.it.totals["selfplay_computed_token_forwards"] += computed
        seconds = time.time() - t0
        chains = self.it.replay.size
        return {**grpo.rollout_metrics(self.it.replay, self.grpo.settings.group_size), **budget_metrics,
                "selfplay_episodes": played, "rollouts": chains, "rollout_token_forwards": forwards,
                "rollout_computed_token_forwards": computed,
                "selfplay_seconds": seconds, "rollouts_per_s": chains / max(seconds, 1e-9)}

    def play_groups(self, params, problems: list[dict], key, first_id: int) -> dict[str, Any]:
        """One GRPO actor batch: G chains for each of ``problems`` (padded to ``actor_batch_size``), padding dropped.

        Problem ``i`` of the iteration samples with ``fold_in(key, i)``."""
        B, G = self.config.selfplay.actor_batch_size, self.grpo.settings.group_size
        padded = problems + [problems[0]] * (B - len(problems))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(first_id, first_id + B))
        rows = self.grpo.play(params, padded, keys)
        n = len(problems)
        # Per problem: the charged forwards of the real problems; computed ones of the padding rows too.
        return {k: v if k == "computed_token_forwards" else v[:n] if k == "token_forwards" else v[: n * G]
                for k, v in rows.items()}

    def learn(self, it: int) -> dict[str, Any]:
        """``learner_steps`` steps on batches from the replay buffer and/or the demonstrations (``sft_only``, and
        ``alphazero``'s SFT term with ``sft_source="demonstrations"``)."""
        config, sp = self.config, self.config.selfplay
        if self.grpo is not None:
            return self._grpo_learn(it)
        t0 = time.time()
        rng = np.random.default_rng([config.seed, it, 1])
        bar = Progress(total=sp.learner_steps, desc=f"iter {it}/{sp.iterations} learning", enabled=self.progress)
        demo_iter = None
        if self.demonstrations is not None:
            demo_iter = BatchIterator(self.demonstrations, self.demo_task, batch_size=sp.learner_batch_size,
                                      seq_len=self.seq_len, seed=config.seed + it, position=0)
        pending, forwards = [], 0
        width = learner_candidate_width(config, self.task)
        for _ in range(sp.learner_steps):
            batch = _learner_batch(self.it.replay, rng, sp, self.task, demo_iter, candidate_width=width)
            if batch is None:
                break
            pending.append(self.learn_step(batch))
            forwards += learner_token_forwards(batch)
            bar.update(1)
        bar.close()
        learn = _mean_metrics(pending, it)
        self.it.totals["learner_examples"] += len(pending) * sp.learner_batch_size
        self.it.totals["learner_token_forwards"] += forwards
        seconds = time.time() - t0
        return {**{f"learn_{k}": v for k, v in learn.items()}, "learn_seconds": seconds,
                "learner_steps_per_s": len(pending) / max(seconds, 1e-9),
                "learner_tokens_per_s": forwards / max(seconds, 1e-9)}

    def _grpo_learn(self, it: int) -> dict[str, Any]:
        """GRPO's learner: the rollout policy's log-probabilities, then ``updates_per_batch`` epochs of minibatches."""
        config, sp = self.config, self.config.selfplay
        t0 = time.time()
        rng = np.random.default_rng([config.seed, it, 1])
        data, forwards = self.grpo.learner_data(self.it.replay, nnx.state(self.model), self.reference)
        chains = len(data["advantage"])
        steps = self.grpo.settings.updates_per_batch * -(-chains // sp.learner_batch_size)
        bar = Progress(total=steps, desc=f"iter {it}/{sp.iterations} learning", enabled=self.progress)
        pending = []
        for batch in self.grpo.minibatches(data, rng):
            pending.append(self.learn_step(batch))
            forwards += 3 * self.grpo.learner_forwards(batch)  # forward and backward, as learner_token_forwards
            bar.update(1)
        bar.close()
        learn = _mean_metrics(pending, it)
        self.it.totals["learner_examples"] += chains * self.grpo.settings.updates_per_batch
        self.it.totals["learner_token_forwards"] += forwards
        seconds = time.time() - t0
        return {**{f"learn_{k}": v for k, v in learn.items()}, "learner_steps": len(pending),
                "learner_chains": chains, "learner_token_forwards": forwards, "learn_seconds": seconds,
                "learner_steps_per_s": len(pending) / max(seconds, 1e-9),
                "learner_tokens_per_s": forwards / max(seconds, 1e-9)}

    def learn_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One jitted learner step on a host batch (its rows split over the mesh); returns its metrics."""
        self.it.state, metrics = self.learner_step(self.it.state, shard_batch(batch, self.mesh))
        return metrics

    def evaluate(self, it: int) -> dict[str, Any]:
        """Held-out solve rates, policy only (greedy) and with MCTS; written as the ``eval`` record of ``it``."""
        t0 = time.time()
        model = self.model
        key = jax.random.key(self.config.seed + 99)
        out = {}
        for name, evaluator in self.evaluators.items():
            evaluator.set_params(model)
            out[name] = evaluator.run(self.eval_problems, key)
        if parallel.is_main_process():  # per-problem, for paired tests between iterations and algorithms
            for name, rows in out.items():
                write_results(rows, os.path.join(self.workdir, "results", f"validation_{name}_{it}.jsonl"))
        values = {"greedy_solve_rate": float(np.mean([r["solved"] for r in out["greedy"]])),
                  "mcts_solve_rate": float(np.mean([r["solved"] for r in out["mcts"]])),
                  "mcts_token_forwards_per_problem": float(np.mean([r["token_forwards"] for r in out["mcts"]]))}
        if self.test_problems:  # the reported split: per-problem greedy results, kept for paired tests
            evaluator = self.evaluators["greedy"]
            rows = evaluator.run(self.test_problems, key)
            if parallel.is_main_process():
                write_results(rows, os.path.join(self.workdir, "results", f"test_greedy_{it}.jsonl"))
            values["test_greedy_solve_rate"] = float(np.mean([r["solved"] for r in rows]))
        ev = self.config.eval
        if ev.value_problems:
            enumerated = self.config.search.candidates == "enumerate"  # greedy is over the legal steps
            report = value_report(model, self.task, self.eval_problems[: ev.value_problems],
                                  jax.random.fold_in(key, 1), chains=1, mc_samples=ev.value_mc_samples,
                                  temperature=self.config.search.candidate_temperature,
                                  policy_solved=[r["solved"] for r in out["greedy"][: ev.value_problems]],
                                  policy="greedy over the legal steps" if enumerated else "greedy")
            values.update(flat_metrics(report))
        totals = {**self.it.totals, "total_token_forwards": self.it.totals["selfplay_computed_token_forwards"]
                  + self.it.totals["learner_token_forwards"]}
        values.update(eval_seconds=time.time() - t0, **totals)
        return self.writer.write(it, "eval", values)

    def save(self, it: int) -> dict[str, Any]:
        """Checkpoints the iteration (model, optimizer, replay, totals): a rerun resumes after it."""
        t0 = time.time()
        self.ckpt.save(it, snapshot(self.it.state), {"iteration": it, "phase": "selfplay", "totals": self.it.totals,
                                                     "step": it}, replay=self.it.replay.state_dict())
        self.it.iteration = it
        return {"checkpoint_seconds": time.time() - t0}

    # ---------------------------------------------------------------- run
    def run(self, end: int) -> None:
        """Evaluates the starting point once, then runs iterations ``iteration + 1 .. end``."""
        sp = self.config.selfplay
        if self.it.iteration == 0 and not read_metrics(self.workdir, "eval"):
            row = self.evaluate(0)
            self.log(f"iteration 0 (SFT start): greedy {row['greedy_solve_rate']:.1%}, "
                     f"MCTS@{sp.eval_simulations} {row['mcts_solve_rate']:.1%}")
        while self.it.iteration < end:
            it = self.it.iteration + 1
            played = self.selfplay(it)
            learned = self.learn(it)
            self.writer.write(it, "selfplay", {**played, **learned})
            row = self.evaluate(it)
            self.writer.write(it, "timing", self.save(it))
            self.log(f"iteration {it}: greedy {row['greedy_solve_rate']:.1%}, MCTS@{sp.eval_simulations} "
                     f"{row['mcts_solve_rate']:.1%}"
                     + (f", self-play solved {played['selfplay_solve_rate']:.1%}" if played else ""))

    def close(self) -> None:
        self.writer.close()


def run_training(config: ConfigDict, workdir: str, *, progress: bool = True, log: Callable[[str], None] = print,
                 stop_after_iterations: int | None = None) -> dict[str, Any]:
    """Runs or resumes the whole job (SFT, then self-play); returns the per-iteration table rows.

    ``stop_after_iterations`` ends the call after that many iterations.
    """
    workdir = os.path.abspath(workdir)
    task = make_task(config)
    mesh = make_mesh(config)  # one mesh for every phase of the run
    validate_config(config, task, mesh)
    log = log if parallel.is_main_process() else (lambda *_: None)
    t_start = time.time()
    sft = train_sft(config, workdir, progress=progress, log=log, mesh=mesh)
    loop = SelfPlayLoop(config, workdir, sft.model, task, progress=progress, log=log, mesh=mesh)
    sp = config.selfplay
    end = sp.iterations if stop_after_iterations is None else min(sp.iterations,
                                                                  loop.it.iteration + stop_after_iterations)
    try:
        loop.run(end)
    finally:
        loop.close()
    rows = read_metrics(workdir, "eval")
    log("")
    log(format_iterations(rows, config, time.time() - t_start))
    return {"iterations": rows, "parameters": count_params(sft.model)}



def _mean_metrics(pending: list[dict[str, Any]], it: int) -> dict[str, float]:
    """The mean of each learner metric over an iteration's steps; a non-finite loss stops the run."""
    learn = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]} if pending else {}
    if learn and not np.isfinite(learn["loss"]):
        raise TrainingDiverged(
            f"self-play learner loss became {learn['loss']} in iteration {it}; the checkpoint after "
            f"iteration {it - 1} is kept. Lower --config.selfplay.learning_rate and rerun to resume.")
    return learn


def _truncate(batch, n: int):
    """Drops the padding rows of an episode batch."""
    import dataclasses as dc
    def rows(x):  # an array, or the dict of arrays that tree_states is (None where not recorded)
        return None if x is None else {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]

    moves = [dc.replace(m, **{f.name: rows(getattr(m, f.name)) for f in dc.fields(m)}) for m in batch.moves]
    return dc.replace(batch, problems=batch.problems[:n], texts=batch.texts[:n], verdicts=batch.verdicts[:n],
                      solved=batch.solved[:n], token_forwards=batch.token_forwards[:n], moves=moves,
                      num_steps=batch.num_steps[:n])


def learner_token_forwards(batch: dict[str, Any]) -> int:
    """What one learner step on ``batch`` computes, in token forwards: every token through the model
    (padding included), three times (forward and backward, the usual 1 + 2 FLOPs convention)."""
    n = 0
    if "candidates" in batch:  # one pass over [state | K candidates] per move (score_continuations)
        B, T = batch["tokens"].shape
        _, K, S = batch["candidates"].shape
        n += B * (T + K * S)
    if "sft" in batch:
        n += int(np.asarray(batch["sft"]["tokens"]).size)
    if "tree_states" in batch:  # one pass over each proven tree state
        n += int(np.asarray(batch["tree_states"]["tokens"]).size)
    return 3 * n


def learner_candidate_width(config, task) -> int | None:
    """The tokens of each candidate a learner batch keeps: with enumerated candidates the model-written ones
    (``Task.legal_written_len``, the only ones a legal step's score reads); None (all) otherwise."""
    return task.legal_written_len() if config.search.candidates == "enumerate" else None


def learns_tree_values(sp) -> bool:
    """Whether the learner also fits the value to the states its search trees proved (``tree_value_weight``)."""
    return sp.algorithm in ("alphazero", "expert_iteration") and sp.tree_value_weight > 0


def learner_batch_parts(sp) -> tuple[bool, bool]:
    """(replayed moves, SFT rows): what a learner batch of ``selfplay`` config ``sp`` holds. Moves are scored
    (one pass over each state and its K candidates) only when a policy or value term uses them."""
    if sp.algorithm == "sft_only":
        return False, True
    if sp.algorithm == "expert_iteration":
        return sp.value_weight > 0, True
    return sp.policy_weight > 0 or sp.value_weight > 0, sp.sft_weight > 0


def _learner_batch(replay: ReplayBuffer, rng, sp, task, demo_iter, *, candidate_width: int | None = None):
    """One learner batch: replayed moves and/or SFT rows (``learner_batch_parts``); the SFT rows come from
    ``demo_iter`` where the learner reads the demonstrations (``learns_from_demonstrations``), else from the
    replay's solved trajectories. None while there is nothing to learn from. ``candidate_width``: keep only
    that many tokens of each candidate (the task's legal steps: their model-written ones, the only tokens a
    candidate's score reads, ``Task.legal_written_len``)."""
    use_moves, needs_sft = learner_batch_parts(sp)
    if replay.size == 0 and (use_moves or demo_iter is None):
        return None
    batch: dict[str, Any] = {}
    if use_moves:
        moves = replay.sample_moves(rng, sp.learner_batch_size)
        batch.update({k: moves[k] for k in ("tokens", "length", "candidates", "cand_valid", "action_weights",
                                            "cand_log_inclusion", "search_value", "outcome", "td_lambda",
                                            "proven")})
        batch["candidates"] = batch["candidates"][..., :candidate_width]
    if learns_tree_values(sp):
        states = replay.sample_tree_states(rng, sp.learner_batch_size)
        if states is not None:
            batch["tree_states"] = states
    if needs_sft and demo_iter is not None:
        batch["sft"] = next(demo_iter)
    elif needs_sft:
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
