"""Value diagnostics, the statistics of comparisons, value labels, and a self-play study end to end."""

import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest

from alphareason.config import ConfigError
from alphareason.data.loader import encode_example, state_labels
from alphareason.eval.stats import binomial_two_sided, mcnemar, mean_interval, solve_rate_interval
from alphareason.eval.value import auc, bootstrap_auc, calibration, chain_states
from alphareason.tasks import get_task

TASK = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")


# ------------------------------------------------------------------ statistics
def test_auc_counts_ordered_pairs_and_ties_and_weights():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert auc(np.array([1.0, 2.0]), np.array([1, 1])) is None
    # a success rate counts as that much positive and the rest negative: the pairs (0.9 vs 0.2) weigh 0.5 * 0.5
    got = auc(np.array([0.2, 0.9]), np.array([0.5, 1.0]))
    pos, neg = np.array([0.5, 1.0]), np.array([0.5, 0.0])
    want = (pos[1] * neg[0] * 1.0 + pos[0] * neg[0] * 0.5) / (pos.sum() * neg.sum())
    assert got == pytest.approx(want)


def test_bootstrap_auc_resamples_whole_problems_and_pairs_the_scorers():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(100), 3)  # 100 problems, 3 states each
    labels = (rng.random(300) < 0.5).astype(float)
    good = labels + rng.normal(0, 0.8, 300)  # informative
    noise = rng.normal(0, 1, 300)
    out = bootstrap_auc([noise, good], labels, clusters, resamples=500, seed=1)
    assert out["auc"] == [auc(noise, labels), auc(good, labels)] and out["resamples"] == 500
    for a, (lo, hi) in zip(out["auc"], out["interval"]):
        assert lo < a < hi
    assert out["difference"] == pytest.approx(out["auc"][1] - out["auc"][0])
    assert out["difference_interval"][0] > 0 and out["p_value"] < 0.01
    assert bootstrap_auc([noise, good], labels, clusters, resamples=500, seed=1) == out  # seeded
    same = bootstrap_auc([good, good], labels, clusters, resamples=200)
    assert out["p_value"] >= 2 / 501  # add-one: never 0
    assert same["difference"] == 0 and same["difference_interval"] == [0, 0] and same["p_value"] == 1.0
    # Every state duplicated within its problem: the same problems are drawn and each AUC is unchanged, so the
    # intervals are too (a bootstrap over states would narrow them as if there were twice the evidence).
    twice = bootstrap_auc([np.repeat(noise, 2), np.repeat(good, 2)], np.repeat(labels, 2), np.repeat(clusters, 2),
                          resamples=500, seed=1)
    np.testing.assert_allclose(twice["interval"], out["interval"])
    np.testing.assert_allclose(twice["difference_interval"], out["difference_interval"])
    assert bootstrap_auc([good], np.ones(300), clusters) is None  # one class: no AUC


def test_calibration_brier_and_ece():
    out = calibration(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0.0, 0.0, 1.0, 0.0]))
    assert out["brier"] == pytest.approx((0.05 ** 2 * 2 + 0.05 ** 2 + 0.95 ** 2) / 4)
    assert out["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * abs(0.95 - 0.5))


def test_mean_interval_uses_students_t():
    out = mean_interval([0.10, 0.14, 0.18])
    half = 4.303 * np.std([0.10, 0.14, 0.18], ddof=1) / math.sqrt(3)
    assert out["mean"] == pytest.approx(0.14) and out["high"] - out["mean"] == pytest.approx(half)
    assert mean_interval([0.3])["low"] == 0.3


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 0], bool)
    out = mcnemar(a, b)
    assert (out["a_only"], out["b_only"]) == (5, 1)
    assert out["p_value"] == pytest.approx(2 * (1 + 6) / 64)
    assert binomial_two_sided(3, 6) == 1.0
    lo, hi = solve_rate_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.1924, abs=1e-3)


# ------------------------------------------------------------------ value labels
def test_oracle_labels_are_exact_solvability_of_each_state():
    problem = {"numbers": [2, 5, 3], "target": 13}  # 2*5=10, 10+3=13
    good = "2*5=10\n10+3=13\n"
    assert state_labels(TASK, problem, good, True, "oracle") == [1.0, 1.0, 1.0]
    bad = "2+5=7\n7+3=10\n"  # 7 and 3 cannot make 13: the first step already lost it
    assert [TASK.solvable_after(problem, t) for t in ("", "2+5=7\n", bad)] == [True, False, False]
    assert state_labels(TASK, problem, bad, False, "oracle") == [1.0, 0.0, 0.0]
    assert state_labels(TASK, problem, bad, False, "chain") == [0.0, 0.0, 0.0]
    ex = encode_example(TASK, TASK.prompt(problem), bad, False, 41, value_labels=[1.0, 0.0, 0.0])
    positions = np.nonzero(ex["value_mask"])[0]
    np.testing.assert_array_equal(ex["value_target"][positions], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="3 value labels for 2 states"):
        encode_example(TASK, TASK.prompt(problem), "2+5=7\n", False, 41, value_labels=[1.0, 0.0, 0.0])


def test_oracle_labels_are_refused_without_a_solver(tmp_path):
    from alphareason.train.sft import check_value_label
    from helpers import micro_config
    config = micro_config()
    config.data.value_label = "oracle"
    task = TASK

    class NoSolver(type(TASK)):
        def solvable_after(self, problem, text):
            return None

    with pytest.raises(ConfigError, match="has none for partial chains"):
        check_value_label(config, NoSolver(num_numbers=3, max_number=10, min_target=10, max_target=30))
    check_value_label(config, task)
    config.data.value_label = "vstar"
    with pytest.raises(ConfigError, match="choose one of chain, oracle"):
        check_value_label(config, task)


def test_chain_states_are_the_prompt_and_every_valid_step():
    problem = {"numbers": [2, 5, 3], "target": 13}
    assert chain_states(TASK, problem, "2+5=7\n9*9=81\n") == [("", 0), ("2+5=7\n", 1)]
    assert [d for _, d in chain_states(TASK, problem, "2*5=10\n10+3=13\n")] == [0, 1, 2]


