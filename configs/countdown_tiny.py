"""The default: Countdown with the calculator tool, small enough for a 2-core CPU.

Three numbers from 1-30, targets 10-100, all numbers used. The SFT warm start
and a few AlphaZero iterations run in minutes on a laptop CPU:

  alphareason train --config configs/countdown_tiny.py --workdir runs/demo
"""

from alphareason.config import default_config


def get_config():
    c = default_config()
    c.name = "countdown_tiny"
    c.task.options.num_numbers = 3
    c.task.options.max_number = 30
    c.data.train_size = 4000
    c.data.validation_size = 100
    c.data.test_size = 100
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.eval.num_problems = 100
    return c
