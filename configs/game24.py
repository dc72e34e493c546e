"""Game24: four numbers 1-13, reach 24 using all of them (1346 solvable multisets)."""

from alphareason.config import default_config


def get_config():
    c = default_config()
    c.name = "game24"
    c.task.name = "game24"
    c.task.options = {"tool": "calculator"}
    c.data.train_size = 1000  # of the 1346 solvable multisets; the rest are held out
    c.data.validation_size = 150
    c.data.test_size = 150
    c.train.steps = 3000
    c.search.num_simulations = 64
    c.search.num_candidates = 16
    c.search.max_num_considered_actions = 16
    return c