# ------------------------------------------------------------------ value report
def test_value_report_labels_every_live_state_exactly():
    import jax
    from alphareason.eval.value import compare_walk_values, flat_metrics, value_report
    from alphareason.model import ModelConfig
    from alphareason.model.testing import perturbed_model
    model = perturbed_model(ModelConfig.micro(max_len=TASK.context_len()), seed=3)
    problems = TASK.generate(0, 6)
    report = value_report(model, TASK, problems, jax.random.key(0), chains=2, mc_samples=3, batch_size=8)
    total = sum(r["states"] for r in report["depths"].values())
    assert report["all"]["states"] == total and report["depths"][0]["states"] == len(problems)
    assert report["depths"][0]["solvable"] == 1.0  # generated problems are solvable
    for row in report["depths"].values():
        assert 0.0 <= row["mean_mc"] <= 1.0 and 0.0 <= row["mean_value"] <= 1.0
    walks = report["walks"]
    assert walks["walks_per_problem"] == 4 and walks["all"]["states"] == sum(
        r["states"] for r in walks["depths"].values())
    assert set(walks["depths"]) == {1}  # Countdown-3: one live state past the prompt on every walk
    states = walks["states"]
    assert len(states["text"]) == walks["all"]["states"] and set(states["depth"]) == {1}
    assert auc(np.array(states["value"]), np.array(states["vstar"])) == pytest.approx(walks["all"]["auc_vstar"])
    for i, text, star in zip(states["problem"], states["text"], states["vstar"]):
        assert float(TASK.solvable_after(problems[i], text)) == star
    # The walk states depend on the problems and the key, not the model: two models compare state by state.
    other = value_report(perturbed_model(ModelConfig.micro(max_len=TASK.context_len()), seed=4), TASK, problems,
                         jax.random.key(0), chains=1, mc_samples=1, batch_size=8)
    assert other["walks"]["states"]["text"] == states["text"] and other["walks"]["states"]["value"] != states["value"]
    paired = compare_walk_values(report, other, resamples=200)
    assert paired["all"]["difference"] == pytest.approx(other["walks"]["all"]["auc_vstar"]
                                                        - walks["all"]["auc_vstar"])
    assert compare_walk_values(report, report, resamples=50)["all"]["p_value"] == 1.0
    assert report["prompt"]["policy"] == "greedy" and auc(np.array(report["prompt"]["value"]), np.array(
        report["prompt"]["solved"])) == report["prompt_auc_greedy"] == report["prompt_auc_policy"]
    # the prompt's AUC against another policy's outcomes (greedy over the legal steps, for enumerated searches)
    fewer = value_report(model, TASK, problems[:3], jax.random.key(0), chains=1, mc_samples=1, batch_size=8,
                         policy_solved=np.array([True, False, False]), policy="greedy over the legal steps")
    assert fewer["prompt"]["solved"] == [1.0, 0.0, 0.0] and fewer["prompt"]["policy"].endswith("legal steps")
    assert fewer["prompt_auc_policy"] == auc(np.array(fewer["prompt"]["value"]), np.array([1.0, 0.0, 0.0]))
    assert "value_prompt_auc_policy" in flat_metrics(fewer) and "value_prompt_auc_policy" not in flat_metrics(report)
    with pytest.raises(ValueError, match="one outcome per problem"):
        value_report(model, TASK, problems[:3], jax.random.key(0), policy_solved=np.ones(4))
    with pytest.raises(ValueError, match="different walk states"):
        compare_walk_values(report, fewer)


def test_walk_states_are_the_live_legal_states_labelled_exactly():
    from alphareason.eval.value import summarize_vstar, walk_states
    problems = TASK.generate(0, 8)
    index, texts, depths = walk_states(TASK, problems, np.random.default_rng(0), 6)
    again = walk_states(TASK, problems, np.random.default_rng(0), 6)
    assert (index, texts, depths) == again and len(set(zip(index, texts))) == len(texts)  # seeded, distinct
    labels = []
    for i, text, d in zip(index, texts, depths):
        verdict = TASK.verify(problems[i], text)
        assert verdict.num_valid_steps == d == len(text.splitlines()) and not verdict.solved
        labels.append(float(TASK.solvable_after(problems[i], text)))
    labels = np.array(labels)
    assert 0 < labels.sum() < len(labels)  # both classes: the AUC is defined
    out = summarize_vstar(labels * 0.5 + 0.25, labels)  # a value that ranks by V* exactly
    assert out["auc_vstar"] == 1.0 and out["solvable_states"] == labels.sum() and out["states"] == len(labels)
    assert summarize_vstar(1.0 - labels, labels)["auc_vstar"] == 0.0
    assert walk_states(get_task("arithmetic"), get_task("arithmetic").generate(0, 2),
                       np.random.default_rng(0), 3) == ([], [], [])


def test_search_against_a_constant_value_changes_only_the_value():
    import jax
    import jax.numpy as jnp
    from alphareason.eval.value import constant_value, search_with_and_without_value
    from alphareason.model import ModelConfig
    from alphareason.model.testing import perturbed_model
    from alphareason.search import EnvConfig, SearchConfig
    model = perturbed_model(ModelConfig.micro(max_len=TASK.context_len()), seed=3)
    flat = constant_value(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 20, (2, 12)), jnp.int32)
    logits, values = model(tokens)
    flat_logits, flat_values = flat(tokens)
    np.testing.assert_array_equal(np.asarray(flat_logits), np.asarray(logits))
    assert np.all(np.asarray(flat_values) == 0.0) and np.std(np.asarray(values)) > 0  # the original is untouched
    kw = dict(env=EnvConfig(num_candidates=4), search=SearchConfig(num_simulations=8, max_num_considered_actions=4),
              batch_size=4)
    problems = TASK.generate(3, 8)
    out = search_with_and_without_value(model, TASK, problems, jax.random.key(0), **kw)
    paired = out["paired"]
    assert paired["n"] == 8 and out["difference"] == (paired["b_only"] - paired["a_only"]) / 8
    # a network whose value is already constant: the same searches (same keys), so no difference at all
    same = search_with_and_without_value(flat, TASK, problems, jax.random.key(0), **kw)
    assert same["learned"] == same["constant"] and same["paired"]["a_only"] == same["paired"]["b_only"] == 0


