"""The AlphaZero loop: config checks, replay, and exact resume after a kill in any phase."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from alphareason.config import ConfigError
from alphareason.checkpoint import Checkpointer
from alphareason.train.loop import SelfPlayLoop, run_training, validate_config
from alphareason.train.metrics import read_metrics
from alphareason.train.replay import ReplayBuffer
from alphareason.run import load_model, make_task
from helpers import micro_config

TIMING_KEYS = ("seconds", "per_s")


def loop_config(**selfplay):
    c = micro_config()
    c.selfplay.episodes_per_iteration = 8
    c.selfplay.actor_batch_size = 4  # two actor batches per iteration: a kill can land between them
    c.selfplay.learner_steps = 3
    for k, v in selfplay.items():
        c.selfplay[k] = v
    return c


class Killed(Exception):
    pass


def kill_at(monkeypatch, phase, iteration, nth=1):
    """Makes the loop die once, at the ``nth`` unit of work of ``phase`` in ``iteration``: an actor batch
    (``selfplay``), a learner step (``learn``) or the checkpoint (``checkpoint``), before it runs."""
    method = {"selfplay": "play_batch", "learn": "learn_step", "checkpoint": "save"}[phase]
    original = getattr(SelfPlayLoop, method)
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        if self.it.iteration + 1 == iteration:
            calls["n"] += 1
            if calls["n"] == nth:
                raise Killed(f"{phase} {iteration} #{nth}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfPlayLoop, method, wrapped)


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in rows]


def _params(config, workdir):
    model, _, meta = load_model(config, workdir)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))), meta


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of two iterations."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = loop_config()
    out = run_training(config, workdir, progress=False, log=lambda *_: None)
    return config, workdir, out


def test_uninterrupted_run_writes_iterations_and_checkpoints(reference):
    config, workdir, out = reference
    rows = out["iterations"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.0 <= r["greedy_solve_rate"] <= 1.0 and 0.0 <= r["mcts_solve_rate"] <= 1.0
    sp = read_metrics(workdir, "selfplay")
    assert [r["step"] for r in sp] == [1, 2]
    # Self-play compute grows and is counted in model token forwards.
    assert 0 < rows[1]["selfplay_token_forwards"] < rows[2]["selfplay_token_forwards"]
    assert sp[-1]["replay_size"] > sp[0]["replay_size"] > 0
    # the moves each iteration added, and how often the learner will draw each of them
    assert sp[0]["selfplay_moves"] == sp[0]["replay_size"]
    assert sp[1]["replay_size"] < config.selfplay.replay_capacity  # nothing overwritten yet
    assert sp[1]["selfplay_moves"] == sp[1]["replay_size"] - sp[0]["replay_size"]
    draws = config.selfplay.learner_steps * config.selfplay.learner_batch_size
    assert [r["learner_draws_per_new_move"] for r in sp] == [draws / r["selfplay_moves"] for r in sp]
    _, meta = _params(config, workdir)
    assert meta["iteration"] == 2 and meta["phase"] == "selfplay"
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_sample_reuse_replays_the_run_and_evaluates_like_the_loop(reference):
    """experiments/sample_reuse.py on the run's replay: at step 0 (the SFT start) its validation results equal,
    problem by problem, the loop's iteration-0 evaluation (the same evaluators, problems and key)."""
    from alphareason.train.study import failure_kind
    from experiments.sample_reuse import run_arm

    config, workdir, _ = reference
    n = config.eval.num_problems
    out = run_arm(workdir, "all_iterations", steps=2, every=1, held_fraction=0.25, val_problems=n, mcts_problems=n,
                  seed=0, log=lambda *_: None)
    for name in ("greedy", "mcts"):
        loop_rows = [json.loads(x) for x in open(os.path.join(workdir, "results", f"validation_{name}_0.jsonl"))]
        assert out["evals"]["0"][name]["solved"] == [bool(r["solved"]) for r in loop_rows]
        assert out["evals"]["0"][name]["outcomes"] == [failure_kind(r.get("reason", "")) for r in loop_rows]
    assert [c["step"] for c in out["curve"]] == [0, 1, 2] and sorted(out["evals"]) == ["0", "1", "2"]
    assert out["held_moves"] > 0 and out["train_moves"] > 0


