"""Statistics for comparisons over seeds and paired per-problem results.

* ``mean_interval``: mean and a 95% Student-t interval over seeds;
* ``mcnemar``: the exact two-sided McNemar test on paired solved / unsolved
  outcomes (the same problems solved by two methods), pooled over seeds;
* ``solve_rate_interval``: a Wilson interval for one solve rate.

Pure functions over numpy arrays and plain numbers; no SciPy needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    if dof < 1:
        raise ValueError(f"a t interval needs at least 2 values (dof={dof})")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_interval(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean and its 95% t interval (low = high = mean for one value)."""
    x = np.asarray(values, np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (``2 * P(X <= min(k, n-k))``)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired outcomes ``a``, ``b`` (bool[n]: the same problems, two methods).

    Returns ``{"a_only", "b_only", "p_value", "n"}``: problems only ``a`` solved, only ``b`` solved, and
    the exact two-sided p-value that the two methods solve equally often.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same problems: shapes {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return {"a_only": a_only, "b_only": b_only, "p_value": binomial_two_sided(a_only, a_only + b_only),
            "n": int(a.size)}


def solve_rate_interval(solved: int, n: int) -> tuple[float, float]:
    """A 95% Wilson score interval for ``solved`` of ``n``."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, solved / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
