"""The mesh, FSDP sharding by logical-axis rules, sharded search and checkpoint resharding.

JAX fixes its device count at start-up, so the multi-device runs happen in
subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``;
the rest of the suite keeps its single device. Every comparison is against
the same computation on one device.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from alphareason import parallel
from alphareason.checkpoint import Checkpointer, CheckpointError, snapshot
from alphareason.config import ConfigError
from alphareason.launch import device_env
from alphareason.model import ModelConfig, Transformer
from alphareason.run import checkpoint_dir, load_model, make_mesh, make_optimizer, make_task
from alphareason.train.loop import validate_config
from helpers import micro_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def run_devices(script: str, devices: int = 8, timeout: int = 900) -> dict:
    """Runs ``script`` in a fresh Python with ``devices`` virtual CPU devices; returns its RESULT json."""
    env = device_env(devices)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --------------------------------------------------------------- the mesh
def test_mesh_shape_infers_minus_one_and_names_impossible_sizes():
    assert parallel.mesh_shape(-1, 1, 8) == (8, 1)
    assert parallel.mesh_shape(-1, 2, 8) == (4, 2)
    assert parallel.mesh_shape(2, -1, 8) == (2, 4)
    assert parallel.mesh_shape(4, 2, 8) == (4, 2)
    with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide the 8 devices"):
        parallel.mesh_shape(-1, 3, 8)
    with pytest.raises(ValueError, match="mesh data=4 x fsdp=4 = 16 but there are 8 devices"):
        parallel.mesh_shape(4, 4, 8)
    with pytest.raises(ValueError, match="both -1"):
        parallel.mesh_shape(-1, -1, 8)
    with pytest.raises(ValueError, match="mesh.data=0"):
        parallel.mesh_shape(0, 1, 8)


def test_config_mesh_that_does_not_fit_the_devices_is_refused_before_work(tmp_path):
    from alphareason.train.loop import run_training
    config = micro_config()
    config.mesh.data = jax.device_count() + 1
    with pytest.raises(ConfigError, match=f"mesh data={jax.device_count() + 1} x fsdp=1"):
        make_mesh(config)
    with pytest.raises(ConfigError, match="this run sees"):
        run_training(config, str(tmp_path / "w"), progress=False, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w")  # nothing was started


@pytest.mark.parametrize("key, value, message", [
    ("selfplay.actor_batch_size", 6, "selfplay.actor_batch_size=6 is not divisible by the 4 data-parallel devices "
                                     r"\(mesh data=2 x fsdp=2\)"),
    ("selfplay.learner_batch_size", 10, "selfplay.learner_batch_size=10 is not divisible by the 4"),
    ("train.batch_size", 6, "train.batch_size=6 is not divisible by the 4"),
    ("model.d_model", 30, "model.d_model=30 cannot be split over the 4 devices of mesh axis 'fsdp'"),
])
def test_batches_and_widths_that_do_not_split_over_the_mesh_are_refused(key, value, message):
    config = micro_config()
    section, name = key.split(".")
    config[section][name] = value
    if key == "model.d_model":
        config.model.num_heads = 3
    mesh = AbstractMesh((2, 2), ("data", "fsdp")) if key != "model.d_model" else AbstractMesh((1, 4), ("data", "fsdp"))
    with pytest.raises(ConfigError, match=message):
        validate_config(config, make_task(config), mesh)


# ------------------------------------------------- logical-axis rules (FSDP)
def test_rules_split_the_model_width_over_fsdp_and_the_moments_follow_their_parameters():
    model = Transformer(ModelConfig.micro(positions="learned"), rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, learning_rate=1e-3, steps=4, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)
    _, state = nnx.split((model, optimizer))
    with nnx.logical_axis_rules(parallel.RULES):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    params = specs[0]
    block = params["blocks"][0]
    assert params["embed"] == P(None, "fsdp")  # [V, D]
    assert params["pos_embed"] == P(None, "fsdp")  # [max_len, D]
    assert params["policy_head"] == P("fsdp", None)  # [D, V]
    assert params["value_head"] == P("fsdp")  # [D]
    assert params["value_bias"] == P()
    assert block["attn"]["qkv"] == P("fsdp", None, None, None)  # [D, 3, H, Dh]
    assert block["attn"]["out"] == P(None, None, "fsdp")  # [H, Dh, D]
    assert block["mlp"]["up"] == P("fsdp", None)  # [D, F]
    assert block["mlp"]["down"] == P(None, "fsdp")  # [F, D]
    assert block["attn_norm"]["scale"] == P(None)
    adam = specs[1]["opt_state"][1][0]  # optax.chain(clip, adamw): adamw's ScaleByAdamState
    assert adam["mu"] == params and adam["nu"] == params
    assert adam["count"] == P()


# ------------------------------------------------------------ checkpoints
def test_checkpoint_of_another_model_config_is_refused_naming_the_arrays(tmp_path):
    config = micro_config()
    task = make_task(config)
    from alphareason.run import make_model_config
    model = Transformer(make_model_config(config, task), rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, learning_rate=1e-3, steps=4, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)
    ckpt = Checkpointer(checkpoint_dir(str(tmp_path), "sft"))
    ckpt.save(3, snapshot(nnx.split((model, optimizer))[1]), {"step": 3, "phase": "sft"})
    assert load_model(config, str(tmp_path))[2]["step"] == 3
    config.model.d_ff = 128
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.down is \(64, 32\) there and \(128, 32\) in the "
                                              r"config.*different model"):
        load_model(config, str(tmp_path))
    config.model.d_ff, config.model.num_layers = 64, 3
    with pytest.raises(CheckpointError, match=r"the config has \d+ array\(s\) the checkpoint lacks: 0\.blocks\.2"):
        load_model(config, str(tmp_path))


def _flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


# ------------------------------------------------ 8 devices equal 1 device
EIGHT_DEVICES = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from alphareason import parallel
    from alphareason.model import ModelConfig
    from alphareason.model.testing import perturbed_model
    from alphareason.run import make_optimizer
    from alphareason.search import EnvConfig, SearchConfig, Searcher
    from alphareason.search.decode import LegalStepDecoder
    from alphareason.tasks import get_task
    from alphareason.train.grpo import GRPO, GRPOSettings, token_logprobs
    from alphareason.train.loop import make_learner_step
    from alphareason.train.sft import make_train_step
    from helpers import micro_config

    MESHES = MESHES_HERE
    assert jax.device_count() == 8, jax.devices()
    out = {}
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    model = perturbed_model(ModelConfig.micro(max_len=64), seed=1)
    graphdef, params = nnx.split(model)

    # The search: each device searches its own problems; trees equal the single-device trees.
    settings = (EnvConfig(num_candidates=4), SearchConfig(num_simulations=4, max_num_considered_actions=4))
    searcher = Searcher(task, graphdef, *settings, seq_len=64, keep_tree=True)
    inputs = jax.tree.map(jnp.asarray, searcher.env.initial(task.generate(5, 8)))
    keys = jax.random.split(jax.random.key(0), 8)
    # The reference searches each problem alone on one device: the same shapes as each of the 8 shards, so
    # the floats are those of the same program (a batch of 8 rounds differently in the last bits).
    parts = [searcher(params, keys[i:i + 1], jax.tree.map(lambda x: x[i:i + 1], inputs)) for i in range(8)]
    one = jax.tree.map(lambda *xs: jnp.concatenate(xs) if jnp.ndim(xs[0]) else xs[0], *parts)
    mesh = parallel.make_mesh(data=4, fsdp=2)
    many = Searcher(task, graphdef, *settings, seq_len=64, keep_tree=True, mesh=mesh)(
        parallel.place_state(params, mesh), keys, inputs)
    out["search_shards"] = len(many.action_weights.sharding.device_set)
    pairs = list(zip(jax.tree.leaves(one), map(parallel.to_host, jax.tree.leaves(many))))
    out["tree_leaves"] = len(pairs)
    out["discrete_equal"] = all(bool(np.array_equal(a, b)) for a, b in pairs if not jnp.issubdtype(a.dtype, jnp.floating))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(one)[0]]
    out["float_diff"] = sorted((float(np.max(np.abs(np.asarray(a) - b) / np.maximum(1.0, np.abs(np.asarray(a))))),
                                path) for path, (a, b) in zip(paths, pairs)
                               if jnp.issubdtype(a.dtype, jnp.floating) and a.size)[-3:]

    # Policy-only decoding over legal steps: each device decodes its own problems, as one device does.
    legal = LegalStepDecoder(task, graphdef, seq_len=64)
    alone = [legal(params, None, jax.tree.map(lambda x: x[i:i + 1], inputs)) for i in range(8)]
    split = LegalStepDecoder(task, graphdef, seq_len=64, mesh=mesh)(parallel.place_state(params, mesh), None, inputs)
    out["legal_shards"] = len(split["tokens"].sharding.device_set)
    out["legal_equal"] = all(bool(np.array_equal(np.concatenate([np.asarray(a[k]) for a in alone]),
                                                 parallel.to_host(split[k]))) for k in ("tokens", "length", "solved"))

    # SFT and learner steps with FSDP against one device: 8 rows, one per device.
    rng = np.random.default_rng(0)
    B, T = 8, 64
    sft_batch = {"tokens": rng.integers(3, 20, (B, T)).astype(np.int32),
                 "targets_mask": (rng.random((B, T)) < 0.5).astype(np.float32),
                 "value_target": (rng.random(B) < 0.5).astype(np.float32),
                 "value_mask": (rng.random((B, T)) < 0.2).astype(np.float32)}
    learner_batch = {"tokens": np.asarray(one.root.tokens), "length": np.asarray(one.root.length),
                     "candidates": np.asarray(one.root.candidates), "cand_valid": np.asarray(one.root.cand_valid),
                     "action_weights": np.asarray(one.action_weights), "search_value": np.asarray(one.search_value),
                     "outcome": (np.arange(B) % 2).astype(np.float32)}
    config = micro_config()
    optimizer = make_optimizer(model, learning_rate=1e-2, steps=10, warmup_steps=1, weight_decay=0.01,
                               grad_clip=1.0)
    gd, state = nnx.split((model, optimizer))
    start = jax.tree.map(np.asarray, nnx.to_pure_dict(state))

    # GRPO's clipped surrogate with a KL term, on chains the rollout policy nearly wrote (ratios near 1).
    old_logp = np.asarray(token_logprobs(model, jnp.asarray(sft_batch["tokens"]))[0])
    grpo_batch = {"tokens": sft_batch["tokens"], "mask": rng.random((B, T - 1)) < 0.5,
                  "advantage": rng.normal(size=B).astype(np.float32), "weight": np.ones(B, np.float32),
                  "old_logp": old_logp + rng.normal(0, 0.1, old_logp.shape).astype(np.float32),
                  "ref_logp": old_logp + rng.normal(0, 0.3, old_logp.shape).astype(np.float32)}

    def make_step(name, sharding=None):
        if name == "sft":
            return make_train_step(gd, policy_weight=1.0, value_weight=0.5, state_sharding=sharding)
        if name == "grpo":
            return GRPO(task, graphdef, gd, GRPOSettings(group_size=4, minibatch_size=B, kl_beta=0.1), seq_len=T,
                        state_sharding=sharding).learner_step
        return make_learner_step(gd, config, task, sharding)

    out["diff"], out["bytes"], out["moved"] = {}, {}, {}
    for name, batch in (("sft", sft_batch), ("learner", learner_batch), ("grpo", grpo_batch)):
        if name not in MESHES:
            continue
        ref, _ = make_step(name)(jax.tree.map(jnp.copy, state), batch)
        ref = jax.tree.map(np.asarray, nnx.to_pure_dict(ref))
        out["moved"][name] = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(start)))
        for data, fsdp in MESHES[name]:
            mesh = parallel.make_mesh(data=data, fsdp=fsdp)
            placed = parallel.place_state(jax.tree.map(jnp.copy, state), mesh)
            new, _ = make_step(name, parallel.state_shardings(placed, mesh))(placed, parallel.shard_batch(batch, mesh))
            up = nnx.to_pure_dict(new)[0]["blocks"][0]["mlp"]["up"]
            out["bytes"][f"{name} {data}x{fsdp}"] = [int(s.data.nbytes) for s in up.addressable_shards][:2] + [
                int(up.nbytes)]
            got = jax.tree.map(np.asarray, nnx.to_pure_dict(new))
            out["diff"][f"{name} {data}x{fsdp}"] = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                                                     for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    print("RESULT " + json.dumps(out))
"""


