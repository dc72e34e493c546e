"""Evaluation: held-out solve rates and test-time strategies at matched compute.

* ``heldout``: ``Evaluator`` (greedy / sampled / MCTS solve rates of a model
  on a list of problems, results rows, the summary table) — what
  ``alphareason eval`` and the training loop run;
* ``strategy``: the test-time strategies as data (``StrategyConfig``,
  ``parse_strategy``, ``StrategyResult``);
* ``budget``: budgets in model token forwards, and ``TokenCountingModel``,
  an independent count of what a model computed;
* ``select``: choosing one chain among N (value head, vote, verifier);
* ``runner``: ``StrategyRunner``, every strategy at every budget;
* ``scaling``: the test-time compute study (Snell et al. 2024 in miniature)
  behind ``alphareason scaling``.
"""

from alphareason.eval.budget import (TokenCounter, TokenCountingModel, lanes_for_budget, log2_budgets,
                                     simulations_for_budget)
from alphareason.eval.heldout import (HELDOUT_STRATEGIES, EvalSettings, Evaluator, format_table, summary,
                                      write_results)
from alphareason.eval.runner import StrategyRunner
from alphareason.eval.select import select_by_value, select_by_verifier, select_by_vote
from alphareason.eval.strategy import (STRATEGIES, StrategyConfig, StrategyResult, has_votable_answer,
                                       parse_strategy)

__all__ = ["HELDOUT_STRATEGIES", "STRATEGIES", "EvalSettings", "Evaluator", "StrategyConfig", "StrategyResult",
           "StrategyRunner", "TokenCounter", "TokenCountingModel", "format_table", "has_votable_answer",
           "lanes_for_budget", "log2_budgets", "parse_strategy", "select_by_value", "select_by_verifier",
           "select_by_vote", "simulations_for_budget", "summary", "write_results"]
