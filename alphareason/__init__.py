"""alphareason: search over reasoning steps (mctx) distilled into a small JAX transformer.

  import alphareason
  run = alphareason.load_run("runs/demo")          # a trained run directory
  tree = run.search("4 9 13 -> 23", simulations=64)  # the first move's search tree
  alphareason.viz.show(tree)                        # in Jupyter
  rows = run.evaluate(run.problems("test")[:100], strategy="mcts")
"""


def load_run(workdir: str, overrides=()):
    """A trained run, ready to search and evaluate (``alphareason.run.Run``)."""
    from alphareason.run import load_run as _load_run
    return _load_run(workdir, overrides)


def __getattr__(name):  # ``alphareason.viz`` without importing JAX for every ``import alphareason``
    if name == "viz":
        import importlib
        return importlib.import_module("alphareason.viz")
    raise AttributeError(f"module 'alphareason' has no attribute {name!r}")
