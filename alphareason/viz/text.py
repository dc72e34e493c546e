"""Compact text view of a search tree's top levels, for the command line and logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alphareason.viz import tree_io

__all__ = ["format_tree"]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_tree(tree: Mapping[str, Any], *, depth: int = 2, top: int = 5) -> str:
    """Returns a text view of the tree's top levels.

    One line per node: the step (`*` marks the chosen path), visits `N`, mean
    value `Q` and prior `P`, and the verdict of terminal or invalid steps.
    Children are listed most visited first.

    Args:
      tree: a tree dict (or a path to a tree JSON file).
      depth: how many levels below the root to show (0: the root only).
      top: how many children to show per node; the rest are summarised in one line.
    """
    tree = tree_io.load_tree(tree)
    rows: list[tuple[str, str]] = []  # (tree-drawing prefix + step, statistics)

    def visit(node: Mapping[str, Any], prefix: str, level: int) -> None:
        if level >= depth:
            return
        children = tree_io.children_by_visits(node)
        shown, rest = children[:max(top, 0)], children[max(top, 0):]
        for i, child in enumerate(shown):
            last = i == len(shown) - 1 and not rest
            mark = "* " if child["chosen"] else ""
            stats = f"N={child['visits']:<4} Q={_num(child['q']):>5}  P={_num(child['prior'])}"
            verdict = tree_io.verdict(child)
            if verdict:
                stats += f"  [{verdict}]"
            rows.append((prefix + ("`- " if last else "|- ") + mark + child["step"], stats))
            visit(child, prefix + ("   " if last else "|  "), level + 1)
        if rest:
            n = sum(c["visits"] for c in rest)
            rows.append((prefix + "`- ...", f"{len(rest)} more, N={n} in all"))

    root = tree["root"]
    rows.append(("root", f"N={root['visits']:<4} V={_num(root['value'])}"))
    visit(root, "", 0)
    width = max(len(left) for left, _ in rows) + 2
    lines = [f"{tree['title']}"] if tree.get("title") else []
    lines.append(f"{tree['task']} {tree_io.problem_text(tree)} | policy {tree['policy']}, "
                 f"{tree['num_simulations']} simulations | * = chosen path")
    lines += [f"{left:<{width}}{right}" for left, right in rows]
    path = tree_io.chosen_path(tree)
    if path:
        outcome = tree_io.verdict(path[-1]) or "unfinished"
        lines.append("chosen: " + " -> ".join(n["step"] for n in path) + f" ({outcome})")
    else:
        lines.append("chosen: none")
    return "\n".join(lines)
