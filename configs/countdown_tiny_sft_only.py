"""Baseline: SFT only. The learner keeps training on demonstrations; no search, no self-play.

Same learner steps, batch size and evaluation as ``countdown_tiny``, so the
AlphaZero run is compared with spending its learner updates on more SFT.
"""

from configs.countdown_tiny import get_config as base


def get_config():
    c = base()
    c.name = "countdown_tiny_sft_only"
    c.selfplay.algorithm = "sft_only"
    return c
