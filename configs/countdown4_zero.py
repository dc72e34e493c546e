"""Countdown-4 tabula rasa: no demonstrations, a random network, search over the task's legal steps.

The candidates of every node are the task's legal steps (``search.candidates
= "enumerate"``); policy and value learn only from the verifier's reward
through the search (pure AlphaZero: the policy distils the search's improved
policy, the value the episodes' outcomes; no SFT term). "Policy only" here is
the policy's most likely legal step at every step, no search
(``LegalStepDecoder``). The study compares it with expert iteration (SFT on
the search's own solved chains); SFT-only has nothing to imitate here.

  python experiments/selfplay_study.py run --config configs/countdown4_zero.py \\
      --results benchmarks/results/study/countdown4_zero --algorithms alphazero expert_iteration

Measured (seeds 0-2, 4 iterations; benchmarks/README.md): the policy-only rate ends at 6.4, 6.9 and 5.4% of
the 1,000 test problems for AlphaZero, 5.4, 4.6 and 2.8% for expert iteration at the same compute (pooled
McNemar p = 4e-4); MCTS@32 28.7% against 21.5% of the validation problems (means).
``experiments/policy_ceiling.py`` (the same learner on exact targets) reaches 5.5-6.2%.
"""

from configs.countdown4 import get_config as countdown4


def get_config():
    c = countdown4()
    c.name = "countdown4_zero"
    c.train.steps = 0  # no demonstrations
    c.data.validation_size = 200
    c.data.test_size = 1000
    c.search.candidates = "enumerate"
    c.search.num_simulations = 32
    c.search.max_num_considered_actions = 16
    c.eval.num_problems = 200
    c.eval.batch_size = 200
    c.selfplay.iterations = 4  # the study's figures
    c.selfplay.episodes_per_iteration = 256
    c.selfplay.actor_batch_size = 64
    c.selfplay.replay_capacity = 4096
    c.selfplay.learner_steps = 100
    c.selfplay.learner_batch_size = 64
    c.selfplay.learning_rate = 1e-3  # from scratch: the rate SFT starts with on this task
    c.selfplay.policy_weight = 1.0
    c.selfplay.value_weight = 1.0
    c.selfplay.sft_weight = 0.0
    c.selfplay.eval_simulations = 32
    return c