def _check_eight_devices(out, meshes):
    assert out["search_shards"] == 8
    assert out["discrete_equal"], "a per-shard search tree differs from the single-device tree"
    assert out["float_diff"][-1][0] <= 1e-6, out["float_diff"]  # relative to the value (or 1 below 1)
    assert out["tree_leaves"] > 20  # the whole mctx tree was compared, not only the summary
    assert out["legal_shards"] == 8 and out["legal_equal"], "policy-only legal-step decoding differs on the mesh"
    for name, pairs in meshes.items():
        assert out["moved"][name] > 1e-3  # the step changed the parameters (not a comparison of two no-ops)
        for data, fsdp in pairs:
            assert out["diff"][f"{name} {data}x{fsdp}"] <= 1e-5, out["diff"]
            shard0, shard1, whole = out["bytes"][f"{name} {data}x{fsdp}"]
            assert shard0 == shard1 == whole // fsdp  # each device holds 1/fsdp of the parameter (FSDP)


def test_eight_devices_sharded_search_decoding_and_fsdp_sft_learner_and_grpo_steps_equal_one_device():
    meshes = {"sft": [(4, 2)], "learner": [(2, 4)], "grpo": [(2, 4)]}
    _check_eight_devices(run_devices(EIGHT_DEVICES.replace("MESHES_HERE", repr(meshes))), meshes)


