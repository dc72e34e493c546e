"""Smoke tests of `alphareason bench model|search|selfplay`: every figure is written (no timing thresholds)."""

import json
import math

import pytest

from alphareason.bench.model_bench import run_model_bench

MICRO = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "train.batch_size=8",
         "data.train_size=32", "data.validation_size=4", "data.test_size=4"]


def _positive(value, name):
    assert isinstance(value, (int, float)) and value > 0, f"{name} = {value!r}"


@pytest.mark.slow  # half a minute of compilation on 2 cores; `make test-all`
def test_model_bench_quick_writes_every_figure(tmp_path):
    out = tmp_path / "model.json"
    result = run_model_bench(str(out), quick=True, overrides=MICRO, train_steps=4, matmul_sizes=(64,),
                             decode_batch=4, prompt_len=4, new_tokens=2, data_dir=str(tmp_path / "data"))
    written = json.loads(out.read_text())
    assert written["summary"] == result["summary"]
    for dtype in ("float32", "bfloat16"):
        _positive(written["peak"][dtype]["flops_per_s"], f"peak.{dtype}")
        row = written["train"][dtype]
        for key in ("tokens_per_s", "tokens_per_s_median", "step_seconds_best", "flops_per_s",
                    "fraction_of_float32_peak"):
            _positive(row[key], f"train.{dtype}.{key}")
    _positive(written["train"]["bf16_speedup"], "bf16_speedup")
    _positive(written["forward"]["tokens_per_s"], "forward.tokens_per_s")
    decode = written["decode"]
    for key in ("cached_seconds", "uncached_seconds", "speedup"):
        _positive(decode[key], f"decode.{key}")
    assert (decode["batch_size"], decode["prompt_len"], decode["new_tokens"]) == (4, 4, 2)
    assert decode["uncached_token_forwards"] > decode["cached_token_forwards"]
    curves = written["loss_curves"]
    assert curves["steps"] == [1, 2, 3, 4]
    assert len(curves["float32"]) == len(curves["bfloat16"]) == 4
    assert all(loss > 0 for loss in curves["float32"] + curves["bfloat16"])
    with open(curves["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(written["summary"]) == {"train_fraction_of_peak", "bf16_train_speedup", "decode_cache_speedup"}
    assert written["model"]["d_model"] == 32 and written["model"]["batch_size"] == 8
    for dtype in ("float32", "bfloat16"):
        assert written["train"][dtype]["page_faults_per_step_median"] >= 0
    assert isinstance(written["machine"]["huge_pages"]["glibc_tunable"], bool)
    ceiling = written["bf16_ceiling"]
    for key in ("products_seconds_float32", "products_seconds_bfloat16", "speedup_bound"):
        _positive(ceiling[key], f"bf16_ceiling.{key}")
    assert written["summary"]["bf16_train_speedup"]["bound_from_products"] == ceiling["speedup_bound"]
    # Every product timed alone: the bound replaces exactly their float32 time by their bfloat16 time.
    rest = ceiling["step_seconds_float32"] - ceiling["products_seconds_float32"]
    assert ceiling["speedup_bound"] == pytest.approx(
        ceiling["step_seconds_float32"] / (max(rest, 0.0) + ceiling["products_seconds_bfloat16"]))


def _product_flops(product) -> int:
    (lc, rc), (lb, rb) = product["dimension_numbers"]
    size = lambda shape, axes: math.prod(shape[i] for i in axes)  # noqa: E731
    k, b = size(product["lhs"], lc), size(product["lhs"], lb)
    m, n = math.prod(product["lhs"]) // (k * b), math.prod(product["rhs"]) // (k * b)
    return 2 * m * n * k * b * product["count"]


def test_the_traced_products_of_a_training_step_are_the_flops_the_benches_count():
    """The products found in the step's jaxpr (forward, both gradients, attention) add up to
    ``3 * flops_per_token`` per token: the FLOP count behind "fraction of peak"."""
    from alphareason.bench.model_bench import _float32_step, products_in_step
    from alphareason.config import load_config
    from alphareason.data.loader import collate, encode_example
    from alphareason.model import flops_per_token
    from alphareason.run import make_model_config, make_task
    config = load_config("configs/countdown_tiny.py", MICRO)
    task = make_task(config)
    mcfg = make_model_config(config, task)
    problem = task.generate(0, 1)[0]
    batch = collate([encode_example(task, task.prompt(problem), task.solve(problem), True, mcfg.max_len)] * 8)
    products = products_in_step(*_float32_step(config, mcfg, batch))
    tokens = 8 * mcfg.max_len
    assert sum(_product_flops(p) for p in products) == 3 * flops_per_token(mcfg, mcfg.max_len) * tokens
    # Per layer: 4 weight matrices x (forward, input gradient, weight gradient), 2 attention products x 3.
    per_layer = sum(p["count"] for p in products) - sum(p["count"] for p in products if p["count"] == 1)
    assert per_layer == config.model.num_layers * (4 * 3 + 2 * 3)


SMALL_LOOP = MICRO + ["train.steps=4", "task.options.max_number=10", "task.options.max_target=30",
                      "eval.num_problems=4", "eval.batch_size=4", "search.num_simulations=4",
                      "search.num_candidates=4", "search.max_num_considered_actions=4", "selfplay.iterations=1",
                      "selfplay.episodes_per_iteration=8", "selfplay.actor_batch_size=8",
                      "selfplay.replay_capacity=64", "selfplay.learner_steps=2", "selfplay.learner_batch_size=8",
                      "selfplay.eval_simulations=4"]


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_search_bench_quick_writes_every_figure(tmp_path):
    from alphareason.bench.search_bench import run_search_bench
    out = tmp_path / "search.json"
    result = run_search_bench(str(out), quick=True, overrides=MICRO)  # quick: batches 1 and 4, 8 simulations
    written = json.loads(out.read_text())
    assert written["overhead"] == result["overhead"] and written["task"] == "game24"
    assert [row["batch_size"] for row in written["throughput"]] == [1, 4]
    for row in written["throughput"]:
        for key in ("expansions_per_s", "expansions_per_cpu_s", "seconds", "computed_per_proposing_expansion",
                    "floor_per_proposing_expansion", "computed_over_floor"):
            _positive(row[key], f"throughput.{key}")
        # every batch size searches the same 4 problems (4 calls of one, one of 4): one workload
        assert row["problems"] == 4 and row["calls"] == 4 // row["batch_size"] and row["node_expansions"] == 4 * 9
        assert row["computed_token_forwards"] >= row["needed_token_forwards"] > 0
    for key in ("search_seconds", "model_only_seconds", "ratio", "model_only_computed_token_forwards"):
        _positive(written["overhead"][key], f"overhead.{key}")
    memory = written["memory"]
    assert memory["bytes_per_node"] > memory["kv_slot_bytes_per_node"] > memory["paged_step_segment_bytes_per_node"] > 0
    # The random network gives every step a nonzero probability: 8 distinct candidates at every proposing node.
    assert all(r["distinct_candidates"] == 8 for r in written["distinct"]["without_replacement"])
    _positive(written["versus_ts_llm"]["ratio"], "versus_ts_llm")
    ceiling = written["decoder_ceiling"]
    assert ceiling["one_node"]["rows"] == 6 and ceiling["batched"]["rows"] == 4 * 6  # K = 6, batch 4
    _positive(ceiling["speedup"], "decoder_ceiling.speedup")


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_selfplay_bench_writes_phases_and_peak_memory(tmp_path):
    from alphareason.bench.selfplay_bench import run_selfplay_bench
    from alphareason.config import ConfigError
    out, workdir = tmp_path / "selfplay.json", tmp_path / "run"
    result = run_selfplay_bench(str(out), overrides=SMALL_LOOP, workdir=str(workdir))
    written = json.loads(out.read_text())
    assert written["iterations"] == 1 and written["episodes_per_iteration"] == 8
    for key in ("episodes_per_s", "learner_steps_per_s", "learner_tokens_per_s", "loop_seconds", "peak_rss_gib"):
        _positive(written[key], key)
    assert set(written["phase_fraction"]) == {"selfplay", "learning", "evaluation", "checkpointing"}
    assert abs(sum(written["phase_fraction"].values()) - 1) < 1e-6
    assert [r["step"] for r in written["solve_rates"]] == [0, 1]
    assert result["peak_rss_bytes"] == written["peak_rss_bytes"]
    # The kept run refuses to be timed again (a resumed run would time nothing).
    with pytest.raises(ConfigError, match="not empty"):
        run_selfplay_bench(str(out), overrides=SMALL_LOOP, workdir=str(workdir))


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_selfplay_bench_of_grpo_from_the_command_line(tmp_path):
    """``alphareason bench selfplay --config configs/countdown_tiny_grpo.py``: rollouts/s and learner tokens/s."""
    from alphareason.cli import main
    out = tmp_path / "grpo.json"
    overrides = [f"--config.{o}" for o in SMALL_LOOP + ["train.steps=200", "grpo.format_reward=0.5"]]
    assert main(["bench", "selfplay", "--config", "configs/countdown_tiny_grpo.py", "--out", str(out)]
                + overrides) == 0
    written = json.loads(out.read_text())
    assert written["algorithm"] == "grpo" and written["group_size"] == 8
    for key in ("rollouts_per_s", "episodes_per_s", "learner_tokens_per_s", "learner_steps_per_s",
                "selfplay_token_forwards", "learner_token_forwards", "peak_rss_gib"):
        _positive(written[key], key)


@pytest.mark.slow
def test_scale_bench_writes_every_setting_with_the_same_episodes(tmp_path):
    """`alphareason bench scale` on the micro model: one device, FSDP over two, and two processes."""
    from alphareason.bench.scale_bench import run_scale_bench
    out = tmp_path / "scale.json"
    settings = [("1 device", 1, 1, 1, 1), ("2 devices, FSDP (1 x 2)", 1, 2, 1, 2),
                ("2 processes x 2 devices", 2, 2, 4, 1)]
    result = run_scale_bench(str(out), quick=True, settings=settings, log=lambda *_: None,
                             overrides=SMALL_LOOP + ["selfplay.actor_batch_size=8"])
    written = json.loads(out.read_text())
    assert written["settings"] == json.loads(json.dumps(result["settings"]))
    assert [r["setting"] for r in written["settings"]] == [s[0] for s in settings]
    for row in written["settings"]:
        for key in ("sft_tokens_per_s", "selfplay_episodes_per_s", "sft_time_ratio", "selfplay_time_ratio"):
            _positive(row[key], f"{row['setting']}.{key}")
        assert row["processes_agree"]
    assert written["same_episodes_everywhere"]  # every mesh and process count played the same episodes
    one, fsdp, two = written["settings"]
    assert (two["processes"], len(two["per_process"]), two["mesh"]) == (2, 2, {"data": 4, "fsdp": 1})
    # FSDP over two devices: each holds about half of the parameters and Adam state (norms stay whole).
    assert 0.5 <= fsdp["state_bytes_per_device"] / one["state_bytes_per_device"] < 0.52
    assert written["selfplay"]["candidates"] == "enumerate" and written["selfplay"]["episodes"] == 8


@pytest.mark.slow  # half a minute of compilation (12 programs); score_continuations' own checks are in test_model
def test_scoring_bench_blocked_attention_equals_the_dense_mask(tmp_path):
    """`alphareason bench scoring --quick` on a micro model: every figure written, and the blocked attention
    computes what the dense mask it replaced computes (the largest difference at float32 rounding)."""
    from alphareason.bench.scoring_bench import run_scoring_bench
    out = tmp_path / "scoring.json"
    run_scoring_bench(str(out), quick=True, overrides=["model.d_model=32", "model.num_layers=2", "model.num_heads=2",
                                                       "model.d_ff=64", "search.num_candidates=4"])
    written = json.loads(out.read_text())
    assert sorted(written["shapes"]) == ["enumerated_search_whole_steps", "enumerated_search_written", "learner"]
    for name, row in written["shapes"].items():
        for key in ("blocked_forward_seconds", "dense_forward_seconds", "blocked_gradient_seconds",
                    "dense_gradient_seconds", "forward_speedup", "gradient_speedup"):
            _positive(row[key], f"{name}.{key}")
        assert row["max_abs_difference"] < 1e-4, (name, row["max_abs_difference"])
    assert written["shapes"]["enumerated_search_written"]["num_continuations"] == 48  # Countdown-4's legal steps
    assert written["shapes"]["enumerated_search_written"]["continuation_len"] == 10  # `9801*9801=`
    _positive(written["enumerated_search_speedup"]["forward"], "enumerated_search_speedup")
