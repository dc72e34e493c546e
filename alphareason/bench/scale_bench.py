"""Scale-out benchmark: the sharded paths on 1, 2, 4 and 8 devices and on 2 processes x 4 devices.

``alphareason bench scale --out benchmarks/results/scale.json`` runs, for the
default config (``configs/countdown_tiny.py``, 0.8M parameters) and the SAME
global batch everywhere, each setting in a fresh process (JAX fixes its
device count at start-up):

* 1, 2, 4 and 8 virtual CPU devices in one process, mesh ``(devices, 1)``
  (data parallel), and 8 devices with FSDP, mesh ``(2, 4)``;
* 2 processes x 4 devices on 127.0.0.1 (``jax.distributed``, gloo), mesh
  ``(8, 1)``: the multi-host code path.

In each it times the two workloads of a run on the run's own code paths:

* SFT: the jitted train step (``train.sft.make_train_step`` with the
  state's shardings) on ``train.batch_size`` sequences per step, each
  process feeding its own rows (``parallel.global_batch``): tokens/s over
  ``sft_steps`` steps after a warm-up (best of the per-step times and the
  median are both kept);
* self-play: an actor batch of ``selfplay.actor_batch_size`` episodes with
  the sharded search (``Searcher(mesh=...)`` + ``EpisodeRunner``):
  episodes/s. The network is freshly initialised and the candidates are the
  task's legal steps (``search.candidates=enumerate``) so every episode runs
  to its end and every setting does the same work; the episodes' digest
  (actions, verdicts, token forwards) must be the same in every setting.

All the devices of this benchmark are virtual devices of one physical
machine (this one: 2 CPU cores), so more devices do not add compute: the
figures show the overhead of the sharded path (per-device dispatch,
collectives, per-shard search), not a speedup. The target is the 8-device
time at most 1.5x the 1-device time, for both workloads. The projection to
a real pod (``docs/scaling.md``) starts from these per-device figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from alphareason.provenance import machine_info, process_code_version

DEFAULT_CONFIG = "configs/countdown_tiny.py"
SETTINGS = (  # (name, processes, devices per process, mesh data, mesh fsdp)
    ("1 device", 1, 1, 1, 1),
    ("2 devices", 1, 2, 2, 1),
    ("4 devices", 1, 4, 4, 1),
    ("8 devices", 1, 8, 8, 1),
    ("8 devices, FSDP (2 x 4)", 1, 8, 2, 4),
    ("2 processes x 4 devices", 2, 4, 8, 1),
)
TARGET_RATIO = 1.5


# ------------------------------------------------------------------ worker
def measure(config, *, sft_steps: int, selfplay_repeats: int) -> dict:
    """Times SFT steps and self-play episodes on the config's mesh in this process (all processes call it)."""
    import jax
    import numpy as np
    from flax import nnx

    from alphareason import parallel
    from alphareason.model import Transformer, count_params
    from alphareason.run import (env_config, make_mesh, make_model_config, make_optimizer, make_task,
                                 search_config)
    from alphareason.search.episodes import EpisodeRunner
    from alphareason.search.mcts import Searcher
    from alphareason.train.sft import make_train_step

    task = make_task(config)
    mcfg = make_model_config(config, task)
    mesh = make_mesh(config)
    B, T = config.train.batch_size, mcfg.max_len
    parallel.check_batch(B, mesh, name="train.batch_size")
    model = Transformer(mcfg, rngs=nnx.Rngs(config.seed))
    optimizer = make_optimizer(model, learning_rate=1e-3, steps=1000, warmup_steps=10, weight_decay=0.01,
                               grad_clip=1.0)
    graphdef, state = nnx.split((model, optimizer))
    state = parallel.place_state(state, mesh)
    device0 = jax.local_devices()[0]
    state_bytes = sum(int(s.data.nbytes) for x in jax.tree.leaves(state) for s in x.addressable_shards
                      if s.device == device0)  # parameters + optimizer state held by one device
    step = make_train_step(graphdef, policy_weight=1.0, value_weight=0.5,
                           state_sharding=parallel.state_shardings(state, mesh))
    rng = np.random.default_rng(config.seed)
    rows = parallel.process_rows(B, mesh)

    def batch():
        full = {"tokens": rng.integers(3, mcfg.vocab_size, (B, T)).astype(np.int32),
                "targets_mask": (rng.random((B, T)) < 0.6).astype(np.float32),
                "value_target": (rng.random(B) < 0.5).astype(np.float32),
                "value_mask": (rng.random((B, T)) < 0.1).astype(np.float32)}
        return {k: v[rows] for k, v in full.items()}  # this process's rows only

    t0 = time.perf_counter()
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, parallel.global_batch(batch(), mesh, B))
    float(metrics["loss"])
    sft_compile = time.perf_counter() - t0
    host = [batch() for _ in range(sft_steps)]
    times = []
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for local in host:
        t0 = time.perf_counter()
        state, metrics = step(state, parallel.global_batch(local, mesh, B))
        float(metrics["loss"])  # the step is done (a loop reads its metrics every few steps)
        times.append(time.perf_counter() - t0)
    sft_seconds, sft_cpu = time.perf_counter() - t_all, time.process_time() - cpu_all

    model = nnx.merge(graphdef, state)[0]
    params = nnx.state(model)
    searcher = Searcher(task, nnx.split(model)[0], env_config(config), search_config(config), seq_len=T, mesh=mesh)
    runner = EpisodeRunner(searcher, action_temperature=1.0)
    A = config.selfplay.actor_batch_size
    problems = task.generate(config.seed + 5, A)
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    first = runner.run(params, problems, key)  # compiles
    selfplay_compile = time.perf_counter() - t0
    episode_times = []
    cpu_all = time.process_time()
    for r in range(selfplay_repeats):
        t0 = time.perf_counter()
        out = runner.run(params, problems, jax.random.fold_in(key, r + 1))
        episode_times.append(time.perf_counter() - t0)
    selfplay_cpu = time.process_time() - cpu_all
    digest = hashlib.sha256()
    for m in first.moves:
        digest.update(np.ascontiguousarray(m.action).tobytes())
    digest.update(first.solved.tobytes())
    digest.update(first.token_forwards.tobytes())
    return {
        "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "parameters": count_params(model),
        "state_bytes_per_device": state_bytes,
        "sft": {"batch_size": B, "seq_len": T, "steps": sft_steps, "compile_seconds": sft_compile,
                "step_seconds_best": min(times), "step_seconds_median": float(np.median(times)),
                "tokens_per_s": B * T / min(times), "tokens_per_s_median": B * T / float(np.median(times)),
                "tokens_per_s_overall": B * T * sft_steps / sft_seconds,
                "cpu_seconds_per_step": sft_cpu / sft_steps},
        "selfplay": {"episodes": A, "moves_per_episode": float(np.mean(out.num_steps)),
                     "num_simulations": config.search.num_simulations, "candidates": config.search.candidates,
                     "num_candidates": searcher.num_candidates, "compile_seconds": selfplay_compile,
                     "batch_seconds_best": min(episode_times),
                     "episodes_per_s": A / min(episode_times),
                     "episodes_per_s_median": A / float(np.median(episode_times)),
                     "cpu_seconds_per_batch": selfplay_cpu / selfplay_repeats,
                     "digest": digest.hexdigest()[:16]},
    }


