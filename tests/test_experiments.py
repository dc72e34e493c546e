"""experiments/selfplay_curves.py runs every algorithm from one SFT start and writes its outputs."""

import json
import os

import pytest

from experiments.selfplay_curves import run_curves

TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.d_ff=64", "--config.task.options.max_number=10", "--config.task.options.max_target=30",
        "--config.data.train_size=96", "--config.data.validation_size=8", "--config.data.test_size=8",
        "--config.train.steps=4", "--config.train.batch_size=8", "--config.train.warmup_steps=2",
        "--config.train.checkpoint_every=4", "--config.eval.num_problems=8", "--config.eval.batch_size=8",
        "--config.search.num_simulations=4", "--config.search.num_candidates=4",
        "--config.search.max_num_considered_actions=4", "--config.selfplay.iterations=1",
        "--config.selfplay.episodes_per_iteration=8", "--config.selfplay.actor_batch_size=8",
        "--config.selfplay.replay_capacity=64", "--config.selfplay.learner_steps=2",
        "--config.selfplay.learner_batch_size=8", "--config.selfplay.eval_simulations=4"]


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_selfplay_curves_share_the_sft_start_and_write_table_json_and_plot(tmp_path):
    out = str(tmp_path / "curves")
    result = run_curves("configs/countdown_tiny.py", out, overrides=TINY, progress=False)
    runs = result["runs"]
    assert set(runs) == {"alphazero", "expert_iteration", "sft_only"}
    # Every algorithm starts from the same SFT model: identical iteration-0 evaluations.
    starts = {json.dumps(r["iterations"][0], sort_keys=True) for r in runs.values()}
    assert len(starts) == 1
    assert [r["step"] for r in runs["alphazero"]["iterations"]] == [0, 1]
    assert runs["alphazero"]["iterations"][1]["selfplay_token_forwards"] > 0
    assert not runs["sft_only"]["iterations"][1].get("selfplay_token_forwards")
    for name in ("curves.json", "curves.md", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "curves.md")).read()
    assert "| expert_iteration | 1 |" in table


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_selfplay_curves_variants_start_from_the_same_sft_and_bad_variants_are_refused(tmp_path):
    import pytest
    out = str(tmp_path / "ablation")
    with pytest.raises(ValueError, match="model"):
        run_curves("configs/countdown_tiny.py", out, algorithms=(), overrides=TINY, progress=False,
                   variants={"wide": ["model.d_model=64"]})
    with pytest.raises(ValueError, match="taken"):
        run_curves("configs/countdown_tiny.py", out, algorithms=("alphazero",), overrides=TINY, progress=False,
                   variants={"alphazero": ["search.rescale_values=False"]})
    assert not os.path.exists(os.path.join(out, "sft")), "a refused variant must not start any work"
    result = run_curves("configs/countdown_tiny.py", out, algorithms=("alphazero",), overrides=TINY,
                        progress=False, variants={"no_rescale": ["search.rescale_values=False"]})
    runs = result["runs"]
    assert set(runs) == {"alphazero", "no_rescale"}
    # The second invocation resumed the alphazero run: its wall time adds to the first one's.
    first = json.load(open(os.path.join(out, "curves.json")))["runs"]["alphazero"]["seconds"]
    again = run_curves("configs/countdown_tiny.py", out, algorithms=("alphazero",), overrides=TINY, progress=False)
    assert again["runs"]["alphazero"]["seconds"] >= first > 0
    assert again["runs"]["alphazero"]["iterations"] == runs["alphazero"]["iterations"]
    assert again["runs"]["no_rescale"] == runs["no_rescale"]  # not rerun, still in the table
    assert runs["no_rescale"]["overrides"] == ["search.rescale_values=False"]
    assert runs["alphazero"]["iterations"][0] == runs["no_rescale"]["iterations"][0]
    saved = json.load(open(os.path.join(out, "no_rescale", "config.json")))
    assert saved["search"]["rescale_values"] is False


@pytest.mark.slow  # minutes on 2 cores; `make test-all`
def test_search_solve_rates_writes_every_row_and_keeps_measured_rows(tmp_path, monkeypatch):
    from alphareason.config import load_config
    from alphareason.train.sft import train_sft
    from experiments import search_solve_rates

    config = load_config("configs/countdown_tiny.py", [o[len("--config."):] for o in TINY])
    workdir = str(tmp_path / "run")
    train_sft(config, workdir, progress=False)
    out = str(tmp_path / "rates")
    calls = []
    evaluate = search_solve_rates._evaluate

    def counting(*args, **kwargs):
        calls.append((kwargs["strategy"], kwargs.get("simulations"), kwargs.get("mode", "sample")))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(search_solve_rates, "_evaluate", counting)
    result = search_solve_rates.run({"countdown": workdir}, out, num_problems=4, simulations=(2,),
                                    candidates=4, kinds=("sft", "untrained+legal"))
    rows = result["tasks"]["countdown"]
    for kind in ("sft", "untrained+legal"):
        assert set(rows[kind]) == {"greedy", "mcts@2", next(k for k in rows[kind] if k.startswith("best_of_"))}
        for row in rows[kind].values():
            assert 0.0 <= row["solve_rate"] <= 1.0 and row["token_forwards"] > 0
    assert ("mcts", 2, "enumerate") in calls and ("mcts", 2, "sample") in calls
    # A second call with one more budget measures only the new rows and keeps the first ones.
    calls.clear()
    again = search_solve_rates.run({"countdown": workdir}, out, num_problems=4, simulations=(2, 3),
                                   candidates=4, kinds=("sft",))
    assert [c[:2] for c in calls] == [("mcts", 3), ("sample", None)]
    assert again["tasks"]["countdown"]["untrained+legal"] == rows["untrained+legal"]
    assert again["simulations"] == [2, 3]
    saved = json.load(open(os.path.join(out, "solve_rates.json")))
    assert set(saved["tasks"]["countdown"]["sft"]) >= {"greedy", "mcts@2", "mcts@3"}
    assert "**countdown, untrained+legal network**" in open(os.path.join(out, "solve_rates.md")).read()
