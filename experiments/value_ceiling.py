"""How far can a run's value head go with exact labels? A ceiling for the self-play value targets.

From a trained run's checkpoint, the value is fitted to exact solvability
(``V*``, the task's solver: an oracle that no self-play target sees) on the
live states of random legal walks from fresh training problems (never the
validation or test problems), and measured on the held-out walk states of
``alphareason bench value`` (the same validation problems, key and walks, so
the numbers sit beside its ``walks`` AUCs). Two fits:

* ``head``: only the value head trains, on the network's frozen features (a
  linear probe: can ``V*`` be read off what the network already computes?);
* ``full``: the whole network trains on the value loss alone (can this
  network learn ``V*`` from this many states?).

A self-play value far below the full fit is limited by its targets; one near
it, by the network and its data.

  python experiments/value_ceiling.py \\
      --workdir runs/study/countdown4_transfer_enumerate/seed1/alphazero_tree \\
      --out benchmarks/results/study/countdown4_transfer_enumerate/value/seed1_alphazero_tree_ceiling.json

The JSON holds each fit's curve (held-out walk AUC pooled and per depth,
with the fit on a sample of its training states, every ``--eval-every``
steps) and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alphareason.eval.value import ValueProbe, auc, depth_groups, walk_rng, walk_states


def state_inputs(probe: ValueProbe, problems: Sequence[dict], texts: Sequence[str],
                 batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The token rows of states (prompt + ``texts[i]``): (int32[N, T], length int32[N])."""
    tokens, length = [], []
    for start in range(0, len(texts), batch):
        inputs = probe.env.after(list(problems[start: start + batch]), list(texts[start: start + batch]))
        tokens.append(np.asarray(inputs["tokens"]))
        length.append(np.asarray(inputs["length"]))
    return np.concatenate(tokens), np.concatenate(length)


def labelled_walk_states(task, problems, rng, walks: int):
    """Live states of ``walks`` random legal walks a problem with their exact solvability: (index, texts, depth
    int[N], vstar f32[N])."""
    index, texts, depth = walk_states(task, problems, rng, walks)
    if not index:
        raise SystemExit(f"the task has no random legal walks: nothing to label")
    vstar = np.array([float(task.solvable_after(problems[i], t)) for i, t in zip(index, texts)], np.float32)
    return index, texts, np.asarray(depth), vstar


def aucs(values: np.ndarray, vstar: np.ndarray, depth: np.ndarray) -> dict[str, float | None]:
    """AUC against ``V*``, pooled and per depth."""
    return {("all" if name == "all" else f"depth{name}"): auc(values[m], vstar[m])
            for name, m in depth_groups(depth).items()}


def fit(model, probe: ValueProbe, train: dict, heldout: dict, *, trainable: str, steps: int, batch: int,
        learning_rate: float, eval_every: int, seed: int, log=print) -> list[dict]:
    """Fits ``model``'s value to ``train["vstar"]`` (BCE at each state's last token); returns the curve.

    ``trainable``: ``"head"`` (value head and bias only) or ``"full"`` (every parameter).
    """
    wrt = (nnx.Any(nnx.PathContains("value_head"), nnx.PathContains("value_bias")) if trainable == "head"
           else nnx.Param)
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=0.0), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, tokens, length, label):
        def loss_fn(model):
            _, values = model(tokens)  # [B, T]
            last = jnp.take_along_axis(values, (length - 1)[:, None], axis=1)[:, 0]
            return jnp.mean(optax.sigmoid_binary_cross_entropy(last, label))
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    sample = rng.choice(len(train["vstar"]), min(2000, len(train["vstar"])), replace=False)
    curve, losses, t0 = [], [], time.time()
    for i in range(steps + 1):
        if i % eval_every == 0 or i == steps:
            params = nnx.state(model)
            held = probe.values(params, heldout["problems"], heldout["texts"])
            fit_values = probe.values(params, [train["problems"][j] for j in sample],
                                      [train["texts"][j] for j in sample])
            row = {"step": i, "seconds": time.time() - t0, "train_loss": float(np.mean(losses)) if losses else None,
                   "heldout": aucs(held, heldout["vstar"], heldout["depth"]),
                   "train_auc": auc(fit_values, train["vstar"][sample])}
            curve.append(row)
            losses = []
            log(f"{trainable} step {i}: held-out walk AUC {row['heldout']['all']:.3f} "
                f"(" + ", ".join(f"{k} {v:.3f}" for k, v in row["heldout"].items() if k != "all" and v is not None)
                + f"), training states {row['train_auc']:.3f}, loss {row['train_loss'] or float('nan'):.4f}")
        if i == steps:
            break
        idx = rng.integers(0, len(train["vstar"]), batch)
        losses.append(float(step(model, optimizer, jnp.asarray(train["tokens"][idx]),
                                 jnp.asarray(train["length"][idx]), jnp.asarray(train["vstar"][idx]))))
    return curve


