"""experiments/selfplay_curves.py runs every algorithm from one SFT start and writes its outputs."""

import json
import os

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
