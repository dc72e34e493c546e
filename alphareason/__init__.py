"""alphareason: search over reasoning steps (mctx) distilled into a small JAX transformer."""

from alphareason.host_memory import keep_freed_memory as _keep_freed_memory

_keep_freed_memory()  # before JAX starts its CPU threads; see alphareason/host_memory.py
