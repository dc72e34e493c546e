"""Where a result came from: the code that produced it and the machine it ran on.

Every result file a study or a benchmark writes records both, so a figure can
be traced to a commit (``code``) and its timings read against the machine and
its load (``machine``). Neither function raises: outside a git checkout (an
installed wheel) the code version is ``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", _PACKAGE_DIR, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    """``{"commit": <40 hex digits> | None, "dirty": bool | None}`` of the checkout this package is imported from.

    ``dirty`` is true when tracked files differ from the commit (untracked files, such as results, do not count)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


_AT_START: dict | None = None


def process_code_version() -> dict:
    """``code_version()`` as its first call in this process answered it.

    A long run shares its checkout with whoever works in it, so a commit made while it runs would be
    recorded as the code that ran if the version were read when the results are written. Commands call
    this when they start (``alphareason`` and the study script do); every later call returns the same
    answer."""
    global _AT_START
    if _AT_START is None:
        _AT_START = code_version()
    return dict(_AT_START)


def machine_info() -> dict:
    """The platform, CPU count, JAX version and backend, the load average now, and the huge-page setting."""
    import jax

    from alphareason.host_memory import huge_pages_active, transparent_huge_pages_mode
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "load_average_at_start": load,
            "huge_pages": {"glibc_tunable": huge_pages_active(), "kernel_mode": transparent_huge_pages_mode()}}
