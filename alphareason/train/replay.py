"""Replay: a fixed-capacity ring buffer of self-play moves and solved trajectories.

Each move stored is exactly what the learner needs: the state (token
sequence), the K candidate steps with their validity, the search's
``action_weights`` (policy target), the search value, and the episode's
outcome (value target). Solved trajectories (the full chain of thought of an
episode that the verifier accepted) are kept in a second ring for the SFT /
expert-iteration term.

The buffer is plain numpy arrays plus two counters, saved as one item of
every self-play checkpoint, so a resumed run has exactly the same replay.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alphareason import tokenizer as tok
from alphareason.search.episodes import EpisodeBatch

# Value targets added after replays were first saved: a checkpoint without them restores, with the outcome
# in their place (``load_state_dict``).
LATER_TARGETS = ("proven",)


def lambda_returns(search_values: np.ndarray, outcome: float, lam: float) -> np.ndarray:
    """TD(lambda) value targets of one episode's states: f32[n] from the search values v[0..n-1] and its outcome.

    ``G[t] = (1 - lam) * v[t + 1] + lam * G[t + 1]`` with ``G[n - 1] = outcome``
    (the last move leads to the terminal state): ``lam = 1`` is the Monte-Carlo
    outcome, ``lam = 0`` the next state's search value (one-step TD).
    """
    n = len(search_values)
    out = np.zeros((n,), np.float32)
    g = float(outcome)
    for t in range(n - 1, -1, -1):
        if t < n - 1:
            g = (1.0 - lam) * float(search_values[t + 1]) + lam * g
        out[t] = g
    return out


def proven_solvable(search_solved: np.ndarray, outcome: float) -> np.ndarray:
    """Which of one episode's states are proven solvable: f32[n] (1 or 0) from ``search_solved[n]`` (the search
    from state t reached a solved chain) and the episode's outcome.

    Each state leads to the next by a legal step, so a state is solvable when any later one on the path is,
    or when the episode ended solved: ``proven[t] = max(outcome, search_solved[t:])``. Exact where it is 1
    (the verifier's verdict on a chain the search wrote, no oracle); a 0 says only that neither the
    searches from here on nor the episode found a solution (MCTS-Solver's proven wins, Winands et al. 2008).
    """
    found = np.asarray(search_solved, bool)[::-1]
    return np.maximum(np.logical_or.accumulate(found)[::-1], float(outcome) > 0.5).astype(np.float32)


def proven_tree_nodes(parents: np.ndarray, children: np.ndarray, visits: np.ndarray, done: np.ndarray,
                      solved: np.ndarray, cand_valid: np.ndarray) -> np.ndarray:
    """What one search tree proves about its live nodes (MCTS-Solver): int8[N+1], 1 solvable, 0 unsolvable,
    -1 not proven (and every terminal or unvisited node).

    A live node is solvable when one of its children is (a solved terminal, or a live node proven
    solvable), and unsolvable when every one of its valid candidates was expanded and each child is an
    unsolved terminal or proven unsolvable. Unsolvable is only a proof where the candidates are all the
    legal steps (``search.candidates="enumerate"``). Children come after their parents in mctx's node order,
    so one pass from the last node back decides them all.

    parents: int[N+1]; children: int[N+1, K] (mctx's ``children_index``, -1: not expanded); visits: int[N+1];
    done, solved: bool[N+1]; cand_valid: bool[N+1, K].
    """
    n = len(visits)
    win = np.zeros((n,), bool)  # solvable: a solved terminal, or a live node with a solvable child
    loss = np.zeros((n,), bool)  # unsolvable: an unsolved terminal, or a live node whose every move loses
    for i in range(n - 1, -1, -1):
        if visits[i] == 0:
            continue
        if done[i]:
            win[i], loss[i] = bool(solved[i]), not solved[i]
            continue
        kids = children[i]
        expanded = kids >= 0
        win[i] = bool(np.any(win[kids[expanded]]))
        valid = np.asarray(cand_valid[i], bool)
        loss[i] = not win[i] and bool(np.all(expanded[valid])) and bool(np.all(loss[kids[valid]]))
    out = np.full((n,), -1, np.int8)
    live = (np.asarray(visits) > 0) & ~np.asarray(done, bool)
    out[live & win] = 1
    out[live & loss] = 0
    return out


class ReplayBuffer:
    """``capacity`` moves and ``capacity // 4`` solved trajectories, oldest overwritten first; with
    ``tree_capacity`` also that many states of the search trees that the trees proved solvable or not
    (``proven_tree_nodes``; ``EpisodeRunner(tree_states=True)`` records them)."""

    def __init__(self, capacity: int, *, seq_len: int, num_candidates: int, step_len: int, value_lambda: float = 1.0,
                 tree_capacity: int = 0):
        if capacity <= 0:
            raise ValueError(f"selfplay.replay_capacity must be > 0, got {capacity}")
        C, T, K, S = capacity, seq_len, num_candidates, step_len
        self.capacity, self.value_lambda = C, value_lambda
        self.moves = {
            "tokens": np.zeros((C, T), np.int32), "length": np.ones((C,), np.int32),
            "candidates": np.zeros((C, K, S), np.int32), "cand_valid": np.zeros((C, K), bool),
            "action_weights": np.zeros((C, K), np.float32), "cand_log_inclusion": np.zeros((C, K), np.float32),
            "search_value": np.zeros((C,), np.float32),
            "outcome": np.zeros((C,), np.float32), "td_lambda": np.zeros((C,), np.float32),
            "proven": np.zeros((C,), np.float32), "action": np.zeros((C,), np.int32),
        }
        self.traj_capacity = max(1, C // 4)
        self.trajectories = {"tokens": np.zeros((self.traj_capacity, T), np.int32),
                             "prompt_length": np.ones((self.traj_capacity,), np.int32),
                             "length": np.ones((self.traj_capacity,), np.int32)}
        self.counters = np.zeros((4,), np.int64)  # move insert, move size, traj insert, traj size
        self.tree_capacity = tree_capacity
        self.tree_states = ({"tokens": np.zeros((tree_capacity, T), np.int32),
                             "length": np.ones((tree_capacity,), np.int32),
                             "label": np.zeros((tree_capacity,), np.float32)} if tree_capacity else None)
        self.tree_counters = np.zeros((2,), np.int64)  # insert, size

    @property
    def size(self) -> int:
        return int(self.counters[1])

    @property
    def num_trajectories(self) -> int:
        return int(self.counters[3])

    @property
    def num_tree_states(self) -> int:
        return int(self.tree_counters[1])

    def add_episodes(self, batch: EpisodeBatch, *, prompt_lengths: list[int]) -> int:
        """Adds every active move of ``batch`` (outcome = the verifier's verdict). Returns moves added."""
        outcome = batch.solved.astype(np.float32)
        td, proven = {}, {}  # row -> TD(lambda) targets / proven solvability of its moves, in order
        for r in range(len(batch.problems)):
            values = [m.search_value[r] for m in batch.moves if m.active[r]]
            td[r] = lambda_returns(np.asarray(values), outcome[r], self.value_lambda)
            proven[r] = proven_solvable(np.asarray([m.search_solved[r] for m in batch.moves if m.active[r]], bool),
                                        outcome[r])
        added, taken = 0, np.zeros((len(batch.problems),), np.int64)
        for move in batch.moves:
            rows = np.nonzero(move.active)[0]
            for r in rows:
                self._put_move({"tokens": move.tokens[r], "length": move.length[r],
                                "candidates": move.candidates[r], "cand_valid": move.cand_valid[r],
                                "action_weights": move.action_weights[r],
                                "cand_log_inclusion": move.cand_log_inclusion[r], "search_value": move.search_value[r],
                                "outcome": outcome[r], "td_lambda": td[r][taken[r]], "proven": proven[r][taken[r]],
                                "action": move.action[r]})
                taken[r] += 1
                added += 1
        if self.tree_states is not None:
            for move in batch.moves:
                if move.tree_states is None:
                    raise ValueError("this replay keeps tree states, but the episodes recorded none: run them with "
                                     "EpisodeRunner(tree_states=True)")
                label = move.tree_states["label"]
                for r, m in zip(*np.nonzero((label >= 0) & move.active[:, None])):
                    self._put_tree_state(move.tree_states["tokens"][r, m], move.tree_states["length"][r, m],
                                         label[r, m])
        if batch.moves:
            final_tokens, final_length = _final_sequences(batch)
            for r in np.nonzero(batch.solved)[0]:
                self._put_traj(final_tokens[r], prompt_lengths[r], final_length[r])
        return added

    def _put_move(self, item: dict[str, Any]) -> None:
        i = int(self.counters[0] % self.capacity)
        for k, v in item.items():
            self.moves[k][i] = v
        self.counters[0] += 1
        self.counters[1] = min(self.counters[1] + 1, self.capacity)

    def _put_traj(self, tokens, prompt_length, length) -> None:
        i = int(self.counters[2] % self.traj_capacity)
        self.trajectories["tokens"][i] = tokens
        self.trajectories["prompt_length"][i] = prompt_length
        self.trajectories["length"][i] = length
        self.counters[2] += 1
        self.counters[3] = min(self.counters[3] + 1, self.traj_capacity)

    def _put_tree_state(self, tokens, length, label) -> None:
        i = int(self.tree_counters[0] % self.tree_capacity)
        for key, value in (("tokens", tokens), ("length", length), ("label", label)):
            self.tree_states[key][i] = value
        self.tree_counters[0] += 1
        self.tree_counters[1] = min(self.tree_counters[1] + 1, self.tree_capacity)

    def sample_tree_states(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray] | None:
        if not self.num_tree_states:
            return None
        idx = rng.integers(0, self.num_tree_states, size=batch_size)
        return {k: v[idx] for k, v in self.tree_states.items()}

    def sample_moves(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        if self.size == 0:
            raise ValueError("the replay buffer is empty: self-play produced no moves")
        idx = rng.integers(0, self.size, size=batch_size)
        return {k: v[idx] for k, v in self.moves.items()}

    def sample_trajectories(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray] | None:
        if self.num_trajectories == 0:
            return None
        idx = rng.integers(0, self.num_trajectories, size=batch_size)
        return {k: v[idx] for k, v in self.trajectories.items()}

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        out = {"moves": dict(self.moves), "trajectories": dict(self.trajectories), "counters": self.counters}
        if self.tree_states is not None:
            out.update(tree_states=dict(self.tree_states), tree_counters=self.tree_counters)
        return out

    def restore_template(self, saved_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, Any]:
        """The structure to restore a checkpoint's ``replay`` into: this buffer's, saved at its full capacity,
        less the value targets a replay saved before them lacks (``load_state_dict`` fills them in)."""
        state = self.state_dict()
        if saved_shapes is not None:
            state["moves"] = {k: v for k, v in state["moves"].items()
                              if k not in LATER_TARGETS or f"moves.{k}" in saved_shapes}
            if "tree_counters" not in saved_shapes:  # saved without tree states: they start empty
                state.pop("tree_states", None), state.pop("tree_counters", None)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moves = {k: np.asarray(v) for k, v in state["moves"].items()}
        self.moves.setdefault("td_lambda", self.moves["outcome"].copy())  # replays saved before TD(lambda) targets
        self.moves.setdefault("cand_log_inclusion", np.zeros_like(self.moves["action_weights"]))  # and before this
        self.moves.setdefault("proven", self.moves["outcome"].copy())  # and before proven solvability
        self.trajectories = {k: np.asarray(v) for k, v in state["trajectories"].items()}
        self.counters = np.asarray(state["counters"], np.int64).copy()
        if self.tree_states is not None and "tree_states" in state:
            self.tree_states = {k: np.asarray(v) for k, v in state["tree_states"].items()}
            self.tree_counters = np.asarray(state["tree_counters"], np.int64).copy()


def _final_sequences(batch: EpisodeBatch) -> tuple[np.ndarray, np.ndarray]:
    """The token sequence each episode ended with: last recorded state + the step taken from it."""
    T = batch.moves[0].tokens.shape[1]
    B = len(batch.problems)
    tokens = np.zeros((B, T), np.int32)
    length = np.zeros((B,), np.int32)
    for move in batch.moves:
        for r in np.nonzero(move.active)[0]:
            step = move.candidates[r, move.action[r]]
            n = int(np.sum(step != tok.PAD))
            seq = move.tokens[r].copy()
            start = int(move.length[r])
            seq[start: start + n] = step[:n]
            if start + n < T:
                seq[start + n] = tok.EOS  # the SFT term also teaches the model to stop
            tokens[r], length[r] = seq, start + n
    return tokens, length
