"""The `alphareason` command, called in-process: eval, verify, data build, and clear errors for bad input.

A micro model is trained once for the module; every test calls
``alphareason.cli.main([...])`` and checks the exit status, what it prints
and the files it writes.
"""

import glob
import json
import os
import shutil

import pytest
import tensorflow_datasets as tfds

from alphareason.cli import main
from alphareason.data import load_records
from alphareason.data.builder import ReasoningDataset
from alphareason.run import make_task
from alphareason.train.sft import train_sft
from helpers import micro_config

COUNTDOWN3 = ["--option", "num_numbers=3", "--option", "max_number=10", "--option", "min_target=10",
              "--option", "max_target=30"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained micro run (countdown, 3 numbers from 1-10, targets 10-30)."""
    workdir = tmp_path_factory.mktemp("run")
    config = micro_config()
    config.train.steps = 30
    config.train.checkpoint_every = 30
    train_sft(config, str(workdir), progress=False, log=lambda s: None)
    return {"workdir": str(workdir), "config": config, "task": make_task(config)}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _key(problem):
    return tuple(sorted(problem["numbers"])), problem["target"]


def _error_line(capsys, argv):
    """Runs argv expecting exit status 2; returns the one error line on stderr."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alphareason ")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------ eval
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_eval_problem_file_prints_table_and_writes_one_verified_line_per_problem(run, tmp_path, capsys, strategy):
    task = run["task"]
    problems = task.generate(7, 5)
    problems_file = _write(tmp_path / "problems.jsonl", problems)
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--workdir", run["workdir"], "--problems", problems_file, "--strategy", strategy,
                 "--samples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "difficulty" in line)
    for column in ("solved", "rate", "steps", "tok fwd/prob"):
        assert column in header
    difficulties = {task.difficulty(p) for p in problems}
    table_rows = [line.split() for line in printed.splitlines() if line.split() and line.split()[0] in
                  {str(d) for d in difficulties} | {"all"}]
    assert {r[0] for r in table_rows} == {str(d) for d in difficulties} | {"all"}
    assert [r for r in table_rows if r[0] == "all"][0][1] == "5"  # problems counted
    rows = _read_jsonl(out)
    assert [r["problem"] for r in rows] == problems
    for r in rows:
        assert set(r) >= {"problem", "solution", "solved", "token_forwards"}
        assert r["solved"] == task.verify(r["problem"], r["solution"]).solved
        assert r["token_forwards"] > 0 and r["strategy"] == strategy
    if strategy == "sample":  # two chains of thought per problem cost more than their prompts
        assert all(r["samples"] == 2 for r in rows)
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["num_problems"] == 5
    assert summary["mean_token_forwards"] == pytest.approx(sum(r["token_forwards"] for r in rows) / 5)


