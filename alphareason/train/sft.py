"""Supervised warm start (SFT): demonstrations -> policy, success labels -> value.

``train_sft(config, workdir)`` builds (or reuses) the TFDS dataset, creates or
restores the model and optimizer, and trains with one jitted step. Every
``checkpoint_every`` steps it writes an orbax checkpoint holding the model,
the optimizer, the step and the data position, so a killed run resumed with
the same command continues exactly where it stopped (same batches, same
numbers). A NaN loss stops the run with a message and keeps the last good
checkpoint.

It runs on the run's mesh (``mesh.data`` x ``mesh.fsdp``): parameters and
optimizer state split by their logical axes (FSDP), each batch's rows split
over every device. In a multi-process run each process encodes and feeds
only its own rows of each batch; process 0 writes the logs and metrics, and
all processes write the checkpoints together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from alphareason import parallel
from alphareason.checkpoint import Checkpointer, restore_into, snapshot
from alphareason.config import ConfigDict, ConfigError, config_json, stored_config_json
from alphareason.data import BatchIterator
from alphareason.data.loader import VALUE_LABELS
from alphareason.model import Transformer, count_params
from alphareason.run import (check_mesh, checkpoint_dir, dataset, make_data_spec, make_mesh, make_model_config,
                             make_optimizer, make_task, place_state)
from alphareason.tasks import Task
from alphareason.train.losses import sft_loss
from alphareason.train.metrics import MetricsWriter
from alphareason.train.progress import Progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------- set-up
def check_workdir_config(workdir: str, config: ConfigDict, sections=("task", "model", "data")) -> None:
    """Refuses to resume a workdir created with an incompatible config; process 0 writes ``config.json``.

    The mesh may change between runs: checkpoints restore on any mesh.
    """
    path = os.path.join(workdir, "config.json")
    current = config_json(config)
    if os.path.exists(path):
        stored = stored_config_json(path)
        diffs = [s for s in sections if stored.get(s) != current.get(s)]
        if diffs:
            raise ConfigError(
                f"{workdir} was created with a different {', '.join(diffs)} config than the one given now; "
                f"resume with the same config, or use a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    if not parallel.is_main_process():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_value_label(config: ConfigDict, task: Task) -> None:
    """Refuses an unknown ``data.value_label``, or the oracle label for a task without an exact solver."""
    label = config.data.value_label
    if label not in VALUE_LABELS:
        raise ConfigError(f"data.value_label={label!r}; choose one of {', '.join(VALUE_LABELS)}")
    if label == "oracle" and task.solvable_after(task.generate(0, 1)[0], "") is None:
        raise ConfigError(f"data.value_label='oracle' labels states with the task's exact solver, and task "
                          f"{task.name} has none for partial chains; use data.value_label='chain'")


# ------------------------------------------------------------ the train step
def make_train_step(graphdef, *, policy_weight: float, value_weight: float,
                    loss_fn: Callable = sft_loss, state_sharding=None) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)`` over the split (model, optimizer).

    ``state_sharding`` (``parallel.state_shardings``) keeps the new state
    where the old one lived (FSDP: split over ``fsdp``); the batch's rows may
    be split over the mesh and XLA partitions the step accordingly.
    """

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def objective(m):
            return loss_fn(m, batch, policy_weight=policy_weight, value_weight=value_weight)

        (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return parallel.jit_state_step(step, state_sharding)


@dataclasses.dataclass
class SFTResult:
    model: Transformer
    task: Task
    steps: int
    last_metrics: dict[str, float]


def train_sft(config: ConfigDict, workdir: str, *, progress: bool = True, stop_after: int | None = None,
              log: Callable[[str], None] = print, mesh=None) -> SFTResult:
    """Runs (or resumes) SFT to ``config.train.steps``; returns the trained model.

    ``stop_after`` stops after that many steps of this call (tests use it to
    simulate a kill; the checkpoint at the stop is what a resume continues).
    ``mesh``: the devices (default: the config's ``mesh`` section); the
    returned model's parameters live on it.
    """
    workdir = os.path.abspath(workdir)
    task = make_task(config)
    tcfg = config.train
    if tcfg.steps < 0 or tcfg.batch_size <= 0:
        raise ConfigError(f"train.steps must be >= 0 and train.batch_size > 0 (got {tcfg.steps}, {tcfg.batch_size})")
    imitate_unsolved = tcfg.imitate_unsolved
    if imitate_unsolved and (config.data.demonstrations != "traces" or config.data.negatives_per_problem):
        raise ConfigError("train.imitate_unsolved=True imitates every training record, so it needs "
                          "data.demonstrations=traces and data.negatives_per_problem=0 (random-walk "
                          "negatives must not be imitated; the unsolved traces train the value head)")
    check_value_label(config, task)
    mcfg = make_model_config(config, task)
    mesh = make_mesh(config) if mesh is None else mesh
    check_mesh(config, mesh, batches={"train.batch_size": tcfg.batch_size}, model_config=mcfg)
    main = parallel.is_main_process()
    log = log if main else (lambda *_: None)
    progress = progress and main
    check_workdir_config(workdir, config)
    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))
    if tcfg.steps == 0:  # tabula rasa: the network as initialised, no demonstrations read
        log(f"model: {count_params(model):,} parameters, sequence length {mcfg.max_len}; no SFT (train.steps=0)")
        return SFTResult(model=model, task=task, steps=0, last_metrics={})
    demo_task = make_task(config, demonstrations=True)  # the task itself unless data.sft_task_options is set
    spec = make_data_spec(config, demo_task, demonstrations=True)
    t0 = time.time()
    source = parallel.main_first("sft-dataset", lambda: dataset(config, workdir, demo_task, demonstrations=True)
                                 ).as_data_source(split="train")
    log(f"data: {len(source)} training examples ({spec.config_name()}), ready in {time.time() - t0:.1f}s")

    optimizer = make_optimizer(model, learning_rate=tcfg.learning_rate, steps=tcfg.steps,
                               warmup_steps=tcfg.warmup_steps, weight_decay=tcfg.weight_decay,
                               grad_clip=tcfg.grad_clip)
    graphdef, state = nnx.split((model, optimizer))
    state = place_state(state, mesh)  # FSDP: each device holds its share of parameters and moments
    ckpt = Checkpointer(checkpoint_dir(workdir, "sft"))
    metrics_writer = MetricsWriter(workdir, enabled=main)
    step, position = 0, 0
    if ckpt.latest_step() is not None:
        pure, meta = ckpt.restore(snapshot(state))
        state = restore_into(state, pure)
        step, position = int(meta["step"]), int(meta["data_position"])
        metrics_writer.truncate_after(lambda r: r.get("phase") != "sft" or r["step"] <= step)
        log(f"resumed SFT from step {step} ({ckpt.directory})")
    else:
        log(f"model: {count_params(model):,} parameters, sequence length {mcfg.max_len}")

    batches = BatchIterator(source, demo_task, batch_size=tcfg.batch_size, seq_len=mcfg.max_len,
                            seed=config.seed, position=position, imitate_unsolved=imitate_unsolved,
                            value_label=config.data.value_label)
    train_step = make_train_step(graphdef, policy_weight=tcfg.policy_weight, value_weight=tcfg.value_weight,
                                 state_sharding=parallel.state_shardings(state, mesh))
    rows = parallel.process_rows(tcfg.batch_size, mesh)  # this process's share of every batch
    last: dict[str, float] = {}
    pending: list[dict] = []
    end = tcfg.steps if stop_after is None else min(tcfg.steps, step + stop_after)
    bar = Progress(total=tcfg.steps, initial=step, desc="sft", enabled=progress)
    tokens_seen, t_last = 0, time.time()
    while step < end:
        batch = parallel.global_batch(batches.next_rows(rows), mesh, tcfg.batch_size)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        tokens_seen += int(tcfg.batch_size * mcfg.max_len)
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
