"""Step-level search: golden trees, masking, terminals, batch invariance, export, episodes, compute, CLI.

Compiling a search dominates the run time on a CPU, so the module compiles
few of them and shares them (module-scoped ``searchers``):

* ``distinct``: the default setting (Gumbel MuZero over K = 4 distinct
  sampled steps), exactly the micro config's search with 8 simulations, so
  the CLI tests' searches (batch 1 and 3) hit the same compiled programs
  (persistent cache);
* ``sample``: the same with K independent samples (duplicates masked), the
  search as it was before distinct candidates: its golden tree is today's;
* ``enumerate``: PUCT over the task's legal steps, length-normalised priors;
* ``tokens``: token-level PUCT (S = 1, K = vocabulary) with a depth limit.

Golden trees are exported with ``export_tree`` and stored under
``tests/data/golden_*.json``; ``ALPHAREASON_UPDATE_GOLDEN=1`` rewrites them.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphareason import cli
from alphareason import tokenizer as tok
from alphareason.model.testing import forward, perturbed_model
from alphareason.search import EnvConfig, EpisodeRunner, SearchConfig, Searcher, export_tree
from alphareason.search.env import NEG_INF, Node, ReasoningEnv, first_duplicates
from alphareason.search.mcts import greedy_action, node_expansions
from alphareason.tasks import ProblemError, get_task, run_transition
from alphareason.run import make_model_config, make_task
from alphareason.train.sft import train_sft
from alphareason.viz import tree_io
from helpers import micro_config

DATA = os.path.join(os.path.dirname(__file__), "data")
UPDATE_GOLDEN = os.environ.get("ALPHAREASON_UPDATE_GOLDEN") == "1"
TOL = 1e-5
SEED = 2  # the pinned key: jax.random.key(SEED), split over the problems

# The micro config's search (helpers.micro_config) with 8 simulations: what
# `alphareason search/eval --simulations 8` builds for a micro workdir.
SETTINGS = {
    "distinct": (EnvConfig(num_candidates=4), SearchConfig(num_simulations=8, max_num_considered_actions=4)),
    "sample": (EnvConfig(num_candidates=4, distinct=False), SearchConfig(num_simulations=8, max_num_considered_actions=4)),
    "enumerate": (EnvConfig(candidates="enumerate", length_normalize=True),
                  SearchConfig(policy="puct", num_simulations=12)),
    "tokens": (EnvConfig(candidates="tokens"), SearchConfig(policy="puct", num_simulations=16, max_depth=2)),
}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup():
    config = micro_config()
    task = make_task(config)
    mcfg = make_model_config(config, task)
    graphdef, params = nnx.split(perturbed_model(mcfg, seed=0))
    return {"config": config, "task": task, "seq_len": mcfg.max_len, "graphdef": graphdef, "params": params,
            "problems": task.generate(0, 3)}


@pytest.fixture(scope="module")
def searchers(setup):
    made = {}

    def get(name):
        if name not in made:
            env, search = SETTINGS[name]
            made[name] = Searcher(setup["task"], setup["graphdef"], env, search, seq_len=setup["seq_len"],
                                  keep_tree=True)
        return made[name]

    return get


@pytest.fixture(scope="module")
def results(setup, searchers):
    """One search per setting on the 3 problems with keys split from key(SEED) (memoised)."""
    done = {}

    def get(name, params=None, problems=None, seed=SEED):
        cache_key = (name, seed, None if params is None else id(params), json.dumps(problems))
        if cache_key not in done:
            s = searchers(name)
            probs = problems or setup["problems"]
            inputs = jax.tree.map(jnp.asarray, s.env.initial(probs))
            keys = jax.random.split(jax.random.key(seed), len(probs))
            done[cache_key] = s(setup["params"] if params is None else params, keys, inputs)
        return done[cache_key]

    return get


def numpy_tree(result):
    return jax.tree.map(np.asarray, result.tree)


# ------------------------------------------------------------------ helpers
def assert_same(actual, expected, where="$"):
    """Exact for ints, strings, bools and None; floats within TOL (relative and absolute)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, float), f"{where}: {actual!r} is not a float like {expected!r}"
        assert math.isclose(actual, expected, rel_tol=TOL, abs_tol=TOL), f"{where}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def golden(name, actual):
    """Compares ``actual`` (JSON-able) with tests/data/golden_{name}.json, or rewrites it."""
    path = os.path.join(DATA, f"golden_{name}.json")
    actual = json.loads(json.dumps(actual))
    if UPDATE_GOLDEN:
        with open(path, "w") as f:
            json.dump(actual, f, indent=1)
            f.write("\n")
        pytest.skip(f"rewrote {path}; rerun without ALPHAREASON_UPDATE_GOLDEN=1")
    assert os.path.exists(path), f"{path} is missing; create it with ALPHAREASON_UPDATE_GOLDEN=1"
    with open(path) as f:
        assert_same(actual, json.load(f))


def summary_of(result, setup, policy):
    return {"problems": setup["problems"],
            "trees": [export_tree(result, b, task=setup["task"], problem=p, policy=policy)
                      for b, p in enumerate(setup["problems"])],
            "action": np.asarray(result.action).tolist(),
            "action_weights": np.asarray(result.action_weights).tolist(),
            "search_value": np.asarray(result.search_value).tolist(),
            "token_forwards": np.asarray(result.token_forwards).tolist()}


def visited_edges(t, b):
    """(parent, action, child) for every expanded non-root node of row b."""
    edges = []
    for i in range(1, t.node_visits.shape[1]):
        if t.node_visits[b, i] > 0:
            edges.append((int(t.parents[b, i]), int(t.action_from_parent[b, i]), i))
    return edges


def node_cost(t, b, i, mode, width=None):
    """What expanding node i must need, counted from the tree itself (not from the node's own record):
    nothing when terminal; else the tokens new to the model (the prompt at the root, the node's step on
    its parent's cache below it; enumerated steps re-read the whole prefix) plus the candidate tokens
    decoded or read (none for token actions, whose candidates are the vocabulary; enumerated legal
    steps: their first ``width`` tokens, the model-written ones)."""
    emb = t.embeddings
    if emb.done[b, i]:
        return 0
    parent = int(t.parents[b, i])
    new = int(emb.length[b, i]) - (int(emb.length[b, parent]) if i > 0 and mode != "enumerate" else 0)
    return new + (0 if mode == "tokens" else int(np.sum(emb.candidates[b, i][:, :width] != tok.PAD)))


def read_width(setup, name):
    """How many tokens of each candidate the search reads: enumerated legal steps' model-written ones."""
    return setup["task"].legal_written_len() if SETTINGS[name][0].candidates == "enumerate" else None


