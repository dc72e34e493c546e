"""Episodes: solve a batch of problems by searching, stepping, and searching again.

At every move the searcher runs from the current state of each unfinished
chain of thought; one action is taken (at ``action_temperature`` 0 the most
visited candidate, ties broken by the search's improved policy; otherwise a
sample from ``action_weights ** (1 / temperature)``) and the search starts
afresh from the new root (mctx keeps no tree between moves). This continues
until every chain of thought is terminal or the task's step limit is reached
(for token-level search: steps x tokens per step).

Each move is recorded exactly as self-play training needs it
(``MoveRecord``), and each problem ends with its text, the Python verifier's
verdict and the compute spent.

On a mesh (``Searcher(mesh=...)``) the problems are split over the devices;
in a multi-process run each process builds the root inputs of its own
problems only and feeds its own devices, and every process gets the whole
batch's results back (``parallel.to_host``), so all of them record the same
moves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from alphareason import parallel
from alphareason import tokenizer as tok
from alphareason.search.env import INPUT_KEYS
from alphareason.search.mcts import Searcher, SearchResult, greedy_action
from alphareason.tasks import Problem, Verdict


@dataclasses.dataclass
class MoveRecord:
    """One move of a batch of episodes (numpy; ``B`` problems, ``K`` candidates)."""

    tokens: np.ndarray  # int32[B, T]: the state (sequence so far)
    length: np.ndarray  # int32[B]
    candidates: np.ndarray  # int32[B, K, S]
    cand_valid: np.ndarray  # bool[B, K]
    action_weights: np.ndarray  # float32[B, K]: search policy (training target)
    cand_log_inclusion: np.ndarray  # float32[B, K]: log P(candidate drawn) of a distinct sample (0 otherwise)
    search_value: np.ndarray  # float32[B]
    search_solved: np.ndarray  # bool[B]: the search from this state reached a solved chain
    network_value: np.ndarray  # float32[B]
    action: np.ndarray  # int32[B]: the candidate taken (its step: ``candidates[b, action[b]]``)
    active: np.ndarray  # bool[B]: the episode was still running at this move
    # ``EpisodeRunner(tree_states=True)``: the search tree's nodes, ``M = N + 1`` per row: ``tokens`` int32[B, M, T],
    # ``length`` int32[B, M] and ``label`` int8[B, M] (``replay.proven_tree_nodes``: 1 / 0 proven, -1 not)
    tree_states: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class EpisodeBatch:
    """The outcome of a batch of episodes."""

    problems: list[Problem]
    texts: list[str]  # chain of thought after the prompt
    verdicts: list[Verdict]  # the task's Python verifier on ``texts``
    solved: np.ndarray  # bool[B]: as judged by the verifier
    token_forwards: np.ndarray  # int64[B]: model token forwards spent on each problem
    computed_token_forwards: np.ndarray  # int64[B]: computed by its searches, charged or not (finished rows too)
    moves: list[MoveRecord]
    num_steps: np.ndarray  # int32[B]: moves made (steps; tokens for token-level search)

    def solve_rate(self) -> float:
        return float(np.mean(self.solved)) if len(self.solved) else 0.0


def choose_actions(key, visit_counts, action_weights, *, temperature: float):
    """The move per row: ``greedy_action`` (temperature 0) or a sample from weights**(1/temperature).

    visit_counts: int32[B, K]; action_weights: float32[B, K]. Returns int32[B].
    """
    if temperature <= 0:
        return greedy_action(visit_counts, action_weights)
    logits = jnp.log(jnp.maximum(action_weights, 1e-30)) / temperature
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class EpisodeRunner:
    """Runs episodes with a ``Searcher``; compiled pieces are cached on the instance."""

    def __init__(self, searcher: Searcher, *, action_temperature: float = 0.0, max_moves: int | None = None,
                 tree_states: bool = False):
        """The searcher's mesh (``Searcher(mesh=...)``), if any, is where the problems go. ``tree_states``: each
        recorded move also holds its search tree's states and what the tree proved about them (the searcher
        must keep its trees)."""
        if tree_states and not searcher.keep_tree:
            raise ValueError("tree_states needs the search trees: build the Searcher with keep_tree=True")
        self.tree_states = tree_states
        self.searcher = searcher
        self.env = searcher.env
        self.task = searcher.task
        self.action_temperature = action_temperature
        self.max_moves = max_moves or self.env.max_actions
        self.mesh = getattr(searcher, "mesh", None)
        self._advance = jax.jit(self._advance_impl)

    def _advance_impl(self, root, action):
        nxt = self.env.transition(root, action)
        return {k: nxt[k] for k in INPUT_KEYS}, nxt["solved"]

    def run(self, params, problems: list[Problem], key, *, record: bool = True,
            problem_ids: np.ndarray | None = None) -> EpisodeBatch:
        """Plays one episode per problem. ``problem_ids`` seed each problem's keys (default 0..B-1)."""
        B = len(problems)
        ids = np.arange(B) if problem_ids is None else np.asarray(problem_ids)
        if self.mesh is None:
            inputs = jax.tree.map(jnp.asarray, self.env.initial(problems))
        else:  # each process builds and feeds only its own problems
            parallel.check_batch(B, self.mesh, name="problems per batch")
            mine = parallel.process_rows(B, self.mesh)
            inputs = parallel.global_batch(self.env.initial(list(problems)[mine]), self.mesh, B)
        fetch = parallel.to_host
        forwards = np.zeros((B,), np.int64)
        computed = np.zeros((B,), np.int64)
        steps = np.zeros((B,), np.int32)
        moves: list[MoveRecord] = []
        done = np.zeros((B,), bool)
        for move in range(self.max_moves):
            if done.all():
                break
            move_key = jax.random.fold_in(key, move)
            keys = jax.vmap(lambda i: jax.random.fold_in(move_key, i))(jnp.asarray(ids))
            result: SearchResult = self.searcher(params, keys, inputs)
            action = choose_actions(jax.random.fold_in(move_key, 1 << 30), result.visit_counts,
                                    result.action_weights, temperature=self.action_temperature)
            active = ~done
            forwards += np.where(active, fetch(result.token_forwards), 0)
            computed += fetch(result.computed_token_forwards).astype(np.int64)
            if record:
                moves.append(MoveRecord(
                    tokens=fetch(inputs["tokens"]), length=fetch(inputs["length"]),
                    candidates=fetch(result.root.candidates), cand_valid=fetch(result.root.cand_valid),
                    action_weights=fetch(result.action_weights),
                    cand_log_inclusion=fetch(result.root.cand_log_inclusion), search_value=fetch(result.search_value),
                    search_solved=fetch(result.search_solved), network_value=fetch(result.network_value),
                    action=fetch(action), active=active,
                    tree_states=proven_tree_states(result.tree, fetch) if self.tree_states else None))
            inputs, _ = self._advance(result.root, action)
            steps += active
            done = fetch(inputs["done"])
        tokens, length = fetch(inputs["tokens"]), fetch(inputs["length"])
        return finish_batch(self.task, problems, tokens, length, forwards, moves, steps, computed)


