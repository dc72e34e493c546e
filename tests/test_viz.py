"""Tests for alphareason.viz: the tree format, and the text, DOT/SVG and HTML views."""

from __future__ import annotations

import copy
import html
import html.parser
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from alphareason import viz
from alphareason.viz import cli, dot, tree_io

DATA = Path(__file__).parent / "data"
SMALL = DATA / "tree_small.json"
PUCT = DATA / "tree_puct.json"


def small_tree() -> dict:
    return json.loads(SMALL.read_text())


def node_by_id(tree: dict, node_id: int) -> dict:
    return next(n for n in viz.iter_nodes(tree) if n["id"] == node_id)


def with_parents(tree: dict):
    """Yields (node, parent) pairs, depth first."""
    stack = [(tree["root"], None)]
    while stack:
        node, parent = stack.pop()
        yield node, parent
        stack.extend((c, node) for c in reversed(node["children"]))


class _NodeCollector(html.parser.HTMLParser):
    """Collects the attributes and step text of every `li.node` in a page."""

    def __init__(self):
        super().__init__()
        self.nodes: list[dict] = []
        self.panels: list[dict] = []
        self._in_step = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "li" and "node" in classes:
            self.nodes.append({**attrs, "classes": classes, "step_text": None, "open": None})
        elif tag == "section" and "panel" in classes:
            self.panels.append(attrs)
        elif tag == "details" and self.nodes and self.nodes[-1]["open"] is None:
            self.nodes[-1]["open"] = "open" in attrs
        elif tag == "span" and "step" in classes and self.nodes[-1]["step_text"] is None:
            self._in_step = True
            self.nodes[-1]["step_text"] = ""

    def handle_data(self, data):
        if self._in_step:
            self.nodes[-1]["step_text"] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_step = False


def parse_page(page: str) -> _NodeCollector:
    collector = _NodeCollector()
    collector.feed(page)
    return collector


# ----------------------------------------------------------------------------
# Tree format


@pytest.mark.parametrize("path", [SMALL, PUCT])
def test_fixtures_load_and_keep_the_visit_invariant(path):
    tree = viz.load_tree(path)
    assert tree["format"] == viz.FORMAT
    viz.check_visit_invariant(tree)
    assert viz.visit_invariant_errors(tree) == []
    root = tree["root"]
    assert root["visits"] == tree["num_simulations"] + 1


def test_iter_nodes_visits_every_node_depth_first():
    tree = viz.load_tree(SMALL)
    ids = [n["id"] for n in viz.iter_nodes(tree)]
    assert ids == [0, 1, 3, 6, 9, 4, 10, 5, 2, 7, 8, 11, 12, 14, 15, 16]
    assert len(set(ids)) == len(ids)


def test_path_text_is_the_chosen_solution():
    assert viz.path_text(viz.load_tree(SMALL)) == "13-9=4\n10-4=6\n6*4=24"
    assert viz.path_text(viz.load_tree(PUCT)) == "10-4=6\n13-9=4\n6*4=24"
    assert [n["id"] for n in viz.chosen_path(viz.load_tree(SMALL))] == [1, 3, 6]


def test_load_tree_accepts_a_dict_and_returns_it():
    tree = small_tree()
    assert viz.load_tree(tree) is tree


def _set(path, value):
    """Returns a mutation that sets the field at `path` (a list of keys) to `value`."""

    def mutate(tree):
        target = tree
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(tree):
        target = tree
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


N4 = ["root", "children", 0, "children", 1]  # the node "4*4=16", id 4