# ------------------------------------------------------------------ a study, end to end
def test_study_runs_matches_compute_and_reports_paired_tests(tmp_path):
    import configs_for_tests
    from alphareason.train import study
    config_path = configs_for_tests.write_micro(tmp_path)
    results, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    kw = dict(runs=runs, results=results, test_problems=8, progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="run alphazero for this seed first"):
        study.run_one(config_path, [], "sft_only", 0, **kw)
    for algorithm in ("alphazero", "sft_only"):  # one seed here; aggregation over seeds: the report test below
        study.run_one(config_path, [], algorithm, 0, **kw)
    out = study.report(results, title="micro")
    assert set(out["algorithms"]) == {"alphazero", "sft_only"}
    assert out["different_starts"] == [] and "Not one start" not in study.markdown(out)  # one SFT start
    for name, a in out["algorithms"].items():
        assert a["seeds"] == [0] and [i["iteration"] for i in a["iterations"]] == [0, 1]
    az, sft = out["algorithms"]["alphazero"]["iterations"][-1], out["algorithms"]["sft_only"]["iterations"][-1]
    # matched compute: within one of sft_only's learner steps of alphazero's total
    step = study.learner_step_cost(study.algorithm_config(config_path, [], "sft_only", 0), TASK)
    assert abs(sft["total_token_forwards"] - az["total_token_forwards"]) <= step
    assert out["paired"]["sft_only"]["n"] == 8  # 8 test problems
    for f in ("study.json", "study.md", "study.png"):
        assert os.path.exists(os.path.join(results, f))
    files = sorted(os.listdir(os.path.join(results, "alphazero", "seed0")))
    assert files == ["metrics.jsonl", "run.json", "test_greedy_0.jsonl", "test_greedy_1.jsonl",
                     "validation_greedy_0.jsonl", "validation_greedy_1.jsonl",
                     "validation_mcts_0.jsonl", "validation_mcts_1.jsonl"]
    code = json.load(open(os.path.join(results, "alphazero", "seed0", "run.json")))["code"]
    assert len(code["commit"]) == 40 and isinstance(code["dirty"], bool)  # the test runs in a git checkout
    # the validation results, per problem, agree with the eval record's rates; the search at the last
    # iteration is paired with the start's on the same problems
    evals = {r["step"]: r for r in map(json.loads, open(os.path.join(results, "alphazero", "seed0", "metrics.jsonl")))
             if r["phase"] == "eval"}
    for it in (0, 1):
        for name in ("greedy", "mcts"):
            rows = [json.loads(x) for x in open(os.path.join(results, "alphazero", "seed0",
                                                             f"validation_{name}_{it}.jsonl"))]
            assert np.mean([r["solved"] for r in rows]) == pytest.approx(evals[it][f"{name}_solve_rate"])
    start = [json.loads(x)["solved"] for x in open(os.path.join(results, "alphazero", "seed0", "validation_mcts_0.jsonl"))]
    last = [json.loads(x)["solved"] for x in open(os.path.join(results, "alphazero", "seed0", "validation_mcts_1.jsonl"))]
    s = out["algorithms"]["alphazero"]["search_against_start"]
    assert (s["start"], s["last"], s["iterations"]) == (np.mean(start), np.mean(last), [1])
    assert s["a_only"] == sum(a and not b for a, b in zip(start, last))
    assert s["b_only"] == sum(b and not a for a, b in zip(start, last))
    assert [x["validation_mcts"]["mean"] for x in out["algorithms"]["alphazero"]["iterations"]] == \
        [evals[0]["mcts_solve_rate"], evals[1]["mcts_solve_rate"]]
    evals = [json.loads(x) for x in open(os.path.join(results, "alphazero", "seed0", "metrics.jsonl"))]
    evals = [r for r in evals if r["phase"] == "eval"]
    for key in ("value_auc_mc", "value_brier_mc", "value_auc_vstar_depth0", "value_auc_vstar_walks",
                "policy_legal_mass"):
        assert all(key in r for r in evals), key  # value diagnostics in every iteration's record
    rows = [json.loads(x) for x in open(os.path.join(results, "alphazero", "seed0", "test_greedy_1.jsonl"))]
    assert len(rows) == 8 and all(TASK.verify(r["problem"], r["solution"]).solved == r["solved"] for r in rows)
    # the policy over legal steps (experiments/legal_step_policy.py): the start and every algorithm's last
    # checkpoint, next to the study's results; every step it writes is legal, so a chain ends solved or at a dead end
    from experiments.legal_step_policy import main as legal_step_policy
    legal_step_policy(["--runs", runs, "--results", results, "--seeds", "0", "--test-problems", "8"])
    legal = {(a, it): [json.loads(x) for x in open(os.path.join(results, a, "seed0", f"test_legal_greedy_{it}.jsonl"))]
             for a in ("alphazero", "sft_only") for it in (0, 1)}
    assert legal["alphazero", 0] == legal["sft_only", 0]  # one start
    for rows in legal.values():
        assert [r["problem"] for r in rows] == [r["problem"] for r in legal["alphazero", 0]]
        assert all(TASK.verify(r["problem"], r["solution"]).solved == r["solved"] for r in rows)
        assert {study.failure_kind(r["reason"]) for r in rows} <= {"solved", "dead end (valid steps, wrong result)"}
    out = study.report(results, title="micro")
    g = out["algorithms"]["alphazero"]["legal_greedy"]
    assert [x["iteration"] for x in g["iterations"]] == [0, 1] and g["seeds"] == [0]
    assert g["iterations"][1]["rates"] == [np.mean([r["solved"] for r in legal["alphazero", 1]])]
    assert out["paired_legal_greedy"]["sft_only"]["n"] == 8
    assert "The policy over legal steps" in study.markdown(out)


