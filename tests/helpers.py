"""Small configs shared by the tests: everything runs in seconds on one CPU core."""

from alphareason.config import default_config


def micro_config(**task_options):
    """Countdown with 3 numbers from 1-10 and a 2-layer, 32-wide model."""
    c = default_config()
    c.name = "micro"
    c.task.options.num_numbers = 3
    c.task.options.max_number = 10
    c.task.options.min_target = 10
    c.task.options.max_target = 30
    for k, v in task_options.items():
        c.task.options[k] = v
    c.data.train_size = 96
    c.data.validation_size = 8
    c.data.test_size = 8
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.eval.num_problems = 8
    c.eval.batch_size = 8
    c.eval.value_problems = 0  # value diagnostics off (tests/configs_for_tests.py turns them on)
    c.search.num_simulations = 4
    c.search.num_candidates = 4
    c.search.max_num_considered_actions = 4
    c.selfplay.iterations = 2
    c.selfplay.episodes_per_iteration = 8
    c.selfplay.actor_batch_size = 8
    c.selfplay.replay_capacity = 64
    c.selfplay.learner_steps = 3
    c.selfplay.learner_batch_size = 8
    c.selfplay.eval_simulations = 4
    return c
