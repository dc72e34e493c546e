"""The run layer: one experiment config -> the objects every command builds from.

Everything that turns a config (``configs/*.py``, or a run directory's
``config.json``) into working parts lives here, below training, search and
evaluation, so that ``alphareason train``, ``eval``, ``search``, the
benchmarks, the experiments and notebooks all build the same way:

* ``make_task(config)``: the task and its options;
* ``make_model_config(config, task)``: the transformer's shape; its context
  is the task's (``Task.context_len``) unless ``model.max_len`` sets it;
* ``make_data_spec(config)``, ``data_dir(config, workdir)``,
  ``split_problems(config, workdir, split)``: the dataset and its splits;
* ``env_config(config)``, ``search_config(config, ...)``: the search;
* ``make_mesh(config)``: the device mesh every phase runs on
  (``mesh.data`` x ``mesh.fsdp``, -1 inferred), and ``place_state`` /
  ``check_mesh``: parameters and batches on it (``alphareason.parallel``);
* ``load_model(config, workdir, mesh=...)``: the newest trained network of a
  run, placed on the mesh (a checkpoint of any mesh restores on any other).

A run directory (``workdir``) holds ``config.json`` (the config it was made
with; ``run_config`` reads it back), ``data/`` (the TFDS dataset, unless
``data.data_dir`` is set), ``checkpoints/{sft,selfplay}/`` (orbax) and
``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os

from alphareason.config import ConfigDict, ConfigError
from alphareason.data import DataSpec, build_dataset, load_records, make_spec
from alphareason.model import ModelConfig
from alphareason.search.env import EnvConfig
from alphareason.search.mcts import SearchConfig
from alphareason.tasks import Task, get_task, read_problems

CHECKPOINT_PHASES = ("selfplay", "sft")  # newest first: what ``load_model`` looks for


def task_options(config: ConfigDict) -> dict:
    return dict(config.task.options.to_dict() if hasattr(config.task.options, "to_dict") else config.task.options)


def make_task(config: ConfigDict, *, demonstrations: bool = False) -> Task:
    """The run's task; ``demonstrations``: the task of the SFT demonstrations (``data.sft_task_options``
    changes options for them, e.g. Countdown-3 demonstrations for a Countdown-4 run)."""
    options = task_options(config)
    if demonstrations:
        options.update(dict(config.data.sft_task_options))
    try:
        return get_task(config.task.name, **options)
    except ValueError as e:
        raise ConfigError(f"task config{' (data.sft_task_options)' if demonstrations else ''}: {e}") from e


def traces(config: ConfigDict) -> bool:
    """Whether the run's demonstrations (and so its decoding) are search traces (Stream of Search)."""
    return config.data.demonstrations == "traces"


def sequence_length(config: ConfigDict, task: Task) -> int:
    """The model's context T: ``model.max_len``, or (0) the task's bound for the run's demonstrations.

    For search traces the task's bound (``max_trace_steps`` steps of the
    longest step each; Countdown-4: 1,234 tokens) is far above the traces'
    real lengths (at most about 530), so ``model.max_len`` may be set below it,
    down to what a shortest solution needs: longer traces are then cut to the
    context, in the data and when the model writes one.
    """
    needed = task.context_len(traces=False)
    if config.model.max_len and config.model.max_len < needed:
        raise ConfigError(f"model.max_len={config.model.max_len} is shorter than the {needed} tokens a "
                          f"chain of thought of this task can take; raise it or set it to 0 (automatic)")
    return int(config.model.max_len or task.context_len(traces=traces(config)))


def make_model_config(config: ConfigDict, task: Task) -> ModelConfig:
    m = config.model
    try:
        return ModelConfig(max_len=sequence_length(config, task), d_model=m.d_model, num_layers=m.num_layers,
                           num_heads=m.num_heads, d_ff=m.d_ff, positions=m.positions, compute_dtype=m.compute_dtype)
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from e


def learns_from_demonstrations(sp: ConfigDict) -> bool:
    """Whether self-play's learner (``selfplay`` config ``sp``) reads the demonstrations: ``sft_only``, and
    ``alphazero`` with its SFT term anchored to them (``sft_source="demonstrations"``)."""
    return sp.algorithm == "sft_only" or (sp.algorithm == "alphazero" and sp.sft_weight > 0
                                          and sp.sft_source == "demonstrations")


