"""Evaluation of a model on problems with one strategy; results rows and a summary table.

Strategies here (the test-time-compute study adds more in ``strategies``):
  * ``greedy``: one chain of thought, argmax at every token;
  * ``sample``: ``samples`` chains of thought at ``temperature``; the answer
    is the one the value head ranks highest (no verifier involved); the row
    also reports ``pass_at_n`` (whether ANY sample is correct: an oracle
    figure, never used to pick the answer);
  * ``mcts``: an episode of search (``num_simulations`` per move).

Every row: the problem, the solution text, ``solved`` as judged by the
task's Python verifier, the verifier's reason, the strategy, the difficulty
and the compute spent in model token forwards (and FLOPs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.model import flops_per_token
from alphareason.search.env import EnvConfig, ReasoningEnv
from alphareason.search.episodes import EpisodeRunner, prompt_lengths
from alphareason.search.mcts import SearchConfig, Searcher
from alphareason.search.rollout import Sampler
from alphareason.tasks import Problem, Task

STRATEGIES = ("greedy", "sample", "mcts")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    strategy: str = "greedy"
    samples: int = 8
    temperature: float = 0.7
    batch_size: int = 64
    env: EnvConfig = EnvConfig()
    search: SearchConfig = SearchConfig()
    traces: bool = False  # greedy/sample write search traces (dead ends undone with "#"), Stream of Search

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")


def _chunks(items: list, size: int) -> Iterable[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start: start + size]


def _pad_batch(problems: list[Problem], size: int) -> list[Problem]:
    """Pads a final short batch with copies of its first problem so shapes (and compiles) stay fixed."""
    return problems + [problems[0]] * (size - len(problems))


class Evaluator:
    """Holds the compiled decoders for one model graph; evaluates lists of problems."""

    def __init__(self, model: nnx.Module, task: Task, settings: EvalSettings):
        self.task, self.settings = task, settings
        self.graphdef, self.params = nnx.split(model)
        self.seq_len = model.config.max_len
        self.flops_per_token = flops_per_token(model.config, self.seq_len)
        self.env = ReasoningEnv(task, self.graphdef, settings.env, seq_len=self.seq_len)
        self.sampler = Sampler(task, self.graphdef, seq_len=self.seq_len, traces=settings.traces)
        self._searcher = None

    def set_params(self, model: nnx.Module) -> None:
        self.params = nnx.state(model)

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            self._searcher = Searcher(self.task, self.graphdef, self.settings.env, self.settings.search,
                                      seq_len=self.seq_len)
        return self._searcher

    def run(self, problems: list[Problem], key) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        s = self.settings
        batch = s.batch_size if s.strategy != "sample" else max(1, s.batch_size // s.samples)
        batch = min(batch, len(problems))
        for start, chunk in _chunks(problems, batch):
            n = len(chunk)
            padded = _pad_batch(chunk, batch)
            chunk_key = jax.random.fold_in(key, start)
            if s.strategy == "mcts":
                out = EpisodeRunner(self.searcher).run(self.params, padded, chunk_key, record=False,
                                                       problem_ids=np.arange(start, start + batch))
                texts, forwards = out.texts[:n], out.token_forwards[:n]
                extra = [{} for _ in range(n)]
            else:
                texts, forwards, extra = self._decode(padded, chunk_key, n)
            for p, text, f, e in zip(chunk, texts, forwards, extra):
                verdict = self.task.verify(p, text)
                rows.append({"problem": p, "solution": text, "solved": verdict.solved, "reason": verdict.reason,
                             "answer": verdict.answer, "strategy": s.strategy,
                             "difficulty": self.task.difficulty(p), "num_steps": text.count("\n"),
                             "token_forwards": int(f), "flops": float(f) * self.flops_per_token, **e})
        return rows

    def _decode(self, problems: list[Problem], key, n: int):
        s = self.settings
        reps = 1 if s.strategy == "greedy" else s.samples
        rows = [p for p in problems for _ in range(reps)]
        inputs = jax.tree.map(jax.numpy.asarray, self.env.initial(rows))
        out = self.sampler(self.params, key, inputs, greedy=s.strategy == "greedy", temperature=s.temperature)
        out = jax.tree.map(np.asarray, out)
        starts = prompt_lengths(self.task, rows)
        texts = [tok.decode(out["tokens"][i, starts[i]: out["length"][i]]) for i in range(len(rows))]
        forwards = out["token_forwards"].reshape(len(problems), reps).sum(-1)
        if reps == 1:
            return texts[:n], forwards[:n], [{} for _ in range(n)]
        values = out["final_value"].reshape(len(problems), reps)
        chosen, extra = [], []
        for i in range(n):
            group = texts[i * reps: (i + 1) * reps]
            best = int(np.argmax(values[i]))
            chosen.append(group[best])
            any_solved = any(self.task.verify(problems[i], t).solved for t in group)
            extra.append({"pass_at_n": any_solved, "samples": reps, "value": float(values[i, best])})
        return chosen, forwards[:n], extra


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"num_problems": len(rows),
           "solve_rate": float(np.mean([r["solved"] for r in rows])) if rows else 0.0,
           "mean_token_forwards": float(np.mean([r["token_forwards"] for r in rows])) if rows else 0.0}
    if rows and "pass_at_n" in rows[0]:
        out["pass_at_n"] = float(np.mean([r["pass_at_n"] for r in rows]))
    return out


def format_table(rows: list[dict[str, Any]], *, title: str = "") -> str:
    """Solve rate per difficulty, mean solution length (steps) and compute per problem."""
    by_diff: dict[int, list] = defaultdict(list)
    for r in rows:
        by_diff[r["difficulty"]].append(r)
    has_pass = bool(rows) and "pass_at_n" in rows[0]
    head = f"{'difficulty':>10} {'problems':>8} {'solved':>7} {'rate':>6} {'steps':>6} {'tok fwd/prob':>13}"
    head += f" {'pass@n':>7}" if has_pass else ""
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def line(name, group):
        rate = np.mean([r["solved"] for r in group])
        text = (f"{name:>10} {len(group):>8} {sum(r['solved'] for r in group):>7} {rate:>6.1%} "
                f"{np.mean([r['num_steps'] for r in group]):>6.2f} "
                f"{np.mean([r['token_forwards'] for r in group]):>13.0f}")
        if has_pass:
            text += f" {np.mean([r['pass_at_n'] for r in group]):>7.1%}"
        return text

    for d in sorted(by_diff):
        lines.append(line(str(d), by_diff[d]))
    if rows:
        lines.append("-" * len(head))
        lines.append(line("all", rows))
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