def test_a_variant_whose_selfplay_differs_is_not_matched_by_learner_steps_alone(tmp_path):
    """Matching sets only the learner steps, from the reference's self-play: a variant that spends differently
    in self-play (more problems, more simulations) is refused before any work, with the way out."""
    import configs_for_tests
    from alphareason.train import study
    config_path = configs_for_tests.write_micro(tmp_path)
    reference = tmp_path / "results" / "alphazero" / "seed0"
    reference.mkdir(parents=True)
    (reference / "metrics.jsonl").write_text(json.dumps({"step": 0, "phase": "eval", "total_token_forwards": 0}) + "\n")
    variants = {"wide": ["selfplay.algorithm=alphazero", "selfplay.episodes_per_iteration=64",
                         "search.num_simulations=3"],
                "weights": ["selfplay.algorithm=alphazero", "selfplay.policy_weight=0.5"]}
    with pytest.raises(ConfigError, match=r"wide changes what self-play spends \(search.num_simulations, "
                                          r"selfplay.episodes_per_iteration\).*--unmatched"):
        study.run_one(config_path, [], "wide", 0, runs=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                      variants=variants, test_problems=8, progress=False, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()  # refused before any work
    config = {name: study.algorithm_config(config_path, [], name, 0, variants)
              for name in ("alphazero", "wide", "weights", "expert_iteration")}
    assert study.selfplay_differences(config["weights"], config["alphazero"]) == []  # a learner setting
    assert study.selfplay_differences(config["expert_iteration"], config["alphazero"]) == []  # the same search
    assert study.selfplay_differences(config["wide"], config["alphazero"]) == [
        "search.num_simulations", "selfplay.episodes_per_iteration"]


def test_a_seed_can_start_from_an_earlier_sft_run_with_the_same_training(tmp_path):
    """``--sft-from``: the seed's start is the earlier checkpoint, not retrained; the data difference is recorded."""
    import jax
    from flax import nnx
    from helpers import micro_config
    from alphareason.train import study
    from alphareason.train.sft import train_sft
    quiet = dict(progress=False, log=lambda *_: None)
    earlier = train_sft(micro_config(), str(tmp_path / "earlier"), **quiet)
    config = micro_config()
    config.data.test_size = 12  # the study's larger test split: allowed, and recorded
    sft_dir = study._sft_start(config, str(tmp_path / "runs"), 0, False, lambda *_: None, str(tmp_path / "earlier"))
    with open(os.path.join(sft_dir, study.SFT_FROM)) as f:
        assert json.load(f)["data_differences"] == {"test_size": [8, 12]}
    with open(os.path.join(sft_dir, "metrics.jsonl")) as f:
        assert {json.loads(x)["phase"] for x in f} == {"sft"}  # the earlier run's SFT curve, not its evaluations
    adopted = train_sft(config, sft_dir, **quiet)  # resumes at the copied last step: nothing left to train
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(earlier.model, nnx.Param),
                        nnx.state(adopted.model, nnx.Param))
    assert all(jax.tree.leaves(same))
    other = micro_config()
    other.model.d_model = 16
    with pytest.raises(ConfigError, match="its model config differs"):
        study.adopt_sft(other, str(tmp_path / "earlier"), str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="no SFT run there"):
        study.adopt_sft(config, str(tmp_path / "nothing"), str(tmp_path / "other"))


def test_a_resumed_run_keeps_its_metrics_when_the_seed_has_no_sft_checkpoint(tmp_path):
    """The SFT start is copied into a run once, before it begins; with ``train.steps=0`` there is no
    checkpoint to mark that, and a resumed run's metrics must not be replaced by the SFT folder's."""
    from alphareason.train import study
    sft_dir, workdir = tmp_path / "sft", tmp_path / "alphazero"
    (sft_dir / "data").mkdir(parents=True)
    (sft_dir / "data" / "problems.txt").write_text("the dataset\n")
    (sft_dir / "metrics.jsonl").write_text('{"phase": "sft", "step": 0}\n')
    study.start_from_sft(str(sft_dir), str(workdir))
    assert (workdir / "data" / "problems.txt").read_text() == "the dataset\n"
    assert not (workdir / "checkpoints").exists()
    ran = '{"phase": "sft", "step": 0}\n{"phase": "selfplay", "step": 1}\n'
    (workdir / "metrics.jsonl").write_text(ran)  # the run wrote an iteration, then was killed
    (sft_dir / "metrics.jsonl").write_text('{"phase": "sft", "step": 0, "rewritten": true}\n')
    study.start_from_sft(str(sft_dir), str(workdir))  # the resumed call
    assert (workdir / "metrics.jsonl").read_text() == ran


def test_grpo_is_matched_by_a_token_budget_equal_to_the_references_mean_iteration(tmp_path):
    """GRPO's learner cost depends on its rollouts, so it is matched by a budget, not by learner steps."""
    import configs_for_tests
    from alphareason.run import make_model_config, make_task
    from alphareason.train import study
    config_path = configs_for_tests.write_micro(tmp_path)
    config = study.algorithm_config(config_path, ["grpo.group_size=4"], "grpo", 0)
    assert config.selfplay.algorithm == "grpo"
    rows = [{"step": 0, "total_token_forwards": 0}, {"step": 1, "total_token_forwards": 1000},
            {"step": 2, "total_token_forwards": 3000}]
    budget, episodes = study.matched_grpo_budget(rows, config, make_task(config))
    assert budget == 1500  # the mean of 1000 and 2000 per iteration
    # The cap: the fewest problems whose chains (4 per problem), at one full context each, spend the budget.
    T = make_model_config(config, make_task(config)).max_len
    assert episodes * 4 * T >= 1500 and (episodes == config.selfplay.actor_batch_size
                                         or (episodes - 1) * 4 * T < 1500)


