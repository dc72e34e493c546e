"""Smoke test of ``alphareason bench model``: every figure is written and positive (no timing thresholds)."""

import json

from alphareason.bench.model_bench import run_model_bench

MICRO = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "train.batch_size=8",
         "data.train_size=32", "data.validation_size=4", "data.test_size=4"]


def _positive(value, name):
    assert isinstance(value, (int, float)) and value > 0, f"{name} = {value!r}"


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