def make_data_spec(config: ConfigDict, task: Task | None = None, *, demonstrations: bool = False) -> DataSpec:
    """The dataset of the run (its held-out splits are the run's), or with ``demonstrations`` the one SFT
    imitates (the same unless ``data.sft_task_options`` is set)."""
    d = config.data
    task = task or make_task(config, demonstrations=demonstrations)
    exclude: tuple[str, ...] = ()
    if d.exclude_file:
        exclude = tuple(json.dumps(p, sort_keys=True) for p in read_problems(d.exclude_file, task))
    options = task_options(config)
    if demonstrations:
        options.update(dict(d.sft_task_options))
    # The run's own dataset has no demonstrations when SFT imitates another task's, or when nothing imitates.
    imitated = config.train.steps > 0 or learns_from_demonstrations(config.selfplay)
    own_demonstrations = demonstrations or (imitated and not d.sft_task_options)
    return make_spec(config.task.name, options, train_size=d.train_size if own_demonstrations else 0,
                     validation_size=d.validation_size, test_size=d.test_size, seed=d.seed,
                     demonstrations=d.demonstrations, negatives_per_problem=d.negatives_per_problem,
                     exclude=exclude, max_chain_len=sequence_length(config, task) if traces(config) else 0)


def data_dir(config: ConfigDict, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def dataset(config: ConfigDict, workdir: str, task: Task | None = None, *, demonstrations: bool = False):
    """The run's TFDS builder (built on first use; array_record); ``demonstrations``: SFT's."""
    return build_dataset(make_data_spec(config, task, demonstrations=demonstrations), data_dir(config, workdir))


def split_problems(config: ConfigDict, workdir: str, split: str) -> list[dict]:
    """Every problem of one split (``train``, ``validation``, ``test``) of the run's dataset."""
    return [r["problem"] for r in load_records(dataset(config, workdir).as_data_source(split=split))]


def env_config(config: ConfigDict) -> EnvConfig:
    s = config.search
    return EnvConfig(num_candidates=s.num_candidates, candidates=s.candidates, temperature=s.candidate_temperature,
                     length_normalize=s.length_normalize, distinct=s.distinct_candidates, group_rows=s.group_rows)


def search_config(config: ConfigDict, *, num_simulations: int | None = None, policy: str | None = None) -> SearchConfig:
    """The config's ``search`` section as a ``SearchConfig`` (``num_simulations``/``policy`` override it)."""
    s = config.search
    try:
        return SearchConfig(policy=policy or s.policy, num_simulations=num_simulations or s.num_simulations,
                            max_num_considered_actions=s.max_num_considered_actions, gumbel_scale=s.gumbel_scale,
                            value_scale=s.value_scale, rescale_values=s.rescale_values, pb_c_init=s.pb_c_init,
                            dirichlet_alpha=s.dirichlet_alpha, dirichlet_fraction=s.dirichlet_fraction,
                            max_depth=s.max_depth or None, max_tree_gib=s.max_tree_gib)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def make_optimizer(model, *, learning_rate: float, steps: int, warmup_steps: int, weight_decay: float,
                   grad_clip: float):
    """AdamW with global-norm clipping, linear warmup and cosine decay to a tenth over ``steps``.

    Its state's structure is part of every checkpoint (``(model, optimizer)``).
    """
    import optax
    from flax import nnx
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=min(warmup_steps, max(steps - 1, 1)),
        decay_steps=max(steps, 2), end_value=learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_mesh(config: ConfigDict):
    """The run's device mesh from ``mesh.data`` and ``mesh.fsdp`` (-1: inferred from the device count).

    Raises ``ConfigError`` when the sizes do not fit the devices of all
    processes together.
    """
    from alphareason import parallel
    try:
        return parallel.make_mesh(data=int(config.mesh.data), fsdp=int(config.mesh.fsdp))
    except ValueError as e:
        import jax
        raise ConfigError(f"{e} (mesh.data={config.mesh.data}, mesh.fsdp={config.mesh.fsdp}; this run sees "
                          f"{jax.device_count()} devices in {jax.process_count()} process(es))") from None


def check_mesh(config: ConfigDict, mesh, *, batches: dict[str, int], model_config: ModelConfig | None = None) -> None:
    """Refuses batch sizes that do not split over the mesh, and a model width FSDP cannot split.

    ``batches``: ``{"train.batch_size": 64, ...}``, the global batch sizes
    a phase will use.
    """
    from alphareason import parallel
    try:
        for name, size in batches.items():
            parallel.check_batch(size, mesh, name=name)
        if model_config is not None:
            parallel.check_model(model_config, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def place_state(state, mesh):
    """An ``nnx`` state (model, optimizer) placed on ``mesh`` by the parameters' logical axes (FSDP)."""
    from alphareason import parallel
    return parallel.place_state(state, mesh)


def checkpoint_dir(workdir: str, phase: str) -> str:
    return os.path.join(workdir, "checkpoints", phase)


def load_model(config: ConfigDict, workdir: str, *, phase: str | None = None, mesh=None):
    """The newest trained network of a run: self-play if present, else SFT.

    Returns ``(model, task, meta)``; ``meta`` is the checkpoint's metadata
    (``phase``, ``step``, ...). Checkpoints hold the split ``(model,
    optimizer)`` state; the optimizer is rebuilt with the same structure and
    dropped after the restore. With ``mesh`` the parameters are read straight
    into their shardings on it (FSDP over ``fsdp``), whatever mesh wrote the
    checkpoint. Raises ``CheckpointError`` when the run has no checkpoint,
    naming the command that makes one, or when the checkpoint's parameter
    shapes differ from the config's.
    """
    from flax import nnx

    from alphareason.checkpoint import Checkpointer, CheckpointError, restore_into, snapshot
    from alphareason.model import Transformer
    task = make_task(config)
    mcfg = make_model_config(config, task)
    for name in ([phase] if phase else CHECKPOINT_PHASES):
        directory = checkpoint_dir(workdir, name)
        if not os.path.isdir(directory) or Checkpointer(directory).latest_step() is None:
            continue
        model = Transformer(mcfg, rngs=nnx.Rngs(0))
        optimizer = make_optimizer(model, learning_rate=1.0, steps=2, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)
        graphdef, state = nnx.split((model, optimizer))
        if mesh is not None:
            state = place_state(state, mesh)
        pure, meta = Checkpointer(directory).restore(snapshot(state))
        model, _ = nnx.merge(graphdef, restore_into(state, pure))
        return model, task, meta
    raise CheckpointError(f"no {phase + ' ' if phase else ''}checkpoint under "
                          f"{os.path.join(os.path.abspath(workdir), 'checkpoints')}; run "
                          f"`alphareason train --config ... --workdir {workdir}` first")


# ------------------------------------------------------------------ a run, for notebooks and scripts
class Run:
    """A trained run directory, ready to search and evaluate: ``run = load_run("runs/demo")``.

    Attributes: ``config`` (the run's config), ``task``, ``model`` (its newest
    checkpoint: self-play if present, else SFT), ``checkpoint`` (that
    checkpoint's metadata) and ``workdir``.
    """

    def __init__(self, workdir: str, config: ConfigDict, model, task: Task, checkpoint: dict):
        self.workdir, self.config, self.model, self.task, self.checkpoint = workdir, config, model, task, checkpoint

    def problems(self, split: str = "validation") -> list[dict]:
        """A held-out split of the run's dataset (``validation`` or ``test``)."""
        return split_problems(self.config, self.workdir, split)

    def search(self, problem, *, simulations: int | None = None, policy: str | None = None, seed: int = 0) -> dict:
        """Searches one problem (a dict or the task's text form, ``"4 9 13 -> 23"``) from its prompt.

        Returns the first move's search tree as ``alphareason.viz`` draws it
        (``alphareason.viz.show(tree)`` in Jupyter), with its settings.
        """
        import jax
        from flax import nnx

        from alphareason.search.mcts import Searcher
        from alphareason.search.tree import export_tree
        if isinstance(problem, str):
            problem = self.task.parse_problem(problem)
        settings = search_config(self.config, num_simulations=simulations, policy=policy)
        graphdef, params = nnx.split(self.model)
        searcher = Searcher(self.task, graphdef, env_config(self.config), settings, seq_len=self.model.config.max_len,
                            keep_tree=True)
        inputs = jax.tree.map(jax.numpy.asarray, searcher.env.initial([problem]))
        result = searcher(params, jax.random.key(seed)[None], inputs)
        return export_tree(result, 0, task=self.task, problem=problem, policy=settings.policy)

    def evaluate(self, problems, *, strategy: str = "greedy", simulations: int | None = None, samples: int = 8,
                 temperature: float = 0.7, batch_size: int = 64, seed: int = 0) -> list[dict]:
        """Results rows (``alphareason eval``'s format) of ``greedy``, ``sample`` or ``mcts`` on ``problems``."""
        import jax

        from alphareason.eval import EvalSettings, Evaluator
        problems = [self.task.parse_problem(p) if isinstance(p, str) else p for p in problems]
        settings = EvalSettings(strategy=strategy, samples=samples, temperature=temperature, batch_size=batch_size,
                                env=env_config(self.config), search=search_config(self.config,
                                                                                  num_simulations=simulations),
                                traces=traces(self.config))
        return Evaluator(self.model, self.task, settings).run(problems, jax.random.key(seed))


def load_run(workdir: str, overrides=()) -> Run:
    """The run in ``workdir`` (its ``config.json`` and newest checkpoint); ``overrides`` as on the command line."""
    from alphareason.config import apply_overrides, run_config
    config = apply_overrides(run_config(workdir), overrides)
    model, task, meta = load_model(config, workdir)
    return Run(os.path.abspath(workdir), config, model, task, meta)
