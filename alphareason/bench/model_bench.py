"""Model benchmark: matmul peak, SFT training and forward throughput, mixed precision, KV-cache decoding.

``alphareason bench model --out FILE.json [--quick] [--config.KEY=VALUE ...]``
measures, in one run on this machine, for the model of
``configs/countdown_tiny.py`` (the default reasoning core):

* ``peak``: the best float32 (and bfloat16-input) matmul FLOP/s over a few
  large square jitted matmuls, best of several repeats;
* ``train``: SFT training tokens/s (``train.sft.make_train_step`` on real
  batches of the config's data pipeline, preloaded so the loader is not
  timed) in float32 and with ``model.compute_dtype="bfloat16"`` (bfloat16
  matmul inputs, float32 accumulation and parameters), and the achieved
  FLOP/s (``3 * flops_per_token`` per token: forward + backward) as a
  fraction of the float32 peak. Both precisions train from the same
  initialisation on the same batches, one step of each in turn, so load on
  the machine hits both alike; their loss curves go into the JSON and a PNG
  beside it (``FILE.png``) to show that they track;
* ``bf16_ceiling``: every matrix product of the float32 training step (from
  its jaxpr), timed alone with float32 and with bfloat16 inputs, and the
  bound they put on the bfloat16 step's speedup (``bf16_ceiling``);
* ``forward``: full causal forward tokens/s at the training shape;
* ``decode``: greedy generation of 32 tokens after a 32-token prompt at
  batch 64, with the KV cache (one prefill, then 32 one-token decode steps,
  jitted as one program) and without (the full forward over the growing
  prefix for every new token), and the speedup.

Tokens are counted as batch x sequence length, padding included (it is
computed). Targets on a 2-core CPU: float32 training >= 40% of the float32
peak, bfloat16 >= 1.5x float32 training tokens/s, cached decoding >= 10x
uncached. Timings are the best (and median) of repeats after compilation;
other load on the machine lowers them, the ratios are measured within the
run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason.provenance import machine_info, process_code_version

TARGETS = {"train_fraction_of_peak": 0.40, "bf16_train_speedup": 1.5, "decode_cache_speedup": 10.0}


def _block(tree):
    return jax.block_until_ready(tree)


def _best_and_median(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def _minor_faults() -> int:
    """Minor page faults of this process so far (XLA's per-call buffers cost them; see host_memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------ matmul peak
def matmul_peak(sizes: Sequence[int], repeats: int) -> dict:
    """Best FLOP/s of ``[n, n] @ [n, n]`` (float32 accumulation) per input dtype."""
    out = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        by_size = {}
        for n in sizes:
            key_a, key_b = jax.random.split(jax.random.key(n))
            a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
            b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
            f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
            _block(f(a, b))
            best, _ = _best_and_median(lambda: f(a, b), repeats)
            by_size[str(n)] = 2.0 * n ** 3 / best
        out[name] = {"flops_per_s": max(by_size.values()), "by_size": by_size}
    return out


# ------------------------------------------------------------------ bfloat16 ceiling
def _dot_generals(jaxpr, multiplicity: int = 1) -> list[tuple[tuple, tuple, tuple, int]]:
    """Every ``dot_general`` of ``jaxpr`` and its sub-jaxprs (scan bodies times their length):
    (lhs shape, rhs shape, dimension numbers, times run)."""
    from jax.extend import core as jcore
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            dims = jax.tree.map(int, eqn.params["dimension_numbers"])
            out.append((tuple(lhs), tuple(rhs), dims, multiplicity))
        times = multiplicity * int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else multiplicity
        for sub in jcore.jaxprs_in_params(eqn.params):
            out.extend(_dot_generals(sub, times))
    return out


def _as_row_times_column(a, b, dims):
    """2-D operands of ``dot_general(a, b, dims)`` transposed (materialised) to ``[M, K]`` and ``[K, N]``."""
    (lc,), (rc,) = dims[0]
    a = a if lc == 1 else a.T
    b = b if rc == 0 else b.T
    return jax.lax.optimization_barrier((a, b))  # keeps XLA from folding the transposes back in


def products_in_step(step_fn, *args) -> list[dict]:
    """The distinct matrix products of ``step_fn(*args)`` with how often one step runs each."""
    counts: dict[tuple, int] = {}
    for lhs, rhs, dims, times in _dot_generals(jax.make_jaxpr(step_fn)(*args).jaxpr):
        key = (lhs, rhs, json.dumps(dims))
        counts[key] = counts.get(key, 0) + times
    return [{"lhs": list(lhs), "rhs": list(rhs), "dimension_numbers": json.loads(dims), "count": n}
            for (lhs, rhs, dims), n in counts.items()]


def bf16_ceiling(products: list[dict], step_seconds_float32: float, repeats: int) -> dict:
    """What bfloat16 products could give the float32 training step at most.

    Times every product of the step alone (jitted, best of ``repeats``), with
    float32 inputs and with bfloat16 inputs (float32 accumulation, inputs cast
    beforehand), and bounds the mixed-precision step by replacing the float32
    products' time with the bfloat16 products' time, all else unchanged:
    ``speedup_bound = step / (step - sum(float32) + sum(bfloat16))``. It is an
    upper bound: the casts a bfloat16 step adds are not counted, and products
    timed alone pay one dispatch each (which overstates their share). A
    product XLA:CPU cannot run with bfloat16 inputs and float32 output (it
    says so when called; the batched attention products, jax 0.10.2) counts
    at its float32 time, marked ``bfloat16_unsupported``. A 2-D product in
    another layout than ``[M, K] @ [K, N]`` (the weight gradients contract the
    token axis) is also timed in bfloat16 with its operands transposed first,
    transposes included, and the faster of the two counts.
    """
    total = {"float32": 0.0, "bfloat16": 0.0}
    rows = []
    for i, p in enumerate(products):
        (lc, rc), (lb, rb) = p["dimension_numbers"]  # ((contracting), (batch)), from JSON lists
        dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
        key_a, key_b = jax.random.split(jax.random.key(i))
        row = dict(p)
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            a = jax.random.normal(key_a, tuple(p["lhs"]), jnp.float32).astype(dtype)
            b = jax.random.normal(key_b, tuple(p["rhs"]), jnp.float32).astype(dtype)
            f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
            try:
                _block(f(a, b))
            except jax.errors.JaxRuntimeError as e:  # XLA:CPU has no bf16 x bf16 -> f32 kernel for this one
                row[f"{name}_unsupported"] = str(e).splitlines()[0]
                row[f"{name}_seconds"] = row["float32_seconds"]  # it stays a float32 product
            else:
                row[f"{name}_seconds"], _ = _best_and_median(lambda: f(a, b), repeats)
            if name == "bfloat16" and len(p["lhs"]) == len(p["rhs"]) == 2 and dims != (((1,), (0,)), ((), ())):
                # A 2-D product in another layout may run faster as [M, K] @ [K, N] with its
                # operands transposed first (what _mixed_matmul's backward does): the better counts.
                g = jax.jit(lambda a, b: jnp.dot(*_as_row_times_column(a, b, dims),
                                                 preferred_element_type=jnp.float32))
                _block(g(a, b))
                transposed, _ = _best_and_median(lambda: g(a, b), repeats)
                row["bfloat16_transposed_first_seconds"] = transposed
                row["bfloat16_seconds"] = min(row["bfloat16_seconds"], transposed)
            total[name] += row[f"{name}_seconds"] * p["count"]
        rows.append(row)
    rest = max(step_seconds_float32 - total["float32"], 0.0)
    return {"products": rows, "step_seconds_float32": step_seconds_float32,
            "products_seconds_float32": total["float32"], "products_seconds_bfloat16": total["bfloat16"],
            "products_fraction_of_step": total["float32"] / step_seconds_float32,
            "speedup_bound": step_seconds_float32 / (rest + total["bfloat16"])}


# ------------------------------------------------------------------ training
def _preload_batches(config, task, seq_len: int, num_batches: int, data_dir: str) -> list[dict]:
    from alphareason.data import BatchIterator, build_dataset
    from alphareason.run import make_data_spec
    builder = build_dataset(make_data_spec(config, task), data_dir)
    batches = BatchIterator(builder.as_data_source(split="train"), task, batch_size=config.train.batch_size,
                            seq_len=seq_len, seed=config.seed)
    return [jax.tree.map(jnp.asarray, next(batches)) for _ in range(num_batches)]


def train_throughput(config, task, mcfg, batches: list[dict], steps: int) -> dict:
    """Trains float32 and bfloat16 copies of one initialisation in lockstep on ``batches``.

    Returns per precision: step times, tokens/s and the loss of every step.
    The first two steps (compilation) are not timed.
    """
    from alphareason.model import Transformer
    from alphareason.run import make_optimizer
    from alphareason.train.sft import make_train_step
    t = config.train
    runs = {}
    for name in ("float32", "bfloat16"):
        model = Transformer(dataclasses.replace(mcfg, compute_dtype=name), rngs=nnx.Rngs(config.seed))
        optimizer = make_optimizer(model, learning_rate=t.learning_rate, steps=steps, warmup_steps=t.warmup_steps,
                                   weight_decay=t.weight_decay, grad_clip=t.grad_clip)
        graphdef, state = nnx.split((model, optimizer))
        step_fn = make_train_step(graphdef, policy_weight=t.policy_weight, value_weight=t.value_weight)
        runs[name] = {"state": state, "step": step_fn, "times": [], "losses": [], "faults": []}
    for i in range(steps):
        batch = batches[i % len(batches)]
        for run in runs.values():
            f0, t0 = _minor_faults(), time.perf_counter()
            run["state"], metrics = run["step"](run["state"], batch)
            loss = float(metrics["loss"])  # waits for the step
            run["times"].append(time.perf_counter() - t0)
            run["faults"].append(_minor_faults() - f0)
            run["losses"].append(loss)
    tokens = int(batches[0]["tokens"].size)
    out = {}
    for name, run in runs.items():
        timed = run["times"][2:] or run["times"]
        best, median = min(timed), float(np.median(timed))
        out[name] = {"step_seconds_best": best, "step_seconds_median": median,
                     "tokens_per_s": tokens / best, "tokens_per_s_median": tokens / median,
                     "page_faults_per_step_median": float(np.median(run["faults"][2:] or run["faults"])),
                     "losses": run["losses"]}
    return out


def _float32_step(config, mcfg, batch):
    """(the jitted float32 SFT step, its state, ``batch``), for tracing its products."""
    from alphareason.model import Transformer
    from alphareason.run import make_optimizer
    from alphareason.train.sft import make_train_step
    t = config.train
    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))
    optimizer = make_optimizer(model, learning_rate=t.learning_rate, steps=2, warmup_steps=1,
                               weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    graphdef, state = nnx.split((model, optimizer))
    return make_train_step(graphdef, policy_weight=t.policy_weight, value_weight=t.value_weight), state, batch


def plot_loss_curves(path: str, losses: dict[str, list[float]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in losses.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (policy + value)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ forward and decoding
def forward_throughput(model, tokens, repeats: int) -> dict:
    graphdef, params = nnx.split(model)
    f = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    _block(f(params, tokens))
    best, median = _best_and_median(lambda: f(params, tokens), repeats)
    return {"batch_size": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "seconds_best": best,
            "tokens_per_s": tokens.size / best, "tokens_per_s_median": tokens.size / median}


def cached_decoder(graphdef, batch: int, prompt_len: int, new_tokens: int) -> Callable:
    """A jitted ``(params, prompt [B, P]) -> tokens [B, new_tokens]``: one prefill, then greedy KV-cached steps."""
    total = prompt_len + new_tokens

    @jax.jit
    def cached(params, prompt):
        m = nnx.merge(graphdef, params)
        logits, _, cache = m.prefill(prompt, jnp.full((batch,), prompt_len, jnp.int32), m.init_cache(batch, total))

        def body(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits, _, cache = m.decode(token, cache)
            return (logits, cache), token

        _, tokens = jax.lax.scan(body, (logits, cache), None, length=new_tokens)
        return tokens.T  # [B, new_tokens]

    return cached


def decode_speed(model, prompt, new_tokens: int, repeats: int) -> dict:
    """Greedy generation of ``new_tokens`` after ``prompt`` [B, P]: KV cache vs recomputing the prefix."""
    graphdef, params = nnx.split(model)
    batch, prompt_len = prompt.shape
    total = prompt_len + new_tokens
    cached = cached_decoder(graphdef, batch, prompt_len, new_tokens)

    @jax.jit
    def next_token(params, tokens):  # one jitted program per prefix length
        logits, _ = nnx.merge(graphdef, params)(tokens)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def uncached(params, prompt):
        tokens = prompt
        for _ in range(new_tokens):
            tokens = jnp.concatenate([tokens, next_token(params, tokens)[:, None]], axis=1)
        return tokens[:, prompt_len:]

    out_cached = _block(cached(params, prompt))
    out_uncached = _block(uncached(params, prompt))  # compiles every prefix length
    t_cached, t_cached_median = _best_and_median(lambda: cached(params, prompt), repeats)
    t_uncached, t_uncached_median = _best_and_median(lambda: uncached(params, prompt), repeats)
    return {"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "cached_seconds": t_cached, "uncached_seconds": t_uncached, "speedup": t_uncached / t_cached,
            "cached_seconds_median": t_cached_median, "uncached_seconds_median": t_uncached_median,
            "cached_token_forwards": batch * total, "uncached_token_forwards": batch * sum(
                prompt_len + i for i in range(new_tokens)),
            "same_tokens_fraction": float(np.mean(np.asarray(out_cached) == np.asarray(out_uncached)))}


# ------------------------------------------------------------------ the benchmark
def run_model_bench(out_path: str, *, quick: bool = False, config_path: str = "configs/countdown_tiny.py",
                    overrides: Sequence[str] = (), train_steps: int | None = None,
                    matmul_sizes: Sequence[int] | None = None, decode_batch: int | None = None,
                    prompt_len: int | None = None, new_tokens: int | None = None,
                    data_dir: str | None = None) -> dict:
    """Runs every measurement, writes ``out_path`` (JSON) and the loss-curve PNG beside it; returns the dict.

    ``quick`` is a smoke test: few steps and repeats, small matmuls and a
    short decode (figures meaningless). The keyword arguments override single
    sizes (tests use them to stay small).
    """
    from alphareason.config import load_config
    from alphareason.model import Transformer, count_params, flops_per_token
    from alphareason.run import make_model_config, make_task

    config = load_config(config_path, overrides)
    task = make_task(config)
    mcfg = dataclasses.replace(make_model_config(config, task), compute_dtype="float32")
    repeats = 2 if quick else 10
    train_steps = train_steps or (6 if quick else 300)
    matmul_sizes = tuple(matmul_sizes or ((256,) if quick else (512, 1024, 2048)))
    decode_batch = decode_batch or (8 if quick else 64)
    prompt_len = prompt_len or (8 if quick else 32)
    new_tokens = new_tokens or (4 if quick else 32)
    t_start = time.time()
    result = {"code": process_code_version(), "machine": machine_info(), "quick": quick, "config": config_path, "overrides": list(overrides),
              "note": ("one run on this machine; other load lowers the absolute figures (best-of timings), "
                       "the ratios are measured within the run"),
              "targets": dict(TARGETS)}

    print(f"peak matmul FLOP/s (sizes {matmul_sizes}) ...")
    result["peak"] = matmul_peak(matmul_sizes, repeats=max(repeats, 3))
    peak32 = result["peak"]["float32"]["flops_per_s"]
    print(f"  float32 {peak32 / 1e9:.1f} GFLOP/s, bfloat16 inputs "
          f"{result['peak']['bfloat16']['flops_per_s'] / 1e9:.1f} GFLOP/s")

    seq_len, batch_size = mcfg.max_len, config.train.batch_size
    train_flops_per_token = 3.0 * flops_per_token(mcfg, seq_len)
    result["model"] = {"parameters": count_params(Transformer(mcfg, rngs=nnx.Rngs(0))), "d_model": mcfg.d_model,
                       "num_layers": mcfg.num_layers, "num_heads": mcfg.num_heads, "d_ff": mcfg.d_ff,
                       "seq_len": seq_len, "batch_size": batch_size,
                       "train_flops_per_token": train_flops_per_token}

    print(f"SFT training, float32 and bfloat16 in lockstep, {train_steps} steps of {batch_size}x{seq_len} ...")
    with tempfile.TemporaryDirectory(prefix="alphareason-model-bench-") as tmp:
        batches = _preload_batches(config, task, seq_len, min(train_steps, 100), data_dir or tmp)
    train = train_throughput(config, task, mcfg, batches, train_steps)
    for name, row in train.items():
        row["flops_per_s"] = train_flops_per_token * row["tokens_per_s"]
        row["fraction_of_float32_peak"] = row["flops_per_s"] / peak32
        print(f"  {name}: {row['tokens_per_s']:.0f} tokens/s (median {row['tokens_per_s_median']:.0f}), "
              f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s = {row['fraction_of_float32_peak']:.0%} of the float32 peak")
    losses = {name: row.pop("losses") for name, row in train.items()}
    train["bf16_speedup"] = train["bfloat16"]["tokens_per_s"] / train["float32"]["tokens_per_s"]
    train["bf16_speedup_median"] = (train["bfloat16"]["tokens_per_s_median"]
                                    / train["float32"]["tokens_per_s_median"])
    print(f"  bfloat16 / float32 tokens/s: {train['bf16_speedup']:.2f} (median {train['bf16_speedup_median']:.2f})")
    result["train"] = train

    print("bfloat16 ceiling: the float32 step's matrix products alone, float32 vs bfloat16 inputs ...")
    products = products_in_step(*_float32_step(config, mcfg, batches[0]))
    ceiling = bf16_ceiling(products, train["float32"]["step_seconds_best"], repeats=max(repeats, 5))
    result["bf16_ceiling"] = ceiling
    print(f"  {len(products)} distinct products, {sum(p['count'] for p in products)} per step: "
          f"{ceiling['products_seconds_float32'] * 1e3:.1f} ms float32 "
          f"({ceiling['products_fraction_of_step']:.0%} of the step), "
          f"{ceiling['products_seconds_bfloat16'] * 1e3:.1f} ms bfloat16; "
          f"bound on the bfloat16 training speedup {ceiling['speedup_bound']:.2f}x")

    png = os.path.splitext(out_path)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tail = max(1, len(losses["float32"]) // 10)
    gap = abs(np.mean(losses["bfloat16"][-tail:]) - np.mean(losses["float32"][-tail:]))
    plot_loss_curves(png, losses, f"SFT loss, {config_path}: float32 vs bfloat16 matmuls")
    result["loss_curves"] = {"png": png, "steps": list(range(1, train_steps + 1)), **losses,
                             "final_loss_float32": float(np.mean(losses["float32"][-tail:])),
                             "final_loss_bfloat16": float(np.mean(losses["bfloat16"][-tail:])),
                             "final_loss_gap": float(gap)}
    print(f"  final loss (mean of the last {tail} steps): float32 {result['loss_curves']['final_loss_float32']:.4f}, "
          f"bfloat16 {result['loss_curves']['final_loss_bfloat16']:.4f}; curves in {png}")

    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))
    print("forward ...")
    result["forward"] = forward_throughput(model, batches[0]["tokens"], repeats)
    print(f"  {result['forward']['tokens_per_s']:.0f} tokens/s at {batch_size}x{seq_len}")

    print(f"decoding {new_tokens} tokens after a {prompt_len}-token prompt at batch {decode_batch} ...")
    decode_model = Transformer(dataclasses.replace(mcfg, max_len=max(mcfg.max_len, prompt_len + new_tokens)),
                               rngs=nnx.Rngs(config.seed))
    prompt = jax.random.randint(jax.random.key(1), (decode_batch, prompt_len), 4, mcfg.vocab_size, jnp.int32)
    result["decode"] = decode_speed(decode_model, prompt, new_tokens, repeats)
    d = result["decode"]
    print(f"  cached {d['cached_seconds'] * 1e3:.1f} ms, uncached {d['uncached_seconds'] * 1e3:.1f} ms: "
          f"{d['speedup']:.1f}x")

    result["summary"] = {
        "train_fraction_of_peak": {"measured": train["float32"]["fraction_of_float32_peak"],
                                   "target": TARGETS["train_fraction_of_peak"]},
        "bf16_train_speedup": {"measured": train["bf16_speedup"], "target": TARGETS["bf16_train_speedup"],
                               "bound_from_products": ceiling["speedup_bound"]},
        "decode_cache_speedup": {"measured": d["speedup"], "target": TARGETS["decode_cache_speedup"]},
    }
    for row in result["summary"].values():
        row["met"] = bool(row["measured"] >= row["target"])
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    result["machine"]["load_average_at_end"] = load_end
    result["seconds"] = time.time() - t_start
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default="configs/countdown_tiny.py")
    args, overrides = p.parse_known_args(argv)
    run_model_bench(args.out, quick=args.quick, config_path=args.config,
                    overrides=[o[len("--config."):] for o in overrides if o.startswith("--config.")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