@pytest.mark.slow
def test_eight_devices_fsdp_steps_equal_one_device_on_every_mesh_shape():
    every = [(8, 1), (4, 2), (2, 4), (1, 8)]
    meshes = {"sft": every, "learner": every, "grpo": every}
    _check_eight_devices(run_devices(EIGHT_DEVICES.replace("MESHES_HERE", repr(meshes))), meshes)


RESHARD = """
    import json, shutil
    import jax, numpy as np
    from flax import nnx
    from alphareason import parallel
    from alphareason.run import load_model
    from alphareason.train.sft import train_sft
    from helpers import micro_config

    def params(model):
        return {".".join(map(str, k)): np.asarray(v).tolist() for k, v in
                jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}

    config = micro_config()
    config.mesh.data, config.mesh.fsdp = 4, 2
    quiet = dict(progress=False, log=lambda *_: None)
    full = train_sft(config, "WORK/full", **quiet)  # 6 steps on a (4, 2) mesh
    train_sft(config, "WORK/part", stop_after=3, **quiet)  # killed after the step-3 checkpoint
    shutil.copytree("WORK/part", "WORK/part_one_device")
    resumed = train_sft(config, "WORK/part", mesh=parallel.make_mesh(data=2, fsdp=4), **quiet)
    qkv = resumed.model.blocks[0].attn.qkv[...]
    print("RESULT " + json.dumps({"full": params(full.model), "resumed_2x4": params(resumed.model),
                                  "resumed_spec": list(qkv.sharding.spec),
                                  "resumed_mesh": list(qkv.sharding.mesh.shape.values()),
                                  "resumed_shard_rows": qkv.addressable_shards[0].data.shape[0]}))
"""