def expected_forwards(t, b, mode, width=None):
    """Sum over nodes of expansions x cost, from the tree's visit counts (not ``node_expansions``)."""
    total = 0
    for i in range(t.node_visits.shape[1]):
        n = int(t.node_visits[b, i])
        if n:
            expansions = n - int(t.children_visits[b, i].sum())
            total += expansions * node_cost(t, b, i, mode, width)
    return total


def path_text(t, b, i, prompt_len):
    """The text of node i's token sequence after the prompt."""
    emb = t.embeddings
    return tok.decode(emb.tokens[b, i, prompt_len: emb.length[b, i]])


@contextlib.contextmanager
def no_compilation(caplog):
    """Fails if anything is compiled inside the block (jax_log_compiles logs every compilation)."""
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        caplog.clear()
        yield
    compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert not compiled, compiled


# ------------------------------------------------------------------ golden trees
def test_golden_tree_gumbel_sampled_steps(setup, results):
    """K independent samples per node: today's tree (and, before tree KV reuse, yesterday's)."""
    golden("gumbel", summary_of(results("sample"), setup, "gumbel"))


def test_golden_tree_gumbel_distinct_sampled_steps(setup, results):
    """The default: K distinct steps per node, drawn without replacement."""
    golden("gumbel_distinct", summary_of(results("distinct"), setup, "gumbel"))


def test_golden_tree_puct_enumerated_steps(setup, results):
    golden("puct", summary_of(results("enumerate"), setup, "puct"))