def test_eval_without_problems_uses_the_heldout_split(run, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--workdir", run["workdir"], "--strategy", "greedy", "--out", str(out)]) == 0
    assert "held-out validation split" in capsys.readouterr().out
    builder_dirs = glob.glob(os.path.join(run["workdir"], "data", "reasoning_dataset", "*", str(ReasoningDataset.VERSION)))
    assert len(builder_dirs) == 1
    heldout = load_records(tfds.builder_from_directory(builder_dirs[0]).as_data_source(split="validation"))
    assert [r["problem"] for r in _read_jsonl(out)] == [r["problem"] for r in heldout]
    assert len(heldout) == run["config"].data.validation_size
    # The results file verifies: nothing claimed solved fails.
    assert main(["verify", "--task", "countdown", *COUNTDOWN3, str(out)]) == 0


# ------------------------------------------------------------------ verify
def test_verify_prints_a_verdict_per_line_and_fails_only_on_lies(tmp_path, capsys):
    problem = {"numbers": [2, 5, 3], "target": 13}
    correct = {"problem": problem, "solution": "2*5=10\n10+3=13\n", "solved": True}
    wrong = {"problem": problem, "solution": "2+5=7\n7+3=10\n", "solved": False}
    unclaimed = {"problem": problem, "solution": "2+5=7\n"}
    lying = {"problem": problem, "solution": "2+5=7\n7*3=13\n", "solved": True}
    honest = _write(tmp_path / "honest.jsonl", [correct, wrong, "", unclaimed])
    assert main(["verify", "--task", "countdown", *COUNTDOWN3, honest]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # three verdicts (the blank line is skipped) and the summary
    assert lines[0].split()[:2] == ["1", "ok"] and lines[1].split()[:2] == ["2", "FAIL"]
    assert lines[2].split()[:2] == ["4", "FAIL"]
    assert "10" in lines[1]  # the reason names what went wrong (it ends at 10, not 13)
    assert lines[3].startswith("3 lines: 1 solved, 2 not solved, 0 claimed solved")

    liar = _write(tmp_path / "liar.jsonl", [correct, lying, wrong])
    assert main(["verify", "--task", "countdown", *COUNTDOWN3, liar]) != 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[:2] == ["2", "LIED"] and "7*3" in lines[1]
    assert "1 claimed solved but failed verification" in lines[-1]


def test_verify_bad_input(tmp_path, capsys):
    problem = {"numbers": [2, 5, 3], "target": 13}
    f = _write(tmp_path / "r.jsonl", [{"problem": problem, "solution": "2*5=10\n10+3=13\n"}, "{nope"])
    assert "line 2" in _error_line(capsys, ["verify", "--task", "countdown", *COUNTDOWN3, f])
    f = _write(tmp_path / "r.jsonl", [{"problem": problem}])
    assert "'solution'" in _error_line(capsys, ["verify", "--task", "countdown", *COUNTDOWN3, f])
    f = _write(tmp_path / "r.jsonl", [{"problem": {"numbers": [2, 5], "target": 13}, "solution": ""}])
    assert "line 1" in _error_line(capsys, ["verify", "--task", "countdown", *COUNTDOWN3, f])
    msg = _error_line(capsys, ["verify", "--task", "count", f])
    assert "unknown task 'count'" in msg and "countdown" in msg
    msg = _error_line(capsys, ["verify", "--task", "countdown", "--option", "num_numberz=3", f])
    assert "num_numberz" in msg and "num_numbers" in msg
    msg = _error_line(capsys, ["verify", "--task", "countdown", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in msg and "no such results file" in msg
    msg = _error_line(capsys, ["verify", "--task", "countdown", str(tmp_path)])
    assert "is a directory" in msg
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    msg = _error_line(capsys, ["verify", "--task", "countdown", empty])
    assert "empty.jsonl holds no results" in msg
    assert "holds no results" in _error_line(capsys, ["verify", "--task", "countdown", os.devnull])


# ------------------------------------------------------------------ data build
def _build(capsys, data_dir, *extra):
    argv = ["data", "build", "--task", "countdown", *COUNTDOWN3, "--size", "40", "--heldout", "6",
            "--data-dir", str(data_dir), *extra]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "validation:" in out
    paths = glob.glob(os.path.join(str(data_dir), "reasoning_dataset", "*", str(ReasoningDataset.VERSION)))
    assert len(paths) == 1
    assert glob.glob(os.path.join(paths[0], "*.array_record*"))
    builder = tfds.builder_from_directory(paths[0])
    return {split: load_records(builder.as_data_source(split=split)) for split in ("train", "validation", "test")}


def test_data_build_is_deterministic_and_honours_the_exclusion_list(tmp_path, capsys):
    first = _build(capsys, tmp_path / "a")
    again = _build(capsys, tmp_path / "b")
    assert first == again
    assert len({_key(r["problem"]) for r in first["train"]}) == 40
    assert len(first["validation"]) == len(first["test"]) == 6

    # Exclude some train problems (one written with its numbers in another order) and a held-out one.
    train_problems = [r["problem"] for r in first["train"] if r["solved"]]
    excluded = train_problems[:10] + [first["validation"][0]["problem"]]
    excluded[0] = {"numbers": list(reversed(excluded[0]["numbers"])), "target": excluded[0]["target"]}
    exclude_file = _write(tmp_path / "exclude.jsonl", excluded)
    built = _build(capsys, tmp_path / "c", "--exclude", exclude_file)
    seen = {_key(r["problem"]) for split in built.values() for r in split}
    assert not seen & {_key(p) for p in excluded}
    assert len({_key(r["problem"]) for r in built["train"]}) == 40  # still the requested size
    assert built == _build(capsys, tmp_path / "d", "--exclude", exclude_file)


def test_data_build_bad_input(tmp_path, capsys):
    bad = _write(tmp_path / "exclude.jsonl", [{"numbers": [2, 5, 3], "target": 13}, {"numbers": [2, 5, 3]}])
    msg = _error_line(capsys, ["data", "build", "--task", "countdown", *COUNTDOWN3, "--size", "5",
                               "--exclude", bad, "--data-dir", str(tmp_path / "d")])
    assert "line 2" in msg and '"target"' in msg
    msg = _error_line(capsys, ["data", "build", "--task", "countdown", "--option", "num_numberz=3", "--size", "5",
                               "--data-dir", str(tmp_path / "d")])
    assert "num_numberz" in msg and "num_numbers" in msg
    msg = _error_line(capsys, ["data", "build", "--task", "countdown", *COUNTDOWN3, "--size", "-5",
                               "--data-dir", str(tmp_path / "d")])
    assert "-5" in msg
    assert not glob.glob(os.path.join(str(tmp_path / "d"), "reasoning_dataset", "*", str(ReasoningDataset.VERSION)))


# ------------------------------------------------------------------ bad problem files, configs, workdirs
@pytest.mark.parametrize("lines, where, words", [
    ([{"numbers": [2, 5, 3], "target": 13}, {"numbers": [2, 5, 3]}], "line 2", ['missing field "target"']),
    ([{"numbers": [2, 5, "3"], "target": 13}], "line 1", ["not an integer"]),
    ([{"numbers": [2, 5, 3], "target": 13.5}], "line 1", ["not an integer"]),
    ([{"numbers": [2, 5], "target": 13}], "line 1", ["has 2 numbers", "give exactly 3"]),
    (["", {"numbers": [2, 5, 3], "target": 13}, {"numbers": [1, 1, 1], "target": 29}], "line 3",
     ["cannot reach 29"]),
    ([{"numbers": [2, 5, 30], "target": 13}], "line 1", ["out of range", "1..10"]),
    ([{"numbers": [2, 5, 3], "target": 99}], "line 1", ["out of range", "10..30"]),
    (["[2, 5, 3]"], "line 1", ["expected a JSON object"]),
    (["not json"], "line 1", ["invalid JSON"]),
])
def test_eval_bad_problem_file_names_the_line_and_the_fix(run, tmp_path, capsys, lines, where, words):
    problems = _write(tmp_path / "problems.jsonl", lines)
    msg = _error_line(capsys, ["eval", "--workdir", run["workdir"], "--problems", problems])
    assert f"problems.jsonl {where}:" in msg
    for word in words:
        assert word in msg


def test_unknown_config_keys_list_the_valid_ones(run, tmp_path, capsys):
    msg = _error_line(capsys, ["eval", "--workdir", run["workdir"], "--config.train.stepz=3"])
    assert "'train.stepz'" in msg and "valid keys there:" in msg and "steps" in msg
    msg = _error_line(capsys, ["train", "--config", "configs/countdown_tiny.py", "--workdir",
                               str(tmp_path / "new"), "--config.model.widht=64", "--no-progress"])
    assert "'model.widht'" in msg and "d_model" in msg
    assert not (tmp_path / "new").exists()  # refused before any work
    msg = _error_line(capsys, ["train", "--config", "configs/countdown_tiny.py", "--workdir",
                               str(tmp_path / "new"), "--config.trian.steps=3", "--no-progress"])
    assert "'trian'" in msg and "train" in msg and "model" in msg


def test_missing_workdir_and_checkpoint(run, tmp_path, capsys):
    msg = _error_line(capsys, ["eval", "--workdir", str(tmp_path / "nowhere")])
    assert "nowhere" in msg and "alphareason train" in msg
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(run["workdir"], "config.json"), empty / "config.json")
    msg = _error_line(capsys, ["eval", "--workdir", str(empty)])
    assert "no checkpoint" in msg and str(empty) in msg and "alphareason train" in msg
    msg = _error_line(capsys, ["eval", "--workdir", run["workdir"], "--phase", "selfplay"])  # an SFT run
    assert "no selfplay checkpoint" in msg and run["workdir"] in msg


def test_bench_value_refuses_a_negative_search_budget_and_a_missing_run(run, tmp_path, capsys):
    out = tmp_path / "value.json"
    msg = _error_line(capsys, ["bench", "value", "--workdir", run["workdir"], "--search-simulations", "-1",
                               "--out", str(out)])
    assert "--search-simulations -1" in msg and ">= 0" in msg
    msg = _error_line(capsys, ["bench", "value", "--out", str(out)])
    assert "--workdir" in msg
    msg = _error_line(capsys, ["bench", "value", "--workdir", run["workdir"], "--phase", "selfplay",
                               "--out", str(out)])  # an SFT run has no self-play checkpoint to measure
    assert "no selfplay checkpoint" in msg and run["workdir"] in msg
    msg = _error_line(capsys, ["bench", "value", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                               "--out", str(out)])
    assert "a.json" in msg and "no such file" in msg
    old = tmp_path / "old.json"  # a result written before the walk states were kept
    old.write_text(json.dumps({"walks": {"all": {"auc_vstar": 0.6}}}))
    msg = _error_line(capsys, ["bench", "value", "--compare", str(old), str(old), "--out", str(out)])
    assert "walk states" in msg and "rerun" in msg
    assert not out.exists()
    states = {"problem": [0, 0, 1, 1, 2, 2], "text": ["a", "b", "c", "d", "e", "f"], "depth": [1, 2, 1, 2, 1, 2],
              "vstar": [1, 0, 0, 1, 1, 0]}
    for name, value in (("a", [0.9, 0.1, 0.2, 0.8, 0.7, 0.3]), ("b", [0.1, 0.9, 0.8, 0.2, 0.3, 0.7])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"walks": {"states": {**states, "value": value}}}))
    assert main(["bench", "value", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())["walks"]
    assert result["all"]["auc"] == [1.0, 0.0] and result["all"]["difference"] == -1.0
    assert set(result) == {"all", "1", "2"} and "b - a -1.000" in capsys.readouterr().out


def test_corrupt_checkpoint_says_which_and_where(run, tmp_path, capsys):
    workdir = tmp_path / "corrupt"
    shutil.copytree(run["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "sft" / "30"
    assert step_dir.is_dir()
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    msg = _error_line(capsys, ["eval", "--workdir", str(workdir)])
    assert "cannot be read" in msg and str(step_dir) in msg and "delete" in msg


def test_value_ceiling_fits_exact_labels_on_bench_values_held_out_states(run, tmp_path):
    """experiments/value_ceiling.py measures on the walk states of `bench value` (same problems and key: the same
    AUC before any step) and fits its training states' exact labels."""
    from alphareason.bench.value_bench import run_value_bench
    from experiments.value_ceiling import main as value_ceiling
    bench = run_value_bench(str(tmp_path / "bench.json"), workdir=run["workdir"], problems=8, chains=1, mc_samples=1)
    out = tmp_path / "ceiling.json"
    assert value_ceiling(["--workdir", run["workdir"], "--out", str(out), "--train-problems", "20",
                          "--heldout-problems", "8", "--steps", "8", "--eval-every", "4", "--lr-full", "3e-3"]) == 0
    result = json.loads(out.read_text())
    assert result["heldout_states"] == bench["walks"]["all"]["states"]
    for name in ("head", "full"):
        curve = result["fits"][name]["curve"]
        assert [row["step"] for row in curve] == [0, 4, 8]
        assert curve[0]["heldout"]["all"] == pytest.approx(bench["walks"]["all"]["auc_vstar"])
    full = result["fits"]["full"]["curve"]
    assert full[-1]["train_auc"] > full[0]["train_auc"] and full[-1]["train_loss"] < full[1]["train_loss"]
