"""Self-contained interactive HTML viewer for search trees.

The page is rendered on the Python side as nested `<details>` elements (so it
reads without JavaScript, and every text is escaped once, here) plus a short
inline script for expand-all / collapse-all / chosen path and the
minimum-visits filter. Nothing is loaded from the network: all style and script
are inline and a Content-Security-Policy forbids any other source.

DOM contract (kept stable for tests and notebooks):
  * `section.panel[data-tree-index=i][data-policy=...]`, one per tree, side by
    side; its `h2.tree-title` is the tree's title;
  * `li.node[data-node-id][data-visits][data-depth][data-chosen][data-verdict]`
    with element id `t{i}-n{id}` (an unvisited child with id -1:
    `t{i}-u{parent id}_{action}`) and classes `chosen`, `solved`, `dead-end`,
    `invalid`, `unvisited`, `root` as they apply;
  * inside each node's row: `.step`, `.visits`, `.q`, `.prior`, `.value`
    (each holding just the number; the row's tooltip has full precision),
    `.verdict`, `.nkids`;
  * controls: `#min-visits` (input type=number), `#expand-all`,
    `#collapse-all`, `#show-chosen`; `.panel .shown-count` counts shown nodes.
"""

from __future__ import annotations

import html as _html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alphareason.viz import tree_io

__all__ = ["to_html", "write_html"]

TreeLike = Mapping[str, Any] | str | os.PathLike


def _esc(text: Any) -> str:
    return _html.escape(str(text), quote=True)


def _as_trees(tree_or_trees: TreeLike | Sequence[TreeLike]) -> list[dict]:
    if isinstance(tree_or_trees, (Mapping, str, os.PathLike)):
        items = [tree_or_trees]
    else:
        items = list(tree_or_trees)
    if not items:
        raise ValueError("no trees given. Fix: pass a tree dict, a tree file path, or a list of them")
    return [tree_io.load_tree(t) for t in items]


def _num(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.2f}"


def _stat(cls: str, shown: str) -> str:
    # The label (N, Q, P, V) is drawn by CSS, so the element's text is just the number.
    return f'<span class="stat {cls}">{shown}</span>'


# Indentation of one tree level in pixels (ul.children margin + padding + border) and
# the approximate width of one monospace character, used to line the statistics
# columns up across levels.
_LEVEL_PX = 22
_CHAR_PX = 8.5


def _step_column_px(tree: Mapping[str, Any]) -> int:
    widest, stack = 0.0, [(tree["root"], 0)]
    while stack:
        node, depth = stack.pop()
        widest = max(widest, max(len(node["step"]), 4) * _CHAR_PX + depth * _LEVEL_PX)
        stack.extend((c, depth + 1) for c in node["children"])
    return int(min(widest, 480)) + 12


def _row(node: Mapping[str, Any], parent_visits: int, depth: int, step_px: int) -> str:
    is_root = depth == 0
    width = f' style="min-width:{max(step_px - depth * _LEVEL_PX, 40)}px"'
    parts = ['<span class="toggle"></span>']
    if is_root:
        parts.append(f'<span class="step root-step"{width}>root</span>')
    else:
        parts.append(f'<span class="step"{width}>{_esc(node["step"])}</span>')
    # The root has no parent: blank placeholders keep its columns in line with the others.
    if is_root:
        parts.append('<span class="bar blank"></span>')
    else:
        share = min(node["visits"] / max(parent_visits - 1, 1), 1.0)
        parts.append(f'<span class="bar"><span style="width:{share * 100:.0f}%"></span></span>')
    parts.append(_stat("visits", str(node["visits"])))
    if is_root:
        parts.append('<span class="stat blank"></span><span class="stat blank"></span>')
    else:
        parts.append(_stat("q", _num(node["q"])) + _stat("prior", _num(node["prior"])))
    parts.append(_stat("value", _num(node["value"])))
    verdict = tree_io.verdict(node)
    if verdict:
        parts.append(f'<span class="verdict {verdict.replace(" ", "-")}">{verdict}</span>')
    if node["children"]:
        n = len(node["children"])
        label = f'{n} {"child" if n == 1 else "children"}'
        parts.append(f'<span class="nkids" data-label="{label}">{label}</span>')
    return "".join(parts)


