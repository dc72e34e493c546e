"""Search over reasoning steps: the mctx environment, MCTS, episodes, tree export, strategies."""

from alphareason.search.env import EnvConfig, Node, ReasoningEnv
from alphareason.search.episodes import EpisodeBatch, EpisodeRunner, MoveRecord
from alphareason.search.mcts import SearchConfig, Searcher, SearchResult
from alphareason.search.rollout import Sampler
from alphareason.search.tree import export_tree

__all__ = ["EnvConfig", "Node", "ReasoningEnv", "EpisodeBatch", "EpisodeRunner", "MoveRecord", "SearchConfig",
           "Searcher", "SearchResult", "Sampler", "export_tree"]
