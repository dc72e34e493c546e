"""Countdown-4, Stream of Search with the calculator: every search trace imitated.

Differs from ``configs/countdown4_sos.py`` in two ways, both towards what
this model can learn in a CPU budget:

* the calculator tool writes every step's result (as in the project's other
  Countdown configs), so the model learns which step to try, when a branch is
  dead and how to back out of it (``#``), not multi-digit arithmetic;
* as in Stream of Search, every trace is imitated, solved or not (with the
  64-step cap about 31% of the traces reach the target): the model learns
  the search procedure from all of them. There are no random-walk negatives;
  the unsolved traces train the value head.
"""

from configs.countdown4_sos import get_config as sos_config


def get_config():
    c = sos_config()
    c.name = "countdown4_sos_calculator"
    c.task.options.tool = "calculator"
    c.data.negatives_per_problem = 0.0
    c.train.imitate_unsolved = True
    return c