def test_learner_batches_and_their_cost_hold_only_the_terms_in_use(tmp_path):
    """Expert iteration without a value term scores no candidates: its batches are SFT rows, costed as such;
    the cost of a batch of enumerated candidates is that of the batch the loop builds."""
    import configs_for_tests
    from alphareason.run import make_model_config, make_task
    from alphareason.train import study
    from alphareason.run import env_config
    from alphareason.search.env import ReasoningEnv
    from alphareason.train.loop import _learner_batch, learner_candidate_width, learner_token_forwards
    from alphareason.train.replay import ReplayBuffer
    path = configs_for_tests.write_micro(tmp_path)
    config = study.algorithm_config(path, ["selfplay.value_weight=0.0"], "expert_iteration", 0)
    task = make_task(config)
    T, S, B = make_model_config(config, task).max_len, task.max_step_len, config.selfplay.learner_batch_size
    K = config.search.num_candidates
    replay = ReplayBuffer(8, seq_len=T, num_candidates=K, step_len=S)
    replay._put_move({"tokens": np.ones((T,), np.int32), "length": 3})
    replay._put_traj(np.ones((T,), np.int32), 2, 5)
    batch = _learner_batch(replay, np.random.default_rng(0), config.selfplay, task, None)
    assert set(batch) == {"sft"}
    assert study.learner_step_cost(config, task) == 3 * B * T
    with_value = study.algorithm_config(path, ["selfplay.value_weight=0.5"], "expert_iteration", 0)
    batch = _learner_batch(replay, np.random.default_rng(0), with_value.selfplay, task, None)
    assert {"sft", "candidates", "action_weights"} <= set(batch)
    assert study.learner_step_cost(with_value, task) == 3 * B * (T + K * S) + 3 * B * T
    # enumerated candidates: the learner keeps each legal step's model-written tokens only, and so does its cost
    enumerated = study.algorithm_config(path, ["search.candidates=enumerate", "task.options.tool=calculator"],
                                        "alphazero", 0)
    task = make_task(enumerated)
    T, S, W = make_model_config(enumerated, task).max_len, task.max_step_len, task.legal_written_len()
    assert W < S
    K = ReasoningEnv(task, None, env_config(enumerated), seq_len=T).num_candidates
    replay = ReplayBuffer(8, seq_len=T, num_candidates=K, step_len=S)
    replay._put_move({"tokens": np.ones((T,), np.int32), "length": 3, "action_weights": np.full((K,), 1.0 / K)})
    replay._put_traj(np.ones((T,), np.int32), 2, 5)
    batch = _learner_batch(replay, np.random.default_rng(0), enumerated.selfplay, task, None,
                           candidate_width=learner_candidate_width(enumerated, task))
    assert batch["candidates"].shape[1:] == (K, W)
    assert study.learner_step_cost(enumerated, task) == learner_token_forwards(batch)


def test_report_aggregates_seeds_and_pairs_every_algorithm_with_the_chosen_reference(tmp_path):
    """Per iteration the mean and t interval over seeds; at the last iteration paired McNemar tests against
    ``reference``, pooled over the seeds both have."""
    from alphareason.train import study
    solved = {("corrected", 0): [1, 1, 1, 0, 0, 1], ("uncorrected", 0): [1, 0, 0, 0, 1, 1],
              ("corrected", 1): [1, 1, 0, 0, 0, 0], ("uncorrected", 1): [0, 0, 0, 0, 0, 0]}
    mcts = {("corrected", 0): [1, 1, 0, 0], ("uncorrected", 0): [0, 1, 1, 0],  # the search on 4 validation problems
            ("corrected", 1): [1, 0, 0, 0], ("uncorrected", 1): [0, 0, 0, 0]}
    for (name, seed), outcomes in solved.items():
        folder = tmp_path / name / f"seed{seed}"
        folder.mkdir(parents=True)
        value = {"value_auc_vstar": 0.6 + 0.1 * seed, "value_prompt_auc_greedy": "nan" if seed else 0.7,
                 "value_auc_vstar_walks_depth1": 0.55 + 0.1 * seed,
                 "policy_legal_mass": 0.8 - 0.2 * seed}
        searched = mcts[name, seed]
        (folder / "run.json").write_text(json.dumps({"eval": [{"step": 0, "total_token_forwards": 100 * seed,
                                                               "mcts_solve_rate": sum(searched) / len(searched),
                                                               **(value if name == "corrected" else {})}]}))
        (folder / "test_greedy_0.jsonl").write_text("".join(
            json.dumps({"problem": {"id": i}, "solved": bool(x), "reason": ""}) + "\n" for i, x in enumerate(outcomes)))
        (folder / "validation_mcts_0.jsonl").write_text("".join(
            json.dumps({"problem": {"id": i}, "solved": bool(x)}) + "\n" for i, x in enumerate(searched)))
    # the chains' ends (the verifier's reasons) at iteration 1, the same in both seeds
    reasons = {"corrected": ["solved in 3 steps", 'step 2 "7/2=?": not of the form a op b=c', "step 3 leaves 5, "
                             "not the target 9", 'step 1 "5+9=14": 5 is not available'],
               "uncorrected": ['step 2 "7/2=?": not of the form a op b=c'] * 2 + ['step 1 "5x9": not of the form'] * 2}
    for (name, ends), seed in itertools.product(reasons.items(), (0, 1)):
        (tmp_path / name / f"seed{seed}" / "test_greedy_1.jsonl").write_text("".join(
            json.dumps({"problem": {"id": i}, "solved": r.startswith("solved"), "reason": r}) + "\n"
            for i, r in enumerate(ends)))
    assert [study.failure_kind(r) for r in reasons["corrected"]] == [
        "solved", "a division that is not whole", "dead end (valid steps, wrong result)", "a number not available"]
    out = study.report(str(tmp_path), reference="corrected")
    assert out["algorithms"]["corrected"]["iterations"][-1]["outcomes"] == {
        "solved": 0.25, "a division that is not whole": 0.25, "dead end (valid steps, wrong result)": 0.25,
        "a number not available": 0.25}
    table = study.markdown(out)
    assert ("| algorithm | last iteration | solved | a number not available | a division that is not whole | "
            "malformed step | dead end (valid steps, wrong result) | other |") in table
    assert "| uncorrected | 1 | 0.0% → 0.0% | 0.0% → 0.0% | 0.0% → 50.0% | 0.0% → 50.0% | 0.0% → 0.0% | " \
           "100.0% → 0.0% |" in table
    for name, seed in itertools.product(reasons, (0, 1)):  # the rest of the test reads iteration 0 alone
        (tmp_path / name / f"seed{seed}" / "test_greedy_1.jsonl").unlink()
    out = study.report(str(tmp_path), reference="corrected")
    # here the two algorithms' iteration 0 differs in both seeds: not one start, and the report says so
    assert out["different_starts"] == [{"seed": 0, "groups": [["corrected"], ["uncorrected"]]},
                                       {"seed": 1, "groups": [["corrected"], ["uncorrected"]]}]
    assert "**Not one start in seed 1:** {corrected} and {uncorrected} start" in study.markdown(out)
    corrected = out["algorithms"]["corrected"]
    assert corrected["seeds"] == [0, 1]
    rates = corrected["iterations"][0]["rates"]
    assert rates == pytest.approx([4 / 6, 2 / 6])
    assert corrected["iterations"][0]["test_greedy"] == pytest.approx(mean_interval(rates))
    assert corrected["iterations"][0]["total_token_forwards"] == 50.0  # the mean over seeds
    # the value diagnostics: mean over the seeds that measured them ("nan": not measured)
    value = corrected["iterations"][0]["value"]
    assert value["value_auc_vstar"] == pytest.approx(mean_interval([0.6, 0.7]))
    assert value["value_prompt_auc_greedy"] == pytest.approx(mean_interval([0.7]))
    assert value["policy_legal_mass"] == pytest.approx(mean_interval([0.8, 0.6]))
    assert out["algorithms"]["uncorrected"]["iterations"][0]["value"] == {}
    assert set(out["paired"]) == {"uncorrected"}
    paired = out["paired"]["uncorrected"]
    assert (paired["against"], paired["a_only"], paired["b_only"], paired["n"]) == ("corrected", 4, 1, 12)
    assert paired["per_seed_difference"] == pytest.approx([-1 / 6, -2 / 6])  # 3/6 - 4/6 and 0/6 - 2/6
    assert paired["difference"] == pytest.approx(mean_interval([-1 / 6, -2 / 6]))
    # the search on the validation problems, paired the same way: 2 / 1 solved only by corrected / uncorrected
    search = out["paired_search"]["uncorrected"]
    assert (search["against"], search["a_only"], search["b_only"], search["n"]) == ("corrected", 2, 1, 8)
    assert search["per_seed_difference"] == pytest.approx([0.0, -0.25])  # 2/4 - 2/4 and 0/4 - 1/4
    table = study.markdown(out)
    assert "vs corrected" in table and "66.7%, 33.3%" in table and "-25.0% [" in table
    assert ("| uncorrected | 25.0% [" in table and "| -12.5% [" in table
            and "over 2 seeds; pooled p = 1 (2 / 1 solved only by corrected / uncorrected) |" in table)
    assert "| corrected | AUC vs V* at step ends | 0.65 [" in table and "| uncorrected | AUC" not in table
    assert "| corrected | prompt AUC vs free greedy decoding | 0.70 |" in table  # one seed: its value, with no interval
    assert "| corrected | AUC vs V* on legal walks, after step 1 | 0.60 [" in table
    assert "| corrected | policy's mass on legal steps | 0.70 [" in table
    # another reference than alphazero writes its own files, not over study.*
    assert {"study_vs_corrected.json", "study_vs_corrected.md", "study_vs_corrected.png"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "study.md").exists()
    # a title is kept by later reports that give none (a study run rewrites its report when it finishes)
    assert study.report(str(tmp_path), title="Micro study", reference="corrected")["title"] == "Micro study"
    assert study.report(str(tmp_path), reference="corrected")["title"] == "Micro study"
    assert (tmp_path / "study_vs_corrected.md").read_text().startswith("## Micro study\n")
    assert study.report(str(tmp_path))["title"] == ""  # study.json had none


