"""Test-wide settings: a persistent XLA compilation cache shared by all tests of a run.

Many tests build the same small model and compile the same functions; with
the cache, identical programs compile once per run instead of once per test.
"""

import os

import jax

# One cache folder per checkout and per pytest-xdist worker: JAX writes cache entries in place (no atomic
# rename), so two processes sharing a folder can read each other's half-written entries.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = os.path.join(os.environ.get("ALPHAREASON_TEST_JAX_CACHE") or os.path.join(_ROOT, ".cache", "jax-tests"),
                      os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ["ALPHAREASON_TEST_JAX_CACHE_DIR"] = _CACHE  # for tests that start processes (notebook kernels)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