def _tooltip(node: Mapping[str, Any], parent_visits: int) -> str:
    """The row's tooltip: every statistic at full precision."""
    share = f" ({node['visits'] / max(parent_visits - 1, 1):.0%} of the parent's)" if parent_visits else ""
    return (f"id {node['id']} \u00b7 action {node['action']} \u00b7 visits {node['visits']}{share}"
            f" \u00b7 Q {node['q']} \u00b7 prior {node['prior']} \u00b7 value {node['value']}"
            f" \u00b7 reward {node['reward']}")


def _node_html(node: Mapping[str, Any], parent: Mapping[str, Any] | None, tree_index: int,
               depth: int, step_px: int, out: list[str]) -> None:
    is_root = depth == 0
    verdict = tree_io.verdict(node)
    classes = ["node"]
    if is_root:
        classes.append("root")
    if node["chosen"]:
        classes.append("chosen")
    if verdict:
        classes.append(verdict.replace(" ", "-"))
    if node["visits"] == 0:
        classes.append("unvisited")
    parent_visits = parent["visits"] if parent else 0
    tip = _tooltip(node, parent_visits)
    out.append(
        f'<li class="{" ".join(classes)}" id="t{tree_index}-{tree_io.node_key(node, parent)}" '
        f'data-node-id="{node["id"]}" data-visits="{node["visits"]}" data-depth="{depth}" '
        f'data-chosen="{"true" if node["chosen"] else "false"}" '
        f'data-verdict="{_esc(verdict or "")}" data-step="{_esc(node["step"])}">')
    row = _row(node, parent_visits, depth, step_px)
    if node["children"]:
        is_open = " open" if is_root or node["chosen"] else ""
        out.append(f'<details{is_open}><summary class="row" title="{_esc(tip)}">{row}</summary>'
                   '<ul class="children">')
        for child in tree_io.children_by_visits(node):
            _node_html(child, node, tree_index, depth + 1, step_px, out)
        out.append("</ul></details>")
    else:
        out.append(f'<div class="row leaf" title="{_esc(tip)}">{row}</div>')
    out.append("</li>")


def _panel_html(tree: Mapping[str, Any], index: int) -> str:
    nodes = list(tree_io.iter_nodes(tree))
    path = tree_io.chosen_path(tree)
    last = path[-1] if path else None
    outcome = (tree_io.verdict(last) or "unfinished") if last else "no chosen path"
    steps = " \u2192 ".join(f"<code>{_esc(n['step'])}</code>" for n in path) or "\u2013"
    title = tree_io.tree_title(tree)
    prompt = tree["prompt"].replace("\n", "\u21b5")  # show line ends as a visible mark
    forwards = tree.get("token_forwards")  # the search's compute, when the export recorded it
    compute = (f'<span class="forwards">{forwards:,} token forwards</span>'
               if isinstance(forwards, int) and not isinstance(forwards, bool) else "")
    out = [
        f'<section class="panel" data-tree-index="{index}" data-policy="{_esc(tree["policy"])}">',
        "<header>",
        f'<h2 class="tree-title">{_esc(title)}</h2>',
        '<div class="meta">'
        f'<span class="policy">policy <b>{_esc(tree["policy"])}</b></span>'
        f'<span>{tree["num_simulations"]} simulations</span>{compute}'
        f'<span class="task">{_esc(tree["task"])}</span>'
        f'<span class="problem">{_esc(tree_io.problem_text(tree))}</span>'
        f'<span>prompt <code class="prompt">{_esc(prompt)}</code></span>'
        "</div>",
        f'<div class="answer {_esc(outcome.replace(" ", "-"))}">chosen: {steps} '
        f'<span class="outcome">{_esc(outcome)}</span></div>',
        f'<div class="counts"><span class="shown-count">{len(nodes)}</span> of '
        f'<span class="total-count">{len(nodes)}</span> nodes shown</div>',
        "</header>",
        '<ul class="tree">',
    ]
    _node_html(tree["root"], None, index, 0, _step_column_px(tree), out)
    out.append("</ul></section>")
    return "\n".join(out)


