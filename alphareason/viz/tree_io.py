"""Search-tree files: load, validate, save and walk the `alphareason.tree/1` format.

This module owns the tree format that `alphareason/search/` exports and every
viewer in `alphareason/viz/` reads. A tree file is one JSON object:

    {"format": "alphareason.tree/1", "task": "game24",
     "problem": {"numbers": [4, 9, 10, 13], "target": 24},
     "prompt": "4,9,10,13>24\\n", "policy": "gumbel", "num_simulations": 16,
     "title": "optional label", "token_forwards": 5120, "root": NODE}

and every NODE is

    {"id": 0, "action": null, "step": "", "visits": 17, "q": null,
     "prior": 1.0, "value": 0.4, "reward": 0.0, "terminal": false,
     "solved": false, "valid": true, "chosen": true, "children": [NODE, ...]}

(`title` and `token_forwards`, the search's compute in model token forwards,
are optional.) `id` is the mctx node index (unique within a tree; an unvisited child has no
mctx node and may carry mctx's UNVISITED index, -1), `action` the candidate
index from the parent (null only at the root, unique among siblings), `step` the decoded step text
("" at the root), `q` the mean value from the parent's view (null when
unvisited), `prior` the parent's prior probability of this step, `value` the
network's value estimate at the node. `chosen` marks the path the search
picked (at most one chosen child per node). A terminal or invalid node is a
leaf: mctx may visit it several times, but what it expands below it are
copies, which the export leaves out. Unknown extra fields are kept.

Trees are plain dicts so a notebook can build, edit and inspect them directly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, NoReturn

FORMAT = "alphareason.tree/1"

Tree = dict[str, Any]
Node = dict[str, Any]

__all__ = [
    "FORMAT",
    "load_tree",
    "save_tree",
    "validate_tree",
    "iter_nodes",
    "visit_invariant_errors",
    "check_visit_invariant",
    "chosen_path",
    "path_text",
    "verdict",
    "children_by_visits",
    "problem_text",
    "tree_title",
    "node_key",
]


# --------------------------------------------------------------------------
# Field checks. Each entry: field -> (is_valid(value), what the value must be).


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x))


_TOP_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda x: isinstance(x, str) and x != "",
             'the task name as a non-empty string, e.g. "game24"'),
    "problem": (lambda x: isinstance(x, dict),
                'the problem as an object, e.g. {"numbers": [4, 9, 10, 13], "target": 24}'),
    "prompt": (lambda x: isinstance(x, str), "the prompt text as a string"),
    "policy": (lambda x: isinstance(x, str) and x != "",
               'the search policy name as a non-empty string, e.g. "gumbel" or "puct"'),
    "num_simulations": (lambda x: _is_int(x) and x >= 0,
                        "the number of simulations as a non-negative integer"),
}

_NODE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (_is_int, "the mctx node index as an integer"),
    "action": (lambda x: x is None or (_is_int(x) and x >= 0),
               "the candidate index from the parent as a non-negative integer "
               "(null only at the root)"),
    "step": (lambda x: isinstance(x, str), 'the decoded step text as a string ("" at the root)'),
    "visits": (lambda x: _is_int(x) and x >= 0, "the visit count as a non-negative integer"),
    "q": (lambda x: x is None or _is_number(x),
          "the mean value from the parent's view as a finite number, or null when unvisited"),
    "prior": (lambda x: _is_number(x) and -1e-6 <= x <= 1.0 + 1e-6,  # allows float32 round-off
              "the parent's prior probability of this step, a number in [0, 1]"),
    "value": (lambda x: x is None or _is_number(x),
              "the network's value estimate as a finite number, or null"),
    "reward": (_is_number, "the reward as a finite number"),
    "terminal": (lambda x: isinstance(x, bool), "true or false"),
    "solved": (lambda x: isinstance(x, bool), "true or false"),
    "valid": (lambda x: isinstance(x, bool), "true or false"),
    "chosen": (lambda x: isinstance(x, bool), "true or false (whether the node is on the chosen path)"),
    "children": (lambda x: isinstance(x, list), "a list of child nodes ([] for a leaf)"),
}


def _is_numpy(x: Any) -> bool:
    return type(x).__module__ == "numpy"


def _show(x: Any) -> str:
    if _is_numpy(x):
        return f"{x!r} (a numpy {type(x).__name__}, not a JSON value)"
    try:
        text = json.dumps(x, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(source: str, where: str, field: str | None, problem: str, fix: str,
          value: Any = None) -> NoReturn:
    field_part = f" field {field!r}" if field else ""
    if _is_numpy(value):
        fix = "convert numpy values to Python ones (`.item()`, `.tolist()`) when building the tree"
    raise ValueError(f"{source}: {where}{field_part}: {problem}. Fix: {fix}")


def validate_tree(tree: Any, *, source: str = "tree") -> None:
    """Raises `ValueError` naming `source`, the bad node's path, the field and the fix.

    Checks the structure and field types of the `alphareason.tree/1` format,
    unique node ids and at most one chosen child per node. It does not check
    the visit-count invariant (see `check_visit_invariant`).
    """
    if not isinstance(tree, Mapping):
        _fail(source, "top level", None, f"expected a JSON object, got {type(tree).__name__}",
              f'write the tree as an object with "format": "{FORMAT}" and a "root" node')
    fmt = tree.get("format")
    if fmt != FORMAT:
        problem = "is missing" if "format" not in tree else f"is {_show(fmt)}"
        _fail(source, "top level", "format", problem,
              f'set "format": "{FORMAT}" (this reader understands only that version)')
    for field, (ok, want) in _TOP_FIELDS.items():
        if field not in tree:
            _fail(source, "top level", field, "is missing", f"add {field!r}: {want}")
        if not ok(tree[field]):
            _fail(source, "top level", field, f"is {_show(tree[field])}", f"set it to {want}",
                  tree[field])
    if tree.get("title") is not None and not isinstance(tree["title"], str):
        _fail(source, "top level", "title", f"is {_show(tree['title'])}",
              "set it to a string label or remove it")
    forwards = tree.get("token_forwards")
    if forwards is not None and not (_is_int(forwards) and forwards >= 0):
        _fail(source, "top level", "token_forwards", f"is {_show(forwards)}",
              "set it to the search's model token forwards as a non-negative integer, or remove it",
              forwards)
    if "root" not in tree:
        _fail(source, "top level", "root", "is missing", "add the root node under \"root\"")

    seen_ids: dict[int, str] = {}
    stack: list[tuple[Any, str]] = [(tree["root"], "root")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, Mapping):
            _fail(source, f"node {path}", None, f"expected a node object, got {_show(node)}",
                  "write each node as an object with the node fields (id, step, visits, ...)")
        where = f"node {path}"
        if _is_int(node.get("id")):
            where += f" (id {node['id']})"
        for field, (ok, want) in _NODE_FIELDS.items():
            if field not in node:
                _fail(source, where, field, "is missing", f"add {field!r}: {want}")
            if not ok(node[field]):
                _fail(source, where, field, f"is {_show(node[field])}", f"set it to {want}",
                      node[field])
        if path != "root" and node["action"] is None:
            _fail(source, where, "action", "is null below the root",
                  "set it to the candidate index of this step in its parent")
        if node["id"] < 0:
            if node["visits"] != 0:
                _fail(source, where, "id", f"is {node['id']} but the node has {node['visits']} visits",
                      "negative ids (mctx's UNVISITED, -1) are for unvisited children only; "
                      "give a visited node its mctx node index")
        elif node["id"] in seen_ids:
            _fail(source, where, "id", f"{node['id']} is also used by {seen_ids[node['id']]}",
                  "give every visited node its own id (its mctx node index); "
                  "unvisited children may use -1")
        else:
            seen_ids[node["id"]] = where
        if node["solved"] and not node["terminal"]:
            _fail(source, where, "solved", "is true but 'terminal' is false",
                  "only terminal steps can be solved: set 'terminal' to true or 'solved' to false")
        children = node["children"]
        actions: dict[Any, int] = {}
        for i, child in enumerate(children):
            action = child.get("action") if isinstance(child, Mapping) else None
            if _is_int(action) and action in actions:
                _fail(source, where, "children",
                      f"children [{actions[action]}] and [{i}] both have action {action}",
                      "give each child its own candidate index (action)")
            actions[action] = i
        chosen = [i for i, c in enumerate(children) if isinstance(c, Mapping) and c.get("chosen") is True]
        if len(chosen) > 1:
            _fail(source, where, "children", f"children {chosen} are all marked chosen",
                  "mark at most one child per node as chosen (the chosen path is a single line)")
        for i in reversed(range(len(children))):
            stack.append((children[i], f"{path}.children[{i}]"))


def load_tree(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> Tree:
    """Loads and validates a search tree.

    Args:
      path_or_dict: a path to a tree JSON file, or an already loaded tree dict.

    Returns:
      The tree as a dict (a dict argument is returned as is, after validation).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not JSON or not a valid `alphareason.tree/1`
        tree; the message names the file, the node path, the field and the fix.
    """
    if isinstance(path_or_dict, Mapping):
        validate_tree(path_or_dict, source="tree")
        return path_or_dict  # type: ignore[return-value]
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such tree file. Fix: check the path, or export a tree from the "
            "search first (it writes alphareason.tree/1 JSON)")
    try:
        with path.open(encoding="utf-8") as f:
            tree = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix: the file should hold one alphareason.tree/1 JSON object; "
            "re-export it if it was truncated") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text. Fix: pass a tree JSON file") from None
    validate_tree(tree, source=str(path))
    return tree


def save_tree(tree: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Validates `tree` and writes it as JSON to `path` (parent folders are created)."""
    validate_tree(tree, source=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(tree, f, indent=1)
        f.write("\n")


def iter_nodes(tree: Mapping[str, Any]) -> Iterator[Node]:
    """Yields every node of `tree` (a tree dict or a node dict), depth first, root first."""
    stack = [tree["root"] if "root" in tree else tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node["children"]))


