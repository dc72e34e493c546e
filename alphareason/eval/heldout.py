"""Evaluation of a model on problems with one strategy; results rows and a summary table.

This is what ``alphareason eval`` and the training loop's evaluation run;
the test-time-compute study's strategies under a budget are in
``eval.runner``. Both decode with the same chain decoder
(``search.decode.ChainDecoder``) and play MCTS with the same episode runner.

Strategies here (``HELDOUT_STRATEGIES``):
  * ``greedy``: one chain of thought, argmax at every token (with
    ``search.candidates="enumerate"``: the policy's most likely legal step at
    every step, ``LegalStepDecoder``);
  * ``sample``: ``samples`` chains of thought at ``temperature`` from one
    prefill of the prompt; the answer is the one the value head ranks
    highest (no verifier involved); the row also reports ``pass_at_n``
    (whether ANY sample is correct: an oracle figure, never used to pick the
    answer);
  * ``mcts``: an episode of search (``num_simulations`` per move).

A problem's key is ``fold_in(key, index)`` (its position in the list), so
its result does not depend on the batch it was decoded in.

Every row: the problem, the solution text, ``solved`` as judged by the
task's Python verifier, the verifier's reason, the strategy, the difficulty
and the compute spent in model token forwards (and FLOPs).

On a mesh (``Evaluator(..., mesh=...)``) each batch of problems is split
over the devices (padded to a multiple of them with copies of its first
problem); every process gets every row back.
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

from alphareason import parallel
from alphareason import tokenizer as tok
from alphareason.model import flops_per_token
from alphareason.search.decode import ChainDecoder, LegalStepDecoder
from alphareason.search.env import EnvConfig, ReasoningEnv
from alphareason.search.episodes import EpisodeRunner, prompt_lengths
from alphareason.search.mcts import SearchConfig, Searcher
from alphareason.tasks import Problem, Task

HELDOUT_STRATEGIES = ("greedy", "sample", "mcts")


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
        if self.strategy not in HELDOUT_STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {', '.join(HELDOUT_STRATEGIES)}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")


def _chunks(items: list, size: int) -> Iterable[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start: start + size]


def _pad_batch(problems: list[Problem], size: int) -> list[Problem]:
    """Pads a final short batch with copies of its first problem so shapes (and compiles) stay fixed."""
    return problems + [problems[0]] * (size - len(problems))


class Evaluator:
    """Holds the compiled decoders for one model graph; evaluates lists of problems.

    ``mesh``: the devices the problems of a batch are split over (None: one device).
    """

    def __init__(self, model: nnx.Module, task: Task, settings: EvalSettings, *, mesh=None):
        self.task, self.settings, self.mesh = task, settings, mesh
        self.graphdef, self.params = nnx.split(model)
        self.seq_len = model.config.max_len
        self.flops_per_token = flops_per_token(model.config, self.seq_len)
        self.env = ReasoningEnv(task, self.graphdef, settings.env, seq_len=self.seq_len)
        if settings.env.candidates == "enumerate" and settings.strategy == "greedy":
            # the policy over the task's legal steps (what the search with enumerated candidates uses)
            self.decoder = LegalStepDecoder(task, self.graphdef, seq_len=self.seq_len,
                                            length_normalize=settings.env.length_normalize, mesh=mesh)
        else:
            self.decoder = ChainDecoder(task, self.graphdef, seq_len=self.seq_len, traces=settings.traces,
                                        mesh=mesh)
        self._episodes: EpisodeRunner | None = None

    def set_params(self, model: nnx.Module) -> None:
        self.params = nnx.state(model)

    @property
    def episodes(self) -> EpisodeRunner:
        """The MCTS episode runner (built on first use)."""
        if self._episodes is None:
            self._episodes = EpisodeRunner(Searcher(self.task, self.graphdef, self.settings.env, self.settings.search,
                                                    seq_len=self.seq_len, mesh=self.mesh))
        return self._episodes

    def run(self, problems: list[Problem], key) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        s = self.settings
        batch = s.batch_size if s.strategy != "sample" else max(1, s.batch_size // s.samples)
        batch = parallel.padded_rows(min(batch, len(problems)), self.mesh)
        for start, chunk in _chunks(problems, batch):
            n = len(chunk)
            padded = _pad_batch(chunk, batch)
            if s.strategy == "mcts":
                # the keys depend on the problem's index only (moves are greedy), not on the batching
                out = self.episodes.run(self.params, padded, jax.random.fold_in(key, 0), record=False,
                                        problem_ids=np.arange(start, start + batch))
                texts, forwards, computed = out.texts[:n], out.token_forwards[:n], out.computed_token_forwards[:n]
                extra = [{} for _ in range(n)]
            else:
                texts, forwards, computed, extra = self._decode(padded, key, start, n)
            for p, text, f, c, e in zip(chunk, texts, forwards, computed, extra):
                verdict = self.task.verify(p, text)
                rows.append({"problem": p, "solution": text, "solved": verdict.solved, "reason": verdict.reason,
                             "answer": verdict.answer, "strategy": s.strategy,
                             "difficulty": self.task.difficulty(p), "num_steps": text.count("\n"),
                             "token_forwards": int(f), "flops": float(f) * self.flops_per_token,
                             "computed_token_forwards": int(c), "computed_flops": float(c) * self.flops_per_token,
                             **e})
        return rows

    def _decode(self, problems: list[Problem], key, first_id: int, n: int):
        s = self.settings
        lanes = 1 if s.strategy == "greedy" else s.samples
        inputs = jax.tree.map(jax.numpy.asarray, self.env.initial(problems))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(first_id, first_id + len(problems)))
        out = self.decoder(self.params, keys, inputs, lanes=lanes, greedy=s.strategy == "greedy",
                           temperature=s.temperature)
        out = parallel.to_host(out)
        starts = prompt_lengths(self.task, problems)
        texts = [[tok.decode(out["tokens"][b, j, starts[b]: out["length"][b, j]]) for j in range(lanes)]
                 for b in range(n)]
        forwards, computed = out["spent"][:n], out["computed"][:n]
        if lanes == 1:
            return [t[0] for t in texts], forwards, computed, [{} for _ in range(n)]
        chosen, extra = [], []
        for b in range(n):
            best = int(np.argmax(out["value"][b]))
            chosen.append(texts[b][best])
            any_solved = any(self.task.verify(problems[b], t).solved for t in texts[b])
            extra.append({"pass_at_n": any_solved, "samples": lanes, "value": float(out["value"][b, best])})
        return chosen, forwards, computed, extra


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"num_problems": len(rows),
           "solve_rate": float(np.mean([r["solved"] for r in rows])) if rows else 0.0,
           "mean_token_forwards": float(np.mean([r["token_forwards"] for r in rows])) if rows else 0.0,
           "mean_computed_token_forwards": (float(np.mean([r.get("computed_token_forwards", 0) for r in rows]))
                                            if rows else 0.0)}
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
