"""The sharded paths on 8 virtual CPU devices give the same results as one device.

JAX fixes its device count at start-up, so the 8-device run happens in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from alphareason.parallel import check_batch, make_mesh

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from alphareason.model import ModelConfig
    from alphareason.model.testing import perturbed_model
    from alphareason.parallel import make_mesh, replicate, shard_batch
    from alphareason.search import EnvConfig, SearchConfig, Searcher
    from alphareason.tasks import get_task
    from alphareason.train.learner import selfplay_loss

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh()
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    model = perturbed_model(ModelConfig.micro(max_len=64), seed=1)
    graphdef, params = nnx.split(model)
    searcher = Searcher(task, graphdef, EnvConfig(num_candidates=4), SearchConfig(num_simulations=4,
                        max_num_considered_actions=4), seq_len=64)
    problems = task.generate(5, 8)
    inputs = jax.tree.map(jnp.asarray, searcher.env.initial(problems))
    keys = jax.random.split(jax.random.key(0), 8)
    one = searcher(params, keys, inputs)
    sharded_inputs = shard_batch(inputs, mesh)
    many = searcher(replicate(params, mesh), shard_batch(keys, mesh), sharded_inputs)
    out = {"num_shards": len(many.action_weights.sharding.device_set),
           "search_equal": bool(np.array_equal(one.action_weights, many.action_weights)
                                and np.array_equal(one.visit_counts, many.visit_counts)
                                and np.array_equal(one.root.candidates, many.root.candidates)),
           "search_close": float(np.max(np.abs(np.asarray(one.search_value) - np.asarray(many.search_value))))}

    batch = {"tokens": inputs["tokens"], "length": inputs["length"], "candidates": one.root.candidates,
             "cand_valid": one.root.cand_valid, "action_weights": one.action_weights,
             "search_value": one.search_value, "outcome": jnp.asarray(np.arange(8) % 2, jnp.float32)}

    @jax.jit
    def grads(params, batch):
        f = lambda p: selfplay_loss(nnx.merge(graphdef, p), batch, task=task)[0]
        return jax.value_and_grad(f)(params)

    loss1, g1 = grads(params, batch)
    loss8, g8 = grads(replicate(params, mesh), shard_batch(batch, mesh))
    out["loss_diff"] = float(abs(loss1 - loss8))
    out["grad_diff"] = float(max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g1, g8))))
    print("RESULT " + json.dumps(out))
""")


def test_search_and_learner_on_eight_devices_match_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["num_shards"] == 8
    assert out["search_equal"], out
    assert out["search_close"] < 1e-6
    assert out["loss_diff"] < 1e-6
    assert out["grad_diff"] < 1e-6


def test_mesh_errors_name_the_numbers():
    mesh = make_mesh()
    n = jax.device_count()
    check_batch(4 * n, mesh)
    with pytest.raises(ValueError, match="fsdp=3 does not divide"):
        make_mesh(fsdp=3, devices=[jax.devices()[0]] * 4)
    if n == 1:
        with pytest.raises(ValueError, match="mesh data=2 x fsdp=1 = 2 but there are 1 devices"):
            make_mesh(data=2)