MALFORMED = {
    "format missing": (_delete(["format"]), ["top level", "'format'", "is missing", viz.FORMAT]),
    "format version": (_set(["format"], "alphareason.tree/2"),
                       ["'format'", "alphareason.tree/2", f'"format": "{viz.FORMAT}"']),
    "root missing": (_delete(["root"]), ["'root'", "is missing"]),
    "num_simulations missing": (_delete(["num_simulations"]), ["'num_simulations'", "add"]),
    "problem not an object": (_set(["problem"], [4, 9]), ["'problem'", "[4, 9]", "object"]),
    "title not a string": (_set(["title"], 3), ["'title'", "string"]),
    "visits missing": (_delete(N4 + ["visits"]),
                       ["node root.children[0].children[1] (id 4)", "'visits'", "is missing",
                        "add 'visits'"]),
    "visits negative": (_set(N4 + ["visits"], -3), ["(id 4)", "'visits'", "-3", "non-negative integer"]),
    "visits a string": (_set(N4 + ["visits"], "2"), ["(id 4)", "'visits'", '"2"', "integer"]),
    "visits a bool": (_set(N4 + ["visits"], True), ["(id 4)", "'visits'", "true"]),
    "q a string": (_set(N4 + ["q"], "high"), ["(id 4)", "'q'", '"high"', "null"]),
    "q NaN": (_set(N4 + ["q"], math.nan), ["(id 4)", "'q'", "nan", "finite"]),
    "prior above one": (_set(N4 + ["prior"], 1.5), ["(id 4)", "'prior'", "1.5", "[0, 1]"]),
    "terminal not a bool": (_set(N4 + ["terminal"], "yes"), ["(id 4)", "'terminal'", "true or false"]),
    "children not a list": (_set(N4 + ["children"], None), ["(id 4)", "'children'", "a list"]),
    "node not an object": (_set(N4, 7), ["node root.children[0].children[1]", "node object"]),
    "step missing at root": (_delete(["root", "step"]), ["node root (id 0)", "'step'", "is missing"]),
    "action null below root": (_set(N4 + ["action"], None), ["(id 4)", "'action'", "null below the root"]),
    "duplicate id": (_set(N4 + ["id"], 3),
                     ["root.children[0].children[1] (id 3)", "'id'", "also used by",
                      "node root.children[0].children[0] (id 3)", "own id"]),
    "solved but not terminal": (_set(N4 + ["solved"], True), ["(id 4)", "'solved'", "terminal"]),
    "two chosen children": (_set(N4 + ["chosen"], True),
                            ["node root.children[0] (id 1)", "'children'", "[0, 1]", "at most one"]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_trees_give_a_named_error(name, tmp_path):
    mutate, expected = MALFORMED[name]
    tree = small_tree()
    mutate(tree)
    path = tmp_path / "bad_tree.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(ValueError) as info:
        viz.load_tree(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "Fix: " in message, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # The same error comes from a dict, naming "tree" as the source.
    with pytest.raises(ValueError, match=r"^tree: "):
        viz.load_tree(json.loads(json.dumps(tree)))


def test_numpy_values_get_a_conversion_hint():
    np = pytest.importorskip("numpy")
    tree = small_tree()
    node_by_id(tree, 4)["visits"] = np.int32(2)
    with pytest.raises(ValueError, match=r"\(id 4\) field 'visits': is np.int32\(2\) \(a numpy int32.*"
                                         r"Fix: convert numpy values to Python ones"):
        viz.load_tree(tree)


def test_prior_allows_float32_round_off():
    tree = small_tree()
    node_by_id(tree, 10)["prior"] = 1.0000001
    viz.load_tree(tree)


def test_unvisited_children_may_share_mctx_unvisited_id():
    tree = small_tree()
    node_by_id(tree, 5)["id"] = -1
    node_by_id(tree, 16)["id"] = -1  # as mctx exports them: no node index yet
    viz.load_tree(tree)
    page = viz.to_html(tree)
    assert 'id="t0-u1_2"' in page and 'id="t0-u0_3"' in page
    text = viz.to_dot(tree)
    assert "  n1 -> u1_2;" in text and "  n0 -> u0_3;" in text
    node_by_id(tree, 7)["id"] = -1
    with pytest.raises(ValueError, match=r"field 'id': is -1 but the node has 1 visits. Fix: negative ids"):
        viz.load_tree(tree)


def test_sibling_actions_must_differ():
    tree = small_tree()
    node_by_id(tree, 9)["action"] = 0
    with pytest.raises(ValueError, match=r"node root.children\[0\].children\[0\] \(id 3\) field 'children': "
                                         r"children \[0\] and \[1\] both have action 0"):
        viz.load_tree(tree)


def test_a_json_list_is_not_a_tree(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json: top level: expected a JSON object, got list"):
        viz.load_tree(path)


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text(SMALL.read_text()[:200])
    with pytest.raises(ValueError) as info:
        viz.load_tree(path)
    message = str(info.value)
    assert str(path) in message and "not valid JSON" in message and "line " in message
    assert "Fix:" in message


def test_missing_file_is_a_clear_file_not_found_error(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope.json: no such tree file. Fix: "):
        viz.load_tree(path)


def test_visit_invariant_catches_a_broken_tree():
    tree = small_tree()
    node_by_id(tree, 3)["visits"] = 7  # "10-4=6": 7 != 1 + 4 + 1, and its parent 9 != 1 + 7 + 2 + 0
    errors = viz.visit_invariant_errors(tree)
    assert len(errors) == 2
    assert errors[0].startswith("root.children[0] (id 1, step '13-9=4'): visits 9 != 1 + 9")
    assert errors[1].startswith("root.children[0].children[0] (id 3, step '10-4=6'): visits 7 != 1 + 5")
    with pytest.raises(ValueError, match=r"visit counts are inconsistent") as info:
        viz.check_visit_invariant(tree)
    assert "(id 3" in str(info.value) and "(id 1" in str(info.value)


def test_visit_invariant_checks_the_root_too():
    tree = small_tree()
    tree["root"]["visits"] = 16
    assert viz.visit_invariant_errors(tree) == [
        "root (id 0, step ''): visits 16 != 1 + 16 (sum of its 4 children's visits)"]


def test_save_tree_round_trips_and_refuses_invalid_trees(tmp_path):
    tree = viz.load_tree(SMALL)
    out = tmp_path / "nested" / "tree.json"
    viz.save_tree(tree, out)
    assert viz.load_tree(out) == tree
    bad = small_tree()
    bad["root"]["visits"] = -1
    with pytest.raises(ValueError, match=r"bad.json: node root \(id 0\) field 'visits'"):
        viz.save_tree(bad, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


# ----------------------------------------------------------------------------
# HTML


def test_html_is_self_contained():
    page = viz.to_html([SMALL, PUCT])
    assert page.startswith("<!DOCTYPE html>")
    for forbidden in ("http://", "https://", "<link", "@import", "url(", "//cdn", "fonts.googleapis"):
        assert forbidden not in page, forbidden
    assert re.search(r"\bsrc\s*=", page) is None
    assert "<script>" in page and "<style>" in page  # inline script and style
    assert "default-src 'none'" in page  # the CSP forbids loading anything else


@pytest.mark.parametrize("path", [SMALL, PUCT])
def test_html_has_every_node_with_its_step_and_visits(path):
    tree = viz.load_tree(path)
    dom = parse_page(viz.to_html(tree))
    by_element_id = {n["id"]: n for n in dom.nodes}
    assert len(dom.nodes) == len(by_element_id) == len(list(viz.iter_nodes(tree)))
    for node, parent in with_parents(tree):
        li = by_element_id["t0-" + tree_io.node_key(node, parent)]
        assert int(li["data-node-id"]) == node["id"]
        assert int(li["data-visits"]) == node["visits"]
        assert li["data-step"] == node["step"]
        assert li["step_text"] == (node["step"] or "root")
    page = viz.to_html(tree)
    root_visits = tree["root"]["visits"]
    assert f'<span class="stat visits">{root_visits}</span>' in page


def test_html_marks_the_chosen_path_and_verdicts():
    dom = parse_page(viz.to_html(SMALL))
    by_id = {int(n["data-node-id"]): n for n in dom.nodes}
    chosen = {i for i, n in by_id.items() if "chosen" in n["classes"]}
    assert chosen == {0, 1, 3, 6}
    assert {i for i, n in by_id.items() if n["data-chosen"] == "true"} == chosen
    assert {i for i, n in by_id.items() if "solved" in n["classes"]} == {6}
    assert {i for i, n in by_id.items() if "dead-end" in n["classes"]} == {9, 10, 11}
    assert {i for i, n in by_id.items() if "invalid" in n["classes"]} == {16}
    assert {i for i, n in by_id.items() if "unvisited" in n["classes"]} == {5, 16}
    assert by_id[6]["data-verdict"] == "solved" and by_id[9]["data-verdict"] == "dead end"
    # The root and the chosen path start expanded, the other branches collapsed.
    assert {i for i, n in by_id.items() if n["open"]} == {0, 1, 3}
    assert by_id[4]["open"] is False and by_id[2]["open"] is False
    page = viz.to_html(SMALL)
    assert 'class="answer solved"' in page and "<code>6*4=24</code>" in page


def test_html_escapes_text():
    tree = small_tree()
    tree["title"] = 'A <b>"bold"</b> & title'
    node_by_id(tree, 4)["step"] = '</script><script>alert("x")</script>'
    node_by_id(tree, 5)["step"] = "a<b & c>\"d'"
    tree["prompt"] = "</style><img src=x>"
    page = viz.to_html(tree)
    assert page.count("<script") == 1 and page.count("</script>") == 1  # only the page's own
    assert page.count("</style>") == 1
    assert "<img" not in page and '<b>"bold"' not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "A &lt;b&gt;&quot;bold&quot;&lt;/b&gt; &amp; title" in page
    dom = parse_page(page)
    by_id = {int(n["data-node-id"]): n for n in dom.nodes}
    assert by_id[4]["step_text"] == by_id[4]["data-step"] == '</script><script>alert("x")</script>'
    assert by_id[5]["step_text"] == "a<b & c>\"d'"


def test_html_shows_two_trees_side_by_side():
    page = viz.to_html([SMALL, PUCT])
    dom = parse_page(page)
    assert [p["data-policy"] for p in dom.panels] == ["gumbel", "puct"]
    assert [p["data-tree-index"] for p in dom.panels] == ["0", "1"]
    assert "Gumbel MuZero, 16 simulations" in page and "PUCT, 12 simulations" in page
    assert "grid-template-columns: repeat(2, minmax(0, 1fr))" in page
    ids = [n["id"] for n in dom.nodes]
    assert len(ids) == len(set(ids)) == 16 + 12  # element ids stay unique across panels
    assert "t1-n5" in ids and "t0-n16" in ids
    assert "<title>2 search trees: 4 9 10 13 -&gt; 24</title>" in page
    assert "<title>My comparison</title>" in viz.to_html([SMALL, PUCT], title="My comparison")


def test_html_has_the_controls():
    page = viz.to_html(SMALL)
    assert re.search(r'<input type="number" id="min-visits"[^>]*value="0"', page)
    for control in ("expand-all", "collapse-all", "show-chosen"):
        assert f'id="{control}"' in page


def test_html_min_visits_sets_the_filter_s_starting_value():
    page = viz.to_html(SMALL, min_visits=2)
    assert re.search(r'<input type="number" id="min-visits"[^>]*value="2"', page)
    # Every node is still in the page; the script hides the filtered ones on load.
    assert len(parse_page(page).nodes) == len(parse_page(viz.to_html(SMALL)).nodes)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="min_visits"):
            viz.to_html(SMALL, min_visits=bad)


def test_html_shows_the_search_compute_when_the_tree_has_it():
    assert "token forwards" not in viz.to_html(SMALL)
    tree = small_tree()
    tree["token_forwards"] = 12345
    assert '<span class="forwards">12,345 token forwards</span>' in viz.to_html(tree)
    tree["token_forwards"] = -3
    with pytest.raises(ValueError, match="field 'token_forwards': is -3"):
        viz.to_html(tree)


def test_write_html_writes_the_page(tmp_path):
    out = viz.write_html(SMALL, tmp_path / "views" / "tree.html", title="t")
    assert out.read_text(encoding="utf-8") == viz.to_html(SMALL, title="t")


def test_to_html_validates_its_input():
    with pytest.raises(ValueError, match="no trees given"):
        viz.to_html([])
    bad = small_tree()
    del bad["root"]["children"][0]["prior"]
    with pytest.raises(ValueError, match=r"tree: node root.children\[0\] \(id 1\) field 'prior'"):
        viz.to_html(bad)


# ----------------------------------------------------------------------------
# DOT / SVG


def test_to_dot_draws_every_node_with_the_chosen_path_bold_and_solved_green():
    text = viz.to_dot(SMALL)
    assert text.startswith("digraph search_tree {") and text.rstrip().endswith("}")
    tree = viz.load_tree(SMALL)
    for node in viz.iter_nodes(tree):
        assert re.search(rf"^  n{node['id']} \[", text, re.M), node["id"]
    assert '  n0 -> n1 [color="#1a56db", penwidth=2.5, style=bold];' in text
    assert '  n3 -> n6 [color="#1a56db", penwidth=2.5, style=bold];' in text
    assert "  n1 -> n4;" in text
    solved = re.search(r"^  n6 \[(.*)\];$", text, re.M).group(1)
    assert 'label="6*4=24\\nN=4 Q=1.00 P=0.70\\nsolved"' in solved
    assert 'fillcolor="#c9f0d1"' in solved and "bold" in solved
    assert re.search(r'^  n9 \[label="6\+4=10\\nN=1 Q=0.00 P=0.30\\ndead end"', text, re.M)
    assert 'label="Gumbel MuZero, 16 simulations\\ngame24: 4 9 10 13 -> 24"' in text


def test_to_dot_min_visits_prunes_subtrees_but_keeps_the_root():
    text = viz.to_dot(SMALL, min_visits=3)
    kept = {int(i) for i in re.findall(r"^  n(\d+) \[", text, re.M)}
    assert kept == {0, 1, 3, 6, 2, 12}
    assert {int(i) for i in re.findall(r"^  n(\d+) \[", viz.to_dot(SMALL, min_visits=100), re.M)} == {0}


def test_to_dot_escapes_quotes_and_backslashes():
    tree = small_tree()
    node_by_id(tree, 4)["step"] = 'say "hi"\\n'
    text = viz.to_dot(tree)
    assert 'label="say \\"hi\\"\\\\n\\nN=2' in text


@pytest.mark.skipif(shutil.which("dot") is None,
                    reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_write_svg_with_graphviz(tmp_path):
    out = viz.write_svg(SMALL, tmp_path / "svg" / "tree.svg")
    svg = html.unescape(out.read_text())  # Graphviz writes "-" as "&#45;"
    assert "<svg" in svg and "13-9=4" in svg and "6*4=24" in svg


def test_write_svg_without_graphviz_says_how_to_install_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("dot") is None
    with pytest.raises(viz.GraphvizNotFoundError) as info:
        viz.write_svg(SMALL, tmp_path / "tree.svg")
    assert str(info.value) == (
        "Graphviz is not installed: install it with `apt-get install graphviz` (Debian/Ubuntu) "
        "or `brew install graphviz`, or use --html")
    assert not (tmp_path / "tree.svg").exists()


def test_write_dot(tmp_path):
    out = viz.write_dot(SMALL, tmp_path / "tree.dot", min_visits=2)
    assert out.read_text() == viz.to_dot(SMALL, min_visits=2)


# ----------------------------------------------------------------------------
# Text


def test_format_tree_shows_the_top_levels():
    text = viz.format_tree(SMALL)
    lines = text.splitlines()
    assert lines[0] == "Gumbel MuZero, 16 simulations"
    assert "game24 4 9 10 13 -> 24 | policy gumbel, 16 simulations" in lines[1]
    assert re.match(r"root\s+N=17\s+V=0.35$", lines[2])
    assert re.match(r"\|- \* 13-9=4\s+N=9\s+Q= 0.78  P=0.45$", lines[3])
    assert re.match(r"\|  \|- \* 10-4=6\s+N=6\s+Q= 0.83  P=0.50$", lines[4])
    assert re.search(r"`- 9/4=2\s+N=0\s+Q=    -  P=0.05  \[invalid\]$", text, re.M)
    assert "6*4=24" not in "\n".join(lines[2:-1])  # depth 2: the third step is not listed
    assert lines[-1] == "chosen: 13-9=4 -> 10-4=6 -> 6*4=24 (solved)"
    # Every step column starts at the same place.
    assert len({line.index("N=") for line in lines[2:-1]}) == 1


def test_format_tree_depth_and_top():
    shallow = viz.format_tree(SMALL, depth=1, top=2)
    assert "10-4=6" not in shallow.split("chosen:")[0]
    assert re.search(r"^`- \.\.\.\s+2 more, N=3 in all$", shallow, re.M)
    assert "13-9=4" in shallow and "10+13=23" in shallow and "9*4=36" not in shallow.split("chosen:")[0]
    deep = viz.format_tree(PUCT, depth=3)
    assert re.search(r"\* 6\*4=24\s+N=3 .*\[solved\]", deep)
    assert re.search(r"15-13=2\s+N=1 .*\[dead end\]", deep)
    assert len(viz.format_tree(SMALL, depth=0).splitlines()) == 4


# ----------------------------------------------------------------------------
# show() and plots


def test_show_outside_ipython_returns_the_page():
    page = viz.show([SMALL, PUCT])
    assert isinstance(page, str)
    assert page == viz.to_html([SMALL, PUCT])


def test_show_inside_ipython_returns_an_inline_frame(monkeypatch):
    pytest.importorskip("IPython")
    monkeypatch.setattr(viz, "_in_ipython", lambda: True)
    shown = viz.show(SMALL, height=400)
    from IPython.display import HTML

    assert isinstance(shown, HTML)
    assert shown.data.startswith('<div class="alphareason-tree"><iframe srcdoc="&lt;!DOCTYPE html&gt;')
    assert "height: 400px" in shown.data
    assert "&lt;/script&gt;" in shown.data and "</script>" not in shown.data
    filtered = viz.show(SMALL, min_visits=3).data
    assert 'id=&quot;min-visits&quot; min=&quot;0&quot; step=&quot;1&quot; value=&quot;3&quot;' in filtered


def test_plot_root_visits():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert viz.plot_root_visits(SMALL, ax=ax) is ax
    share_bars, prior_bars = ax.containers
    assert [round(b.get_height(), 4) for b in share_bars] == [0.5625, 0.25, 0.1875, 0.0]
    assert [b.get_height() for b in prior_bars] == [0.45, 0.25, 0.25, 0.05]
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == ["13-9=4", "10+13=23", "9*4=36", "9/4=2"]
    assert labels[0].get_color() == viz.CHOSEN_COLOR and labels[1].get_color() != viz.CHOSEN_COLOR


def test_plot_root_visits_top_children():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ax = viz.plot_root_visits(PUCT, ax=Figure().subplots(), top=2)
    share_bars, prior_bars = ax.containers
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10-4=6", "13-9=4"]
    assert [round(b.get_height(), 4) for b in share_bars] == [round(7 / 12, 4), round(4 / 12, 4)]
    assert [b.get_height() for b in prior_bars] == [0.35, 0.3]
    assert "top 2 of 4" in ax.get_title()


# ----------------------------------------------------------------------------
# Command line


def test_tree_main_prints_and_writes_views(tmp_path, capsys):
    html_out, dot_out = tmp_path / "t.html", tmp_path / "t.dot"
    svg_out = tmp_path / "t.svg" if shutil.which("dot") else None
    assert cli.tree_main(str(SMALL), html=html_out, dot=dot_out, svg=svg_out, depth=1) == 0
    out, err = capsys.readouterr()
    assert out.strip() == viz.format_tree(SMALL, depth=1)
    assert html_out.read_text() == viz.to_html([SMALL])
    assert dot_out.read_text() == viz.to_dot(SMALL)
    assert f"wrote {html_out}" in err and "warning" not in err
    if svg_out:
        assert "<svg" in svg_out.read_text()


def test_tree_main_compares_several_trees_in_html(tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert cli.main([str(SMALL), str(PUCT), "--html", str(out)]) == 0
    assert out.read_text() == viz.to_html([SMALL, PUCT])
    printed = capsys.readouterr().out
    assert "policy gumbel" in printed and "policy puct" in printed
    assert cli.tree_main([SMALL, PUCT], svg=tmp_path / "x.svg") == 1
    assert "--svg and --dot take one tree" in capsys.readouterr().err


def test_alphareason_tree_command(tmp_path, capsys, monkeypatch):
    """`alphareason tree` (the project's command) takes several trees, --min-visits and --svg."""
    from alphareason import cli as main_cli

    out = tmp_path / "cmp.html"
    assert main_cli.main(["tree", str(SMALL), str(PUCT), "--html", str(out), "--min-visits", "2",
                          "--top", "2"]) == 0
    assert out.read_text() == viz.to_html([SMALL, PUCT], min_visits=2)
    assert capsys.readouterr().out.strip() == "\n\n".join(
        viz.format_tree(t, top=2) for t in (SMALL, PUCT))
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main_cli.main(["tree", str(SMALL), "--svg", str(tmp_path / "t.svg")]) == 1
    err = capsys.readouterr().err
    assert "Graphviz is not installed: install it with `apt-get install graphviz`" in err
    assert not (tmp_path / "t.svg").exists()


def test_tree_main_missing_file(tmp_path, capsys):
    assert cli.tree_main(tmp_path / "missing.json") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("alphareason tree: error: ") and "missing.json: no such tree file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tree_main_invalid_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    tree = small_tree()
    del tree["root"]["children"][1]["q"]
    bad.write_text(json.dumps(tree))
    assert cli.main([str(bad), "--html", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: node root.children[1] (id 2) field 'q': is missing" in err
    assert "Traceback" not in err and not (tmp_path / "x.html").exists()
    bad.write_text("{not json")
    assert cli.tree_main(bad) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_tree_main_warns_on_inconsistent_visits(tmp_path, capsys):
    path = tmp_path / "t.json"
    tree = small_tree()
    tree["root"]["visits"] = 20
    path.write_text(json.dumps(tree))
    assert cli.tree_main(path) == 0
    assert "warning:" in capsys.readouterr().err


def test_tree_main_without_graphviz_still_writes_html(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    html_out = tmp_path / "t.html"
    assert cli.tree_main(SMALL, html=html_out, svg=tmp_path / "t.svg") == 1
    err = capsys.readouterr().err
    assert "alphareason tree: error: Graphviz is not installed" in err and "Traceback" not in err
    assert html_out.exists() and not (tmp_path / "t.svg").exists()


def test_fixture_is_not_modified_by_views():
    tree = viz.load_tree(SMALL)
    before = copy.deepcopy(tree)
    viz.to_html(tree), viz.to_dot(tree), viz.format_tree(tree), viz.show(tree)
    assert tree == before
    assert dot.GRAPHVIZ_MISSING.startswith("Graphviz is not installed")
    assert tree_io.verdict(node_by_id(tree, 16)) == "invalid"
