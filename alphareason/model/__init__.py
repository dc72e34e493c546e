"""The reasoning core: transformer with policy and value heads, KV cache, step sampling."""

from alphareason.model.transformer import (BranchCache, KVCache, ModelConfig, Transformer, count_params,
                                           flops_per_token, matmul_params, tile_cache)
from alphareason.model.sampling import (CandidateSample, StepSample, Tool, prefill_token_forwards, sample_candidates,
                                        sample_step)

__all__ = ["BranchCache", "KVCache", "ModelConfig", "Transformer", "count_params", "flops_per_token", "matmul_params",
           "tile_cache", "CandidateSample", "StepSample", "Tool", "prefill_token_forwards", "sample_candidates",
           "sample_step"]
