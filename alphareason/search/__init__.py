"""Search over reasoning steps: the mctx environment, MCTS, episodes, the chain decoder, tree export."""

from alphareason.search.decode import ChainDecoder
from alphareason.search.env import EnvConfig, Node, ReasoningEnv
from alphareason.search.episodes import EpisodeBatch, EpisodeRunner, MoveRecord
from alphareason.search.mcts import SearchConfig, Searcher, SearchResult
from alphareason.search.tree import export_tree

__all__ = ["ChainDecoder", "EnvConfig", "Node", "ReasoningEnv", "EpisodeBatch", "EpisodeRunner", "MoveRecord",
           "SearchConfig", "Searcher", "SearchResult", "export_tree"]
