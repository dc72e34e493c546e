"""Metrics: ``metrics.jsonl`` (one JSON object per record) and TensorBoard events.

TensorBoard event files are written with tensorboardX, which needs no
TensorFlow. On resume, records newer than the restored checkpoint are
dropped from ``metrics.jsonl`` so that an interrupted-and-resumed run leaves
the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records ``{"step": int, "phase": str, ...}`` to jsonl and TensorBoard.

    ``enabled=False`` (every process but process 0 of a multi-process run)
    writes nothing; ``write`` still returns the record.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter  # no TensorFlow needed
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"), flush_secs=10)

    def truncate_after(self, keep: "callable") -> None:
        """Keeps only records for which ``keep(record)`` is true (used on resume)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if keep(r)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, phase: str, values: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), "phase": phase, **{k: _plain(v) for k, v in values.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{phase}/{k}", v, global_step=int(step))
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | os.PathLike, phase: str | None = None) -> list[dict[str, Any]]:
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if phase is None or r.get("phase") == phase]


def mean_dicts(dicts: Iterable[dict[str, float]]) -> dict[str, float]:
    dicts = list(dicts)
    if not dicts:
        return {}
    return {k: float(np.mean([float(d[k]) for d in dicts])) for k in dicts[0]}
