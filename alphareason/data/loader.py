"""Loaders: TFDS array_record splits -> fixed-shape numpy batches.

``encode_example`` turns one record (prompt, chain of thought, solved) into
token ids and the masks the losses need; ``BatchIterator`` walks a split in a
seeded order, one epoch after another, and its whole state is one integer
(``position``) so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from alphareason import tokenizer as tok
from alphareason.tasks import Task


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A TFDS record (bytes for text) -> python dict with ``problem`` parsed."""
    return {
        "problem": json.loads(_text(record["problem"])),
        "prompt": _text(record["prompt"]),
        "text": _text(record["text"]),
        "solved": bool(int(record["solved"])),
        "difficulty": int(record["difficulty"]),
    }


VALUE_LABELS = ("chain", "oracle")


def state_labels(task: Task, problem: Mapping[str, Any], text: str, solved: bool, value_label: str) -> list[float]:
    """The value label of every state of a chain: the prompt's end, then the end of each step.

    ``"chain"``: every state gets the chain's outcome (what a Monte-Carlo
    return from one rollout gives; a random walk through a still-solvable
    state teaches "unsolvable" there). ``"oracle"``: each state's exact
    solvability (``Task.solvable_after``, the task's solver: an oracle label).
    """
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    if value_label == "chain":
        return [float(solved)] * (len(lines) + 1)
    if value_label != "oracle":
        raise ValueError(f"data.value_label={value_label!r}; choose one of {', '.join(VALUE_LABELS)}")
    out = []
    for d in range(len(lines) + 1):
        label = task.solvable_after(dict(problem), "".join(x + "\n" for x in lines[:d]))
        if label is None:
            raise ValueError(f"data.value_label='oracle' needs an exact solver of partial chains; task "
                             f"{task.name} has none (use 'chain')")
        out.append(float(label))
    return out


def encode_example(task: Task, prompt: str, text: str, solved: bool, seq_len: int, *,
                   imitate: bool | None = None, value_labels: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """One chain of thought -> arrays of length ``seq_len``.

    Returns:
      tokens: int32[T]: BOS prompt text EOS, PAD after.
      targets_mask: float32[T]: 1 where ``tokens[t]`` is a policy target (a
        model-written character of ``text`` or the EOS); 0 for BOS, prompt,
        PAD, tool-written characters, and everywhere for examples not imitated
        (``imitate``, default ``solved``: Stream of Search imitates unsolved
        search traces too).
      value_target: float32[T]: the value label at each position of
        ``value_mask``: ``value_labels`` (one per state: the prompt's end, then
        each step's end) or, by default, the chain's outcome everywhere.
      value_mask: float32[T]: 1 at the prompt's last token and at the SEP
        ending each step of the text (the states the search evaluates).
    """
    prompt_ids = tok.encode(prompt, bos=True)
    text_ids = tok.encode(text)
    total = len(prompt_ids) + len(text_ids) + 1
    if total > seq_len:
        raise ValueError(
            f"a chain of thought needs {total} tokens but the sequence length is {seq_len}; "
            f"raise --config.model.max_len (or data.seq_len) or use shorter demonstrations")
    tokens = np.full((seq_len,), tok.PAD, np.int32)
    tokens[: len(prompt_ids)] = prompt_ids
    start = len(prompt_ids)
    tokens[start: start + len(text_ids)] = text_ids
    tokens[start + len(text_ids)] = tok.EOS
    targets_mask = np.zeros((seq_len,), np.float32)
    if solved if imitate is None else imitate:
        model_written = ~task.tool_mask(text)
        targets_mask[start: start + len(text_ids)] = model_written
        targets_mask[start + len(text_ids)] = 1.0
    # The value head is trained where the search reads it: at the end of the
    # prompt and at the end of every step (the SEP), i.e. at search nodes.
    # Positions inside a step are not states, and positions shared by a
    # solved and an unsolved chain of the same problem only add label noise.
    value_mask = np.zeros((seq_len,), np.float32)
    value_mask[start - 1] = 1.0
    value_mask[start: start + len(text_ids)] = np.asarray(text_ids) == tok.SEP
    value_target = np.full((seq_len,), float(solved), np.float32)
    if value_labels is not None:
        positions = np.nonzero(value_mask)[0]
        if len(positions) != len(value_labels):
            raise ValueError(f"{len(value_labels)} value labels for {len(positions)} states of {text!r}")
        value_target[positions] = value_labels
    return {"tokens": tokens, "targets_mask": targets_mask, "value_target": value_target, "value_mask": value_mask}


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class BatchIterator:
    """Seeded, resumable iteration over a random-access source of records.

    Example ``i`` of the stream is record ``perm_e[i % n]`` of epoch
    ``e = i // n``, with ``perm_e`` a permutation drawn from ``(seed, e)``.
    ``position`` (examples consumed) is the complete state.
    """

    def __init__(self, source, task: Task, *, batch_size: int, seq_len: int, seed: int, position: int = 0,
                 imitate_unsolved: bool = False, value_label: str = "chain"):
        if len(source) == 0:
            raise ValueError("the training split is empty; set data.train_size > 0")
        self.source, self.task = source, task
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.imitate_unsolved = imitate_unsolved  # policy targets on every record, not only solved ones
        self.value_label = value_label  # "chain" or "oracle" (state_labels)
        self.position = position
        self._perm_epoch, self._perm = -1, None

    def _index(self, i: int) -> int:
        n = len(self.source)
        epoch = i // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[i % n])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_rows(slice(0, self.batch_size))

    def next_rows(self, rows: slice) -> dict[str, np.ndarray]:
        """Rows ``rows`` of the next batch (one process's share of it); the position moves by the whole batch."""
        examples = []
        for i in range(self.position + rows.start, self.position + rows.stop):
            rec = decode_record(self.source[self._index(i)])
            labels = (None if self.value_label == "chain" else
                      state_labels(self.task, rec["problem"], rec["text"], rec["solved"], self.value_label))
            examples.append(encode_example(self.task, rec["prompt"], rec["text"], rec["solved"], self.seq_len,
                                           imitate=rec["solved"] or self.imitate_unsolved, value_labels=labels))
        self.position += self.batch_size
        return collate(examples)


def load_records(source) -> list[dict[str, Any]]:
    """All records of a (small) split, decoded."""
    return [decode_record(source[i]) for i in range(len(source))]
