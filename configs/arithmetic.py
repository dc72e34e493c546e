"""Multi-digit multiplication as a chain of thought (partial products, then sums)."""

from alphareason.config import default_config


def get_config():
    c = default_config()
    c.name = "arithmetic"
    c.task.name = "arithmetic"
    c.task.options = {"max_digits_a": 3, "max_digits_b": 3}
    c.data.train_size = 20_000
    c.train.steps = 3000
    return c