@pytest.mark.slow
def test_checkpoint_of_a_4x2_mesh_resumes_on_2x4_and_on_one_device_with_equal_results(tmp_path):
    from alphareason.train.sft import train_sft
    out = run_devices(RESHARD.replace("WORK", str(tmp_path)))
    config = micro_config()
    spec = out["resumed_spec"]
    assert out["resumed_mesh"] == [2, 4] and spec[0] == "fsdp" and not any(spec[1:])  # qkv [D, 3, H, Dh]
    assert out["resumed_shard_rows"] == config.model.d_model // 4  # read straight into the (2, 4) shards
    # The checkpoint written on 8 devices, read on this process's one device.
    one = parallel.make_mesh(devices=jax.devices()[:1])
    step3, _, meta = load_model(config, str(tmp_path / "part_one_device"), mesh=one)
    assert meta["step"] == 3
    resumed = train_sft(config, str(tmp_path / "part_one_device"), progress=False, log=lambda *_: None, mesh=one)
    got, at_step3 = _flat_params(resumed.model), _flat_params(step3)
    assert set(got) == set(out["full"])
    assert max(np.max(np.abs(np.asarray(out["full"][k]) - v)) for k, v in at_step3.items()) > 1e-4  # steps 4-6 moved
    for name, value in got.items():
        full = np.asarray(out["full"][name], np.float32)
        assert np.max(np.abs(value - full)) <= 1e-5, name  # 1 device continues as the (4, 2) run did
        assert np.max(np.abs(np.asarray(out["resumed_2x4"][name], np.float32) - full)) <= 1e-5, name


# ------------------------------------------------------- multi-process settings
def test_distributed_settings_come_from_flags_or_the_environment_and_bad_ones_are_named():
    from alphareason.parallel import DistributedError, distributed_settings
    assert distributed_settings(environ={}) is None  # one process
    want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings(**want, environ={}) == want
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_settings(environ=env) == want
    assert distributed_settings(process_id=0, environ=env)["process_id"] == 0  # a flag wins over the environment
    with pytest.raises(DistributedError, match="missing --process-id"):
        distributed_settings(coordinator_address="10.0.0.1:1234", num_processes=2, environ={})
    with pytest.raises(DistributedError, match="must be HOST:PORT"):
        distributed_settings(coordinator_address="10.0.0.1", num_processes=2, process_id=0, environ={})
    with pytest.raises(DistributedError, match="--process-id=2 is outside 0..1 for --num-processes=2"):
        distributed_settings(coordinator_address="h:1", num_processes=2, process_id=2, environ={})
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed_settings(environ={**env, "JAX_NUM_PROCESSES": "two"})
