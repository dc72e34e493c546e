"""Supervised warm start (SFT): demonstrations -> policy, success labels -> value.

``train_sft(config, workdir)`` builds (or reuses) the TFDS dataset, creates or
restores the model and optimizer, and trains with one jitted step. Every
``checkpoint_every`` steps it writes an orbax checkpoint holding the model,
the optimizer, the step and the data position, so a killed run resumed with
the same command continues exactly where it stopped (same batches, same
numbers). A NaN loss stops the run with a message and keeps the last good
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alphareason.config import ConfigDict, ConfigError
from alphareason.data import BatchIterator, DataSpec, build_dataset, make_spec
from alphareason.model import ModelConfig, Transformer, count_params
from alphareason.tasks import Task, get_task, read_problems
from alphareason.train.checkpoint import Checkpointer
from alphareason.train.losses import sft_loss
from alphareason.train.metrics import MetricsWriter
from alphareason.train.progress import Progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------- set-up
def make_task(config: ConfigDict) -> Task:
    options = dict(config.task.options.to_dict() if hasattr(config.task.options, "to_dict") else config.task.options)
    try:
        return get_task(config.task.name, **options)
    except ValueError as e:
        raise ConfigError(f"task config: {e}") from e


def sequence_length(config: ConfigDict, task: Task) -> int:
    """The model's context T: by default the tokens of the longest chain of
    thought (BOS+prompt, the steps, EOS).

    A search trace's bound (``max_trace_steps`` steps of the longest step
    each) is far above the traces' real lengths (Countdown-4: 1,234 against
    at most about 530), so for traces ``model.max_len`` may be set below it,
    down to what a shortest solution needs: longer traces are then cut to the
    context, in the data and when the model writes one (a context budget, as
    Stream of Search's 4,096 tokens).
    """
    needed = task.max_prompt_len + task.max_steps * task.max_step_len + 1
    bound = needed
    if config.data.demonstrations == "traces":
        bound = task.max_prompt_len + getattr(task, "max_trace_steps", 4 * task.max_steps) * task.max_step_len + 1
    if config.model.max_len and config.model.max_len < needed:
        raise ConfigError(f"model.max_len={config.model.max_len} is shorter than the {needed} tokens a "
                          f"chain of thought of this task can take; raise it or set it to 0 (automatic)")
    return int(config.model.max_len or bound)


def make_model_config(config: ConfigDict, task: Task) -> ModelConfig:
    m = config.model
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    if m.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}; choose 'float32' or 'bfloat16'")
    return ModelConfig(max_len=sequence_length(config, task), d_model=m.d_model, num_layers=m.num_layers,
                       num_heads=m.num_heads, d_ff=m.d_ff, positions=m.positions, compute_dtype=m.compute_dtype)


def make_data_spec(config: ConfigDict) -> DataSpec:
    d = config.data
    exclude: tuple[str, ...] = ()
    if d.exclude_file:
        task = make_task(config)
        exclude = tuple(json.dumps(p, sort_keys=True) for p in read_problems(d.exclude_file, task))
    options = config.task.options.to_dict() if hasattr(config.task.options, "to_dict") else dict(config.task.options)
    return make_spec(config.task.name, options, train_size=d.train_size, validation_size=d.validation_size,
                     test_size=d.test_size, seed=config.seed, demonstrations=d.demonstrations,
                     negatives_per_problem=d.negatives_per_problem, exclude=exclude,
                     max_chain_len=sequence_length(config, make_task(config)) if d.demonstrations == "traces" else 0)


def data_dir(config: ConfigDict, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def split_problems(config: ConfigDict, workdir: str, split: str) -> list[dict]:
    """Every problem of one split (``train``, ``validation``, ``test``) of the run's dataset."""
    from alphareason.data import load_records
    builder = build_dataset(make_data_spec(config), data_dir(config, workdir))
    return [r["problem"] for r in load_records(builder.as_data_source(split=split))]


def make_optimizer(model: nnx.Module, *, learning_rate: float, steps: int, warmup_steps: int,
                   weight_decay: float, grad_clip: float) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=min(warmup_steps, max(steps - 1, 1)),
        decay_steps=max(steps, 2), end_value=learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def check_workdir_config(workdir: str, config: ConfigDict, sections=("task", "model", "data")) -> None:
    """Refuses to resume a workdir created with an incompatible config."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(config.to_dict(), default=str))
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        diffs = [s for s in sections if stored.get(s) != current.get(s)]
        if diffs:
            raise ConfigError(
                f"{workdir} was created with a different {', '.join(diffs)} config than the one given now; "
                f"resume with the same config, or use a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------ the train step
def make_train_step(graphdef, *, policy_weight: float, value_weight: float,
                    loss_fn: Callable = sft_loss) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` over the split (model, optimizer)."""

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def objective(m):
            return loss_fn(m, batch, policy_weight=policy_weight, value_weight=value_weight)

        (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0)


def snapshot(state) -> dict:
    """The split (model, optimizer) state as a pure dict of arrays (for orbax)."""
    return nnx.to_pure_dict(state)


def restore_into(state, pure: dict):
    nnx.replace_by_pure_dict(state, pure)
    return state


@dataclasses.dataclass
class SFTResult:
    model: Transformer
    task: Task
    steps: int
    last_metrics: dict[str, float]


def train_sft(config: ConfigDict, workdir: str, *, progress: bool = True, stop_after: int | None = None,
              log: Callable[[str], None] = print) -> SFTResult:
    """Runs (or resumes) SFT to ``config.train.steps``; returns the trained model.

    ``stop_after`` stops after that many steps of this call (tests use it to
    simulate a kill; the checkpoint at the stop is what a resume continues).
    """
    workdir = os.path.abspath(workdir)
    task = make_task(config)
    tcfg = config.train
    if tcfg.steps < 0 or tcfg.batch_size <= 0:
        raise ConfigError(f"train.steps must be >= 0 and train.batch_size > 0 (got {tcfg.steps}, {tcfg.batch_size})")
    imitate_unsolved = bool(tcfg.get("imitate_unsolved", False))
    if imitate_unsolved and (config.data.demonstrations != "traces" or config.data.negatives_per_problem):
        raise ConfigError("train.imitate_unsolved=True imitates every training record, so it needs "
                          "data.demonstrations=traces and data.negatives_per_problem=0 (random-walk "
                          "negatives must not be imitated; the unsolved traces train the value head)")
    mcfg = make_model_config(config, task)
    check_workdir_config(workdir, config)
    spec = make_data_spec(config)
    t0 = time.time()
    builder = build_dataset(spec, data_dir(config, workdir))
    source = builder.as_data_source(split="train")
    log(f"data: {len(source)} training examples ({spec.config_name()}), ready in {time.time() - t0:.1f}s")

    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))
    optimizer = make_optimizer(model, learning_rate=tcfg.learning_rate, steps=tcfg.steps,
                               warmup_steps=tcfg.warmup_steps, weight_decay=tcfg.weight_decay,
                               grad_clip=tcfg.grad_clip)
    graphdef, state = nnx.split((model, optimizer))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "sft"))
    metrics_writer = MetricsWriter(workdir)
    step, position = 0, 0
    if ckpt.latest_step() is not None:
        pure, meta = ckpt.restore(snapshot(state))
        state = restore_into(state, pure)
        step, position = int(meta["step"]), int(meta["data_position"])
        metrics_writer.truncate_after(lambda r: r.get("phase") != "sft" or r["step"] <= step)
        log(f"resumed SFT from step {step} ({ckpt.directory})")
    else:
        log(f"model: {count_params(model):,} parameters, sequence length {mcfg.max_len}")

    batches = BatchIterator(source, task, batch_size=tcfg.batch_size, seq_len=mcfg.max_len,
                            seed=config.seed, position=position, imitate_unsolved=imitate_unsolved)
    train_step = make_train_step(graphdef, policy_weight=tcfg.policy_weight, value_weight=tcfg.value_weight)
    last: dict[str, float] = {}
    pending: list[dict] = []
    end = tcfg.steps if stop_after is None else min(tcfg.steps, step + stop_after)
    bar = Progress(total=tcfg.steps, initial=step, desc="sft", enabled=progress)
    tokens_seen, t_last = 0, time.time()
    while step < end:
        batch = next(batches)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        tokens_seen += int(batch["tokens"].size)
        step += 1
        bar.update(1)
        save_now = step % tcfg.checkpoint_every == 0 or step == end
        if step % tcfg.log_every == 0 or save_now:
            values = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
            pending = []
            if not all(np.isfinite(v) for v in values.values()):
                bar.close()
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"SFT loss became {values.get('loss')} by step {step}; the last good checkpoint "
                    f"(step {good}) in {ckpt.directory} is kept. Lower --config.train.learning_rate "
                    f"(now {tcfg.learning_rate}) or raise warmup, then rerun the same command to resume.")
            now = time.time()
            values["tokens_per_s"] = tokens_seen / max(now - t_last, 1e-9)
            tokens_seen, t_last = 0, now
            last = metrics_writer.write(step, "sft", values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
        if save_now:
            ckpt.save(step, snapshot(state), {"step": step, "data_position": batches.position, "phase": "sft"})
    bar.close()
    metrics_writer.close()
    model, optimizer = nnx.merge(graphdef, state)
    return SFTResult(model=model, task=task, steps=step, last_metrics=last)


def load_model(config: ConfigDict, workdir: str, *, phase: str | None = None) -> tuple[Transformer, Task, dict]:
    """The newest trained model in ``workdir``: self-play if present, else SFT.

    Checkpoints hold the split ``(model, optimizer)`` state; the optimizer is
    rebuilt with the same structure and dropped after the restore.
    """
    from alphareason.train.checkpoint import CheckpointError
    task = make_task(config)
    mcfg = make_model_config(config, task)
    for name in ([phase] if phase else ["selfplay", "sft"]):
        directory = os.path.join(workdir, "checkpoints", name)
        if not os.path.isdir(directory) or Checkpointer(directory).latest_step() is None:
            continue
        model = Transformer(mcfg, rngs=nnx.Rngs(0))
        optimizer = make_optimizer(model, learning_rate=1.0, steps=2, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)
        graphdef, state = nnx.split((model, optimizer))
        ckpt = Checkpointer(directory)
        pure, meta = ckpt.restore(snapshot(state))
        model, _ = nnx.merge(graphdef, restore_into(state, pure))
        return model, task, meta
    raise CheckpointError(f"no checkpoint under {os.path.join(os.path.abspath(workdir), 'checkpoints')}; run "
                          f"`alphareason train --config ... --workdir {workdir}` first")
