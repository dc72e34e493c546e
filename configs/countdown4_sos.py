"""Countdown-4, Stream of Search: no calculator, depth-first search traces as demonstrations.

Same problems as ``configs/countdown4.py`` (4 numbers 1-99, targets 10-100).
The model learns from the reference solver's traces (``task.search_trace``:
every tried step written out, dead ends undone with ``#``, at most 64 steps)
and, when evaluated, writes such a trace itself: a dead end does not end its
chain, and the exact verifier judges the whole trace. Only traces that reach
the target are imitated (with the traces' 64-step cap about 31% of generated
problems); the unsolved ones, and random-walk negatives, train the value head.

The context is 576 tokens rather than the traces' worst-case bound (1,234):
the longest of 2,000 generated traces took 530, and any longer one is cut at
its last whole step that fits, in the data and when the model writes.

Stream of Search (Gandhi et al., 2024) trained a 250M-parameter model on 500k
traces in a 4,096-token context; this config trains the project's 0.8M model
on 80k for a CPU budget (see the README, "Where this stands").
"""

from configs.countdown4 import get_config as countdown4_config


def get_config():
    c = countdown4_config()
    c.name = "countdown4_sos"
    c.task.options.tool = None
    c.data.demonstrations = "traces"
    c.model.max_len = 576
    c.train.steps = 1200
    c.train.batch_size = 64  # 64 x 576 tokens a step: about an hour on 2 cores
    c.selfplay.iterations = 0  # SFT only; `alphareason train` still evaluates the result (iteration 0)
    return c