@pytest.mark.parametrize("phase,nth", [("selfplay", 2), ("learn", 2), ("checkpoint", 1)])
def test_killed_run_resumes_exactly(reference, tmp_path, monkeypatch, phase, nth):
    """Kill in iteration 2 (mid self-play, mid learning, or just before the checkpoint), rerun: same result."""
    config, ref_dir, ref_out = reference
    workdir = str(tmp_path / "run")
    kill_at(monkeypatch, phase, 2, nth)
    with pytest.raises(Killed):
        run_training(config, workdir, progress=False, log=lambda *_: None)
    assert Checkpointer(os.path.join(workdir, "checkpoints", "selfplay")).latest_step() == 1
    out = run_training(loop_config(), workdir, progress=False, log=lambda *_: None)

    assert _strip_timing(out["iterations"]) == _strip_timing(ref_out["iterations"])
    assert _strip_timing(read_metrics(workdir, "selfplay")) == _strip_timing(read_metrics(ref_dir, "selfplay"))
    got, _ = _params(config, workdir)
    want, _ = _params(config, ref_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)


def test_finished_run_rerun_does_nothing_new(reference):
    config, workdir, out = reference
    before = read_metrics(workdir)
    again = run_training(config, workdir, progress=False, log=lambda *_: None)
    assert again["iterations"] == out["iterations"]
    assert read_metrics(workdir) == before


@pytest.mark.parametrize("algorithm", ["expert_iteration", "sft_only"])
def test_baseline_algorithms_run(tmp_path, algorithm):
    config = loop_config(algorithm=algorithm, iterations=1)
    out = run_training(config, str(tmp_path), progress=False, log=lambda *_: None)
    assert [r["step"] for r in out["iterations"]] == [0, 1]
    learn = read_metrics(str(tmp_path), "selfplay")[0]
    if algorithm == "sft_only":
        assert "selfplay_solve_rate" not in learn and learn["learn_sft_loss"] > 0
    else:
        assert "selfplay_solve_rate" in learn


def test_alphazero_anchored_to_the_demonstrations_learns_from_them(tmp_path, monkeypatch):
    """``sft_source="demonstrations"``: every learner batch holds replayed moves and the demonstrations' next rows
    (the same stream as ``sft_only``'s, so a resumed iteration reads the same rows)."""
    from alphareason.data import BatchIterator
    config = loop_config(iterations=1, sft_weight=1.0, sft_source="demonstrations")
    seen, original = [], SelfPlayLoop.learn_step

    def learn_step(self, batch):
        seen.append((self, jax.tree.map(np.asarray, batch)))
        return original(self, batch)

    monkeypatch.setattr(SelfPlayLoop, "learn_step", learn_step)
    run_training(config, str(tmp_path), progress=False, log=lambda *_: None)
    assert len(seen) == config.selfplay.learner_steps
    loop = seen[0][0]
    want = BatchIterator(loop.demonstrations, loop.demo_task, batch_size=config.selfplay.learner_batch_size,
                         seq_len=loop.seq_len, seed=config.seed + 1, position=0)
    for _, batch in seen:
        assert batch["candidates"].shape[0] == config.selfplay.learner_batch_size  # the moves are there too
        for k, v in next(want).items():
            np.testing.assert_array_equal(batch["sft"][k], v)
    learn = read_metrics(str(tmp_path), "selfplay")[0]
    assert learn["learn_sft_loss"] > 0 and "learn_policy_loss" in learn


