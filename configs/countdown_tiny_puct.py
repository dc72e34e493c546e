"""Ablation: AlphaZero with PUCT (``mctx.muzero_policy``) instead of Gumbel MuZero."""

from configs.countdown_tiny import get_config as base


def get_config():
    c = base()
    c.name = "countdown_tiny_puct"
    c.search.policy = "puct"
    return c
