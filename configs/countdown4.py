"""Countdown-4 in the Stream of Search setting: 4 numbers 1-99, targets 10-100.

With the calculator tool (the default); set ``task.options.tool=None`` and
``data.demonstrations=traces`` for the Stream-of-Search comparison.
"""

from alphareason.config import default_config


def get_config():
    c = default_config()
    c.name = "countdown4"
    c.task.options.num_numbers = 4
    c.task.options.max_number = 99
    c.data.train_size = 80_000
    c.data.validation_size = 200
    c.data.test_size = 200
    c.train.steps = 6000
    c.train.batch_size = 128
    c.search.num_simulations = 64
    c.search.num_candidates = 16
    c.search.max_num_considered_actions = 16
    # The learner restarts below the rate SFT ended at (2e-4): at 5e-4 every algorithm lost MCTS
    # solve rate in its first iteration (51 -> 44.5-46%), at 1e-4 none did (README, Countdown-4 curves).
    c.selfplay.learning_rate = 1e-4
    return c
