"""The `alphareason tree` subcommand: print a search tree, write HTML / SVG / DOT views.

    alphareason tree tree.json --html tree.html --svg tree.svg
    alphareason tree gumbel.json puct.json --html compare.html   # side by side

`tree_main` does the work and returns the exit code; `add_arguments` declares
the flags so `alphareason/cli.py` stays thin. Errors a user can cause (missing
or invalid file, Graphviz absent, unwritable output) print one clear line to
stderr and give exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from alphareason.viz import dot as dot_lib
from alphareason.viz import html as html_lib
from alphareason.viz import text, tree_io

__all__ = ["add_arguments", "tree_main", "main"]

PathLike = str | os.PathLike


def _error(message: str) -> int:
    print(f"alphareason tree: error: {message}", file=sys.stderr)
    return 1


def tree_main(path: PathLike | Sequence[PathLike], *, html: PathLike | None = None,
              svg: PathLike | None = None, dot: PathLike | None = None, depth: int = 2,
              top: int = 5, min_visits: int = 0) -> int:
    """Prints the tree(s) as text and writes the requested views.

    Args:
      path: a tree JSON file, or several; several are printed one after the
        other and shown side by side in the HTML page.
      html: where to write the self-contained HTML viewer.
      svg: where to write an SVG (needs Graphviz; one tree only).
      dot: where to write the Graphviz DOT text (one tree only).
      depth: levels below the root to print.
      top: children to print per node.
      min_visits: leave out nodes with fewer visits from the SVG / DOT views;
        the HTML viewer starts with its visit filter at this value.

    Returns:
      The exit code: 0 on success, 1 when a file is missing or invalid or a
      view could not be written.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return _error("no tree file given")
    if len(paths) > 1 and (svg or dot):
        return _error("--svg and --dot take one tree; pass a single file (use --html to compare trees)")
    trees = []
    for p in paths:
        try:
            trees.append(tree_io.load_tree(p))
        except (FileNotFoundError, ValueError) as e:
            return _error(str(e))
        except OSError as e:
            return _error(f"{p}: cannot read: {e.strerror or e}")
    for p, tree in zip(paths, trees):
        for problem in tree_io.visit_invariant_errors(tree):
            print(f"alphareason tree: warning: {p}: {problem}", file=sys.stderr)
    print("\n\n".join(text.format_tree(t, depth=depth, top=top) for t in trees))

    status = 0
    writers = [
        (html, lambda out: html_lib.write_html(trees, out, min_visits=min_visits)),
        (dot, lambda out: dot_lib.write_dot(trees[0], out, min_visits=min_visits)),
        (svg, lambda out: dot_lib.write_svg(trees[0], out, min_visits=min_visits)),
    ]
    for out, write in writers:
        if out is None:
            continue
        try:
            write(out)
        except dot_lib.GraphvizNotFoundError as e:
            status = _error(str(e))
        except (OSError, RuntimeError) as e:
            status = _error(f"cannot write {out}: {e}")
        else:
            print(f"wrote {out}", file=sys.stderr)
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the `tree` subcommand's flags on `parser`."""
    parser.add_argument("path", nargs="+", help="search tree JSON file(s) (alphareason.tree/1)")
    parser.add_argument("--html", help="write the interactive HTML viewer here")
    parser.add_argument("--svg", help="write an SVG here (needs Graphviz)")
    parser.add_argument("--dot", help="write Graphviz DOT text here")
    parser.add_argument("--depth", type=int, default=2, help="levels below the root to print")
    parser.add_argument("--top", type=int, default=5, help="children to print per node")
    parser.add_argument("--min-visits", type=int, default=0,
                        help="leave out nodes with fewer visits from the SVG / DOT views; "
                             "the HTML viewer's visit filter starts at this value")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `alphareason tree` from command-line arguments."""
    parser = argparse.ArgumentParser(prog="alphareason tree", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return tree_main(args.path, html=args.html, svg=args.svg, dot=args.dot, depth=args.depth,
                     top=args.top, min_visits=args.min_visits)


if __name__ == "__main__":
    sys.exit(main())
