"""Test-time compute scaling, full setting: the task configs' models and data, for a GPU / TPU.

Trains (or resumes) the full SFT models of ``configs/countdown4.py`` and
``configs/game24.py`` (or use ``--workdir TASK=DIR`` for trained, e.g.
self-play, runs), then every strategy at 1-256 generations on 2 x 150
held-out problems per task, difficulty from 128 samples per problem:

  alphareason scaling --config configs/scaling_full.py --out runs/scaling_full --train
"""

from alphareason.config import ConfigDict


def get_config():
    c = ConfigDict()
    c.name = "scaling_full"
    c.seed = 0
    c.tasks = ("countdown4", "game24")
    c.task_runs = ConfigDict({
        "countdown4": {"train_config": "configs/countdown4.py", "workdir": "", "train_overrides": ()},
        "game24": {"train_config": "configs/game24.py", "workdir": "", "train_overrides": ()},
    })
    c.problems_per_split = 150
    c.difficulty_samples = 128
    c.num_bins = 5
    c.max_generations = 256
    c.temperature = 0.7
    c.strategies = ("greedy", "sample", "best_of_n", "best_of_n:t=1.0", "best_of_n:verifier", "beam:M=4",
                    "beam:M=16", "beam:M=4,t=1.0", "mcts_gumbel:K=4", "mcts_gumbel:K=8", "mcts_puct:K=8",
                    "mcts_gumbel:K=8,verifier")
    c.mcts_generations = ()  # every budget
    c.max_lanes = 16384
    c.mcts_batch = 150
    c.compilation_cache = True  # OUT/jax_cache: a rerun skips most compiling
    return c
