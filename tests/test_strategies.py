"""Test-time strategies: budgets, compute against an independent count, selection, the scaling experiment.

Most tests run on ``EchoTask``, a task made for them: every step is legal,
a chain ends after two steps, and it is solved when its first character is
the problem's digit (its answer, for voting). With it a micro model's chains
run every round (so beam search really reselects) and some chains are
solved. One test runs Countdown with the calculator tool.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphareason import tokenizer as tok
from alphareason.model import ModelConfig
from alphareason.model.testing import perturbed_model
from alphareason.eval import scaling as exp
from alphareason.eval.budget import (TokenCounter, TokenCountingModel, lanes_for_budget, log2_budgets,
                                     simulations_for_budget)
from alphareason.eval.runner import StrategyRunner, _Lanes
from alphareason.eval.select import select_by_value, select_by_verifier, select_by_vote
from alphareason.eval.strategy import StrategyConfig, parse_strategy
from alphareason.search.decode import beam_sources
from alphareason.tasks import Task, Verdict, get_task



class EchoTask(Task):
    """Two free steps; solved when the chain's first character is the problem's digit."""

    name = "echo"
    max_steps, max_step_len, max_prompt_len, max_trace_steps = 2, 5, 3, 2
    votable_answer = True

    def generate(self, seed, n, *, difficulty=None, exclude=()):
        return [{"digit": (seed + 3 * i) % 10} for i in range(n)]

    def difficulty(self, problem):
        return 0

    def validate_problem(self, obj, *, where="problem"):
        return {"digit": int(obj["digit"])}

    def prompt(self, problem):
        return f"{problem['digit']}\n"

    def solve(self, problem):
        return f"{problem['digit']}\n0\n"

    def search_trace(self, problem, *, max_steps=None):
        return self.solve(problem)

    def verify(self, problem, text):
        answer = text[0] if text else None
        return Verdict(answer == str(problem["digit"]), "first character", 0, answer)

    def init_state(self, problem):
        return {"digit": np.int32(problem["digit"]), "first": np.int32(-1), "steps": np.int32(0)}

    def step(self, state, step_tokens):
        first = jnp.where(state["steps"] == 0, step_tokens[0], state["first"])
        steps = state["steps"] + 1
        done = steps >= self.max_steps
        reward = jnp.where(done & (first == tok.DIGIT0 + state["digit"]), 1.0, 0.0)
        return {"digit": state["digit"], "first": first, "steps": steps}, jnp.bool_(True), done, reward


ECHO = EchoTask()
COUNTER = TokenCounter()
MODEL = perturbed_model(ModelConfig.micro(max_len=16), seed=3, scale=0.3)
PROBLEMS = ECHO.generate(0, 3)  # 3 problems: with max_lanes=8, N=4 needs two calls, the second padded


@pytest.fixture(scope="module")
def runner():
    return StrategyRunner(TokenCountingModel(MODEL, COUNTER), ECHO, max_lanes=8, mcts_batch=2)


def run_counted(runner, config, budget, key=0, problems=PROBLEMS):
    COUNTER.reset()
    result = runner.run(config, problems, budget, jax.random.key(key))
    assert result.token_forwards.sum() + result.idle_token_forwards == COUNTER.needed, config.label
    # What the hardware computed, padding included, as counted by the model wrapper.
    assert result.computed_token_forwards.sum() + result.idle_computed_token_forwards == COUNTER.computed, config.label
    assert (result.computed_token_forwards >= result.token_forwards).all(), config.label
    assert (result.token_forwards <= budget).all(), config.label
    return result


# ------------------------------------------------------------- pure pieces
def test_selection_rules_on_constructed_examples():
    values = np.array([[0.1, 0.9, 0.5, 0.8], [0.3, 0.2, 0.1, 0.0]])
    cand = np.array([[True, False, True, True], [False, False, False, False]])
    np.testing.assert_array_equal(select_by_value(values, cand), [3, 0])  # lane 1 is no candidate; no candidate -> 0
    solved = np.array([[False, True, True, False], [True, False, False, False]])
    np.testing.assert_array_equal(select_by_verifier(solved, cand, values), [2, 0])
    answers = [[7, 5, 5, 7, 5, None], [1, 2, 2, 1, None, 3]]
    cand6 = np.ones((2, 6), bool)
    np.testing.assert_array_equal(select_by_vote(answers, cand6), [1, 0])  # 5 wins 3:2; tie 1:2 -> seen first
    weights = np.array([[0.9, 0.1, 0.1, 0.8, 0.2, 1.0], [0.1, 0.4, 0.5, 0.2, 0.9, 0.3]])
    # weighted: 7 has 1.7 > 5 has 0.4 -> its best chain (lane 0); row 2: 2 has 0.9 > 1 has 0.3, 3 has 0.3
    np.testing.assert_array_equal(select_by_vote(answers, cand6, weights), [0, 2])
    cand6[0, 0] = cand6[0, 3] = False  # non-candidates do not vote
    np.testing.assert_array_equal(select_by_vote(answers, cand6, weights), [4, 2])
    assert select_by_vote([[None, None]], np.ones((1, 2), bool)).tolist() == [0]


def test_beam_sources_keep_finished_and_copy_the_best():
    value = jnp.array([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2]])
    expandable = jnp.array([[True, True, True, True, False, True]])
    frozen = jnp.array([[False, False, False, False, True, False]])
    src, filled = beam_sources(value, expandable, frozen, 2)
    # free slots 0,1,2,3,5 get beams (best first: lanes 1, 3, 2) two copies each; slot 4 is frozen
    assert src.tolist() == [[1, 1, 3, 3, 4, 2]]
    assert filled.tolist() == [[True] * 6]
    src, filled = beam_sources(value, jnp.array([[False, True, False, False, False, False]]), frozen, 2)
    assert src[0, :2].tolist() == [1, 1] and filled.tolist() == [[True, True, False, False, True, False]]


def test_budget_sizing():
    assert lanes_for_budget(100, prompt_cost=10, chain_cost=30) == 3
    assert lanes_for_budget(39, prompt_cost=10, chain_cost=30) == 0
    assert simulations_for_budget(1200, moves=2, expansion_cost=100) == 5
    assert simulations_for_budget(399, moves=2, expansion_cost=100) == 0
    assert log2_budgets(8) == [1, 2, 4, 8]
    r = StrategyRunner(MODEL, ECHO)
    one = r.budget_for(1)
    assert one == ECHO.max_prompt_len + ECHO.max_steps * ECHO.max_step_len
    for name in ("greedy", "sample", "best_of_n", "weighted_vote", "majority_vote", "beam"):
        assert r.size_for(StrategyConfig(name), one)[0] == 1, name
    assert r.size_for(StrategyConfig("beam", beam_width=4), r.budget_for(8)) == (8, 4)
    assert r.size_for(StrategyConfig("beam", beam_width=4), r.budget_for(2)) == (2, 2)
    assert r.size_for(StrategyConfig("mcts_gumbel"), one)[0] == 0  # too small for a search
    assert parse_strategy("beam:M=8,t=1.0") == StrategyConfig("beam", beam_width=8, temperature=1.0)
    assert parse_strategy("best_of_n", temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="setting"):
        parse_strategy("beam:X=3")


def test_verifier_selection_only_when_named():
    assert StrategyConfig("best_of_n").label == "best_of_n(t=0.7)"
    assert StrategyConfig("best_of_n", verifier=True).label == "best_of_n(t=0.7)+verifier"
    assert not parse_strategy("beam:M=4").verifier and parse_strategy("beam:M=4,verifier").verifier
    for name in ("greedy", "sample", "majority_vote", "weighted_vote"):
        with pytest.raises(ValueError, match="no verifier option"):
            StrategyConfig(name, verifier=True)
    r = StrategyRunner(MODEL, ECHO)
    assert r._searcher(StrategyConfig("mcts_gumbel"), 1).env.config.terminal_reward == "value"
    assert r._searcher(StrategyConfig("mcts_gumbel", verifier=True), 1).env.config.terminal_reward == "verifier"
    # learned selection never reads the verifier's verdicts; the oracle option does
    B, N, T = len(PROBLEMS), 3, 16
    tokens = np.full((B, N, T), tok.PAD, np.int32)
    for b, p in enumerate(PROBLEMS):
        for j in range(N):
            ids = tok.encode(ECHO.prompt(p) + f"{(p['digit'] + j) % 10}\n0\n", bos=True)
            tokens[b, j, :len(ids)] = ids
    lanes = dict(tokens=tokens, length=(tokens != tok.PAD).sum(-1), candidate=np.ones((B, N), bool),
                 value=np.tile([0.2, 0.1, 0.9], (B, 1)), spent=np.full((B,), 12), lane_forwards=np.full((B, N), 4),
                 prompt=np.full((B,), 3), cut=np.zeros((B, N), bool), lane_computed=np.full((B, N), 8),
                 prompt_computed=np.full((B,), 16))
    for solved in (np.eye(N, dtype=bool)[[0, 0, 0]], np.eye(N, dtype=bool)[[1, 1, 1]]):
        learned = r._select(StrategyConfig("best_of_n"), PROBLEMS, _Lanes(solved=solved, **lanes), N, 100, 0)
        oracle = r._select(StrategyConfig("best_of_n", verifier=True), PROBLEMS, _Lanes(solved=solved, **lanes),
                           N, 100, 0)
        assert [t[0] for t in learned.texts] == [str((p["digit"] + 2) % 10) for p in PROBLEMS]
        assert [t[0] for t in oracle.texts] == [str((p["digit"] + int(np.argmax(solved[0]))) % 10) for p in PROBLEMS]


def test_voting_needs_an_answer_the_problem_does_not_state():
    countdown = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30)
    r = StrategyRunner(perturbed_model(ModelConfig.micro(max_len=40)), countdown)
    with pytest.raises(ValueError, match="verifier selection"):
        r.run(StrategyConfig("majority_vote"), countdown.generate(0, 1), 1000, jax.random.key(0))


# ------------------------------------------------------- runs of the model
def test_one_generation_is_one_chain(runner):
    one = runner.budget_for(1)
    greedy = run_counted(runner, StrategyConfig("greedy"), one)
    assert run_counted(runner, StrategyConfig("beam", temperature=0.0), one).texts == greedy.texts
    single = run_counted(runner, StrategyConfig("sample"), one)
    assert (single.token_forwards <= one).all() and single.size == 1
    for name in ("best_of_n", "weighted_vote", "majority_vote", "beam"):
        r = run_counted(runner, StrategyConfig(name), one)
        assert r.texts == single.texts, name
        np.testing.assert_array_equal(r.token_forwards, single.token_forwards)
    assert greedy.texts != single.texts  # the sampled chain really is sampled


def test_one_beam_is_greedy_and_width_one_is_best_of_n(runner):
    budget = runner.budget_for(4)
    N = runner.size_for(StrategyConfig("best_of_n"), budget)[0]
    assert N == 4 and runner.size_for(StrategyConfig("beam", beam_width=4), budget) == (4, 4)
    greedy = run_counted(runner, StrategyConfig("greedy"), budget)
    one_beam = run_counted(runner, StrategyConfig("beam", beam_width=4, temperature=0.0), budget)
    assert one_beam.texts == greedy.texts
    bon = run_counted(runner, StrategyConfig("best_of_n"), budget)
    width_one = run_counted(runner, StrategyConfig("beam", beam_width=1), budget)
    assert width_one.texts == bon.texts
    np.testing.assert_array_equal(width_one.token_forwards, bon.token_forwards)


@pytest.mark.parametrize("config", [
    StrategyConfig("best_of_n", verifier=True), StrategyConfig("majority_vote"), StrategyConfig("weighted_vote"),
    StrategyConfig("beam", beam_width=2), StrategyConfig("beam", beam_width=2, verifier=True),
    StrategyConfig("mcts_gumbel", num_candidates=2),
    StrategyConfig("mcts_puct", num_candidates=2, verifier=True)], ids=lambda c: c.label)
def test_reported_compute_is_what_the_model_computed(runner, config):
    expansion = runner.generation_cost + config.num_candidates * ECHO.max_step_len
    budget = runner.budget_for(4) if config.family != "mcts" else 3 * ECHO.max_steps * expansion
    result = run_counted(runner, config, budget)  # asserts: reported + idle == counted, <= budget
    assert result.size > 0 and (result.token_forwards > 0).all()
    if config.family == "mcts":
        assert result.size == 2  # simulations per move
    else:
        assert result.idle_token_forwards > 0  # the padded second batch


def test_budget_is_enforced_when_the_estimate_is_too_low(runner):
    budget = runner.budget_for(1)
    runner.cost_estimate = 2.5  # a quarter of a chain's worst cost: 4 lanes where 1 fits, so lanes are cut
    try:
        for config in (StrategyConfig("best_of_n"), StrategyConfig("beam", beam_width=2)):
            result = run_counted(runner, config, budget)
            assert result.size == 4 and (result.token_forwards <= budget).all()
    finally:
        runner.cost_estimate = float(runner.chain_cost)


def test_all_budgets_from_one_set_of_chains(runner):
    configs = [StrategyConfig("greedy"), StrategyConfig("sample"), StrategyConfig("best_of_n"),
               StrategyConfig("majority_vote"), StrategyConfig("best_of_n", verifier=True)]
    budgets = [runner.budget_for(1), runner.budget_for(4)]
    shared = runner.run_budgets(configs, PROBLEMS, budgets, jax.random.key(5))
    for c in configs:
        for b in budgets:
            alone = runner.run(c, PROBLEMS, b, jax.random.key(5))
            assert shared[c.label, b].texts == alone.texts, (c.label, b)
            np.testing.assert_array_equal(shared[c.label, b].token_forwards, alone.token_forwards)
    chains = runner.sample_chains(PROBLEMS, 4, jax.random.key(5))
    oracle = shared[configs[-1].label, budgets[1]]
    np.testing.assert_array_equal(oracle.solved, chains["solved"].any(axis=1))  # verifier selection = pass@N


def test_countdown_with_the_calculator():
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    counter = TokenCounter()
    model = perturbed_model(ModelConfig.micro(max_len=task.max_prompt_len + task.max_steps * task.max_step_len + 1))
    r = StrategyRunner(TokenCountingModel(model, counter), task)
    problems = task.generate(0, 2)
    result = r.run(StrategyConfig("best_of_n", temperature=1.0), problems, r.budget_for(2), jax.random.key(0))
    assert result.token_forwards.sum() + result.idle_token_forwards == counter.needed
    assert result.computed_token_forwards.sum() + result.idle_computed_token_forwards == counter.computed
    assert (result.token_forwards <= r.budget_for(2)).all()


# --------------------------------------------------------------- the study
def test_difficulty_bins_are_equal_size_quantiles():
    p = np.array([0.0, 0.5, 1.0, 0.25, 0.0, 0.0, 0.75, 0.0, 0.1, 0.9])
    bins = exp.difficulty_bins(p, 5)
    assert sorted(np.bincount(bins)[1:].tolist()) == [2] * 5
    assert set(bins[[2, 9]]) == {1} and set(bins[[6, 1]]) == {2}  # highest pass@1 = easiest
    assert (bins[p == 0.0] >= 4).all()


def test_value_auc():
    assert exp.value_auc([0.1, 0.9, 0.8, 0.2], [False, True, True, False]) == 1.0
    assert exp.value_auc([0.5, 0.5, 0.5, 0.5], [False, True, True, False]) == 0.5
    assert exp.value_auc([0.9, 0.1, 0.5], [False, True, False]) == 0.0
    assert exp.value_auc([0.3, 0.4], [True, True]) is None


def test_compute_needed_interpolates_in_log_compute():
    curve = [(10, 0.2), (20, 0.4), (40, 0.3), (80, 0.6)]
    assert exp.compute_needed(curve, 0.1) == 10
    assert exp.compute_needed(curve, 0.3) == pytest.approx(10 * 2 ** 0.5)
    assert exp.compute_needed(curve, 0.4) == 20
    assert exp.compute_needed(curve, 0.5) == pytest.approx(40 * 2 ** 0.5)  # 0.4 held to 40 (monotone)
    assert exp.compute_needed(curve, 0.7) is None


def _point(label, g, acc_sel, acc_rep, spent, verifier=False):
    def s(acc):
        return {"acc": [acc, acc], "spent": [spent, spent], "n": [5, 5]}
    return {"label": label, "generations": g, "verifier": verifier, "select": s(acc_sel), "report": s(acc_rep),
            "both": s((acc_sel + acc_rep) / 2)}


def test_compute_optimal_selects_on_one_split_and_reports_on_the_other():
    points = [_point("bon", 1, 0.2, 0.2, 10), _point("bon", 2, 0.3, 0.3, 20), _point("bon", 4, 0.4, 0.45, 40),
              _point("bon", 8, 0.6, 0.6, 80), _point("beam", 1, 0.2, 0.2, 10), _point("beam", 2, 0.5, 0.4, 20),
              _point("beam", 4, 0.5, 0.6, 40), _point("oracle", 1, 1.0, 1.0, 10, verifier=True)]
    opt = exp.compute_optimal(points, [10, 20, 40, 80], [1, 2, 4, 8], 1, baseline="bon")
    assert len(opt) == 3  # one bin, all with one policy, all with each bin's own choice
    assert [e["acc_report"] for e in opt[2]] == [e["acc_report"] for e in opt[0]]
    at = {e["generations"]: e for e in opt[0]}
    assert at[1]["label"] in ("bon", "beam") and at[1]["efficiency"] == pytest.approx(1.0)
    assert at[2]["label"] == "beam" and at[2]["acc_report"] == 0.4  # chosen on select (0.5), reported 0.4
    assert at[2]["baseline_needs"] == pytest.approx(exp.compute_needed([(10, .2), (20, .3), (40, .45)], 0.4))
    assert at[2]["efficiency"] == pytest.approx(at[2]["baseline_needs"] / 20)
    assert at[4]["label"] == "beam" and at[4]["acc_select"] == 0.5  # tie on select: the cheaper one
    assert at[8]["label"] == "bon" and at[8]["efficiency"] == pytest.approx(1.0)
    assert all(e["label"] != "oracle" for e in opt[0])  # verifier strategies are never chosen


def test_paper_findings_on_synthetic_curves():
    gens = [1, 2, 4, 8, 16, 32]

    def pt(label, g, accs):
        s = {"acc": list(accs) + [float(np.mean(accs))], "spent": [10.0 * g] * 3, "n": [4, 4, 8]}
        return {"label": label, "generations": g, "verifier": False, "select": s, "report": s, "both": s}

    points = []
    for g in gens:
        small = g <= 4
        points.append(pt("bon", g, [0.3 + 0.015 * g, 0.05 + 0.001 * g]))
        points.append(pt("beam", g, [0.4 if small else 0.5, 0.1 + 0.001 * g if small else 0.0]))
    opt = exp.compute_optimal(points, [10 * g for g in gens], gens, 2, baseline="bon")
    f = exp.paper_findings(points, opt, gens, 2, best_of_n="bon", beam="beam")
    assert f["beam_small_budgets"]["holds"] is True
    assert f["hardest_gains_little"]["holds"] is True
    assert f["compute_optimal_efficiency"]["holds"] is True  # beam's early lead: bon needs more compute
    flat = [dict(p, select=zero, report=zero, both=zero) for p in points
            for zero in [{"acc": [0.0] * 3, "spent": p["both"]["spent"], "n": [4, 4, 8]}]]
    f = exp.paper_findings(flat, exp.compute_optimal(flat, [10 * g for g in gens], gens, 2, baseline="bon"),
                           gens, 2, best_of_n="bon", beam="beam")
    assert all(v["holds"] is None for v in f.values())  # nothing solved: nothing to judge
    assert set(f) == set(exp.FINDINGS) and all("finding" in v for v in f.values())


def test_smoke_run_writes_json_markdown_and_plots(runner, tmp_path):
    settings = types.SimpleNamespace(seed=0, num_bins=2, difficulty_samples=4, temperature=0.7,
                                     strategies=("greedy", "sample", "best_of_n", "best_of_n:verifier", "beam:M=2",
                                                 "majority_vote", "mcts_gumbel:K=2"),
                                     max_generations=4, mcts_generations=(), max_lanes=8, mcts_batch=2)
    problems = ECHO.generate(1, 4)
    result, rows = exp.run_task("echo", TokenCountingModel(MODEL, COUNTER), ECHO, problems[:2],
                                problems[2:], settings, log=lambda s: None, source="micro", runner=runner)
    assert result["generations"] == [1, 2, 4] and len(rows) == 4 * len(result["points"])
    assert {p["label"] for p in result["points"]} >= {"greedy", "best_of_n(t=0.7)", "beam(M=2,t=0.7)"}
    assert not any(p["name"] == "mcts_gumbel" for p in result["points"])  # too small a budget for a search
    report = {"command": "pytest", "settings": {"name": "smoke"}, "machine": "test", "seconds": 1.0,
              "tasks": {"echo": result}}
    exp.write_outputs(str(tmp_path), report)
    exp.write_plot(str(tmp_path / "scaling_echo.png"), "echo", result["points"], result["compute_optimal"], 2,
                   result["labels"])
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["tasks"]["echo"]["findings"].keys() == exp.FINDINGS.keys()
    md = (tmp_path / "scaling.md").read_text()
    assert "| best_of_n(t=0.7) |" in md and "Compute-optimal" in md and "findings" in md
    assert (tmp_path / "scaling_echo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_scaling_refuses_bad_settings_clearly(tmp_path, capsys):
    from alphareason.cli import main
    args = ["scaling", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "scaling_reduced.py"),
            "--out", str(tmp_path)]
    assert main(args + ["--config.strategies=('beam:W=3',)"]) == 2
    assert "is not one of t=, p=, M=, K=, verifier" in capsys.readouterr().err
    assert main(args + ["--workdir", "chess=runs/x"]) == 2
    assert "not one of the config's tasks" in capsys.readouterr().err
    assert main(args + ["--workdir", f"game24={tmp_path}"]) == 2
    assert "no trained run" in capsys.readouterr().err
