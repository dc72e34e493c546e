"""Real multi-process runs: processes on 127.0.0.1 joined by ``jax.distributed``, each with 2 virtual CPU devices.

Each test launches the processes (``alphareason.launch.launch_local``) with a
deadline, so a process that dies or hangs fails the test instead of hanging
it, and compares what they computed with one process running the same global
batch on this test's single device.
"""

import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from alphareason.launch import describe, launch_local
from alphareason.run import load_model
from alphareason.train.metrics import read_metrics
from helpers import micro_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TIMING = ("seconds", "per_s")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}


def _config_file(tmp_path, **overrides) -> str:
    """A config file for the ``alphareason`` command: the tests' micro config with ``overrides``."""
    path = tmp_path / "micro_config.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from helpers import micro_config


        def get_config():
            c = micro_config()
            for key, value in {overrides!r}.items():
                section, name = key.split(".")
                c[section][name] = value
            return c
    """))
    return str(path)


def _flat(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


def _assert_same_metrics(got: list[dict], want: list[dict], *, atol: float = 1e-5):
    assert len(got) == len(want) and got, (len(got), len(want))
    for g, w in zip(got, want):
        assert set(g) == set(w), (g, w)
        for k, v in w.items():
            if any(t in k for t in TIMING):
                continue
            if isinstance(v, float):
                assert abs(g[k] - v) <= atol, (w["phase"], w["step"], k, g[k], v)
            else:
                assert g[k] == v, (w["phase"], w["step"], k, g[k], v)


def _assert_same_params(got: dict, want: dict, *, atol: float = 1e-5):
    assert set(got) == set(want)
    for name in want:
        assert np.max(np.abs(got[name] - want[name])) <= atol, name


SFT = """
    import json, sys
    from alphareason import parallel
    parallel.initialize_distributed(heartbeat_timeout_seconds=20, fingerprint="sft")  # JAX_* from the launcher
    import jax
    from helpers import micro_config
    from alphareason.train.sft import train_sft
    config = micro_config()
    config.mesh.fsdp = 2  # parameters split over each process's two devices, batches over all four
    result = train_sft(config, sys.argv[1], progress=False, log=lambda *_: None)
    up = result.model.blocks[0].mlp.up[...]
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                                  "up_local_shards": [list(s.data.shape) for s in up.addressable_shards]}))
"""


def test_two_processes_sft_matches_one_process_and_its_checkpoint_restores_on_one_device(tmp_path):
    from alphareason.train.sft import train_sft
    work = str(tmp_path / "two")
    results = launch_local(["-c", textwrap.dedent(SFT), work], num_processes=2, devices_per_process=2,
                           with_flags=False, env=_env(), timeout=600)
    out = [json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:]) for r in results]
    assert [o["process"] for o in out] == [0, 1] and all(o["processes"] == 2 and o["devices"] == 4 for o in out)
    assert out[0]["up_local_shards"] == [[16, 64], [16, 64]]  # d_model 32 split over fsdp=2: each device half
    config = micro_config()
    one = train_sft(config, str(tmp_path / "one"), progress=False, log=lambda *_: None)  # same global batches
    _assert_same_metrics(read_metrics(work, "sft"), read_metrics(tmp_path / "one", "sft"))  # written once
    restored, _, meta = load_model(config, work)  # the checkpoint both processes wrote, read on one device
    assert meta["step"] == config.train.steps
    _assert_same_params(_flat(restored), _flat(one.model))


def test_a_process_count_that_disagrees_with_the_coordinator_is_refused_before_work(tmp_path):
    config_path = _config_file(tmp_path)
    work = tmp_path / "w"
    results = launch_local(["-m", "alphareason.cli", "train", "--config", config_path, "--workdir", str(work),
                            "--no-progress"], num_processes=2, devices_per_process=2, with_flags=False, env=_env(),
                           per_process_args=[["--num-processes", "2"], ["--num-processes", "3"]], check=False,
                           timeout=300)
    assert [r.returncode for r in results] == [2, 2], describe(results)
    assert "process 1 was started with --num-processes=3, process 0 with 2" in results[0].stderr
    assert "this process (id 1) was started with --num-processes=3 but the coordinator runs 2" in results[1].stderr
    assert not work.exists()  # nothing was started


@pytest.mark.slow
def test_two_processes_of_self_play_match_one_process_with_the_same_global_batch(tmp_path):
    """``alphareason train`` (SFT + 2 self-play iterations) as 2 processes x 2 devices, FSDP over each
    process's devices, equals the same run in one process on one device."""
    from alphareason.train.loop import run_training
    config_path = _config_file(tmp_path, **{"mesh.fsdp": 2})
    work = str(tmp_path / "two")
    launch_local(["-m", "alphareason.cli", "train", "--config", config_path, "--workdir", work, "--no-progress"],
                 num_processes=2, devices_per_process=2, env=_env(), timeout=900)
    config = micro_config()
    run_training(config, str(tmp_path / "one"), progress=False, log=lambda *_: None)
    want = read_metrics(tmp_path / "one")
    assert {r["phase"] for r in want} >= {"sft", "eval", "selfplay"}
    assert max(r["step"] for r in want if r["phase"] == "selfplay") == config.selfplay.iterations
    _assert_same_metrics(read_metrics(work), want)
    _assert_same_params(_flat(load_model(config, work)[0]), _flat(load_model(config, str(tmp_path / "one"))[0]))


DIES = """
    import os, sys
    from alphareason import parallel
    parallel.initialize_distributed(heartbeat_timeout_seconds=5, fingerprint="dies")
    import jax
    from helpers import micro_config
    from alphareason.checkpoint import Checkpointer
    from alphareason.train.sft import train_sft
    if jax.process_index() == 1:  # dies at the first checkpoint, after 3 training steps
        Checkpointer.save = lambda *args, **kwargs: os._exit(7)
    train_sft(micro_config(), sys.argv[1], progress=False, log=lambda *_: None)
"""


@pytest.mark.slow
def test_a_process_that_dies_mid_run_stops_the_other_with_an_error_naming_it(tmp_path):
    results = launch_local(["-c", textwrap.dedent(DIES), str(tmp_path / "w")], num_processes=2,
                           devices_per_process=2, with_flags=False, env=_env(), check=False, timeout=300,
                           grace_seconds=120)
    assert results[1].returncode == 7, describe(results)
    assert results[0].returncode not in (0, None), describe(results)  # it stopped by itself, with an error
    assert "unhealthy" in results[0].stderr and "stopped sending heartbeats" in results[0].stderr
    message = results[0].stderr[results[0].stderr.index("stopped sending heartbeats"):]
    assert message.split(":", 1)[1].split()[0] == "1", message[:300]  # the dead process's id
