"""Test-time compute scaling, reduced setting: small SFT models, few problems, a 2-core CPU.

Trains (or resumes) a small SFT model per task in OUT/<task>, then runs
every strategy at budgets of 1-256 generations on 2 x 40 held-out problems
per task (selection and report splits); MCTS at 32 and 256 generations.
Sized to finish in under 20 minutes on 2 CPU cores:

  alphareason scaling --config configs/scaling_reduced.py --out runs/scaling_reduced --train

Use trained runs instead of training: ``--workdir countdown4=DIR --workdir game24=DIR``.
"""

from alphareason.config import ConfigDict

_SMALL_MODEL = ("model.d_model=64", "model.num_layers=3", "model.num_heads=4", "model.d_ff=256")
_HELD_OUT = ("data.validation_size=40", "data.test_size=40")


def get_config():
    c = ConfigDict()
    c.name = "scaling_reduced"
    c.seed = 0
    c.tasks = ("countdown4", "game24")
    # Per task: the training config (and overrides) used with --train, or a trained run's workdir
    # (default OUT/<task>).
    c.task_runs = ConfigDict({
        "countdown4": {"train_config": "configs/countdown4.py", "workdir": "",
                       "train_overrides": _SMALL_MODEL + _HELD_OUT + (
                           "data.train_size=40000", "train.steps=2500", "train.batch_size=64",
                           "train.learning_rate=0.003", "train.warmup_steps=100", "train.log_every=100",
                           "train.checkpoint_every=500")},
        "game24": {"train_config": "configs/game24.py", "workdir": "",
                   "train_overrides": _SMALL_MODEL + _HELD_OUT + (
                       "train.steps=1500", "train.batch_size=64", "train.learning_rate=0.003",
                       "train.warmup_steps=100", "train.log_every=100", "train.checkpoint_every=500")},
    })
    c.problems_per_split = 40  # validation (selection) and test (report) problems per task
    c.difficulty_samples = 16  # samples per problem for the pass@1 estimate behind the bins
    c.num_bins = 5
    c.max_generations = 256  # budgets 1, 2, 4, ..., 256 generations
    c.temperature = 0.7  # sampling temperature of every strategy unless its text sets t=
    c.strategies = ("greedy", "sample", "best_of_n", "best_of_n:verifier", "beam:M=4",
                    "mcts_gumbel:K=4", "mcts_puct:K=4")
    c.mcts_generations = (32, 256)  # () = every budget (each budget compiles a search)
    c.max_lanes = 2048  # chains decoded in one call
    c.mcts_batch = 40  # problems searched in one call
    c.compilation_cache = True  # OUT/jax_cache: a rerun skips most compiling
    return c
