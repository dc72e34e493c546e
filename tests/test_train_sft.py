"""SFT: data -> batches, loss goes down, exact resume, NaN handling, config errors."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from alphareason.config import ConfigError, apply_overrides, load_config
from alphareason.data import BatchIterator, build_dataset, encode_example
from alphareason import tokenizer as tok
from alphareason import run
from alphareason.train import sft
from alphareason.checkpoint import Checkpointer, CheckpointError
from alphareason.train.metrics import read_metrics
from helpers import micro_config


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_encode_example_masks_tool_output_and_prompt():
    from alphareason.tasks import get_task
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    ex = encode_example(task, "2,5,3>13\n", "2*5=10\n10+3=13\n", True, 40)
    toks = ex["tokens"]
    assert toks[0] == tok.BOS and tok.decode(toks) == "2,5,3>13\n2*5=10\n10+3=13\n"
    start = len(tok.encode("2,5,3>13\n", bos=True))
    targets = [tok.VOCAB[t] for t, m in zip(toks, ex["targets_mask"]) if m]
    # Model-written characters and the EOS; the calculator's result digits and newlines are not targets.
    assert "".join(t if t != "<eos>" else "$" for t in targets) == "2*5=10+3=$"
    assert ex["value_mask"][start - 1] == 1 and ex["value_mask"][start - 2] == 0
    neg = encode_example(task, "2,5,3>13\n", "2+5=7\n7+3=10\n", False, 40)
    assert neg["targets_mask"].sum() == 0 and np.all(neg["value_target"] == 0)


def test_batch_iterator_is_deterministic_and_resumable(tmp_path):
    config = micro_config()
    builder = build_dataset(run.make_data_spec(config), tmp_path / "data")
    source = builder.as_data_source(split="train")
    task = run.make_task(config)
    a = BatchIterator(source, task, batch_size=8, seq_len=40, seed=0)
    batches = [next(a)["tokens"] for _ in range(20)]  # crosses epoch boundaries
    b = BatchIterator(source, task, batch_size=8, seq_len=40, seed=0, position=8 * 13)
    np.testing.assert_array_equal(next(b)["tokens"], batches[13])
    assert not np.array_equal(batches[0], batches[1])


def test_dataset_splits_are_disjoint_and_rebuilt_identically(tmp_path):
    config = micro_config()
    spec = run.make_data_spec(config)
    b1 = build_dataset(spec, tmp_path / "d1")
    b2 = build_dataset(spec, tmp_path / "d2")
    from alphareason.data import load_records
    recs = {s: load_records(b1.as_data_source(split=s)) for s in ("train", "validation", "test")}
    keys = {s: {json.dumps(r["problem"], sort_keys=True) for r in v} for s, v in recs.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert recs["train"] == load_records(b2.as_data_source(split="train"))
    assert any(not r["solved"] for r in recs["train"])  # negatives for the value head


def test_negatives_with_the_calculator_are_states_a_search_reaches(tmp_path):
    """Every negative is a chain of legal steps (the calculator writes every result): its states are those
    the search evaluates, not a demonstration with a digit changed, which no chain with the tool reaches."""
    from alphareason.data import load_records
    from alphareason.tasks import split_steps
    config = micro_config(tool="calculator")
    spec = run.make_data_spec(config)
    task = spec.make_task()
    negatives = [r for r in load_records(build_dataset(spec, tmp_path / "d").as_data_source(split="train"))
                 if not r["solved"]]
    assert len(negatives) > 0.3 * spec.negatives_per_problem * spec.train_size
    for r in negatives:
        verdict = task.verify(r["problem"], r["text"])
        assert not verdict.solved and verdict.num_valid_steps == len(split_steps(r["text"])), (r, verdict)


def test_sft_loss_goes_down_and_resume_is_exact(tmp_path):
    config = micro_config()
    config.train.steps = 8
    config.train.checkpoint_every = 4
    full = sft.train_sft(config, str(tmp_path / "full"), progress=False, log=lambda s: None)
    part = sft.train_sft(config, str(tmp_path / "part"), progress=False, log=lambda s: None, stop_after=4)
    assert part.steps == 4
    resumed = sft.train_sft(config, str(tmp_path / "part"), progress=False, log=lambda s: None)
    assert resumed.steps == 8
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), _params(full.model),
                 _params(resumed.model))
    m_full = [r for r in read_metrics(tmp_path / "full", "sft")]
    m_res = [r for r in read_metrics(tmp_path / "part", "sft")]
    assert [r["step"] for r in m_full] == [r["step"] for r in m_res]
    np.testing.assert_allclose([r["loss"] for r in m_full], [r["loss"] for r in m_res], atol=1e-6)


def test_sft_learns_the_format(tmp_path):
    config = micro_config()
    config.train.steps = 60
    config.train.learning_rate = 3e-3
    config.train.log_every = 10
    config.train.checkpoint_every = 60
    sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None)
    losses = [r["loss"] for r in read_metrics(tmp_path, "sft")]
    assert losses[-1] < 0.6 * losses[0], losses


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = micro_config()
    config.train.steps = 6
    config.train.checkpoint_every = 2
    config.train.log_every = 2
    sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None, stop_after=2)
    config.train.learning_rate = 1e30  # diverges at once
    with pytest.raises(sft.TrainingDiverged, match="last good checkpoint .step 2."):
        sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None)
    assert Checkpointer(tmp_path / "checkpoints" / "sft").latest_step() == 2


def test_corrupt_checkpoint_names_the_file(tmp_path):
    config = micro_config()
    sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None, stop_after=3)
    step_dir = tmp_path / "checkpoints" / "sft" / "3"
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None)


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run.load_model(micro_config(), str(tmp_path))


def test_config_errors():
    config = micro_config()
    with pytest.raises(ConfigError, match="valid keys there: .*steps"):
        apply_overrides(config, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="is a int"):
        apply_overrides(config, ["train.steps=many"])
    apply_overrides(config, ["--config.train.steps=11", "search.policy=puct"])
    assert config.train.steps == 11 and config.search.policy == "puct"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")
    for name in ("countdown_tiny", "countdown4", "game24", "arithmetic"):
        c = load_config(f"configs/{name}.py")
        run.make_model_config(c, run.make_task(c))


def test_workdir_with_other_config_is_refused(tmp_path):
    config = micro_config()
    sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None, stop_after=1)
    config.model.d_model = 64
    with pytest.raises(ConfigError, match="different model config"):
        sft.train_sft(config, str(tmp_path), progress=False, log=lambda s: None)
