"""Executes every notebook in notebooks/ top to bottom, on the tiny setting, and fails on any error.

The kernel is this interpreter (the virtualenv's python, where `pip install
-e .[test]` put alphareason and ipykernel): the test writes its own kernelspec
to a temporary folder, so no `jupyter kernelspec install` is needed and a
user's other "python3" kernels cannot be picked up instead.

Inputs are passed to the notebooks through environment variables, which the
kernel inherits: `ALPHAREASON_NOTEBOOK_FAST=1` (few training steps, few
simulations), a temporary workdir, and for `results.ipynb` a small metrics file
in the training loop's format and a real (micro) output of
`experiments/test_time_scaling.py`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A real scaling.json of experiments/test_time_scaling.py at micro settings (game24 only, 2 x 6
# problems, 2 bins, budgets 1-4 generations; the model of explore_search_tree.ipynb's full setting):
#   python -m experiments.test_time_scaling --config configs/scaling_reduced.py --out runs/scaling_micro \
#     --workdir game24=runs/notebook_game24 "--config.tasks=('game24',)" --config.problems_per_split=6 \
#     --config.difficulty_samples=4 --config.num_bins=2 --config.max_generations=4 \
#     "--config.strategies=('greedy','best_of_n','best_of_n:verifier','beam:M=4','mcts_gumbel:K=4')" \
#     "--config.mcts_generations=(4,)"
SCALING_RESULTS = ROOT / "tests" / "data" / "scaling_small.json"
KERNEL_NAME = "alphareason-test-python"
CELL_TIMEOUT_S = 300


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"explore_search_tree.ipynb", "results.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs; clear them before committing "
                       "(Jupyter: Edit > Clear Outputs of All Cells)")
    assert nb.cells[0].cell_type == "markdown", f"{path.name} should open with a markdown cell saying what it does"


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts an IPython kernel with this very interpreter."""
    pytest.importorskip("ipykernel", reason="ipykernel is not installed: pip install -e '.[test]'")
    spec_dir = tmp_path_factory.mktemp("kernels")
    (spec_dir / KERNEL_NAME).mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "alphareason tests (this interpreter)", "language": "python"}
    (spec_dir / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    return spec_dir


def write_metrics(folder: Path) -> Path:
    """A small self-play run's metrics.jsonl (the records `alphareason.train.loop` writes); returns its workdir."""
    from alphareason.train.metrics import MetricsWriter

    workdir = folder / "run"
    writer = MetricsWriter(workdir, tensorboard=False)
    for step, loss in [(10, 2.1), (20, 1.4), (30, 1.1)]:
        writer.write(step, "sft", {"loss": loss, "policy_loss": loss - 0.3, "value_loss": 0.3,
                                   "token_accuracy": 0.5, "value_accuracy": 0.7, "tokens_per_s": 1e4})
    for it, (greedy, mcts) in enumerate([(0.2, 0.3), (0.25, 0.4), (0.3, 0.45)]):
        if it:
            writer.write(it, "selfplay", {"selfplay_solve_rate": mcts - 0.05, "selfplay_episodes": 8,
                                          "learn_loss": 1.0 / it, "learn_policy_loss": 0.8 / it,
                                          "learn_value_loss": 0.2 / it, "selfplay_seconds": 3.0})
        writer.write(it, "eval", {"greedy_solve_rate": greedy, "mcts_solve_rate": mcts,
                                  "mcts_token_forwards_per_problem": 900.0, "selfplay_token_forwards": 1000 * it,
                                  "learner_examples": 24 * it})
    writer.close()
    return workdir


def execute(path: Path, kernel_spec_dir: Path):
    """Runs the notebook at `path` top to bottom in this interpreter's kernel; returns it with outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[test]'")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    # Like Jupyter, the kernel starts in the notebook's folder.
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    return nb


def outputs(nb, kind: str) -> list[str]:
    """The code cells' outputs of one kind: "stream" text, or a display MIME type's data."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    """The environment the kernel inherits: the tiny setting, temporary folders, the test's JAX cache."""
    monkeypatch.setenv("ALPHAREASON_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("ALPHAREASON_NOTEBOOK_WORKDIR", str(tmp_path / "notebook_run"))
    # Compiled XLA programs are cached across runs, as in the rest of the suite (tests/conftest.py).
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ["ALPHAREASON_TEST_JAX_CACHE_DIR"])
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return monkeypatch


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, notebook_env, kernel_spec_dir):
    notebook_env.setenv("ALPHAREASON_RESULTS_WORKDIR", str(write_metrics(tmp_path / "results")))
    notebook_env.setenv("ALPHAREASON_SCALING_RESULTS", str(SCALING_RESULTS))
    nb = execute(path, kernel_spec_dir)
    if path.name == "explore_search_tree.ipynb":
        # The viewer was shown inline, the comparison page written, the episode stepped through.
        assert any('class="alphareason-tree"' in page for page in outputs(nb, "text/html"))
        assert (tmp_path / "notebook_run" / "trees" / "compare.html").is_file()
        assert "move 1:" in "".join(outputs(nb, "stream"))
    if path.name == "results.ipynb":
        assert len(outputs(nb, "image/png")) == 3  # metrics, self-play, test-time scaling
        text = "".join(outputs(nb, "stream"))
        assert "Skipping" not in text and "compute-optimal strategy per budget" in text


def test_results_notebook_without_inputs_says_what_to_run(tmp_path, notebook_env, kernel_spec_dir):
    notebook_env.setenv("ALPHAREASON_RESULTS_WORKDIR", str(tmp_path / "no_run"))
    notebook_env.setenv("ALPHAREASON_SCALING_RESULTS", str(tmp_path / "no_results.json"))
    nb = execute(ROOT / "notebooks" / "results.ipynb", kernel_spec_dir)
    text = "".join(outputs(nb, "stream"))
    assert "make demo" in text and "alphareason scaling --config configs/scaling_reduced.py" in text
    assert not outputs(nb, "image/png")