def _worker(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--selfplay-repeats", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    from alphareason import parallel
    from alphareason.config import load_config
    config = load_config(args.config, overrides)
    parallel.initialize_distributed(fingerprint=parallel.fingerprint(config.to_dict()))  # JAX_* if launched so
    result = measure(config, sft_steps=args.sft_steps, selfplay_repeats=args.selfplay_repeats)
    import jax
    with open(f"{args.out}.{jax.process_index()}", "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------ driver
def bench_overrides(quick: bool) -> list[str]:
    """The benchmark's workload on top of the config (the same global batch in every setting)."""
    return ["search.candidates='enumerate'", "search.num_simulations=8", "selfplay.actor_batch_size=32",
            "train.batch_size=64", *(["selfplay.actor_batch_size=16"] if quick else [])]


def run_setting(name: str, processes: int, devices: int, data: int, fsdp: int, *, config_path: str,
                overrides: Sequence[str], quick: bool, timeout: float = 900) -> list[dict]:
    """One setting in fresh processes; returns each process's measurement."""
    from alphareason.launch import describe, device_env, launch_local
    out = os.path.join(tempfile.mkdtemp(prefix="alphareason-scale-bench-"), "result.json")
    args = ["-m", "alphareason.bench.scale_bench", "--worker", "--config", config_path, "--out", out,
            "--sft-steps", "5" if quick else "20", "--selfplay-repeats", "1" if quick else "2",
            f"mesh.data={data}", f"mesh.fsdp={fsdp}", *overrides]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    if processes == 1:
        proc = subprocess.run([sys.executable, *args], env=device_env(devices, env), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"scale bench setting {name!r} failed:\n{proc.stderr[-3000:]}")
    else:
        results = launch_local(args, num_processes=processes, devices_per_process=devices, with_flags=False,
                               env=env, timeout=timeout, check=False)
        if any(r.returncode != 0 for r in results):
            raise RuntimeError(f"scale bench setting {name!r} failed:\n{describe(results)}")
    measured = []
    for p in range(processes):
        with open(f"{out}.{p}") as f:
            measured.append({"setting": name, "wall_seconds": time.time() - t0, **json.load(f)})
    return measured


def run_scale_bench(out_path: str, *, quick: bool = False, overrides: Sequence[str] = (),
                    config_path: str = DEFAULT_CONFIG, settings=SETTINGS, log=print) -> dict:
    import jax
    overrides = bench_overrides(quick) + list(overrides)
    t_start = time.time()
    load_before = os.getloadavg()
    rows = []
    for name, processes, devices, data, fsdp in settings:
        measured = run_setting(name, processes, devices, data, fsdp, config_path=config_path,
                               overrides=overrides, quick=quick)
        main = measured[0]
        row = {"setting": name, "processes": processes, "devices_per_process": devices, "mesh": main["mesh"],
               "sft_tokens_per_s": main["sft"]["tokens_per_s"],
               "sft_tokens_per_s_median": main["sft"]["tokens_per_s_median"],
               "sft_step_seconds": main["sft"]["step_seconds_best"],
               "state_bytes_per_device": main["state_bytes_per_device"],
               "selfplay_episodes_per_s": main["selfplay"]["episodes_per_s"],
               "selfplay_batch_seconds": main["selfplay"]["batch_seconds_best"],
               "sft_compile_seconds": main["sft"]["compile_seconds"],
               "selfplay_compile_seconds": main["selfplay"]["compile_seconds"],
               "selfplay_digest": main["selfplay"]["digest"],
               # CPU time of all processes together: the work done, whatever else the machine was running
               "sft_cpu_seconds_per_step": sum(m["sft"]["cpu_seconds_per_step"] for m in measured),
               "selfplay_cpu_seconds_per_batch": sum(m["selfplay"]["cpu_seconds_per_batch"] for m in measured),
               "processes_agree": len({m["selfplay"]["digest"] for m in measured}) == 1,
               "per_process": measured}
        rows.append(row)
        log(f"{name:>26}: SFT {row['sft_tokens_per_s']:>8.0f} tokens/s, self-play "
            f"{row['selfplay_episodes_per_s']:>6.1f} episodes/s ({row['per_process'][0]['wall_seconds']:.0f}s)")
    base = rows[0]
    for row in rows:
        row["sft_time_ratio"] = base["sft_tokens_per_s"] / row["sft_tokens_per_s"]
        row["selfplay_time_ratio"] = base["selfplay_episodes_per_s"] / row["selfplay_episodes_per_s"]
        row["sft_cpu_ratio"] = row["sft_cpu_seconds_per_step"] / base["sft_cpu_seconds_per_step"]
        row["selfplay_cpu_ratio"] = row["selfplay_cpu_seconds_per_batch"] / base["selfplay_cpu_seconds_per_batch"]
    eight = next((r for r in rows if r["setting"] == "8 devices"), None)
    first = rows[0]["per_process"][0]
    result = {
        "code": process_code_version(),
        "machine": {**machine_info(), "backend": "cpu (virtual devices: --xla_force_host_platform_device_count)"},
        "config": config_path, "overrides": overrides, "quick": quick, "parameters": first["parameters"],
        "sft": {k: first["sft"][k] for k in ("batch_size", "seq_len", "steps")},
        "selfplay": {k: first["selfplay"][k] for k in ("episodes", "num_simulations", "candidates",
                                                       "num_candidates", "moves_per_episode")},
        "settings": rows,
        "same_episodes_everywhere": len({r["selfplay_digest"] for r in rows}) == 1,
        "target": {"time_ratio_at_8_devices_at_most": TARGET_RATIO,
                   "sft_time_ratio_8": eight and eight["sft_time_ratio"],
                   "selfplay_time_ratio_8": eight and eight["selfplay_time_ratio"],
                   "sft_cpu_ratio_8": eight and eight["sft_cpu_ratio"],
                   "selfplay_cpu_ratio_8": eight and eight["selfplay_cpu_ratio"],
                   "met": bool(eight and eight["sft_time_ratio"] <= TARGET_RATIO
                               and eight["selfplay_time_ratio"] <= TARGET_RATIO)},
        "note": ("All devices are virtual CPU devices of one machine: more devices add overhead, not compute. "
                 "time_ratio = 1-device throughput / this setting's throughput (best wall-clock times; 1.0: no "
                 "overhead). cpu_ratio = CPU seconds (all threads of all processes) per step or actor batch / "
                 "the 1-device figure: the work the sharded path adds, robust to other load on the machine."),
        "total_seconds": time.time() - t_start,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg()),
                         "note": "1/5/15-minute load of this machine (shared); above its core count the timings "
                                 "include waiting for a core"},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    if eight:
        log(f"8 devices vs 1: SFT {eight['sft_time_ratio']:.2f}x the time, self-play "
            f"{eight['selfplay_time_ratio']:.2f}x (target <= {TARGET_RATIO})")
    log(f"same episodes in every setting: {result['same_episodes_everywhere']}; wrote {out_path}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
    else:
        sys.exit("run it as `alphareason bench scale --out FILE.json`")