def visit_invariant_errors(tree: Mapping[str, Any]) -> list[str]:
    """Returns one message per expanded node whose visits != 1 + sum of its children's visits."""
    errors = []
    stack: list[tuple[Node, str]] = [(tree["root"], "root")]
    while stack:
        node, where = stack.pop()
        children = node["children"]
        if children:
            total = sum(c["visits"] for c in children)
            if node["visits"] != 1 + total:
                errors.append(
                    f"{where} (id {node['id']}, step {node['step']!r}): visits {node['visits']} "
                    f"!= 1 + {total} (sum of its {len(children)} children's visits)")
        for i in reversed(range(len(children))):
            stack.append((children[i], f"{where}.children[{i}]"))
    return errors


def check_visit_invariant(tree: Mapping[str, Any]) -> None:
    """Raises `ValueError` listing every expanded node whose visits != 1 + sum of children's."""
    errors = visit_invariant_errors(tree)
    if errors:
        raise ValueError(
            "visit counts are inconsistent (every expanded node, root included, must have "
            "visits = 1 + the sum of its children's visits):\n  " + "\n  ".join(errors))


def chosen_path(tree: Mapping[str, Any]) -> list[Node]:
    """Returns the nodes on the chosen path below the root (the root excluded)."""
    path, node = [], tree["root"]
    while True:
        node = next((c for c in node["children"] if c["chosen"]), None)
        if node is None:
            return path
        path.append(node)