def test_the_report_says_the_policy_only_rate_of_an_enumerated_search_is_greedy_over_legal_steps(tmp_path):
    """Where a run's search enumerates the legal steps, its greedy evaluation is over them
    (``LegalStepDecoder``): the caption says so, from run.json or, for runs from before it recorded
    ``search_candidates``, from the config and overrides it names."""
    from alphareason.train import study
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = os.path.join(root, "configs", "countdown_tiny.py")
    infos = {"recorded": {"search_candidates": "enumerate"},
             "from_config": {"config": tiny, "overrides": ["--config.search.candidates=enumerate"]},
             "variant": {"config": tiny, "overrides": [], "variant_overrides": ["search.candidates=enumerate"]},
             "sampled": {"config": tiny, "overrides": []}}
    assert {name: study.run_candidates(info) for name, info in infos.items()} == {
        "recorded": "enumerate", "from_config": "enumerate", "variant": "enumerate", "sampled": "sample"}
    assert study.run_candidates({"eval": []}) is None
    for name, info in infos.items():
        folder = tmp_path / name / "seed0"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"eval": [{"step": 0}], **info}))
        (folder / "test_greedy_0.jsonl").write_text(json.dumps({"problem": {"id": 0}, "solved": True}) + "\n")
    out = study.report(str(tmp_path), reference="recorded")
    assert out["policy_only"] == ("greedy, and greedy over the legal steps for from_config, recorded, variant, "
                                  "whose search enumerates them")
    shutil.rmtree(tmp_path / "sampled")
    out = study.report(str(tmp_path), reference="recorded")
    assert "Policy-only (greedy over the legal steps) solve rate on the test split" in study.markdown(out)