_CSS = """
:root { --chosen: #1a56db; --chosen-bg: #e8effd; --solved: #137333; --solved-bg: #d9f2df;
  --dead: #b3261e; --dead-bg: #fbe4e2; --muted: #6b7280; --line: #d5d9e0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #1f2328; background: #fafbfc; }
code, .step, .stat { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.toolbar { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 14px;
  align-items: center; padding: 8px 14px; background: #fff; border-bottom: 1px solid var(--line); }
.toolbar h1 { font-size: 16px; margin: 0 8px 0 0; }
.toolbar button { font: inherit; padding: 3px 10px; border: 1px solid #b8bec8; border-radius: 5px;
  background: #f3f4f6; cursor: pointer; }
.toolbar button:hover { background: #e5e7eb; }
.toolbar input { font: inherit; width: 5.5em; padding: 2px 4px; }
.legend { display: flex; gap: 10px; color: var(--muted); font-size: 12px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 4px;
  border-radius: 2px; vertical-align: -1px; }
.legend .l-chosen::before { background: var(--chosen-bg); border-left: 3px solid var(--chosen); }
.legend .l-solved::before { background: var(--solved-bg); border: 1px solid var(--solved); }
.legend .l-dead::before { background: var(--dead-bg); border: 1px solid var(--dead); }
.legend .l-invalid::before { background: #eee; border: 1px dashed #999; }
.panels { display: grid; gap: 14px; padding: 14px; }
.panel { min-width: 0; overflow: auto; background: #fff; border: 1px solid var(--line);
  border-radius: 8px; padding: 10px 12px; }
.panel header { margin-bottom: 6px; }
.panel h2 { font-size: 15px; margin: 0 0 2px; }
.meta, .counts { color: var(--muted); font-size: 12px; }
.meta span + span::before { content: "\\00b7"; margin: 0 6px; }
.answer { margin: 4px 0; font-size: 13px; }
.answer .outcome { font-weight: 600; margin-left: 6px; }
.answer.solved .outcome { color: var(--solved); }
.answer.dead-end .outcome, .answer.invalid .outcome { color: var(--dead); }
ul.tree, ul.children { list-style: none; margin: 0; padding: 0; }
ul.children { margin-left: 9px; padding-left: 12px; border-left: 1px solid var(--line); }
.node[hidden] { display: none !important; }
details > summary { list-style: none; }
details > summary::-webkit-details-marker { display: none; }
.row { display: flex; align-items: center; gap: 8px; padding: 1px 6px; margin: 1px 0;
  border-radius: 4px; border-left: 3px solid transparent; white-space: nowrap; }
summary.row { cursor: pointer; }
summary.row:hover { background: #f1f3f6; }
.toggle { width: 10px; color: var(--muted); flex: none; }
.toggle::before { content: "\\00b7"; }
summary .toggle::before { content: "\\25b8"; }
details[open] > summary .toggle::before { content: "\\25be"; }
.step { flex: none; }
.root-step { color: var(--muted); font-style: italic; }
.stat { color: #374151; min-width: 4.6em; }
.stat::before { color: var(--muted); font: 11px system-ui, sans-serif; margin-right: 3px; }
.stat.visits::before { content: "N"; }
.stat.q::before { content: "Q"; }
.stat.prior::before { content: "P"; }
.stat.value::before { content: "V"; }
.bar { display: inline-block; width: 48px; height: 7px; background: #eef0f3; border-radius: 4px;
  overflow: hidden; flex: none; }
.bar.blank { visibility: hidden; }
.bar > span { display: block; height: 100%; background: #8aa4d6; }
.nkids { color: var(--muted); font-size: 11px; }
.verdict { font-size: 11px; font-weight: 600; padding: 0 6px; border-radius: 8px; }
.verdict.solved { color: #fff; background: var(--solved); }
.verdict.dead-end { color: var(--dead); background: var(--dead-bg); }
.verdict.invalid { color: #555; background: #eee; border: 1px dashed #999; }
.node.chosen > details > .row, .node.chosen > .row { background: var(--chosen-bg);
  border-left-color: var(--chosen); }
.node.chosen > details > .row .step, .node.chosen > .row .step { font-weight: 700; color: var(--chosen); }
.node.solved > .row { background: var(--solved-bg); border-left-color: var(--solved); }
.node.solved > .row .step { color: var(--solved); }
.node.chosen.solved > .row { border-left-color: var(--chosen); }
.node.invalid .step { text-decoration: line-through; color: var(--muted); }
.node.unvisited > .row, .node.unvisited > details > .row { opacity: 0.55; }
"""

