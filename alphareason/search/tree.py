"""Tree export: one problem's mctx tree -> a plain nested dict (``alphareason.tree/1``).

Per node: the decoded step, visits, Q (from the parent's view: reward +
discount * value), the prior probability, the value head's estimate, the
reward, and whether the node is terminal, solved and valid. Unvisited
candidates appear as children with 0 visits. The chosen path is the root's
selected action followed by the most visited child at each level below.
The format is what ``alphareason.viz`` renders; ``json.dumps`` round-trips it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from alphareason import tokenizer as tok
from alphareason.tasks import Problem, Task

FORMAT = "alphareason.tree/1"


def _step_text(tokens) -> str:
    return tok.decode(tokens).rstrip("\n")


def export_tree(result, index: int, *, task: Task, problem: Problem, policy: str,
                title: str | None = None) -> dict[str, Any]:
    """``result``: a ``SearchResult`` with ``tree`` kept (``Searcher(keep_tree=True)``)."""
    if result.tree is None:
        raise ValueError("the search result has no tree; build the Searcher with keep_tree=True")
    t = jax.tree.map(lambda x: np.asarray(x[index]), result.tree)
    emb = t.embeddings
    chosen_action = int(np.asarray(result.action)[index])
    num_actions = t.children_index.shape[-1]

    def softmax(x):
        x = x - x.max()
        e = np.exp(x)
        return e / e.sum()

    def node(i: int, action: int | None, parent: int | None, chosen: bool) -> dict[str, Any]:
        if parent is None:
            prior, q, reward, valid, step = 1.0, float(t.node_values[0]), 0.0, True, ""
        else:
            prior = float(softmax(t.children_prior_logits[parent])[action])
            reward = float(t.children_rewards[parent, action])
            q = reward + float(t.children_discounts[parent, action]) * float(t.children_values[parent, action])
            valid = bool(emb.cand_valid[parent, action])
            step = _step_text(emb.candidates[parent, action])
        children = []
        if t.node_visits[i] > 0:
            visits = t.children_visits[i]
            best = int(np.argmax(visits)) if visits.sum() > 0 else -1
            for a in range(num_actions):
                child = int(t.children_index[i, a])
                is_chosen = chosen and (a == (chosen_action if parent is None else best))
                if child >= 0:
                    children.append(node(child, a, i, is_chosen))
                elif emb.cand_valid[i, a]:
                    children.append(_unvisited(t, emb, i, a, softmax))
        terminal = bool(emb.done[i]) if parent is not None else False
        return {"id": int(i), "action": action, "step": step, "visits": int(t.node_visits[i]),
                "q": q, "prior": prior, "value": float(t.raw_values[i]), "reward": reward,
                "terminal": terminal, "solved": bool(emb.solved[i]) and terminal, "valid": valid,
                "chosen": chosen, "children": children}

    root = node(0, None, None, True)
    return {"format": FORMAT, "task": task.name, "problem": problem, "prompt": task.prompt(problem),
            "policy": policy, "num_simulations": int(t.node_visits[0]) - 1,
            "title": title or f"{policy} on {task.prompt(problem).strip()}", "root": root}


def _unvisited(t, emb, parent: int, action: int, softmax) -> dict[str, Any]:
    return {"id": -1, "action": action, "step": _step_text(emb.candidates[parent, action]), "visits": 0,
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
