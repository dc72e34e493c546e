"""The sample-reuse experiment's split: held-out problems never reach a training arm."""

import numpy as np

from alphareason import tokenizer as tok
from experiments.sample_reuse import prompt_keys, split_moves


def _moves(prompts_per_iteration, moves_per_problem=3, T=32):
    rows = []
    for prompts in prompts_per_iteration:
        for p in prompts:
            for m in range(moves_per_problem):
                rows.append(tok.encode(f"{p}\n" + "1+1=2\n" * m, bos=True))
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return {"tokens": tokens, "length": np.array([len(r) for r in rows], np.int32)}


def test_held_out_problems_are_a_fraction_of_the_first_iteration_and_never_trained_on():
    first = [f"{a},{a + 1},3,4>{a + 10}" for a in range(1, 21)]
    later = first[:5] + [f"{a},{a + 1},5,6>{a + 20}" for a in range(1, 16)]  # 5 problems played again later
    moves = _moves([first, later])
    bounds = [(0, 60), (60, 120)]
    split = split_moves(moves, bounds, held_fraction=0.25, seed=0)
    keys = prompt_keys(moves["tokens"], moves["length"])
    held = {keys[i] for i in split["held"]}
    assert split["held_problems"] == len(held) == 5 and split["first_problems"] == 20
    assert all(i < 60 for i in split["held"]) and len(split["held"]) == 15  # every move of the held problems
    assert all(i < 60 for i in split["iteration1"]) and len(split["iteration1"]) == 45
    for arm in ("iteration1", "all_iterations"):
        assert not held & {keys[i] for i in split[arm]}
    assert len(split["all_iterations"]) == 120 - 15 - split["held_seen_later"]
    assert split["held_seen_later"] == 3 * len(held & {p + "\n" for p in later})
    again = split_moves(moves, bounds, held_fraction=0.25, seed=0)
    assert np.array_equal(again["held"], split["held"])  # seeded
