"""alphareason.viz: look at search trees, as text, Graphviz, HTML, or inline in a notebook.

    from alphareason import viz
    tree = viz.load_tree("tree.json")
    print(viz.format_tree(tree))
    viz.show([gumbel_tree, puct_tree])        # side by side in Jupyter
    viz.write_html(tree, "tree.html")         # self-contained, opens offline

This package owns the tree views; it computes no search (the trees come from
`alphareason.search`'s export in the `alphareason.tree/1` format, see
`tree_io`).
"""

from __future__ import annotations

import html as _html
from collections.abc import Mapping
from typing import Any

from alphareason.viz.dot import GraphvizNotFoundError, to_dot, write_dot, write_svg
from alphareason.viz.html import to_html, write_html
from alphareason.viz import tree_io
from alphareason.viz.text import format_tree
from alphareason.viz.tree_io import (
    FORMAT,
    check_visit_invariant,
    chosen_path,
    iter_nodes,
    load_tree,
    path_text,
    save_tree,
    validate_tree,
    visit_invariant_errors,
)

__all__ = [
    "FORMAT",
    "GraphvizNotFoundError",
    "check_visit_invariant",
    "chosen_path",
    "format_tree",
    "iter_nodes",
    "load_tree",
    "path_text",
    "plot_root_visits",
    "save_tree",
    "show",
    "to_dot",
    "to_html",
    "validate_tree",
    "visit_invariant_errors",
    "write_dot",
    "write_html",
    "write_svg",
]

CHOSEN_COLOR = "#1a56db"  # the chosen path's colour, as in the HTML and DOT views


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def show(tree_or_trees: Any, *, title: str | None = None, min_visits: int = 0, height: int = 600) -> Any:
    """Shows one tree, or several side by side, inline in a notebook.

    Args:
      tree_or_trees: a tree (dict or path to a tree JSON file) or a list of them.
      title: the page title (see `to_html`).
      min_visits: the visit filter's starting value (see `to_html`): nodes
        with fewer visits start hidden.
      height: the height of the inline frame in pixels.

    Returns:
      Inside IPython/Jupyter an `IPython.display.HTML` object (the page in an
      iframe, so its style and script stay apart from the notebook's);
      elsewhere the HTML page as a string.
    """
    page = to_html(tree_or_trees, title=title, min_visits=min_visits)
    if not _in_ipython():
        return page
    from IPython.display import HTML

    # (Wrapped in a div: IPython warns about a bare <iframe>, and IFrame takes no srcdoc.)
    return HTML(f'<div class="alphareason-tree"><iframe srcdoc="{_html.escape(page, quote=True)}" '
                f'style="width: 100%; height: {int(height)}px; border: 1px solid #d5d9e0; '
                'border-radius: 6px;" sandbox="allow-scripts"></iframe></div>')


def plot_root_visits(tree: Mapping[str, Any] | str, ax: Any = None, *, top: int | None = None) -> Any:
    """Plots the root children's share of visits next to their prior, as bars.

    The gap between the two bars is what the search changed about the policy
    (the improvement the learner distils). The chosen child's label is blue.

    Args:
      tree: a tree dict (or a path to a tree JSON file).
      ax: a matplotlib Axes to draw on; a new figure is made when None.
      top: plot only this many children, the most visited first (ties: the
        higher prior); None plots them all in action order. Shares stay
        fractions of all the root's child visits.

    Returns:
      The matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    tree = load_tree(tree)
    all_children = tree["root"]["children"]
    children = all_children if top is None else tree_io.children_by_visits(tree["root"])[:max(top, 0)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(children) + 2.0), 3.2))
    total = sum(c["visits"] for c in all_children)
    share = [c["visits"] / total if total else 0.0 for c in children]
    prior = [c["prior"] for c in children]
    x = np.arange(len(children))
    ax.bar(x - 0.2, share, width=0.4, label="visit share", color="#8aa4d6")
    ax.bar(x + 0.2, prior, width=0.4, label="prior", color="#9ca3af")
    ax.set_xticks(x)
    ax.set_xticklabels([c["step"] for c in children], rotation=30, ha="right", fontfamily="monospace")
    for label, child in zip(ax.get_xticklabels(), children):
        if child["chosen"]:
            label.set_color(CHOSEN_COLOR)
    ax.set_ylabel("probability")
    title = tree_io.tree_title(tree)
    shown = "" if len(children) == len(all_children) else f", top {len(children)} of {len(all_children)}"
    ax.set_title(f"root: visit share vs prior ({title}{shown})", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax.figure.tight_layout()
    return ax
