"""TFDS dataset builders: problems and demonstrations written as array_record.

A dataset is fully described by a ``DataSpec`` (task, options, sizes, seed,
demonstration kind). The spec's hash names the TFDS builder config, so two
different specs never share files and the same spec is built once and reused.
Building needs no TensorFlow: ``tfds.core.GeneratorBasedBuilder`` with
``file_format="array_record"``, driven from Python.

Splits:
  * ``train``: problems with demonstrations (``solved=1``) and, for the value
    head, negatives (``solved=0``): chains of thought made of legal steps
    that do not reach the target, or a correct prefix with one wrong step.
  * ``validation`` / ``test``: held-out problems (disjoint from ``train`` and
    from each other), each with its reference solution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from alphareason.tasks import Problem, Task, get_task

DEMONSTRATIONS = ("solutions", "traces")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything that determines a dataset's content."""

    task: str
    task_options: tuple[tuple[str, Any], ...] = ()
    train_size: int = 10_000
    validation_size: int = 200
    test_size: int = 200
    seed: int = 0
    demonstrations: str = "solutions"  # "solutions" (shortest) or "traces" (DFS with backtracking)
    negatives_per_problem: float = 0.5  # expected negatives added per train problem
    exclude: tuple[str, ...] = ()  # JSON of problems never to appear in any split
    # traces: the most tokens (BOS + prompt + trace + EOS) a chain may take; a
    # longer trace is cut after its last whole step that fits (and is then
    # unsolved, unless it solved before the cut). 0: no limit.
    max_chain_len: int = 0

    def __post_init__(self):
        if self.demonstrations not in DEMONSTRATIONS:
            raise ValueError(f"data.demonstrations={self.demonstrations!r}; choose one of {DEMONSTRATIONS}")
        for name in ("train_size", "validation_size", "test_size", "max_chain_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.task_options)

    def make_task(self) -> Task:
        return get_task(self.task, **self.options)

    def config_name(self) -> str:
        fields = dataclasses.asdict(self)
        if not fields["max_chain_len"]:  # added later: datasets built before keep their names
            del fields["max_chain_len"]
        payload = json.dumps(fields, sort_keys=True, default=list)
        digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
        return f"{self.task}_{self.demonstrations}_{self.train_size}_{digest}"


def make_spec(task: str, task_options: dict | None = None, **kwargs) -> DataSpec:
    return DataSpec(task=task, task_options=tuple(sorted((task_options or {}).items())), **kwargs)


class ReasoningDataset(tfds.core.GeneratorBasedBuilder):
    """Problems + chains of thought for one ``DataSpec``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Problems, demonstrations and negatives for SFT.",
                     "1.1.0": "Negatives from the task's own generator (Countdown: random legal steps that end "
                              "unsolved) instead of demonstrations with a digit changed."}

    def __init__(self, spec: DataSpec, *, data_dir: str | os.PathLike):
        self.spec = spec
        self.task = spec.make_task()
        config = tfds.core.BuilderConfig(name=spec.config_name(), description=repr(spec))
        super().__init__(data_dir=os.fspath(data_dir), config=config, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Reasoning problems with chains of thought (alphareason).",
            features=tfds.features.FeaturesDict({
                "problem": tfds.features.Text(),  # JSON of the problem
                "prompt": tfds.features.Text(),
                "text": tfds.features.Text(),  # the chain of thought after the prompt
                "solved": tfds.features.Scalar(dtype=np.int32),
                "difficulty": tfds.features.Scalar(dtype=np.int32),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = split_problems(self.task, self.spec)  # an empty split (e.g. no demonstrations) is not written
        return {name: self._generate_examples(name, problems) for name, problems in splits.items() if problems}

    def _generate_examples(self, split: str, problems: Sequence[Problem]) -> Iterator[tuple[str, dict]]:
        rng = np.random.default_rng([self.spec.seed, {"train": 0, "validation": 1, "test": 2}[split], 7])
        for i, problem in enumerate(problems):
            for j, (text, solved) in enumerate(examples_for(self.task, problem, self.spec, split, rng)):
                yield f"{i}_{j}", {
                    "problem": json.dumps(problem),
                    "prompt": self.task.prompt(problem),
                    "text": text,
                    "solved": int(solved),
                    "difficulty": self.task.difficulty(problem),
                }


def split_problems(task: Task, spec: DataSpec) -> dict[str, list[Problem]]:
    """Held-out splits first, then train excluding them (and ``spec.exclude``)."""
    excluded = [json.loads(p) for p in spec.exclude]
    held = task.generate(spec.seed + 1_000_003, spec.validation_size + spec.test_size, exclude=excluded)
    validation, test = held[: spec.validation_size], held[spec.validation_size:]
    train = task.generate(spec.seed, spec.train_size, exclude=excluded + held)
    return {"train": train, "validation": validation, "test": test}


def examples_for(task: Task, problem: Problem, spec: DataSpec, split: str,
                 rng: np.random.Generator) -> list[tuple[str, bool]]:
    """(text, solved) pairs for one problem: the demonstration, then negatives."""
    if spec.demonstrations == "traces" and split == "train":
        demo = task.search_trace(problem)
        if spec.max_chain_len:
            demo = cut_to_fit(demo, spec.max_chain_len - len(task.prompt(problem)) - 2)
    else:
        demo = task.solve(problem)
    if demo is None:
        raise ValueError(f"task {task.name} could not solve generated problem {problem}")
    out = [(demo, task.verify(problem, demo).solved)]
    if split == "train":
        count = int(spec.negatives_per_problem) + (rng.random() < spec.negatives_per_problem % 1)
        for _ in range(count):
            negative = negative_example(task, problem, demo, rng)
            if negative is not None and not task.verify(problem, negative).solved:
                out.append((negative, False))
    return out


def cut_to_fit(text: str, max_chars: int) -> str:
    """``text`` up to its last whole line (step) within ``max_chars`` characters (tokens)."""
    if len(text) <= max_chars:
        return text
    return text[: text.rfind("\n", 0, max_chars) + 1]


def negative_example(task: Task, problem: Problem, demo: str, rng: np.random.Generator) -> str | None:
    """A chain of thought that does not solve ``problem``, for the value head.

    The task's own ``Task.negative_example`` (Countdown: legal steps chosen at
    random that end unsolved, the states a search reaches); for a task without
    one, the demonstration with one digit changed.
    """
    if type(task).negative_example is not Task.negative_example:
        return task.negative_example(problem, rng)
    digits = [i for i, ch in enumerate(demo) if ch.isdigit()]
    if not digits:
        return None
    i = digits[int(rng.integers(len(digits)))]
    new = str((int(demo[i]) + int(rng.integers(1, 10))) % 10)
    return demo[:i] + new + demo[i + 1:]


def build_dataset(spec: DataSpec, data_dir: str | os.PathLike) -> ReasoningDataset:
    """Builds (or reuses) the dataset for ``spec`` under ``data_dir``."""
    builder = ReasoningDataset(spec, data_dir=data_dir)
    builder.download_and_prepare()
    return builder
