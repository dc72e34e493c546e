"""alphareason: search over reasoning steps (mctx) distilled into a small JAX transformer."""