def test_enumerated_children_value_themselves_as_their_parents_step_end_values_would(setup, searchers, results):
    """Enumerated steps: a child's value comes from its own pass over its prefix; with a depth limit (one
    that never binds here) whole steps are scored and the child's value is its step's end value from the
    parent's pass instead. The same numbers, so the same tree, at fewer token forwards without."""
    env, search = SETTINGS["enumerate"]
    limit = dataclasses.replace(search, max_depth=setup["task"].max_steps + 1)
    searcher = Searcher(setup["task"], setup["graphdef"], env, limit, seq_len=setup["seq_len"], keep_tree=True)
    assert searcher.env.scores_whole_steps and not searchers("enumerate").env.scores_whole_steps
    inputs = jax.tree.map(jnp.asarray, searcher.env.initial(setup["problems"]))
    whole = searcher(setup["params"], jax.random.split(jax.random.key(SEED), 3), inputs)
    own = results("enumerate")
    np.testing.assert_array_equal(whole.visit_counts, own.visit_counts)
    a, b = numpy_tree(whole), numpy_tree(own)
    visited = b.node_visits > 0
    assert visited.sum() > 12  # a tree, not a root
    np.testing.assert_array_equal(a.node_visits, b.node_visits)
    live = visited & ~b.embeddings.done  # a terminal child's network value is not computed (0): nothing uses it
    assert live.sum() > 3
    np.testing.assert_allclose(a.embeddings.network_value[live], b.embeddings.network_value[live], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(a.node_values[visited], b.node_values[visited], rtol=TOL, atol=TOL)
    assert np.all(whole.token_forwards >= own.token_forwards) and whole.token_forwards.sum() > own.token_forwards.sum()


def test_golden_tree_token_level_with_depth_limit(setup, results):
    """Token-level PUCT; only visited nodes are stored (each node has ~50 unvisited candidates)."""

    def visited_only(node):
        return dict(node, children=[visited_only(c) for c in node["children"] if c["visits"] > 0])

    out = summary_of(results("tokens"), setup, "puct")
    out["trees"] = [dict(t, root=visited_only(t["root"])) for t in out["trees"]]
    golden("tokens", out)


def test_batch_of_one_gives_the_same_tree_as_a_batch_of_many(setup, searchers, results):
    many = results("distinct")
    s = searchers("distinct")
    keys = jax.random.split(jax.random.key(SEED), 3)
    for b, problem in enumerate(setup["problems"]):
        inputs = jax.tree.map(jnp.asarray, s.env.initial([problem]))
        one = s(setup["params"], keys[b][None], inputs)
        t1, tm = numpy_tree(one), numpy_tree(many)
        np.testing.assert_array_equal(t1.children_index[0], tm.children_index[b])
        np.testing.assert_array_equal(t1.node_visits[0], tm.node_visits[b])
        np.testing.assert_array_equal(t1.embeddings.candidates[0], tm.embeddings.candidates[b])
        np.testing.assert_array_equal(np.asarray(one.token_forwards)[0], np.asarray(many.token_forwards)[b])
        assert_same(json.loads(json.dumps(export_tree(one, 0, task=setup["task"], problem=problem, policy="g"))),
                    json.loads(json.dumps(export_tree(many, b, task=setup["task"], problem=problem, policy="g"))))


def test_mcts_evaluation_does_not_depend_on_the_batch_size(setup):
    """A held-out MCTS result is a function of the problem's index, not of the batch it was searched in."""
    from alphareason.eval import EvalSettings, Evaluator
    env, search = SETTINGS["distinct"]
    model = nnx.merge(setup["graphdef"], setup["params"])
    problems = setup["task"].generate(5, 4)
    rows = {b: Evaluator(model, setup["task"], EvalSettings(strategy="mcts", batch_size=b, env=env, search=search))
            .run(problems, jax.random.key(SEED)) for b in (1, 4)}
    assert [r["solution"] for r in rows[1]] == [r["solution"] for r in rows[4]]
    assert [r["token_forwards"] for r in rows[1]] == [r["token_forwards"] for r in rows[4]]
    assert len({r["solution"] for r in rows[4]}) > 1  # the problems' searches differ: the keys matter


# ------------------------------------------------------------------ masking
def check_masking(result, *, where):
    """No invalid or duplicate candidate is ever visited where a valid one exists; invalid candidates
    carry NEG_INF prior logits at every expanded node, and get no search policy weight at the root."""
    t = numpy_tree(result)
    emb = t.embeddings
    B, N = t.node_visits.shape
    checked = 0
    for b in range(B):
        for i in range(N):
            if t.node_visits[b, i] == 0:
                continue
            valid = emb.cand_valid[b, i]
            live = emb.cand_length[b, i] > 0
            cands = emb.candidates[b, i][valid]
            assert len({c.tobytes() for c in cands}) == len(cands), f"{where}: duplicate valid candidates"
            logits = t.children_prior_logits[b, i]
            if i > 0:  # the root's logits are mctx's (masked, and noised for PUCT)
                np.testing.assert_array_equal(logits[~valid], NEG_INF)
                prior = emb.cand_logprob[b, i] - emb.cand_log_inclusion[b, i]  # corrected for distinct draws
                np.testing.assert_array_equal(logits[valid], prior[valid])
            elif valid.any():
                assert np.all(logits[~valid] <= NEG_INF)
            if valid.any() and not emb.done[b, i]:
                visited = t.children_index[b, i] >= 0
                assert np.all(valid[visited]), f"{where}: row {b} node {i} visited invalid {np.where(~valid & visited)}"
                checked += int(visited.sum())
            assert np.all(~valid | live), "a valid candidate has tokens"
        root_valid = emb.cand_valid[b, 0]
        if root_valid.any():
            assert root_valid[int(result.action[b])]
            assert root_valid[int(greedy_action(result.visit_counts[b], result.action_weights[b]))]
            np.testing.assert_array_equal(np.asarray(result.action_weights[b])[~root_valid], 0.0)
    return checked


def test_invalid_and_duplicate_candidates_are_never_chosen(setup, results, trained):
    task = setup["task"]
    problems = task.generate(1, 12)
    cases = {"random model, sampled": ("sample", None), "trained model, sampled": ("sample", trained["params"]),
             "trained model, distinct": ("distinct", trained["params"]), "enumerated": ("enumerate", None),
             "tokens": ("tokens", None)}
    checked = {}
    for case, (name, params) in cases.items():
        checked[case] = sum(
            check_masking(results(name, params=params, problems=problems[3 * seed: 3 * seed + 3], seed=seed),
                          where=f"{case}, seed {seed}") for seed in range(4))
    # The random model writes garbage steps: no valid candidate anywhere, every node masked.
    t = numpy_tree(results("sample", problems=problems[:3], seed=0))  # computed above
    assert not t.embeddings.cand_valid[t.node_visits > 0].any()
    # The others had a choice between valid and invalid candidates many times (16, 126 and 45 visits).
    assert checked["trained model, sampled"] >= 5 and checked["enumerated"] >= 30 and checked["tokens"] >= 30
    assert checked["trained model, distinct"] >= 5
    e = numpy_tree(results("enumerate")).embeddings
    assert (~e.cand_valid[:, 0]).sum() > 0 and e.cand_valid[:, 0].sum() > 0


def test_first_duplicates_marks_later_copies_only():
    cands = jnp.asarray([[[5, 3, 0], [6, 3, 0], [5, 3, 0], [5, 3, 0]], [[1, 0, 0], [2, 0, 0], [3, 0, 0], [2, 0, 0]]])
    np.testing.assert_array_equal(first_duplicates(cands), [[False, False, True, True], [False, False, False, True]])


def test_sampled_candidates_with_duplicates_are_masked_as_duplicates(setup, results, trained):
    """The trained model proposes the same valid step several times: only the first copy is valid."""
    task = setup["task"]
    legal_steps = jax.jit(jax.vmap(task.step, in_axes=(None, 0)))
    found = 0
    for seed in range(4):
        res = results("sample", params=trained["params"], problems=task.generate(1, 12)[3 * seed: 3 * seed + 3],
                      seed=seed)
        t = numpy_tree(res)
        emb = t.embeddings
        for b, i in zip(*np.nonzero(t.node_visits > 0)):
            if emb.done[b, i]:
                continue
            rows = [c.tobytes() for c in emb.candidates[b, i]]
            legal_k = np.asarray(legal_steps(jax.tree.map(lambda x: x[b, i], emb.task_state),
                                             emb.candidates[b, i])[1])
            for k, r in enumerate(rows):
                legal = bool(legal_k[k])
                dup = r in rows[:k]
                assert bool(emb.cand_valid[b, i, k]) == (legal and not dup)
                found += legal and dup
    assert found >= 1, "no valid duplicate was proposed; the test does not test anything"


def test_search_solved_says_whether_the_tree_reached_a_solved_chain(setup, results, trained):
    """``search_solved`` (the ``proven`` value target's evidence) is true exactly where some edge of the tree
    earned the verifier's reward of 1; the enumerated search reaches solutions of some problems, not all."""
    problems = setup["task"].generate(1, 12)
    seen = []
    for seed in range(4):
        for name, params in (("enumerate", None), ("distinct", trained["params"])):
            res = results(name, params=params, problems=problems[3 * seed: 3 * seed + 3], seed=seed)
            t = numpy_tree(res)
            for b in range(3):
                rewarded = any(t.children_rewards[b, p, a] == 1.0 for p, a, _ in visited_edges(t, b))
                assert bool(res.search_solved[b]) == rewarded, (name, seed, b)
                seen.append(rewarded)
    assert any(seen) and not all(seen), seen


def test_proven_tree_nodes_follow_mcts_solver_rules():
    """Solvable: a solvable child; unsolvable: every valid candidate expanded into an unsolvable child."""
    from alphareason.train.replay import proven_tree_nodes
    # 0 (root) -> 1 (live), 2 (unsolved terminal); 1 -> 3 (unsolved terminal), 4 (live, not expanded further)
    # 5: a node never visited
    parents = np.array([-1, 0, 0, 1, 1, -1])
    children = np.array([[1, 2, -1], [3, 4, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    visits = np.array([5, 3, 1, 1, 1, 0])
    done = np.array([False, False, True, True, False, False])
    solved = np.zeros(6, bool)
    valid = np.array([[True, True, False], [True, True, False], [False] * 3, [False] * 3, [True, True, True],
                      [True] * 3])
    # 4 is unexplored: nothing proven about it, so neither about 1 nor about the root
    np.testing.assert_array_equal(proven_tree_nodes(parents, children, visits, done, solved, valid),
                                  [-1, -1, -1, -1, -1, -1])
    # 4 without any valid step: it loses, so does 1, and so the root (its third candidate is invalid)
    no_step = valid.copy()
    no_step[4] = False
    np.testing.assert_array_equal(proven_tree_nodes(parents, children, visits, done, solved, no_step),
                                  [0, 0, -1, -1, 0, -1])
    # the root's third candidate valid but never expanded: the root is not proven
    wider = no_step.copy()
    wider[0, 2] = True
    np.testing.assert_array_equal(proven_tree_nodes(parents, children, visits, done, solved, wider),
                                  [-1, 0, -1, -1, 0, -1])
    # 3 solved: 1 and the root are solvable, whatever else is unexplored
    won = solved.copy()
    won[3] = True
    np.testing.assert_array_equal(proven_tree_nodes(parents, children, visits, done, won, wider),
                                  [1, 1, -1, -1, 0, -1])


def test_the_enumerated_trees_proofs_agree_with_the_exact_solver(setup, results):
    """Every state an enumerated search tree proves solvable (unsolvable) is solvable (unsolvable) by the
    task's exact solver; the trees prove both kinds."""
    from alphareason.search.episodes import proven_tree_states
    task = setup["task"]
    problems = task.generate(1, 12)
    counts = {0: 0, 1: 0}
    for seed in range(4):
        batch = problems[3 * seed: 3 * seed + 3]
        res = results("enumerate", problems=batch, seed=seed)
        states = proven_tree_states(res.tree)
        for b, problem in enumerate(batch):
            prompt_len = len(tok.encode(task.prompt(problem), bos=True))
            for m in np.nonzero(states["label"][b] >= 0)[0]:
                text = tok.decode(states["tokens"][b, m, prompt_len: states["length"][b, m]])
                assert task.solvable_after(problem, text) == bool(states["label"][b, m]), (text, problem)
                counts[int(states["label"][b, m])] += 1
    assert counts[0] > 0 and counts[1] > 0, counts


# ------------------------------------------------------------------ terminal handling
@pytest.mark.parametrize("name", ["sample", "enumerate"])
def test_terminal_rewards_discounts_values_and_copies(setup, results, name):
    task = setup["task"]
    res = results(name)
    t = numpy_tree(res)
    emb = t.embeddings
    solved = dead = copies = 0
    for b, problem in enumerate(setup["problems"]):
        prompt_len = len(tok.encode(task.prompt(problem), bos=True))
        for p, a, i in visited_edges(t, b):
            reward, discount = float(t.children_rewards[b, p, a]), float(t.children_discounts[b, p, a])
            if emb.done[b, p]:  # below a terminal node: a copy of it
                copies += 1
                for field in ("tokens", "length", "done", "solved", "step_start"):
                    np.testing.assert_array_equal(getattr(emb, field)[b, i], getattr(emb, field)[b, p])
                jax.tree.map(lambda x: np.testing.assert_array_equal(x[b, i], x[b, p]), emb.task_state)
                assert reward == 0.0 and discount == 0.0 and t.raw_values[b, i] == 0.0
                assert emb.token_forwards[b, i] == 0
                continue
            assert reward in (0.0, 1.0)
            assert (reward == 1.0) == bool(emb.solved[b, i])
            assert (reward == 1.0) <= bool(emb.done[b, i])
            assert discount == (0.0 if emb.done[b, i] else 1.0)
            if emb.done[b, i]:
                assert t.raw_values[b, i] == 0.0 and emb.token_forwards[b, i] == 0
                assert not emb.cand_valid[b, i].any()
                text = path_text(t, b, i, prompt_len)
                if emb.step_start[b, i] == emb.length[b, i]:  # the chain ended with a whole step
                    assert task.verify(problem, text).solved == bool(emb.solved[b, i]), text
                solved += reward == 1.0
                dead += reward == 0.0
            else:
                assert t.raw_values[b, i] == emb.network_value[b, i]
    assert copies > 0 and dead > 0
    if name == "enumerate":
        assert solved > 0


# ------------------------------------------------------------------ tree export
@pytest.mark.parametrize("name", ["sample", "enumerate", "tokens"])
def test_tree_export_invariants(setup, results, name, tmp_path):
    task = setup["task"]
    res = results(name)
    t = numpy_tree(res)
    emb = t.embeddings
    for b, problem in enumerate(setup["problems"]):
        tree = export_tree(res, b, task=task, problem=problem, policy=SETTINGS[name][1].policy)
        assert json.loads(json.dumps(tree)) == tree
        tree_io.save_tree(tree, tmp_path / "t.json")
        assert tree_io.load_tree(tmp_path / "t.json") == tree
        tree_io.check_visit_invariant(tree)
        assert tree["root"]["visits"] == SETTINGS[name][1].num_simulations + 1 == tree["num_simulations"] + 1
        assert tree["token_forwards"] == int(res.token_forwards[b])
        prompt_len = len(tok.encode(task.prompt(problem), bos=True))

        def walk(node, text):
            if node["id"] > 0:
                parent = int(t.parents[b, node["id"]])
                cand = emb.candidates[b, parent, node["action"]]
                assert node["step"] == tok.decode(cand).rstrip("\n")  # the step's text is its tokens
                if name != "tokens":
                    text += tok.decode(cand)
                    assert path_text(t, b, node["id"], prompt_len) == text
                    if cand[emb.cand_length[b, parent, node["action"]] - 1] == tok.SEP:
                        assert tok.encode(node["step"] + "\n") == list(cand[cand != tok.PAD])
                assert node["terminal"] == bool(emb.done[b, node["id"]])
                assert node["valid"] == bool(emb.cand_valid[b, parent, node["action"]])
            if node["terminal"]:
                assert node["children"] == []
            for child in node["children"]:
                walk(child, text)

        walk(tree["root"], "")
        # The chosen path: the greedy root action, then the most visited child, to the end.
        path = tree_io.chosen_path(tree)
        assert path[0]["action"] == int(greedy_action(res.visit_counts[b], res.action_weights[b]))
        node = tree["root"]
        for chosen in path:
            assert [c["chosen"] for c in node["children"]].count(True) == 1
            if node is not tree["root"]:
                assert chosen["visits"] == max(c["visits"] for c in node["children"])
            node = chosen
        assert node["terminal"] or not any(c["visits"] for c in node["children"])


def test_export_needs_the_tree(setup, results):
    res = results("sample").replace(tree=None)
    with pytest.raises(ValueError, match="keep_tree=True"):
        export_tree(res, 0, task=setup["task"], problem=setup["problems"][0], policy="gumbel")


# ------------------------------------------------------------------ compute accounting
@pytest.mark.parametrize("name", ["distinct", "enumerate", "tokens"])
def test_searches_compute_exactly_what_they_account(setup, results, name):
    """An independent count by a wrapper around the model (every call's full shape: padding, rows that ride
    along and finished candidates included) equals the computed figure the search reports, and the tokens
    it needed equal the needed figure (enumerated steps: the scorer's prefixes of idle rows are counted too,
    so only the computed figure is compared). Token-level search re-evaluates nodes at the depth limit: each
    evaluation is counted. Same trees as without the counter."""
    from alphareason.eval.budget import TokenCounter, TokenCountingModel
    counter = TokenCounter()
    graphdef, params = nnx.split(TokenCountingModel(nnx.merge(setup["graphdef"], setup["params"]), counter))
    env, search = SETTINGS[name]
    searcher = Searcher(setup["task"], graphdef, env, search, seq_len=setup["seq_len"], keep_tree=True)
    inputs = jax.tree.map(jnp.asarray, searcher.env.initial(setup["problems"]))
    counted = searcher(params, jax.random.split(jax.random.key(SEED), 3), inputs)
    assert counter.computed == int(counted.computed_token_forwards.sum()) > counter.needed > 0
    if name != "enumerate":
        assert counter.needed == int(counted.token_forwards.sum())
    np.testing.assert_array_equal(counted.visit_counts, results(name).visit_counts)
    np.testing.assert_array_equal(counted.computed_token_forwards, results(name).computed_token_forwards)


@pytest.mark.parametrize("name", ["sample", "enumerate", "tokens"])
def test_token_forwards_are_the_sum_of_node_expansions(setup, results, name):
    t = numpy_tree(results(name))
    res = results(name)
    for b in range(3):
        width = read_width(setup, name)
        assert int(res.token_forwards[b]) == expected_forwards(t, b, SETTINGS[name][0].candidates, width)
        for i in np.nonzero(t.node_visits[b])[0]:
            assert int(t.embeddings.token_forwards[b, i]) == node_cost(t, b, i, SETTINGS[name][0].candidates, width)
    if name == "tokens":  # the depth limit: nodes at depth 2 are evaluated again on every visit
        assert np.all(t.embeddings.depth[t.node_visits > 0] <= 2)
        cut = (t.node_visits > 0) & (t.embeddings.depth == 2) & ~t.embeddings.done
        assert np.any(np.asarray(node_expansions(res.tree))[cut] > 1)
        assert not t.embeddings.cand_valid[cut].any() and not t.embeddings.cand_length[cut].any()


def test_root_priors_are_the_candidates_log_likelihood(setup, results):
    """Sampled and enumerated steps: prior = sum of log-probs of the model-written tokens (divided by
    their number when length-normalised), checked with a full forward pass; tokens: the next-token
    log-softmax."""
    graphdef, params = setup["graphdef"], setup["params"]
    for name in ("sample", "enumerate", "tokens"):
        res = results(name)
        root = jax.tree.map(np.asarray, res.root)
        for b in range(3):
            n = int(root.length[b])
            if name == "tokens":
                logits, _ = forward(graphdef, params, jnp.asarray(root.tokens[b:b + 1]))
                want = jax.nn.log_softmax(np.asarray(logits)[0, n - 1])
                np.testing.assert_allclose(root.cand_logprob[b], want, rtol=TOL, atol=TOL)
                continue
            K = root.candidates.shape[1]
            seqs = np.repeat(root.tokens[b:b + 1], K, 0)
            for k in range(K):
                seqs[k, n: n + root.candidates.shape[2]] = root.candidates[b, k]
            logits, _ = forward(graphdef, params, jnp.asarray(seqs))
            logp = np.asarray(jax.nn.log_softmax(logits, -1))
            tool_written = np.asarray(setup["task"].tool_written(jnp.asarray(root.candidates[b])))
            model_written = ~tool_written & (root.candidates[b] != tok.PAD)
            for k in range(K):
                if not root.cand_length[b, k]:
                    continue
                positions = np.nonzero(model_written[k])[0]
                want = sum(logp[k, n - 1 + j, root.candidates[b, k, j]] for j in positions)
                if SETTINGS[name][0].length_normalize:
                    want /= len(positions)
                assert root.cand_logprob[b, k] == pytest.approx(want, rel=TOL, abs=TOL)


# ------------------------------------------------------------------ token-level search
def test_token_level_search_is_the_same_environment_with_single_token_actions(setup, searchers):
    """Writing a solution token by token (the calculator writes after '=') reaches the same text and
    verdict as step-level actions; only the completing token earns the reward."""
    task, env = setup["task"], searchers("tokens").env
    assert env.num_candidates == tok.VOCAB_SIZE and env.candidate_len == 1
    assert env.max_actions == task.max_steps * task.max_step_len
    problem = setup["problems"][0]
    solution = task.solve(problem)
    mask = task.tool_mask(solution)
    actions = [tok.encode(ch)[0] for ch, forced in zip(solution, mask) if not forced]
    inputs = jax.tree.map(jnp.asarray, env.initial([problem]))
    transition = jax.jit(env.transition)
    state = dict(inputs, depth=jnp.zeros((1,), jnp.int32), solved=jnp.zeros((1,), bool))
    rewards, dones = [], []
    for a in actions:
        n = _token_node(env, state)
        nxt = transition(n, jnp.asarray([a], jnp.int32))
        assert bool(nxt["valid"][0])
        rewards.append(float(nxt["reward"][0]))
        dones.append(bool(nxt["done"][0]))
        state = {k: nxt[k] for k in ("tokens", "length", "step_start", "task_state", "done", "solved", "depth")}
    prompt_len = int(inputs["length"][0])
    text = tok.decode(np.asarray(state["tokens"][0, prompt_len: state["length"][0]]))
    assert text == solution and task.verify(problem, text).solved
    assert rewards == [0.0] * (len(actions) - 1) + [1.0] and dones == rewards
    assert int(state["step_start"][0]) == int(state["length"][0])


def _token_node(env, state):
    """A token-level node for ``state`` without the model (transitions do not need it)."""
    V = tok.VOCAB_SIZE
    return Node(tokens=state["tokens"], length=state["length"], step_start=state["step_start"],
                depth=state["depth"], task_state=state["task_state"], done=state["done"], solved=state["solved"],
                candidates=jnp.arange(V, dtype=jnp.int32)[None, :, None], cand_length=jnp.ones((1, V), jnp.int32),
                cand_valid=jnp.ones((1, V), bool), cand_logprob=jnp.zeros((1, V)), cand_log_inclusion=jnp.zeros((1, V)),
                cand_value_logits=jnp.zeros((1, V)), token_forwards=jnp.zeros((1,), jnp.int32),
                computed_forwards=jnp.zeros((1,), jnp.int32), network_value=jnp.zeros((1,)),
                fresh=jnp.ones((1,), bool), slot=jnp.zeros((1,), jnp.int32))


def test_token_level_root_masks_exactly_the_tokens_that_cannot_continue(setup, results):
    res = results("tokens")
    valid = np.asarray(res.root.cand_valid)
    ids = {c: tok.encode(c)[0] for c in "=\n0123456789+*a#"}
    for special in (tok.PAD, tok.BOS, tok.SEP):  # nothing, or an empty step
        assert not valid[:, special].any()
    assert not valid[:, ids["="]].any()  # '=' first: the calculator writes '?', the step is invalid
    assert valid[:, [ids[c] for c in "0123456789+*a#"]].all()  # a step may still go on after these


# ------------------------------------------------------------------ episodes
class RecordingSearcher:
    """Wraps a Searcher and keeps every result (trees included) an EpisodeRunner asks for."""

    def __init__(self, searcher):
        self.searcher, self.env, self.task, self.results = searcher, searcher.env, searcher.task, []

    def __call__(self, params, keys, inputs):
        res = self.searcher(params, keys, inputs)
        self.results.append(res)
        return res


@pytest.mark.parametrize("name", ["enumerate", "sample", "tokens"])
def test_episodes_record_moves_verdicts_and_exact_compute(setup, searchers, name):
    task, problems = setup["task"], setup["problems"]
    rec = RecordingSearcher(searchers(name))
    out = EpisodeRunner(rec).run(setup["params"], problems, jax.random.key(7))
    K, S = rec.env.num_candidates, rec.env.candidate_len
    assert len(out.moves) == len(rec.results) == int(out.num_steps.max())
    assert out.num_steps.max() <= rec.env.max_actions
    expected = np.zeros(3, np.int64)
    for m, (move, res) in enumerate(zip(out.moves, rec.results)):
        assert move.candidates.shape == (3, K, S) and move.action_weights.shape == (3, K)
        np.testing.assert_allclose(move.action_weights.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(move.search_value, np.asarray(res.search_value))
        np.testing.assert_array_equal(move.network_value, np.asarray(res.network_value))
        np.testing.assert_array_equal(move.action, np.asarray(greedy_action(res.visit_counts, res.action_weights)))
        t = numpy_tree(res)
        for b in range(3):
            if move.active[b]:
                expected[b] += expected_forwards(t, b, SETTINGS[name][0].candidates, read_width(setup, name))
                if m + 1 < len(out.moves) and name != "tokens":  # the next state = this state + the chosen step
                    step = move.candidates[b, move.action[b]]
                    n, nxt = move.length[b], out.moves[m + 1]
                    assert nxt.length[b] == n + np.sum(step != tok.PAD)
                    np.testing.assert_array_equal(nxt.tokens[b, :n], move.tokens[b, :n])
                    np.testing.assert_array_equal(nxt.tokens[b, n: nxt.length[b]], step[step != tok.PAD])
                if move.cand_valid[b].any():
                    assert move.cand_valid[b, move.action[b]]
        if m > 0:  # a finished episode stays finished
            assert np.all(out.moves[m - 1].active >= move.active)
    np.testing.assert_array_equal(out.token_forwards, expected)
    for problem, text, verdict, solved in zip(problems, out.texts, out.verdicts, out.solved):
        assert verdict == task.verify(problem, text) and solved == verdict.solved
        if name != "tokens" or text.endswith("\n"):
            assert run_transition(task, problem, text)[0] == verdict.solved
    if name == "enumerate":
        assert out.solved.sum() >= 1 and out.num_steps.tolist() == [2, 2, 2]
    # The first move's tree marks the step the episode took.
    tree = export_tree(rec.results[0], 0, task=task, problem=problems[0], policy="x")
    assert tree_io.chosen_path(tree)[0]["action"] == out.moves[0].action[0]


def test_episodes_with_sampled_moves_are_reproducible(setup, searchers):
    runner = EpisodeRunner(searchers("enumerate"), action_temperature=1.0)
    a = runner.run(setup["params"], setup["problems"], jax.random.key(3), record=False)
    b = runner.run(setup["params"], setup["problems"], jax.random.key(3), record=False)
    assert a.texts == b.texts and a.token_forwards.tolist() == b.token_forwards.tolist() and a.moves == []


# ------------------------------------------------------------------ bad settings, before compiling
def test_bad_settings_raise_clear_errors_before_compiling(setup, caplog):
    task, graphdef, T = setup["task"], setup["graphdef"], setup["seq_len"]
    with no_compilation(caplog):
        with pytest.raises(ValueError, match=r"search.max_depth=1 is below the 2 steps .* at least 2"):
            Searcher(task, graphdef, EnvConfig(), SearchConfig(max_depth=1), seq_len=T)
        with pytest.raises(ValueError, match=r"search.max_depth=0 must be >= 1"):
            SearchConfig(max_depth=0)
        with pytest.raises(ValueError, match=r"max_len=30 tokens.*13 \+ 2 steps x S=12 tokens = 37.*at least 37"):
            Searcher(task, graphdef, EnvConfig(), SearchConfig(), seq_len=30)
        with pytest.raises(ValueError, match=r"max_len=30"):
            Searcher(task, graphdef, EnvConfig(candidates="tokens"), SearchConfig(), seq_len=30)
        with pytest.raises(ValueError, match=r"num_candidates must be >= 1, got 0"):
            Searcher(task, graphdef, EnvConfig(num_candidates=0), SearchConfig(), seq_len=T)
        with pytest.raises(ValueError, match=r"search.candidates='beam'; choose one of sample, enumerate, tokens"):
            Searcher(task, graphdef, EnvConfig(candidates="beam"), SearchConfig(), seq_len=T)
        with pytest.raises(ValueError, match=r"search.policy='alphago'"):
            SearchConfig(policy="alphago")
        with pytest.raises(ValueError, match=r"num_simulations must be >= 1, got 0"):
            SearchConfig(num_simulations=0)
        env = Searcher(task, graphdef, EnvConfig(), SearchConfig(max_depth=2), seq_len=T).env
        with pytest.raises(ProblemError, match=r"problem 1 .*number 11 is out of range; numbers must be in 1..10"):
            env.initial([{"numbers": [5, 4, 4], "target": 24}, {"numbers": [1, 2, 11], "target": 20}])
        with pytest.raises(ProblemError, match=r"problem 0 .*cannot reach 29"):
            env.initial([{"numbers": [1, 1, 1], "target": 29}])
        with pytest.raises(ValueError, match="no problems"):
            env.initial([])
        arithmetic = get_task("arithmetic", max_digits_a=2, max_digits_b=1)
        with pytest.raises(ValueError, match="candidates='enumerate' needs a legal-step generator"):
            ReasoningEnv(arithmetic, graphdef, EnvConfig(candidates="enumerate"), seq_len=T)
    # The check above does notice compilations.
    with pytest.raises(AssertionError):
        with no_compilation(caplog):
            jax.jit(lambda x: x * 3 + 1)(jnp.arange(5))


def test_a_chain_that_would_overflow_the_context_ends(setup):
    """Undo steps ('#') make chains longer than max_steps: the environment ends one before the tokens
    overflow T (terminal, reward 0) instead of writing past the end."""
    task = get_task("countdown", num_numbers=3, max_number=10, min_target=10, max_target=30, tool="calculator")
    env = ReasoningEnv(task, setup["graphdef"], EnvConfig(num_candidates=2), seq_len=37)
    problem = {"numbers": [5, 4, 4], "target": 24}
    inputs = jax.tree.map(jnp.asarray, env.initial([problem]))
    state = dict(inputs, depth=jnp.zeros((1,), jnp.int32), solved=jnp.zeros((1,), bool))
    transition = jax.jit(env.transition)
    steps = ["5*4=20\n", "#\n", "5*4=20\n", "#\n"]
    done = []
    for text in steps:
        cand = jnp.asarray(tok.encode_padded(text, task.max_step_len))[None, None]
        node = Node(tokens=state["tokens"], length=state["length"], step_start=state["step_start"],
                    depth=state["depth"], task_state=state["task_state"], done=state["done"],
                    solved=state["solved"], candidates=jnp.concatenate([cand, cand], 1),
                    cand_length=jnp.full((1, 2), len(tok.encode(text))), cand_valid=jnp.ones((1, 2), bool),
                    cand_logprob=jnp.zeros((1, 2)), cand_log_inclusion=jnp.zeros((1, 2)),
                    cand_value_logits=jnp.zeros((1, 2)), token_forwards=jnp.zeros((1,), jnp.int32),
                    computed_forwards=jnp.zeros((1,), jnp.int32), network_value=jnp.zeros((1,)),
                    fresh=jnp.ones((1,), bool), slot=jnp.zeros((1,), jnp.int32))
        nxt = transition(node, jnp.zeros((1,), jnp.int32))
        done.append(bool(nxt["done"][0]))
        state = {k: nxt[k] for k in ("tokens", "length", "step_start", "task_state", "done", "solved", "depth")}
        assert int(state["length"][0]) <= 37
    # prompt 9 + 7 + 2 = 18, +12 > 37 after "5*4=20\n#\n5*4=20\n" (25 tokens + 12 > 37).
    assert done == [False, False, True, True]
    assert tok.decode(np.asarray(state["tokens"][0, :state["length"][0]])) == "5,4,4>24\n5*4=20\n#\n5*4=20\n"


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro SFT run (a few hundred steps: it writes the format and some valid steps)."""
    workdir = str(tmp_path_factory.mktemp("search_run"))
    config = micro_config()
    config.train.steps = 300
    config.train.batch_size = 32
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 10
    config.train.checkpoint_every = 300
    config.train.log_every = 300
    result = train_sft(config, workdir, progress=False, log=lambda *_: None)
    return {"workdir": workdir, "params": nnx.state(result.model), "task": result.task}


def test_cli_search_prints_the_solution_and_writes_the_tree(trained, tmp_path, capsys):
    path = str(tmp_path / "tree.json")
    rc = cli.main(["search", "--workdir", trained["workdir"], "--problem", "5 4 4 -> 24",
                   "--simulations", "8", "--json", path])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("problem: 5,4,4>24") and "gumbel, 8 simulations per move" in lines[0]
    solution_lines = lines[2: lines.index(next(x for x in lines if x.startswith("verdict:")))]
    solution = "" if solution_lines == ["  (no steps)"] else "".join(x[2:] + "\n" for x in solution_lines)
    verdict = trained["task"].verify({"numbers": [5, 4, 4], "target": 24}, solution)
    assert rc == (0 if verdict.solved else 1)
    assert ("verdict: SOLVED" in out) == verdict.solved and verdict.reason in out
    assert "first search tree (top levels):" in out and f"wrote the tree to {path}" in out
    tree = tree_io.load_tree(path)
    tree_io.check_visit_invariant(tree)
    assert tree["num_simulations"] == 8 and tree["policy"] == "gumbel"
    first = tree_io.chosen_path(tree)[0]
    assert solution.startswith(first["step"] + "\n") or not first["valid"]


def test_cli_search_rejects_a_bad_problem(trained, capsys):
    rc = cli.main(["search", "--workdir", trained["workdir"], "--problem", '{"numbers": [5, 4, 44], "target": 24}'])
    err = capsys.readouterr().err
    assert rc == 2 and "number 44 is out of range" in err and "Traceback" not in err


def test_cli_eval_mcts(trained, tmp_path, capsys):
    out_path = str(tmp_path / "results.jsonl")
    rc = cli.main(["eval", "--workdir", trained["workdir"], "--strategy", "mcts", "--simulations", "8",
                   "--limit", "3", "--batch-size", "3", "--out", out_path])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("mcts on 3 problems from held-out validation split")
    with open(out_path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    for r in rows:
        assert r["strategy"] == "mcts" and r["token_forwards"] > 0
        assert r["solved"] == trained["task"].verify(r["problem"], r["solution"]).solved
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["num_problems"] == 3
    assert summary["solve_rate"] == pytest.approx(sum(r["solved"] for r in rows) / 3)


def test_gumbel_improved_policy_follows_the_configured_q_transform(setup):
    """action_weights = softmax(prior + (50 + max visits) * value_scale * q'), with q' the raw Q-values
    (``rescale_values=False``) or stretched by 1 / (max - min) over the root's completed Q-values."""
    task, graphdef, params = setup["task"], setup["graphdef"], setup["params"]
    env = EnvConfig(candidates="enumerate", length_normalize=True)
    weights, checked = {}, {True: 0, False: 0}
    for rescale in (True, False):
        s = Searcher(task, graphdef, env, SearchConfig(num_simulations=12, max_num_considered_actions=4,
                                                       rescale_values=rescale, value_scale=0.1),
                     seq_len=setup["seq_len"], keep_tree=True)
        problems = setup["problems"]
        res = s(params, jax.random.split(jax.random.key(SEED), len(problems)),
                jax.tree.map(jnp.asarray, s.env.initial(problems)))
        t = numpy_tree(res)
        weights[rescale] = np.asarray(res.action_weights)
        for b in range(len(problems)):
            visits = t.children_visits[b, 0]
            q = t.children_rewards[b, 0] + t.children_discounts[b, 0] * t.children_values[b, 0]
            prior = t.children_prior_logits[b, 0]
            logw = np.log(np.maximum(weights[rescale][b], 1e-30))
            scale = (50 + visits.max()) * 0.1
            seen = np.nonzero((visits > 0) & np.asarray(res.root.cand_valid[b]))[0]
            for i in seen:
                for j in seen:
                    if abs(q[i] - q[j]) < 1e-3:
                        continue
                    stretch = ((logw[i] - logw[j]) - (prior[i] - prior[j])) / (scale * (q[i] - q[j]))
                    if rescale:
                        assert stretch >= 1 - 1e-4, (b, i, j, stretch)  # 1 / (max - min), Q-values in [0, 1]
                    else:
                        assert stretch == pytest.approx(1.0, abs=1e-4), (b, i, j)
                    checked[rescale] += 1
    assert checked[True] > 0 and checked[False] > 0, checked
    assert not np.allclose(weights[True], weights[False], atol=1e-3)


def test_search_config_refuses_a_non_positive_value_scale():
    with pytest.raises(ValueError, match="value_scale"):
        SearchConfig(value_scale=0.0)


# ------------------------------------------------------------------ the token-forward floor
def expanded_proposing(t, b, max_depth=None):
    """Expanded nodes of row b that proposed candidates (not terminal, not at the depth limit)."""
    emb = t.embeddings
    return [i for i in range(t.node_visits.shape[1])
            if t.node_visits[b, i] > 0 and not emb.done[b, i] and (max_depth is None or emb.depth[b, i] < max_depth)]


def test_every_expanded_node_offers_k_distinct_candidates(setup, results, trained):
    """Distinct sampling: every expanded node's K candidates are K different steps (every token has a nonzero
    probability under these networks, so at least K steps exist). Independent samples from the trained
    network repeat its favourite step: fewer distinct children."""
    task = setup["task"]
    distinct_counts = {}
    for name in ("distinct", "sample"):
        counts = []
        for seed in range(2):
            res = results(name, params=trained["params"], problems=task.generate(1, 12)[3 * seed: 3 * seed + 3],
                          seed=seed)
            t = numpy_tree(res)
            emb = t.embeddings
            for b in range(3):
                for i in expanded_proposing(t, b):
                    steps = {emb.candidates[b, i, k].tobytes() for k in range(4) if emb.cand_length[b, i, k]}
                    counts.append(len(steps))
                    if name == "distinct":
                        assert len(steps) == 4 and (emb.cand_length[b, i] > 0).all(), (b, i)
        distinct_counts[name] = np.mean(counts)
    assert distinct_counts["distinct"] == 4 and distinct_counts["sample"] < 4, distinct_counts


def test_tree_kv_reuse_gives_the_full_forward(setup, results, trained):
    """Every node's candidates were sampled on its parent's cache extended by its step (no prefill): their
    log-likelihoods equal a full forward over the node's tokens and the step, and every node's value (from
    its parent's sampling, or the root's prefill) equals the full forward's value at its last token."""
    graphdef, task = setup["graphdef"], setup["task"]
    params = trained["params"]
    checked, below_root = 0, 0
    for seed, b in [(seed, b) for seed in range(2) for b in range(3)]:
        res = results("distinct", params=params, problems=task.generate(1, 12)[3 * seed: 3 * seed + 3], seed=seed)
        t = numpy_tree(res)
        emb = t.embeddings
        nodes = expanded_proposing(t, b)
        seqs = []
        for i in nodes:
            n = int(emb.length[b, i])
            for k in range(4):
                seq = emb.tokens[b, i].copy()
                seq[n: n + emb.candidates.shape[-1]] = emb.candidates[b, i, k]
                seqs.append(seq)
        logits, values = forward(graphdef, params, jnp.asarray(np.stack(seqs)))
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        values = np.asarray(jax.nn.sigmoid(values))
        for j, i in enumerate(nodes):
            n = int(emb.length[b, i])
            np.testing.assert_allclose(emb.network_value[b, i], values[4 * j, n - 1], atol=2e-5)
            written = ~np.asarray(task.tool_written(jnp.asarray(emb.candidates[b, i])))
            for k in range(4):
                m = int(emb.cand_length[b, i, k])
                want = sum(logp[4 * j + k, n - 1 + s, emb.candidates[b, i, k, s]] for s in range(m) if written[k, s])
                assert emb.cand_logprob[b, i, k] == pytest.approx(want, rel=1e-4, abs=1e-4), (b, i, k)
                checked += 1
            below_root += int(emb.depth[b, i] > 0)
    assert checked >= 40 and below_root >= 2, (checked, below_root)  # nodes whose prefix came from the pool


def test_finished_nodes_cost_nothing(setup, results):
    """The random network's root candidates are all invalid, so every other node is terminal: the search
    computes the root's prefill and sampling and nothing else; a terminal node records no work."""
    res = results("distinct")
    t = numpy_tree(res)
    emb = t.embeddings
    assert emb.done[:, 1:][t.node_visits[:, 1:] > 0].all()
    np.testing.assert_array_equal(emb.computed_forwards[:, 1:][t.node_visits[:, 1:] > 0], 0)
    np.testing.assert_array_equal(emb.token_forwards[:, 1:][t.node_visits[:, 1:] > 0], 0)
    np.testing.assert_array_equal(res.computed_token_forwards, emb.computed_forwards[:, 0])
    K, S, T = 4, setup["task"].max_step_len, setup["seq_len"]
    assert (emb.computed_forwards[:, 0] <= T + K * S).all()  # the prompt's padded width + K x the loop's steps


def test_a_tree_over_the_memory_budget_is_refused_before_the_search(setup, caplog):
    task, graphdef, params, T = setup["task"], setup["graphdef"], setup["params"], setup["seq_len"]
    s = Searcher(task, graphdef, EnvConfig(num_candidates=4), SearchConfig(num_simulations=64, max_tree_gib=0.002),
                 seq_len=T)
    inputs = jax.tree.map(jnp.asarray, s.env.initial(setup["problems"]))
    per_node = s.node_bytes(params)
    assert per_node >= s.env.slot_bytes(params) == 2 * 2 * T * 32 * 4  # layers x (k, v) x T x d_model x float32
    fit = int(0.002 * 2 ** 30 // (3 * per_node)) - 1
    keys = jax.random.split(jax.random.key(0), 3)
    fresh = Searcher(task, graphdef, EnvConfig(num_candidates=4),
                     SearchConfig(num_simulations=64, max_tree_gib=0.002), seq_len=T)
    with no_compilation(caplog):
        with pytest.raises(ValueError, match=rf"batch of 3 problems x 65 nodes \(64 simulations\).*over "
                                             rf"search.max_tree_gib=0.002. What fits: {fit} simulations at batch 3; "
                                             rf"or batch 1 at 64 simulations; or a model with d_model <= \d+"):
            fresh(params, keys, inputs)
    # On a mesh each device holds its share of the rows: what is refused on one device fits on 3, and the
    # budget and the batch that fits are per device and for the whole mesh.
    fresh.check_memory(params, 3, shards=3)
    with pytest.raises(ValueError, match=rf"would hold [\d.]+ GiB on each of 2 devices \(2 problems each\).*"
                                         rf"What fits: {int(0.002 * 2 ** 30 // (2 * per_node)) - 1} simulations at "
                                         rf"batch 4; or batch 2 at 64 simulations"):
        fresh.check_memory(params, 4, shards=2)


def test_runs_made_before_distinct_candidates_keep_independent_samples():
    """Today's default samples K distinct candidates; a stored run config from before the option keeps the
    search it was made with (K independent samples)."""
    from alphareason.config import default_config, upgrade_config
    from alphareason.run import env_config
    assert env_config(default_config()).distinct
    old = default_config().to_dict()
    del old["search"]["distinct_candidates"]
    assert not env_config(upgrade_config(old)).distinct
    assert env_config(upgrade_config(default_config().to_dict())).distinct