# ------------------------------------------------------------------ policy over legal steps
def test_legal_step_decoder_takes_the_policys_most_likely_legal_step():
    """Checked against full forwards of every legal step at every state (independent of the scorer); the
    scorer it uses reads only the model-written part of each legal step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from alphareason import tokenizer as tok
    from alphareason.model import ModelConfig
    from alphareason.model.testing import forward, perturbed_model
    from alphareason.search.decode import LegalStepDecoder
    from alphareason.search.env import EnvConfig, ReasoningEnv
    model = perturbed_model(ModelConfig.micro(max_len=TASK.context_len()), seed=5)
    graphdef, params = nnx.split(model)
    problems = TASK.generate(3, 4)
    env = ReasoningEnv(TASK, graphdef, EnvConfig(candidates="enumerate"), seq_len=TASK.context_len())
    out = LegalStepDecoder(TASK, graphdef, seq_len=TASK.context_len())(
        params, None, jax.tree.map(jnp.asarray, env.initial(problems)))
    for b, p in enumerate(problems):
        text = ""
        while not TASK.verify(p, text).solved and TASK.verify(p, text).reason.startswith("incomplete"):
            state = env.after([p], [text])
            steps, legal = jax.vmap(TASK.legal_steps)(jax.tree.map(jnp.asarray, state["task_state"]))
            best, best_step = -np.inf, None
            n = int(state["length"][0])
            legal_k = np.nonzero(np.asarray(legal[0]))[0]
            seqs = np.repeat(np.asarray(state["tokens"][0])[None], len(legal_k), axis=0)
            for row, k in enumerate(legal_k):  # every legal step written after the state, one full forward each
                step = np.asarray(steps[0, k])
                m = int(np.sum(step != tok.PAD))
                seqs[row, n: n + m] = step[:m]
            logits, _ = forward(graphdef, params, jnp.asarray(seqs))
            logps = np.asarray(jax.nn.log_softmax(logits, -1))
            for row, k in enumerate(legal_k):
                step = np.asarray(steps[0, k])
                m = int(np.sum(step != tok.PAD))
                written = ~np.asarray(TASK.tool_written(jnp.asarray(step)))[:m]
                score = sum(logps[row, n - 1 + j, step[j]] for j in range(m) if written[j])
                if score > best:
                    best, best_step = score, tok.decode(step[:m])
            text += best_step
        start = len(tok.encode(TASK.prompt(p), bos=True))
        got = tok.decode(np.asarray(out["tokens"][b, 0, start: int(out["length"][b, 0])]))
        assert got == text
        assert bool(out["solved"][b, 0]) == TASK.verify(p, text).solved
    # score_legal_steps reads W = legal_written_len of each step's S tokens and scores as the whole steps do
    from alphareason.search.env import score_candidates, score_legal_steps
    state = jax.tree.map(jnp.asarray, env.after(problems[:3], ["", "", TASK.solve(problems[2]).split("\n")[0] + "\n"]))
    steps, legal = jax.vmap(TASK.legal_steps)(state["task_state"])
    steps = jnp.where(legal[..., None], steps, tok.PAD)
    full = score_candidates(model, TASK, state["tokens"], state["length"], steps)
    cut = score_legal_steps(model, TASK, state["tokens"], state["length"], steps)
    np.testing.assert_allclose(np.asarray(cut[0]), np.asarray(full[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cut[1]), np.asarray(full[1]))  # the same tokens scored
    np.testing.assert_allclose(np.asarray(cut[2]), np.asarray(full[2]), atol=1e-5)
    assert int(np.asarray(full[1]).max()) > 0
    # the decoder computes the prefix and the first W tokens of each legal step (7 of this task's 12)
    K, W = TASK.num_numbers * (TASK.num_numbers - 1) * 4, TASK.legal_written_len()
    assert (W, TASK.max_step_len) == (7, 12)
    steps_taken = np.asarray(out["lane_computed"][:, 0]) // (TASK.context_len() + K * W)
    assert (steps_taken >= 1).all()
    np.testing.assert_array_equal(np.asarray(out["lane_computed"][:, 0]), steps_taken * (TASK.context_len() + K * W))


def test_policy_ceiling_targets_are_the_steps_that_keep_a_problem_solvable_and_the_policy_fits_them(tmp_path):
    """experiments/policy_ceiling.py: at the last step the correct steps are exactly the legal ones that write
    the target; every state of its walks has one; the loop's learner on these targets makes the top-ranked
    legal step a correct one on the training states."""
    from helpers import micro_config
    from alphareason import tokenizer as tok
    from alphareason.model.transformer import Transformer
    from alphareason.run import make_model_config, make_task
    from alphareason.search.env import EnvConfig, ReasoningEnv
    from alphareason.train.sft import train_sft
    from experiments import policy_ceiling
    from flax import nnx
    config = micro_config()
    config.train.steps = 0
    config.search.candidates = "enumerate"
    config.selfplay.learning_rate = 1e-3
    config.selfplay.learner_steps = 150  # x 2 iterations
    workdir = str(tmp_path / "zero")
    train_sft(config, workdir, progress=False, log=lambda *_: None)
    task = make_task(config)
    model = Transformer(make_model_config(config, task), rngs=nnx.Rngs(0))
    env = ReasoningEnv(task, nnx.split(model)[0], EnvConfig(num_candidates=1), seq_len=model.config.max_len)
    problems = task.generate(5, 12)
    data, index, depth = policy_ceiling.optimal_walks(env, task, problems, np.random.default_rng(0))
    assert np.bincount(depth).tolist() == [12, 12]  # 3 numbers: the prompt and one state after a correct step
    assert np.all(data["action_weights"].sum(-1) >= 1) and np.all(data["action_weights"] <= data["cand_valid"])
    for n in np.flatnonzero(depth == 1):  # two numbers left: correct means the step writes the target
        for k in np.flatnonzero(data["cand_valid"][n]):
            step = tok.decode(data["candidates"][n, k])
            assert data["action_weights"][n, k] == float(int(step.split("=")[1]) == problems[index[n]]["target"])
    record, rows = policy_ceiling.policy_ceiling(workdir, problems=12, eval_every=300, log=lambda *_: None)
    assert record["states_per_depth"] == [12, 12] and record["steps"] == 300 and len(rows) == 8
    first, last = record["curve"][0], record["curve"][-1]
    assert first["training_states_top_step_correct"] < 0.6 and last["training_states_top_step_correct"] >= 0.9
    T, K, W = data["tokens"].shape[1], data["cand_valid"].shape[1], task.legal_written_len()
    assert last["learner_token_forwards"] == 300 * 3 * config.selfplay.learner_batch_size * (T + K * W)
    # --set changes the run's config first: here the learner's batch and the network's width
    record, _ = policy_ceiling.policy_ceiling(workdir, problems=12, steps=2, eval_every=2, log=lambda *_: None,
                                              overrides=["selfplay.learner_batch_size=5", "model.d_model=16"])
    assert record["overrides"] == ["selfplay.learner_batch_size=5", "model.d_model=16"]
    assert record["batch_size"] == 5 and record["curve"][-1]["learner_token_forwards"] == 2 * 3 * 5 * (T + K * W)
    assert record["parameters"] < policy_ceiling.policy_ceiling(workdir, problems=12, steps=1, log=lambda *_: None
                                                                )[0]["parameters"]
    with pytest.raises(ConfigError, match="unknown config key 'selfplay.learner_rate'"):
        policy_ceiling.policy_ceiling(workdir, overrides=["selfplay.learner_rate=1e-2"])
    sampled = micro_config()
    sampled.train.steps = 0
    train_sft(sampled, str(tmp_path / "sampled"), progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="search.candidates='sample'; the ceiling is of the policy over the task"):
        policy_ceiling.policy_ceiling(str(tmp_path / "sampled"))


def test_lambda_returns_mix_search_values_and_the_outcome():
    from alphareason.train.replay import lambda_returns
    v, z = np.array([0.5, 0.2, 0.9]), 1.0
    np.testing.assert_allclose(lambda_returns(v, z, 1.0), [1.0, 1.0, 1.0])  # Monte-Carlo
    np.testing.assert_allclose(lambda_returns(v, z, 0.0), [0.2, 0.9, 1.0])  # one-step TD on search values
    g2 = 1.0
    g1 = 0.5 * 0.9 + 0.5 * g2
    g0 = 0.5 * 0.2 + 0.5 * g1
    np.testing.assert_allclose(lambda_returns(v, z, 0.5), [g0, g1, g2], rtol=1e-6)


def test_proven_solvable_states_are_those_before_a_solution_the_search_or_the_episode_found():
    from alphareason.train.replay import proven_solvable
    np.testing.assert_array_equal(proven_solvable(np.array([False, True, False]), 0.0), [1, 1, 0])
    np.testing.assert_array_equal(proven_solvable(np.array([False, False, False]), 1.0), [1, 1, 1])
    np.testing.assert_array_equal(proven_solvable(np.array([False, False, False]), 0.0), [0, 0, 0])
    np.testing.assert_array_equal(proven_solvable(np.array([True, False]), 0.0), [1, 0])
    assert proven_solvable(np.zeros((0,), bool), 1.0).shape == (0,)


def test_report_says_where_each_algorithms_compute_went(tmp_path):
    """Self-play and learner token forwards, the learner's rows and the problems played, mean over seeds, at
    the last iteration; problems played are summed over the self-play records of ``metrics.jsonl``."""
    from alphareason.train import study
    spent = {("search", 0): (300, 900, 60, [4, 4]), ("search", 1): (500, 700, 40, [4, 6]),
             ("demos", 0): (0, 1000, 200, None)}
    for (name, seed), (selfplay, learner, rows, played) in spent.items():
        folder = tmp_path / name / f"seed{seed}"
        folder.mkdir(parents=True)
        last = {"selfplay_computed_token_forwards": selfplay, "learner_token_forwards": learner,
                "learner_examples": rows, "total_token_forwards": selfplay + learner}
        (folder / "run.json").write_text(json.dumps({"eval": [{"step": 0}, {"step": 2, **last}]}))
        for it in (0, 2):
            (folder / f"test_greedy_{it}.jsonl").write_text(json.dumps(
                {"problem": {"id": 0}, "solved": True, "reason": "solved"}) + "\n")
        if played:
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"step": it + 1, "phase": "selfplay", "selfplay_episodes": n}) + "\n"
                for it, n in enumerate(played)) + json.dumps({"step": 2, "phase": "eval"}) + "\n")
    out = study.report(str(tmp_path), reference="search")
    assert out["algorithms"]["search"]["iterations"][-1]["spent"] == {
        "total_token_forwards": 1200.0, "selfplay_computed_token_forwards": 400.0,
        "learner_token_forwards": 800.0, "learner_examples": 50.0, "problems_played": 9.0}  # (4 + 4 + 4 + 6) / 2
    assert "problems_played" not in out["algorithms"]["demos"]["iterations"][-1]["spent"]
    table = study.markdown(out)
    assert "| search | 2 | 400 | 800 | 67% | 9 | 50 |" in table
    assert "| demos | 2 | 0 | 1,000 | 100% |  | 200 |" in table


def test_value_bench_rows_pair_each_checkpoint_with_the_reference_of_its_seed(tmp_path):
    """The study report's value table reads RESULTS/value/seed<s>_<name>.json: walk AUCs with their intervals,
    paired with the reference's file of the same seed where both keep the walk states."""
    from alphareason.eval.value import walk_auc_intervals
    from alphareason.train import study
    rng = np.random.default_rng(0)
    n = 240
    states = {"problem": np.repeat(np.arange(60), 4).tolist(), "text": [f"s{i}" for i in range(n)],
              "depth": ([1, 1, 2, 2] * 60), "vstar": (rng.random(n) < 0.3).astype(float).tolist()}
    vstar = np.array(states["vstar"])

    def report(values, keep=True):
        values = np.asarray(values)
        d = np.array(states["depth"])
        walks = {"all": {"auc_vstar": auc(values, vstar)},
                 "depths": {str(k): {"auc_vstar": auc(values[d == k], vstar[d == k])} for k in (1, 2)}}
        if keep:
            walks["states"] = {**states, "value": values.tolist()}
            walks["auc_intervals"] = walk_auc_intervals(walks, resamples=200)
        return {"checkpoint": {"phase": "selfplay"}, "walks": walks}

    os.makedirs(tmp_path / "value")
    files = {"seed0_alphazero": report(vstar + rng.normal(0, 1.0, n)),
             "seed0_alphazero_tree": report(vstar + rng.normal(0, 0.3, n)),
             "seed1_alphazero_tree": report(rng.random(n)),  # no reference of its seed
             "seed0_start": report(rng.random(n), keep=False)}  # written before the states were kept
    for name, r in files.items():
        (tmp_path / "value" / f"{name}.json").write_text(json.dumps(r))
    rows = {(r["seed"], r["name"]): r for r in study.value_bench_rows(str(tmp_path))}
    assert list(rows) == [(0, "alphazero"), (0, "alphazero_tree"), (0, "start"), (1, "alphazero_tree")]
    tree = rows[0, "alphazero_tree"]
    assert tree["walks"]["all"]["auc"] == files["seed0_alphazero_tree"]["walks"]["all"]["auc_vstar"]
    lo, hi = tree["walks"]["all"]["interval"]
    assert lo < tree["walks"]["all"]["auc"] < hi
    paired = tree["vs_reference"]["all"]
    assert paired["difference"] == pytest.approx(tree["walks"]["all"]["auc"] - rows[0, "alphazero"]["walks"]["all"]["auc"])
    assert paired["difference"] > 0 and paired["p_value"] < 0.05
    assert "vs_reference" not in rows[0, "alphazero"] and "vs_reference" not in rows[1, "alphazero_tree"]
    assert rows[0, "start"]["walks"]["all"]["interval"] is None and "vs_reference" not in rows[0, "start"]
    table = "\n".join(study._value_bench_table({"value_bench": list(rows.values()), "reference": "alphazero"}))
    assert f"| 0 | alphazero_tree | {tree['walks']['all']['auc']:.2f} [{lo:.2f}, {hi:.2f}] |" in table
