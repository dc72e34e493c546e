"""Test-wide settings: a persistent XLA compilation cache shared by all tests of a run.

Many tests build the same small model and compile the same functions; with
the cache, identical programs compile once per run instead of once per test.
"""

import os
import tempfile

import jax

_CACHE = os.environ.get("ALPHAREASON_TEST_JAX_CACHE") or os.path.join(tempfile.gettempdir(), "alphareason-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