@pytest.mark.parametrize("key,value,message", [
    ("selfplay.sft_source", "demos", "sft_source='demos'; choose one of solved, demonstrations"),
    ("selfplay.sft_source", "demonstrations", "sft_source='demonstrations' is alphazero's SFT term"),
    ("selfplay.replay_capacity", 10, "replay_capacity=10 is smaller than one iteration"),
    ("selfplay.algorithm", "alphago", "choose one of alphazero"),
    ("selfplay.value_target", "td", "choose one of outcome"),
    ("selfplay.policy_moves", "won", "policy_moves=.won.; choose one of all, solved"),
    ("model.max_len", 20, "model.max_len=20 is shorter"),
    ("search.policy", "uct", "search.policy='uct'"),
    ("search.candidates", "beam", "choose 'sample' or 'enumerate'"),
    ("search.max_depth", 1, "search.max_depth=1 is below the 2 steps"),
    ("selfplay.tree_value_weight", 1.0, "needs search.candidates='enumerate'"),
    ("selfplay.tree_value_weight", -1.0, "tree_value_weight=-1.0 must be >= 0"),
])
def test_inconsistent_configs_are_refused_before_work(tmp_path, key, value, message):
    config = loop_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises((ConfigError, ValueError), match=message):
        validate_config(config, make_task(config))
    with pytest.raises((ConfigError, ValueError), match=message):
        run_training(config, str(tmp_path / "w"), progress=False, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was started


def test_batch_not_divisible_by_devices_is_refused():
    from jax.sharding import AbstractMesh
    config = loop_config(actor_batch_size=6)
    with pytest.raises(ConfigError, match="actor_batch_size=6 is not divisible by the 4 data-parallel devices"):
        validate_config(config, make_task(config), AbstractMesh((4, 1), ("data", "fsdp")))


def test_replay_ring_buffer_overwrites_oldest_and_round_trips():
    buf = ReplayBuffer(5, seq_len=6, num_candidates=2, step_len=3)
    for i in range(7):
        buf._put_move({"tokens": np.full(6, i), "length": i, "candidates": np.zeros((2, 3)),
                       "cand_valid": np.ones(2, bool), "action_weights": np.array([0.5, 0.5]),
                       "search_value": 0.1 * i, "outcome": float(i % 2), "action": i % 2})
    assert buf.size == 5
    assert sorted(buf.moves["length"].tolist()) == [2, 3, 4, 5, 6]
    copy = ReplayBuffer(5, seq_len=6, num_candidates=2, step_len=3)
    copy.load_state_dict(json.loads(json.dumps(jax.tree.map(lambda x: np.asarray(x).tolist(), buf.state_dict()))))
    rng1, rng2 = np.random.default_rng(0), np.random.default_rng(0)
    a, b = buf.sample_moves(rng1, 8), copy.sample_moves(rng2, 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_replay_labels_each_move_with_proven_solvability_and_restores_replays_saved_before_it(tmp_path):
    """``proven``: the search from this state or a later one reached a solution, or the episode was solved.
    A replay checkpointed before the target existed restores, with the outcome in its place."""
    from alphareason.search.episodes import EpisodeBatch, MoveRecord
    B, T, K, S = 2, 6, 2, 3

    def move(found, active):
        return MoveRecord(tokens=np.ones((B, T), np.int32), length=np.full((B,), 2, np.int32),
                          candidates=np.zeros((B, K, S), np.int32), cand_valid=np.ones((B, K), bool),
                          action_weights=np.full((B, K), 0.5, np.float32), cand_log_inclusion=np.zeros((B, K)),
                          search_value=np.full((B,), 0.5, np.float32), search_solved=np.array(found),
                          network_value=np.zeros((B,), np.float32), action=np.zeros((B,), np.int32),
                          active=np.array(active))
    # row 0: unsolved, its second search found a solution; row 1: solved in two moves, no search found one
    moves = [move([False, False], [True, True]), move([True, False], [True, True]), move([False, True], [True, False])]
    batch = EpisodeBatch(problems=[{}, {}], texts=["", ""], verdicts=[None, None], solved=np.array([False, True]),
                         token_forwards=np.zeros(B, np.int64), computed_token_forwards=np.zeros(B, np.int64),
                         moves=moves, num_steps=np.array([3, 2]))
    buf = ReplayBuffer(8, seq_len=T, num_candidates=K, step_len=S)
    assert buf.add_episodes(batch, prompt_lengths=[1, 1]) == 5
    # moves go in move by move: (row 0, row 1), (row 0, row 1), (row 0)
    np.testing.assert_array_equal(buf.moves["outcome"][:5], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(buf.moves["proven"][:5], [1, 1, 1, 1, 0])
    old = buf.state_dict()
    old["moves"] = {k: v for k, v in old["moves"].items() if k != "proven"}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, {"step": 1}, replay=old)
    copy = ReplayBuffer(8, seq_len=T, num_candidates=K, step_len=S)
    items, _ = ckpt.restore_items({"replay": copy.restore_template})
    copy.load_state_dict(items["replay"])
    np.testing.assert_array_equal(copy.moves["proven"], buf.moves["outcome"])
    np.testing.assert_array_equal(copy.moves["td_lambda"], buf.moves["td_lambda"])


def test_tree_values_learn_from_proven_tree_states_and_resume_exactly(tmp_path, monkeypatch):
    """tree_value_weight: the replay keeps the states the search trees proved (both labels occur), the learner
    fits the value to them at the cost its batches have, and a run killed mid-learning resumes exactly."""
    from alphareason.train import study
    config = loop_config(tree_value_weight=1.0, learner_steps=2)
    config.search.candidates = "enumerate"
    config.search.num_simulations = 16  # a state one step from the end: all its legal steps get expanded
    config.selfplay.iterations = 1
    config.eval.value_problems = 2  # the value's prompt AUC is against the policy-only outcome: greedy, legal steps
    ref_dir, workdir = str(tmp_path / "ref"), str(tmp_path / "run")
    seen = {}
    original = ReplayBuffer.add_episodes

    def spy(self, batch, **kw):
        out = original(self, batch, **kw)
        seen["labels"] = self.tree_states["label"][: self.num_tree_states].copy()
        return out

    monkeypatch.setattr(ReplayBuffer, "add_episodes", spy)
    run_training(config, ref_dir, progress=False, log=lambda *_: None)
    assert 0 < seen["labels"].mean() < 1  # proven solvable and proven unsolvable states
    learn = read_metrics(ref_dir, "selfplay")[0]
    assert learn["learn_tree_value_loss"] > 0
    rows = read_metrics(ref_dir, "eval")
    assert all("value_prompt_auc_policy" in r for r in rows)
    cost = study.learner_step_cost(config, make_task(config))
    assert rows[-1]["learner_token_forwards"] == config.selfplay.learner_steps * cost
    kill_at(monkeypatch, "learn", 1, 2)
    with pytest.raises(Killed):
        run_training(config, workdir, progress=False, log=lambda *_: None)
    run_training(config, workdir, progress=False, log=lambda *_: None)
    got, _ = _params(config, workdir)
    want, _ = _params(config, ref_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)


def test_interrupted_or_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (kill, full disk) leaves the last complete checkpoint readable."""
    ckpt = Checkpointer(tmp_path / "ckpt")
    state = {"w": np.arange(6, dtype=np.float32)}
    ckpt.save(1, state, {"step": 1})
    # A kill during orbax's write leaves a temporary directory behind.
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    # A full disk makes the next save fail.
    import orbax.checkpoint as ocp

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(3, {"w": np.zeros(6, np.float32)}, {"step": 3})
    monkeypatch.undo()
    reopened = Checkpointer(tmp_path / "ckpt")
    assert reopened.latest_step() == 1
    restored, meta = reopened.restore({"w": np.zeros(6, np.float32)})
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"step": 1}


def test_solved_trajectories_are_encoded_like_demonstrations():
    """The SFT term's batch equals the data pipeline's encoding of the same solutions."""
    from alphareason import tokenizer as tok
    from alphareason.data import encode_example
    from alphareason.tasks import get_task
    from alphareason.train.loop import sft_batch_from_trajectories
    task = get_task("countdown", num_numbers=3, max_number=30, tool="calculator")
    problems, T = task.generate(0, 4), 41
    tokens = np.zeros((4, T), np.int32)
    prompt_length, length = np.zeros(4, np.int32), np.zeros(4, np.int32)
    for i, p in enumerate(problems):
        ids, sol = tok.encode(task.prompt(p), bos=True), tok.encode(task.solve(p))
        tokens[i, :len(ids) + len(sol) + 1] = ids + sol + [tok.EOS]
        prompt_length[i], length[i] = len(ids), len(ids) + len(sol)
    batch = sft_batch_from_trajectories(task, {"tokens": tokens, "prompt_length": prompt_length, "length": length})
    np.testing.assert_array_equal(batch["tokens"], tokens)
    for i, p in enumerate(problems):
        want = encode_example(task, task.prompt(p), task.solve(p), True, T)
        for k in want:
            np.testing.assert_array_equal(batch[k][i], want[k])
    assert batch["targets_mask"].sum() < (length - prompt_length + 1).sum()  # tool output is not a target
