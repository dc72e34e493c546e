"""Config files for tests of commands that take a config path (written into a temporary folder)."""

import os

MICRO = '''
from helpers import micro_config


def get_config():
    c = micro_config()
    c.eval.value_problems, c.eval.value_mc_samples = 4, 2
    c.selfplay.iterations = 1
    return c
'''


def write_micro(folder) -> str:
    """A config file for ``tests/helpers.py``'s micro config with one self-play iteration."""
    path = os.path.join(str(folder), "micro_config.py")
    with open(path, "w") as f:
        f.write(MICRO)
    return path
