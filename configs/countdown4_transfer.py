"""Countdown-4 from Countdown-3 demonstrations: can self-play go beyond its demonstrator?

SFT imitates optimal solutions of Countdown-3 problems only (the same number
and target ranges, ``data.sft_task_options``); self-play, evaluation and the
test split are Countdown-4. SFT-only keeps imitating Countdown-3; AlphaZero
and expert iteration learn from their own search on Countdown-4.

  python experiments/selfplay_study.py run --config configs/countdown4_transfer.py \\
      --results benchmarks/results/study/countdown4_transfer --algorithms alphazero expert_iteration sft_only

Measured (seed 0, 4 iterations; benchmarks/README.md): the SFT start writes a number the 4-number prompt
lacks in 95% of its chains, so sampled candidates never reach a solution and every algorithm solves 0%.
AlphaZero learns only which steps are legal there (its legal mass 3.4% -> 37.8%). Self-play needs a
reachable reward here: ``--config.search.candidates=enumerate`` (the task's legal steps) gives one. With it
(4 iterations, benchmarks/results/study/countdown4_transfer_enumerate/) the policy-only rate, greedy over the
legal steps, goes 2.2% -> 4.3% and 3.7% -> 7.3% for AlphaZero (seeds 0, 1), 1.9% and 3.2% for SFT only at the
same compute (pooled McNemar p = 4e-8; 2 seeds); free generation stays near 0% (AlphaZero 0.1%, 1.2%).
"""

from alphareason.config import ConfigDict
from configs.countdown4 import get_config as countdown4


def get_config():
    c = countdown4()
    c.name = "countdown4_transfer"
    c.data.sft_task_options = ConfigDict({"num_numbers": 3})
    c.data.train_size = 40_000
    c.data.validation_size = 200
    c.data.test_size = 1000
    c.train.steps = 2000
    c.train.batch_size = 128
    c.search.num_simulations = 32
    c.eval.num_problems = 200
    c.eval.batch_size = 200
    c.selfplay.iterations = 6
    c.selfplay.episodes_per_iteration = 512
    c.selfplay.learner_steps = 80
    c.selfplay.eval_simulations = 32
    c.selfplay.policy_weight = 0.25
    c.selfplay.value_weight = 0.5
    c.selfplay.sft_weight = 1.0
    return c
