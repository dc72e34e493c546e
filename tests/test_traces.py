"""Stream of Search: search traces as demonstrations, and a model that writes them.

A micro model memorises one trace that hits a dead end, undoes it with "#"
and goes on to solve; decoded in trace mode it must write that trace to the
end, decoded as a chain of thought it must stop at the dead end. With the
calculator the model writes only ``a op b=`` of each step (the tool the rest,
also after a "#" reopened a state).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from alphareason.config import ConfigError
from alphareason.data.builder import cut_to_fit, examples_for, make_spec
from alphareason.data.loader import collate, encode_example
from alphareason.model.transformer import ModelConfig, Transformer
from alphareason.eval import EvalSettings, Evaluator
from alphareason.tasks import get_task
from alphareason.run import make_data_spec, make_optimizer, sequence_length
from alphareason.train.sft import make_train_step, train_sft
from helpers import micro_config

TASK = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool=None)
PROBLEM = {"numbers": [6, 6, 8], "target": 12}
TRACE = "6+6=12\n12+8=20\n#\n12-8=4\n#\n12*8=96\n#\n#\n8-6=2\n6*2=12\n"
SEQ_LEN = 80


def test_the_memorised_trace_backtracks_and_solves():
    assert TASK.search_trace(PROBLEM) == TRACE
    assert TASK.verify(PROBLEM, TRACE).solved
    assert not TASK.verify(PROBLEM, "6+6=12\n12+8=20\n").solved  # the dead end


@pytest.fixture(scope="module", params=[None, "calculator"])
def memorised(request):
    """(task, a 2-layer model trained on TRACE alone until it predicts every model-written token)."""
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool=request.param)
    assert task.search_trace(PROBLEM) == TRACE
    model = Transformer(ModelConfig(max_len=SEQ_LEN, d_model=32, num_layers=2, num_heads=2, d_ff=64),
                        rngs=nnx.Rngs(0))
    steps = 300
    optimizer = make_optimizer(model, learning_rate=1e-2, steps=steps, warmup_steps=10, weight_decay=0.0,
                               grad_clip=1.0)
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, policy_weight=1.0, value_weight=0.0)
    batch = collate([encode_example(task, task.prompt(PROBLEM), TRACE, True, SEQ_LEN)] * 8)
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    assert float(metrics["token_accuracy"]) == 1.0, "the micro model did not memorise the trace"
    return task, nnx.merge(graphdef, state)[0]


def _greedy(task, model, *, traces: bool):
    evaluator = Evaluator(model, task, EvalSettings(strategy="greedy", batch_size=2, traces=traces))
    return evaluator.run([PROBLEM, PROBLEM], jax.random.key(0))[0]


def test_trace_decoding_goes_past_a_dead_end_and_solves(memorised):
    row = _greedy(*memorised, traces=True)
    assert row["solution"] == TRACE
    assert row["solved"] and row["num_steps"] == 10


def test_chain_of_thought_decoding_stops_at_the_dead_end(memorised):
    row = _greedy(*memorised, traces=False)
    assert row["solution"] == "6+6=12\n12+8=20\n"
    assert not row["solved"]


def test_a_trace_that_may_not_fit_the_context_is_cut_unsolved(memorised):
    # Same weights (rotary positions), a 40-token context: BOS + prompt (10 tokens) + steps;
    # a step is written only while a whole step (12 tokens) still fits.
    task, model = memorised
    short = Transformer(ModelConfig(max_len=40, d_model=32, num_layers=2, num_heads=2, d_ff=64), rngs=nnx.Rngs(1))
    nnx.update(short, nnx.state(model))
    row = _greedy(task, short, traces=True)
    assert TRACE.startswith(row["solution"]) and row["solution"] != TRACE
    assert not row["solved"]
    assert 1 + len(TASK.prompt(PROBLEM)) + len(row["solution"]) <= 40
    assert 1 + len(TASK.prompt(PROBLEM)) + len(row["solution"]) + TASK.max_step_len > 40


# ---------------------------------------------------------------- data
def test_cut_to_fit_keeps_whole_steps():
    assert cut_to_fit(TRACE, len(TRACE)) == TRACE
    assert cut_to_fit(TRACE, 16) == "6+6=12\n12+8=20\n"  # 15 characters: two whole steps
    assert cut_to_fit(TRACE, 14) == "6+6=12\n"
    assert cut_to_fit(TRACE, 3) == ""


def test_traces_are_cut_to_the_context_in_the_data():
    spec = make_spec("countdown", dict(TASK.options), train_size=8, demonstrations="traces",
                     negatives_per_problem=0.0, max_chain_len=40)
    demo, solved = examples_for(TASK, PROBLEM, spec, "train", np.random.default_rng(0))[0]
    assert demo == "6+6=12\n12+8=20\n#\n12-8=4\n#\n"  # BOS + prompt (10) + 26 + EOS = 37 tokens
    assert not solved
    encode_example(TASK, TASK.prompt(PROBLEM), demo, solved, 40)  # fits


def test_dataset_names_do_not_change_without_a_context_cut():
    spec = make_spec("countdown", dict(TASK.options), train_size=8)
    assert spec.config_name() == make_spec("countdown", dict(TASK.options), train_size=8,
                                           max_chain_len=0).config_name()
    assert spec.config_name() != make_spec("countdown", dict(TASK.options), train_size=8,
                                           max_chain_len=40).config_name()


def test_trace_context_may_be_shorter_than_the_worst_case_but_not_than_a_solution():
    config = micro_config(tool=None)
    config.data.demonstrations = "traces"
    bound = TASK.max_prompt_len + TASK.max_trace_steps * TASK.max_step_len + 1
    assert sequence_length(config, TASK) == bound
    config.model.max_len = 40
    assert sequence_length(config, TASK) == 40
    assert make_data_spec(config).max_chain_len == 40
    config.model.max_len = TASK.max_prompt_len + TASK.max_steps * TASK.max_step_len  # one token short
    with pytest.raises(ConfigError, match="model.max_len"):
        sequence_length(config, TASK)
    config.data.demonstrations = "solutions"
    config.model.max_len = 0
    assert make_data_spec(config).max_chain_len == 0


def test_stream_of_search_imitates_unsolved_traces_only_when_asked():
    unsolved = "6+6=12\n12+8=20\n#\n"
    default = encode_example(TASK, TASK.prompt(PROBLEM), unsolved, False, SEQ_LEN)
    imitated = encode_example(TASK, TASK.prompt(PROBLEM), unsolved, False, SEQ_LEN, imitate=True)
    assert default["targets_mask"].sum() == 0
    assert imitated["targets_mask"].sum() == len(unsolved) + 1  # every character and the EOS
    np.testing.assert_array_equal(imitated["value_mask"], default["value_mask"])
    np.testing.assert_array_equal(imitated["value_target"], default["value_target"])
    assert np.all(default["value_target"] == 0.0)


def test_imitating_unsolved_records_needs_traces_without_negatives(tmp_path):
    config = micro_config(tool=None)
    config.train.imitate_unsolved = True
    with pytest.raises(ConfigError, match="data.demonstrations=traces and data.negatives_per_problem=0"):
        train_sft(config, str(tmp_path / "a"), progress=False, log=lambda s: None)
    config.data.demonstrations = "traces"
    with pytest.raises(ConfigError, match="negatives_per_problem=0"):
        train_sft(config, str(tmp_path / "b"), progress=False, log=lambda s: None)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_batches_imitate_unsolved_records_only_when_asked():
    import json
    from alphareason.data import BatchIterator
    record = {"problem": json.dumps(PROBLEM), "prompt": TASK.prompt(PROBLEM), "text": "6+6=12\n12+8=20\n#\n",
              "solved": 0, "difficulty": 0}
    for imitate, want in ((False, 0), (True, 2 * 18)):
        batch = next(BatchIterator([record], TASK, batch_size=2, seq_len=SEQ_LEN, seed=0, imitate_unsolved=imitate))
        assert batch["targets_mask"].sum() == want