def main(argv: Sequence[str] | None = None) -> int:
    from alphareason.config import run_config
    from alphareason.run import load_model, split_problems
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run whose network to start from")
    p.add_argument("--phase", choices=["selfplay", "sft"], default=None,
                   help="its newest checkpoint of this phase (default: self-play if present, else SFT)")
    p.add_argument("--out", required=True)
    p.add_argument("--fits", nargs="+", choices=["head", "full"], default=["head", "full"])
    p.add_argument("--train-problems", type=int, default=4000)
    p.add_argument("--walks", type=int, default=4, help="random legal walks a problem (bench value's 4)")
    p.add_argument("--heldout-problems", type=int, default=200, help="validation problems (bench value's 200)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr-head", type=float, default=3e-3)
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="bench value's key (0): the same held-out walk states")
    args = p.parse_args(argv)
    for name in ("train_problems", "heldout_problems", "steps", "batch", "eval_every", "walks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    config = run_config(args.workdir)
    validation = split_problems(config, args.workdir, "validation")
    test = split_problems(config, args.workdir, "test")
    heldout_problems = validation[: args.heldout_problems]
    model, task, meta = load_model(config, args.workdir, phase=args.phase)
    graphdef, _ = nnx.split(model)
    probe = ValueProbe(task, graphdef, seq_len=model.config.max_len)
    # training problems: fresh ones (a seed no run uses), none of them a validation or test problem
    train_problems = task.generate(987_654_321 + args.seed, args.train_problems, exclude=validation + test)
    index, texts, depth, vstar = labelled_walk_states(task, train_problems, np.random.default_rng(args.seed),
                                                      args.walks)
    tokens, length = state_inputs(probe, [train_problems[i] for i in index], texts)
    train = {"problems": [train_problems[i] for i in index], "texts": texts, "depth": depth, "vstar": vstar,
             "tokens": tokens, "length": length}
    h_index, h_texts, h_depth, h_vstar = labelled_walk_states(task, heldout_problems,
                                                              walk_rng(jax.random.key(args.seed)), args.walks)
    heldout = {"problems": [heldout_problems[i] for i in h_index], "texts": h_texts, "depth": h_depth,
               "vstar": h_vstar}
    print(f"{len(vstar)} training states from {args.train_problems} problems ({vstar.mean():.1%} solvable); "
          f"{len(h_vstar)} held-out states from {len(heldout_problems)} validation problems "
          f"({h_vstar.mean():.1%} solvable)", flush=True)
    result = {"workdir": os.path.abspath(args.workdir), "checkpoint": {k: meta.get(k) for k in ("phase", "step")},
              "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
              "train_states": int(len(vstar)), "train_solvable": float(vstar.mean()),
              "heldout_states": int(len(h_vstar)), "heldout_solvable": float(h_vstar.mean()), "fits": {}}
    for trainable in args.fits:
        model, _, _ = load_model(config, args.workdir, phase=args.phase)  # each fit from the checkpoint
        lr = args.lr_head if trainable == "head" else args.lr_full
        curve = fit(model, probe, train, heldout, trainable=trainable, steps=args.steps, batch=args.batch,
                    learning_rate=lr, eval_every=args.eval_every, seed=args.seed,
                    log=lambda m: print(m, flush=True))
        result["fits"][trainable] = {"learning_rate": lr, "curve": curve, "final": curve[-1]}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after each fit: a stopped run keeps what it finished
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
