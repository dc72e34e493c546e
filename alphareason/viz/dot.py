"""Graphviz views of a search tree: DOT text, and SVG through the `dot` program.

The chosen path is drawn bold and blue, solved leaves filled green, dead ends
red, invalid steps grey and dashed, unvisited children dotted. `to_dot` needs
nothing installed; `write_svg` runs Graphviz's `dot` executable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alphareason.viz import tree_io

__all__ = ["GraphvizNotFoundError", "to_dot", "write_dot", "write_svg"]

GRAPHVIZ_MISSING = ("Graphviz is not installed: install it with `apt-get install graphviz` "
                    "(Debian/Ubuntu) or `brew install graphviz`, or use --html")


class GraphvizNotFoundError(RuntimeError):
    """The Graphviz `dot` executable is not on PATH."""


def _quote(text: str) -> str:
    """Returns `text` as a DOT double-quoted string (line breaks become centred line breaks)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _node_attrs(node: Mapping[str, Any], name: str, is_root: bool) -> dict[str, str]:
    verdict = tree_io.verdict(node)
    step = "root" if is_root else node["step"]
    stats = f"N={node['visits']}"
    if not is_root:
        stats += f" Q={_num(node['q'])} P={_num(node['prior'])}"
    lines = [step, stats]
    if verdict:
        lines.append(verdict)
    attrs = {"label": "\n".join(lines), "id": name}
    styles = ["rounded", "filled"]
    fill, color = "white", "#6b7280"
    if verdict == "solved":
        fill, color = "#c9f0d1", "#137333"
    elif verdict == "dead end":
        fill, color = "#fbe4e2", "#b3261e"
    elif verdict == "invalid":
        fill, color = "#eeeeee", "#999999"
        styles.append("dashed")
    if node["visits"] == 0 and verdict != "invalid":
        styles.append("dotted")
    if node["chosen"]:
        styles.append("bold")
        color = "#1a56db" if verdict != "solved" else "#137333"
        attrs["penwidth"] = "2.5"
    attrs.update(style=",".join(styles), fillcolor=fill, color=color)
    return attrs


def to_dot(tree: Mapping[str, Any], *, min_visits: int = 0) -> str:
    """Returns the tree as Graphviz DOT text.

    Args:
      tree: a tree dict (or a path to a tree JSON file).
      min_visits: leave out nodes (and their subtrees) with fewer visits; the
        root is always kept.
    """
    tree = tree_io.load_tree(tree)
    title = tree_io.tree_title(tree)
    graph_label = f"{title}\n{tree['task']}: {tree_io.problem_text(tree)}"
    lines = [
        "digraph search_tree {",
        f"  graph [label={_quote(graph_label)}, labelloc=t, fontname=Helvetica, "
        "fontsize=12, rankdir=TB, nodesep=0.25, ranksep=0.35];",
        '  node [shape=box, fontname="Courier", fontsize=10, margin="0.08,0.03"];',
        '  edge [color="#9ca3af", arrowsize=0.6];',
    ]
    stack: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = [(tree["root"], None)]
    while stack:
        node, parent = stack.pop()
        name = tree_io.node_key(node, parent)
        attrs = _node_attrs(node, name, parent is None)
        attr_text = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
        lines.append(f"  {name} [{attr_text}];")
        if parent is not None:
            edge = ' [color="#1a56db", penwidth=2.5, style=bold]' if node["chosen"] else ""
            lines.append(f"  {tree_io.node_key(parent, None)} -> {name}{edge};")
        kept = [c for c in tree_io.children_by_visits(node) if c["visits"] >= min_visits]
        stack.extend((c, node) for c in reversed(kept))
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(tree: Mapping[str, Any], path: str | os.PathLike, *, min_visits: int = 0) -> Path:
    """Writes `to_dot(tree)` to `path` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_dot(tree, min_visits=min_visits), encoding="utf-8")
    return path


def write_svg(tree: Mapping[str, Any], path: str | os.PathLike, *, min_visits: int = 0) -> Path:
    """Renders the tree to an SVG file with Graphviz's `dot`.

    Raises:
      GraphvizNotFoundError: `dot` is not on PATH (the message says how to install it).
      RuntimeError: `dot` failed (its error output is included).
    """
    dot_exe = shutil.which("dot")
    if dot_exe is None:
        raise GraphvizNotFoundError(GRAPHVIZ_MISSING)
    source = to_dot(tree, min_visits=min_visits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([dot_exe, "-Tsvg", "-o", str(path)], input=source.encode("utf-8"),
                            capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Graphviz `dot` failed writing {path} (exit {result.returncode}): "
                           f"{result.stderr.decode('utf-8', 'replace').strip()}")
    return path