_JS = """
(function () {
  "use strict";
  var nodes = Array.prototype.slice.call(document.querySelectorAll("li.node"));
  function details() { return document.querySelectorAll("li.node > details"); }
  function setOpen(open) { details().forEach(function (d) { d.open = open; }); }
  function showChosen() {
    details().forEach(function (d) {
      d.open = d.parentNode.classList.contains("root") || d.parentNode.classList.contains("chosen");
    });
  }
  var input = document.getElementById("min-visits");
  function applyFilter() {
    var min = Number(input.value);
    if (!isFinite(min)) { min = 0; }
    nodes.forEach(function (li) {
      li.hidden = !li.classList.contains("root") && Number(li.getAttribute("data-visits")) < min;
    });
    document.querySelectorAll("li.node > details").forEach(function (d) {
      var kids = d.querySelector(":scope > summary .nkids");
      var hidden = 0;
      for (var c = d.lastElementChild.firstElementChild; c; c = c.nextElementSibling) {
        if (c.hidden) { hidden += 1; }
      }
      kids.textContent = kids.getAttribute("data-label") + (hidden ? " (" + hidden + " hidden)" : "");
    });
    document.querySelectorAll("section.panel").forEach(function (panel) {
      var shown = panel.querySelectorAll("li.node:not([hidden])").length;
      panel.querySelector(".shown-count").textContent = String(shown);
    });
  }
  document.getElementById("expand-all").addEventListener("click", function () { setOpen(true); });
  document.getElementById("collapse-all").addEventListener("click", function () { setOpen(false); });
  document.getElementById("show-chosen").addEventListener("click", showChosen);
  input.addEventListener("input", applyFilter);
  input.addEventListener("change", applyFilter);
  applyFilter();
})();
"""

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:")


def to_html(tree_or_trees: TreeLike | Sequence[TreeLike], *, title: str | None = None,
            min_visits: int = 0) -> str:
    """Renders one or more search trees as a self-contained interactive HTML page.

    Args:
      tree_or_trees: a tree (dict or path to a tree JSON file), or a list of
        them; two or more are shown side by side (e.g. PUCT vs Gumbel on the
        same problem).
      title: the page title; defaults to the tree's title or its problem.
      min_visits: the visit filter's starting value: nodes with fewer visits
        start hidden (the root always shows); the page's "min visits" box
        changes it.

    Returns:
      The HTML document as a string. It loads nothing from the network.
    """
    if isinstance(min_visits, bool) or not isinstance(min_visits, int) or min_visits < 0:
        raise ValueError(f"min_visits={min_visits!r}. Fix: pass a non-negative integer")
    trees = _as_trees(tree_or_trees)
    if title is None:
        if len(trees) == 1:
            title = trees[0].get("title") or f"search tree: {tree_io.problem_text(trees[0])}"
        else:
            title = f"{len(trees)} search trees: {tree_io.problem_text(trees[0])}"
    panels = "\n".join(_panel_html(t, i) for i, t in enumerate(trees))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="alphareason.viz">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<div class="toolbar">
<h1 class="page-title">{_esc(title)}</h1>
<button type="button" id="expand-all">Expand all</button>
<button type="button" id="collapse-all">Collapse all</button>
<button type="button" id="show-chosen">Chosen path</button>
<label for="min-visits">min visits</label>
<input type="number" id="min-visits" min="0" step="1" value="{min_visits}">
<span class="legend"><span class="l-chosen">chosen path</span><span class="l-solved">solved</span><span class="l-dead">dead end</span><span class="l-invalid">invalid</span></span>
</div>
<main class="panels" style="grid-template-columns: repeat({len(trees)}, minmax(0, 1fr));">
{panels}
</main>
<script>{_JS}</script>
</body>
</html>
"""


def write_html(tree_or_trees: TreeLike | Sequence[TreeLike], path: str | os.PathLike, *,
               title: str | None = None, min_visits: int = 0) -> Path:
    """Writes `to_html(tree_or_trees, ...)` to `path` (parent folders are created)."""
    page = to_html(tree_or_trees, title=title, min_visits=min_visits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
