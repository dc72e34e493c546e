"""Tree export: one problem's mctx tree -> a plain nested dict (``alphareason.tree/1``).

Per node: the decoded step, visits, Q (from the parent's view: reward +
discount * value), the prior probability, the value head's estimate, the
reward, and whether the node is terminal, solved and valid. Unvisited valid
candidates appear as children with 0 visits. Below a terminal node mctx
keeps descending into copies of it; the copies are left out (a terminal
node's visits count the simulations that ended there), so every node with
children has visits = 1 + the sum of its children's visits.

The chosen path is the root's chosen action (default: ``greedy_action``, the
move an episode makes at action temperature 0) followed by the most visited
child at each level below, down to a terminal or unexpanded node. The format
is what ``alphareason.viz`` renders; ``json.dumps`` round-trips it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from alphareason import tokenizer as tok
from alphareason.search.mcts import greedy_action
from alphareason.tasks import Problem, Task

FORMAT = "alphareason.tree/1"


def step_text(tokens) -> str:
    """A candidate's text as the tree shows it: its tokens decoded, without the final newline."""
    return tok.decode(tokens).rstrip("\n")


def export_tree(result, index: int, *, task: Task, problem: Problem, policy: str,
                title: str | None = None, action: int | None = None) -> dict[str, Any]:
    """One problem's tree as a dict.

    Args:
      result: a ``SearchResult`` with its tree (``Searcher(keep_tree=True)``).
      index: the problem's row in the batch.
      action: the root's chosen candidate (default: ``greedy_action``).
    """
    if result.tree is None:
        raise ValueError("the search result has no tree; build the Searcher with keep_tree=True")
    t = jax.tree.map(lambda x: np.asarray(x[index]), result.tree)
    emb = t.embeddings
    if action is None:
        action = int(greedy_action(np.asarray(result.visit_counts)[index], np.asarray(result.action_weights)[index]))
    num_actions = t.children_index.shape[-1]

    def softmax(x):
        x = x - x.max()
        e = np.exp(x)
        return e / e.sum()

    def node(i: int, a: int | None, parent: int | None, chosen: bool) -> dict[str, Any]:
        if parent is None:
            prior, q, reward, valid, step = 1.0, float(t.node_values[0]), 0.0, True, ""
        else:
            prior = float(softmax(t.children_prior_logits[parent])[a])
            reward = float(t.children_rewards[parent, a])
            q = reward + float(t.children_discounts[parent, a]) * float(t.children_values[parent, a])
            valid = bool(emb.cand_valid[parent, a])
            step = step_text(emb.candidates[parent, a])
        terminal = bool(emb.done[i])
        children = []
        if t.node_visits[i] > 0 and not terminal:
            visits = t.children_visits[i]
            best = int(np.argmax(visits)) if visits.sum() > 0 else -1
            for b in range(num_actions):
                child = int(t.children_index[i, b])
                is_chosen = chosen and b == (action if parent is None else best)
                if child >= 0:
                    children.append(node(child, b, i, is_chosen))
                elif emb.cand_valid[i, b]:
                    children.append(_unvisited(t, emb, i, b, softmax))
        return {"id": int(i), "action": a, "step": step, "visits": int(t.node_visits[i]),
                "q": q, "prior": prior, "value": float(t.raw_values[i]), "reward": reward,
                "terminal": terminal, "solved": bool(emb.solved[i]) and terminal, "valid": valid,
                "chosen": chosen, "children": children}

    root = node(0, None, None, True)
    forwards = int(np.asarray(result.token_forwards)[index])
    return {"format": FORMAT, "task": task.name, "problem": problem, "prompt": task.prompt(problem),
            "policy": policy, "num_simulations": int(t.node_visits[0]) - 1,
            "title": title or f"{policy} on {task.prompt(problem).strip()}", "token_forwards": forwards,
            "root": root}


def _unvisited(t, emb, parent: int, action: int, softmax) -> dict[str, Any]:
    return {"id": -1, "action": action, "step": step_text(emb.candidates[parent, action]), "visits": 0,
            "q": None, "prior": float(softmax(t.children_prior_logits[parent])[action]), "value": None,
            "reward": 0.0, "terminal": False, "solved": False, "valid": bool(emb.cand_valid[parent, action]),
            "chosen": False, "children": []}


def tree_to_json(tree: dict[str, Any]) -> str:
    return json.dumps(tree, indent=1)


def iter_nodes(tree: dict[str, Any]):
    stack = [tree["root"]]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n["children"])
