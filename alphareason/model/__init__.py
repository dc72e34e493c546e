"""The reasoning core: transformer with policy and value heads, KV cache, step sampling."""

from alphareason.model.transformer import (KVCache, ModelConfig, Transformer, count_params, flops_per_token,
                                           matmul_params, tile_cache)
from alphareason.model.sampling import StepSample, Tool, prefill_token_forwards, sample_step

__all__ = ["KVCache", "ModelConfig", "Transformer", "count_params", "flops_per_token", "matmul_params",
           "tile_cache", "StepSample", "Tool", "prefill_token_forwards", "sample_step"]
