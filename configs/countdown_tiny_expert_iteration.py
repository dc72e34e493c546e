"""Baseline: expert iteration (ReST / STaR style) on the default task.

The same search, actors, budget and evaluation as ``countdown_tiny``; the
learner imitates only the trajectories that search solved (SFT on them) and
trains the value head on outcomes, with no distillation of the search policy.
"""

from configs.countdown_tiny import get_config as base


def get_config():
    c = base()
    c.name = "countdown_tiny_expert_iteration"
    c.selfplay.algorithm = "expert_iteration"
    return c
