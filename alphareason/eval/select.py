"""Choosing one chain per problem among N: by the value head, by vote, or by the exact verifier (oracle)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def select_by_value(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """values f32[B, N], candidates bool[B, N] -> int[B]: the highest-valued candidate (lane 0 if none)."""
    scores = np.where(candidates, values, -np.inf)
    best = np.argmax(scores, axis=1)
    return np.where(candidates.any(axis=1), best, 0)


def select_by_verifier(solved: np.ndarray, candidates: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The first candidate the exact verifier accepts; else the highest-valued one (oracle option)."""
    ok = solved & candidates
    return np.where(ok.any(axis=1), np.argmax(ok, axis=1), select_by_value(values, candidates))


def select_by_vote(answers: Sequence[Sequence[Any]], candidates: np.ndarray,
                   values: np.ndarray | None = None) -> np.ndarray:
    """Self-consistency: the most frequent final answer among the candidates (``values`` None), or
    the answer whose candidates' values sum highest (weighted voting). Chains without an answer
    (``None``) do not vote.

    Ties go to the answer seen first (lowest lane). The returned chain is the first candidate with
    the winning answer (majority) or its highest-valued one (weighted). A problem where no
    candidate has an answer falls back to lane 0 (majority) or the best value (weighted).

    Args:
      answers: ``B`` sequences of ``N`` answers (any hashable, or None).
      candidates: bool[B, N].
      values: f32[B, N] or None.
    Returns: int[B], the chosen lane per problem.
    """
    B = len(answers)
    chosen = np.zeros((B,), np.int64)
    for b in range(B):
        tally: dict[Any, float] = {}
        first: dict[Any, int] = {}
        for j, a in enumerate(answers[b]):
            if a is None or not candidates[b, j]:
                continue
            tally[a] = tally.get(a, 0.0) + (1.0 if values is None else float(values[b, j]))
            first.setdefault(a, j)
        if not tally:
            chosen[b] = 0 if values is None else int(select_by_value(values[b:b + 1], candidates[b:b + 1])[0])
            continue
        winner = max(tally, key=lambda a: (tally[a], -first[a]))
        if values is None:
            chosen[b] = first[winner]
        else:
            lanes = [j for j, a in enumerate(answers[b]) if a == winner and candidates[b, j]]
            chosen[b] = max(lanes, key=lambda j: (values[b, j], -j))
    return chosen
