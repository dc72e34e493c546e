"""Keeps freed host memory in the process so XLA:CPU does not page-fault every step.

XLA's CPU runtime allocates one temporary buffer per call of a compiled
function (146 MB for a training step of the tiny config) and frees it at the
end. glibc hands allocations that large straight back to the kernel
(``munmap``), so the next call touches fresh pages: about 36k page faults per
training step, a third of its CPU time spent in the kernel. With one malloc
arena, no ``mmap`` for large blocks and a high trim threshold, the buffer
stays mapped and is reused.

``keep_freed_memory()`` runs when ``alphareason`` is imported, but only
with ``ALPHAREASON_KEEP_FREED_MEMORY=1``: it must run before JAX starts its
CPU threads (their arenas are fixed when they are created), so set the
variable before importing ``alphareason``. It is off by default because the
process then keeps its peak heap: the default self-play demo's peak RSS went
from about 1.8 to 3.6 GiB for one short iteration (and to 5.0 GiB for the
full demo, over the 4 GiB target) without making self-play faster. Turn it
on for long SFT runs, where the page faults cost the most. A
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 1 << 30  # return memory to the OS only when 1 GiB lies free at the heap top

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tunes glibc malloc (see the module docstring); True if it was applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ALPHAREASON_KEEP_FREED_MEMORY", "0") != "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                    and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