def path_text(tree: Mapping[str, Any]) -> str:
    """Returns the chosen path's steps, one per line (the solution text the search picked)."""
    return "\n".join(node["step"] for node in chosen_path(tree))


def verdict(node: Mapping[str, Any]) -> str | None:
    """Returns "invalid", "solved" or "dead end" for an invalid or terminal node, else None."""
    if not node["valid"]:
        return "invalid"
    if node["terminal"]:
        return "solved" if node["solved"] else "dead end"
    return None


def children_by_visits(node: Mapping[str, Any]) -> list[Node]:
    """Returns the node's children, most visited first (ties: higher prior, then action order)."""
    return sorted(node["children"], key=lambda c: (-c["visits"], -c["prior"]))


def problem_text(tree: Mapping[str, Any]) -> str:
    """Returns a one-line description of the problem, e.g. "4 9 10 13 -> 24"."""
    problem = tree["problem"]
    if isinstance(problem.get("numbers"), list) and "target" in problem:
        numbers = " ".join(str(n) for n in problem["numbers"])
        return f"{numbers} -> {problem['target']}"
    return json.dumps(problem, sort_keys=True)


def tree_title(tree: Mapping[str, Any]) -> str:
    """Returns the tree's title, or "<policy>, <num_simulations> simulations" when it has none."""
    return tree.get("title") or f"{tree['policy']}, {tree['num_simulations']} simulations"


def node_key(node: Mapping[str, Any], parent: Mapping[str, Any] | None) -> str:
    """Returns a name for the node unique within its tree: "n<id>", or for an
    unvisited child without an mctx index, "u<parent id>_<action>" (a bare Graphviz id)."""
    if node["id"] >= 0 or parent is None:
        return f"n{node['id']}"
    return f"u{parent['id']}_{node['action']}"
