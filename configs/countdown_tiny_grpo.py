"""GRPO on the demo task: RL on the verifier's reward without search, after the demo's SFT warm start.

The task, data, model, SFT and evaluation are the demo's (configs/countdown_tiny.py); only the
self-play algorithm changes: each iteration samples grpo.group_size chains for each of
selfplay.episodes_per_iteration fresh problems, rewards them with the verifier (1 solved, 0 not)
and takes the clipped group-relative policy gradient (alphareason/train/grpo.py):

  alphareason train --config configs/countdown_tiny_grpo.py --workdir runs/demo_grpo
  alphareason bench selfplay --config configs/countdown_tiny_grpo.py --out benchmarks/results/selfplay_grpo.json \\
      --config.train.steps=600 --config.selfplay.iterations=4
"""

from configs.countdown_tiny import get_config as demo_config


def get_config():
    c = demo_config()
    c.name = "countdown_tiny_grpo"
    c.selfplay.algorithm = "grpo"
    # 2048 problems x 8 chains per iteration (64 problems = 512 chains per actor batch); the learner takes
    # the chains of groups with signal in minibatches of 64 chains, one epoch, at AlphaZero's learning rate
    # (2e-4). To spend what AlphaZero spends per iteration (self-play + learner), set grpo.token_budget
    # instead: experiments/selfplay_study.py does (about 3.5M token forwards, about 5,000 problems here).
    c.selfplay.episodes_per_iteration = 2048
    c.grpo.group_size = 8
    c.grpo.updates_per_batch = 1
    c.grpo.clip_eps = 0.2
    c.grpo.kl_beta = 0.0
    return c
