"""Backs XLA:CPU's large per-call buffers with transparent huge pages.

XLA's CPU runtime allocates one temporary buffer per call of a compiled
function (146 MB for a training step of the tiny config) and frees it at the
end. glibc serves allocations that large with ``mmap`` and hands them back
with ``munmap``, so every call touches fresh 4 KiB pages: about 36k page
faults per training step, a third of its CPU time spent in the kernel.

glibc (2.35 and later) can ask the kernel for transparent huge pages on the
memory it maps (the tunable ``glibc.malloc.hugetlb=1``): the same buffer then
costs a few hundred faults of 2 MiB each, and it is still returned to the
system when freed, so the process's peak memory barely moves. Measured here
(``alphareason bench model``, tiny config): 39k -> 175 faults per training
step, float32 SFT 29.5k -> 45.0k tokens/s; the self-play demo's peak RSS
with it is 2.40 GiB (``alphareason bench selfplay``).

A glibc tunable is read once, when the process starts. So the entry points
(the ``alphareason`` command, ``experiments/*.py``, ``make test``) call
``reexec_with_huge_pages()`` first thing: where the setting would help and is
missing, it restarts the same command line with the tunable added to
``GLIBC_TUNABLES``. Importing ``alphareason`` (a notebook, a library user)
never restarts anything. ``ALPHAREASON_HUGE_PAGES=0`` turns it off; it is a
no-op where the C library is not glibc, the kernel's transparent huge pages
are ``never`` (nothing to gain) or ``always`` (already on).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
_SWITCH = "ALPHAREASON_HUGE_PAGES"  # "0": off
_RESTARTED = "ALPHAREASON_HUGE_PAGES_RESTARTED"  # set in the restarted process (never restart twice)
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages_mode(path: str = _THP_MODE_FILE) -> str | None:
    """The kernel's THP mode: ``"always"``, ``"madvise"``, ``"never"``, or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"; instant
    except (AttributeError, ValueError, OSError):
        name, version = platform.libc_ver()  # reads the interpreter's binary: slower
    if name != "glibc" or not version:
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def huge_pages_environ(environ: Mapping[str, str], *, thp_mode: str | None,
                       glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart would not help.

    Pure: the caller passes the kernel's THP mode and the glibc version.
    """
    if environ.get(_SWITCH, "1") == "0" or environ.get(_RESTARTED):
        return None
    if glibc is None or glibc < (2, 35) or thp_mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:  # the user chose a value: keep it
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    env[_RESTARTED] = "1"
    return env


def huge_pages_active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process started with glibc's huge-page tunable on."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages() -> None:
    """Restarts the current command line with huge pages on, where that helps (see above).

    Call it before any work (nothing done before it survives): it either
    returns at once or does not return.
    """
    if not sys.platform.startswith("linux"):
        return
    env = huge_pages_environ(os.environ, thp_mode=transparent_huge_pages_mode(), glibc=glibc_version())
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []))
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot restart (e.g. a frozen interpreter): run without
        return