def proven_tree_states(tree, fetch=np.asarray) -> dict[str, np.ndarray]:
    """Every node's state of a batch of search trees and what its tree proved about it:
    ``{"tokens": int32[B, M, T], "length": int32[B, M], "label": int8[B, M]}`` (``M = N + 1``;
    ``replay.proven_tree_nodes``)."""
    from alphareason.train.replay import proven_tree_nodes
    emb = tree.embeddings
    parents, children, visits = fetch(tree.parents), fetch(tree.children_index), fetch(tree.node_visits)
    done, solved, valid = fetch(emb.done), fetch(emb.solved), fetch(emb.cand_valid)
    label = np.stack([proven_tree_nodes(parents[b], children[b], visits[b], done[b], solved[b], valid[b])
                      for b in range(len(visits))])
    return {"tokens": fetch(emb.tokens), "length": fetch(emb.length), "label": label}


def prompt_lengths(task, problems: list[Problem]) -> list[int]:
    return [len(tok.encode(task.prompt(p), bos=True)) for p in problems]


def finish_batch(task, problems, tokens, length, forwards, moves, steps, computed) -> EpisodeBatch:
    """Decodes the chains of thought and judges them with the Python verifier."""
    starts = prompt_lengths(task, problems)
    texts = [tok.decode(tokens[i, starts[i]: length[i]]) for i in range(len(problems))]
    verdicts = [task.verify(p, t) for p, t in zip(problems, texts)]
    solved = np.array([v.solved for v in verdicts], bool)
    return EpisodeBatch(problems=list(problems), texts=texts, verdicts=verdicts, solved=solved,
                        token_forwards=forwards, computed_token_forwards=computed, moves=moves, num_steps=steps)
