"""The reasoning core: a decoder-only transformer with a policy and a value head.

This module owns the network and its KV cache. Read it top to bottom:
``ModelConfig`` -> the layers (``RMSNorm``, ``Attention``, ``MLP``, ``Block``)
-> ``Transformer`` with its entry points:

- ``model(tokens)``: the full causal forward, used for training;
- ``model.prefill(tokens, lengths, cache)``: fills a fresh cache from ragged,
  right-padded prompts;
- ``model.decode(tokens, cache, active)``: pushes one token per row through
  the network, reading and extending the cache;
- ``model.extend(tokens, cache, num_new)``: a chunk of new tokens per row
  after its cached prefix (a search node's step on its parent's cache);
- ``model.decode_branches(tokens, prefix, branches, slot)``: one token of
  each of K continuations that share a prefix's cache (a node's candidate
  steps, sampled without copying the prefix K times).

Shapes: ``B`` batch, ``T`` sequence length, ``S`` cache capacity (``T_max``),
``D`` model width, ``H`` heads, ``Dh = D // H`` head width, ``F`` MLP width,
``V`` vocabulary, ``L`` layers.

Precision: parameters are always float32. With ``compute_dtype="bfloat16"``
every matmul casts its two inputs to bfloat16 and accumulates in float32
(``preferred_element_type``); norms, softmax, the residual stream and the
outputs stay float32. The weight matmuls' gradient products are mixed
precision too (``dense``: bfloat16 cotangent and operands, float32
accumulation); the attention products' gradients are left to autodiff. The KV cache is stored in the compute dtype (the
attention matmuls would cast it to that dtype anyway, so nothing is lost).

Heads: the policy head is a separate (untied) ``[D, V]`` matrix; the value
head is a ``[D] -> 1`` linear map whose sigmoid is the probability that the
chain of thought continued from this position ends solved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alphareason.tokenizer import VOCAB_SIZE

_INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation scale
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the transformer.

    ``max_len`` is the longest sequence (prompt + chain of thought) the model
    is built for: it sizes the learned position table and the default cache.
    """

    vocab_size: int = VOCAB_SIZE
    max_len: int = 128
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512
    positions: Literal["rope", "learned"] = "rope"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                             f"choose num_heads that divides d_model")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions={self.positions!r}; choose 'rope' or 'learned'")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head width, got d_model/num_heads={self.head_dim}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose 'float32' or 'bfloat16'")
        for name in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def dtype(self):
        """The jnp dtype of matmul inputs."""
        return _DTYPES[self.compute_dtype]

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """The default reasoning core: about 0.8M parameters."""
        return cls(**{**dict(d_model=128, num_layers=4, num_heads=4, d_ff=512), **overrides})

    @classmethod
    def micro(cls, **overrides) -> "ModelConfig":
        """A very small model for unit tests."""
        return cls(**{**dict(max_len=32, d_model=32, num_layers=2, num_heads=2, d_ff=64), **overrides})


# -------------------------------------------------------------- the cache
@struct.dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far (a pytree).

    Row ``b`` holds positions ``0 .. lengths[b] - 1``; what lies beyond is
    stale and never attended to. Keys are stored after the rotary embedding.

    The layout is chosen for the decode step. One array per layer (not one
    ``[L, ...]`` array): a decode step writes its token into each layer's
    array in place and reads it whole, where slicing a layer out of a stacked
    array copies it every step. Heads before positions: the step's attention
    is then a batched matrix-vector product over ``(B, H)`` that reads the
    cache as it lies (with positions first XLA transposes it or runs an
    unvectorised reduction). Together: 1.5x faster decoding at batch 64.
    Every leaf has the batch first, so selecting or repeating rows is a
    ``jax.tree.map`` over the cache.
    """

    k: tuple[jax.Array, ...]  # L arrays [B, H, S, Dh], compute dtype
    v: tuple[jax.Array, ...]  # L arrays [B, H, S, Dh], compute dtype
    lengths: jax.Array  # int32[B], filled positions per row

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def stacked(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values as ``[L, B, H, S, Dh]`` arrays (a copy; for inspection and tests)."""
        return jnp.stack(self.k), jnp.stack(self.v)


def tile_cache(cache: KVCache, num_copies: int) -> KVCache:
    """Repeats every row ``num_copies`` times: row ``b`` -> rows ``b*K .. b*K+K-1``.

    Used to sample K candidate steps per problem from one prefill.
    """
    return jax.tree.map(lambda a: jnp.repeat(a, num_copies, axis=0), cache)


class DecodeKV(NamedTuple):
    """One layer's cache for a decode step: ``k, v`` [B, H, S, Dh]; ``write_at`` int32[B] (S: write nothing)."""

    k: jax.Array
    v: jax.Array
    write_at: jax.Array


class ChunkKV(NamedTuple):
    """One layer's cache for a chunk of C tokens per row written from ``start`` int32[B] on."""

    k: jax.Array
    v: jax.Array
    start: jax.Array


class BranchKV(NamedTuple):
    """One layer's keys/values for K continuations of a shared prefix (``Transformer.decode_branches``)."""

    prefix_k: jax.Array  # [B, H, Sp, Dh], read only
    prefix_v: jax.Array
    prefix_mask: jax.Array  # bool[B, Sp]: the prefix's filled positions
    branch_k: jax.Array  # [B, K, H, Sb, Dh]: the continuations' own tokens
    branch_v: jax.Array
    slot: jax.Array  # int32[]: the continuation slot this step writes (the same for every row)


class ContinuationMask(NamedTuple):
    """The attention pattern of ``[prefix (T) | cont_0 (S) | ... | cont_{K-1} (S)]`` (``score_continuations``).

    Passed as the ``mask`` of a full forward: prefix tokens attend causally
    within the prefix; token s of continuation k attends to the prefix's
    first ``lengths[b]`` tokens and to tokens ``0..s`` of its own
    continuation. Attention is computed in those two blocks, ``K * S * (T +
    S)`` scores a head instead of the dense mask's ``(T + K * S) ** 2``.
    """

    prefix_len: int  # T (static)
    num_continuations: int  # K (static)
    prefix_mask: jax.Array  # bool[B, T]: the prefix positions continuations see (``< lengths[b]``)


@struct.dataclass
class BranchCache:
    """Keys and values of K continuations of each row's prefix, one slot per continuation token (a pytree).

    The prefix itself stays in its ``KVCache`` (shared, never copied K
    times); ``Transformer.decode_branches`` reads both. Batch first, then
    the continuation, so reordering continuations (beam search) is a
    ``take_along_axis`` on axis 1 of every leaf.
    """

    k: tuple[jax.Array, ...]  # L arrays [B, K, H, Sb, Dh], compute dtype
    v: tuple[jax.Array, ...]


# ----------------------------------------------------------------- layers
def matmul(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """``einsum(spec, x, w)`` with inputs cast to ``dtype`` and float32 accumulation."""
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def dense(x: jax.Array, w: jax.Array, dtype, *, contract: int = 1) -> jax.Array:
    """``x [..., K...] @ w [K..., N...] -> [..., N...]`` as one 2-D matmul, float32 accumulation.

    The last ``contract`` axes of ``x`` meet the first ``contract`` axes of
    ``w``. Flattening batch and time into one axis keeps the weight gradient
    a plain ``[K, M] @ [M, N]`` product: from ``btd,df->btf`` XLA's CPU
    backend makes the gradient contract two axes and first transposes the
    activations, which cost about a third of a training step.
    """
    lead, k_shape, n_shape = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
    k, n = math.prod(k_shape), math.prod(n_shape)
    x2, w2 = x.reshape(-1, k), w.reshape(k, n)
    if jnp.dtype(dtype) == jnp.float32:
        y = jnp.dot(x2, w2, preferred_element_type=jnp.float32)
    else:
        y = _mixed_matmul(jnp.dtype(dtype), x2, w2)
    return y.reshape(*lead, *n_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_matmul(dtype, x, w):
    """``x [M, K] @ w [K, N]`` with ``dtype`` inputs and float32 accumulation,
    forward and backward.

    Left to autodiff, both gradient products would multiply the float32
    cotangent by a ``dtype`` operand, which XLA computes in float32: two
    thirds of the training FLOPs would get no faster. Here the cotangent is
    cast to ``dtype`` and both products accumulate in float32; the gradients
    come back in the inputs' dtypes.
    """
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(dtype, x, w):
    x_low, w_low = x.astype(dtype), w.astype(dtype)
    like = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # the input dtypes (residuals are arrays)
    return jnp.dot(x_low, w_low, preferred_element_type=jnp.float32), (x_low, w_low, like)


def _mixed_matmul_bwd(dtype, residuals, g):
    x_low, w_low, (x_like, w_like) = residuals
    g_low = g.astype(dtype)
    dx = jax.lax.dot_general(g_low, w_low, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    # x^T is materialised (the barrier stops XLA folding the transpose into
    # the product): the CPU backend's fast low-precision kernels want the
    # contracted axis last on the left, and otherwise XLA falls back to a
    # float32 product.
    x_t = jax.lax.optimization_barrier(x_low.T)
    dw = jnp.dot(x_t, g_low, preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


_INIT_CHUNK = 1 << 16


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with one logical axis name per dimension.

    The names (``"vocab"``, ``"embed"``, ``"mlp"``, ``"heads"``, ...) say
    what each axis is; ``alphareason.parallel`` maps them to mesh axes with
    one table of rules (FSDP: ``"embed"`` over ``fsdp``) when it places the
    model on a mesh. The annotation is metadata only (no eager sharding): a
    model built without a mesh is an ordinary single-device model.
    """
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal(rngs: nnx.Rngs, shape, std: float, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter drawn from N(0, std^2), annotated with the logical ``axes`` (see ``param``).

    The normals are drawn in fixed-size chunks so that one compiled random
    kernel serves every parameter shape: drawing each shape directly makes
    eager model creation compile a kernel per shape (seconds on a CPU).
    Outside a trace the slicing happens in numpy (no compilation at all); the
    values are the same either way.
    """
    key = rngs.params()
    size = math.prod(shape)
    chunks = [jax.random.normal(jax.random.fold_in(key, i), (_INIT_CHUNK,), jnp.float32)
              for i in range(-(-size // _INIT_CHUNK))]
    try:
        flat = np.concatenate([np.asarray(c) for c in chunks])
        return param(jnp.asarray(np.float32(std) * flat[:size].reshape(shape)), axes)
    except jax.errors.TracerArrayConversionError:  # under jit / eval_shape
        return param(np.float32(std) * jnp.concatenate(chunks)[:size].reshape(shape), axes)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, in float32. ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = param(jnp.asarray(np.ones((dim,), np.float32)), ("norm",))
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale[...]


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (rotate-half form). x: [B, T, H, Dh], positions: int32[B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos, sin = jnp.cos(angles)[:, :, None, None, :], jnp.sin(angles)[:, :, None, None, :]  # [B, T, 1, 1, Dh/2]
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves as a
    # size-2 axis: a flip instead of a concatenate, which XLA's CPU loops
    # handle several times slower (forward and backward). Same arithmetic.
    halves = x.reshape(*x.shape[:-1], 2, half)  # [B, T, H, 2, Dh/2]
    cos2 = jnp.concatenate([cos, cos], axis=-2)
    sin2 = jnp.concatenate([-sin, sin], axis=-2)
    return (halves * cos2 + jnp.flip(halves, axis=-2) * sin2).reshape(x.shape)


class Attention(nnx.Module):
    """Multi-head attention with a fused QKV projection and optional rotary positions."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dh = config.d_model, config.num_heads, config.head_dim
        self.qkv = normal(rngs, (d, 3, h, dh), _INIT_STD, ("embed", None, "heads", "head_dim"))  # [D, 3, H, Dh]
        self.out = normal(rngs, (h, dh, d), _INIT_STD / math.sqrt(2 * config.num_layers),
                          ("heads", "head_dim", "embed"))  # [H, Dh, D]
        self.rope = config.positions == "rope"
        self.dtype = config.dtype

    def __call__(self, x, positions, mask, kv_cache=None):
        """One attention sublayer.

        Args:
          x: [B, T, D] normalised input.
          positions: int32[B, T] position of each query token (rotary angle).
          mask: bool[B, T, T_k] which keys each query may attend to (unused
            for ``BranchKV``, which carries its own masks), or a
            ``ContinuationMask`` for ``score_continuations``'s full forward.
          kv_cache: None for a full forward (keys are this call's own ``T``
            tokens, ``T_k = T``); a ``DecodeKV`` for one decode step (``T =
            1``), a ``ChunkKV`` for a chunk of ``T`` tokens written after each
            row's cached prefix (``T_k = S`` for both); or a ``BranchKV`` for
            one token of each of ``T = K`` continuations of a shared prefix.

        Returns:
          ``(y [B, T, D], k, v)``: for a full forward ``k, v`` [B, T, H, Dh]
          are this call's keys and values; otherwise the cache arrays with the
          new slots written (``BranchKV``: the continuations' arrays).
        """
        qkv = dense(x, self.qkv[...], self.dtype)  # [B, T, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh] each
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        if isinstance(kv_cache, DecodeKV):
            return self._decode_step(q, k, v, mask, kv_cache)
        if isinstance(kv_cache, ChunkKV):
            return self._chunk_step(q, k, v, mask, kv_cache)
        if isinstance(kv_cache, BranchKV):
            return self._branch_step(q, k, v, kv_cache)
        if isinstance(mask, ContinuationMask):
            return self._continuations(q, k, v, mask)
        scores = matmul("bqhe,bkhe->bhqk", q, k, self.dtype) / math.sqrt(q.shape[-1])  # [B, H, T, T_k]
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        heads = matmul("bhqk,bkhe->bqhe", probs, v, self.dtype)  # [B, T, H, Dh]
        return dense(heads, self.out[...], self.dtype, contract=2), k, v


    def _continuations(self, q, k, v, mask: ContinuationMask):
        """Full forward of ``[prefix | K continuations]`` with ``ContinuationMask``'s pattern, in blocks.

        The same numbers as the dense mask (masked scores are ``-inf``-like in
        both, so they add nothing to the softmax), without the ``K * S`` by
        ``K * S`` block of scores that are all masked but the diagonal's.
        """
        neg = jnp.finfo(jnp.float32).min
        T, K = mask.prefix_len, mask.num_continuations
        B, _, H, Dh = q.shape
        S = (q.shape[1] - T) // K
        scale = math.sqrt(Dh)
        qp, kp, vp = q[:, :T], k[:, :T], v[:, :T]  # [B, T, H, Dh]
        scores = matmul("bqhe,bkhe->bhqk", qp, kp, self.dtype) / scale  # [B, H, T, T]
        scores = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, None], scores, neg)
        prefix_heads = matmul("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), vp, self.dtype)  # [B, T, H, Dh]
        qc, kc, vc = (a[:, T:].reshape(B, K, S, H, Dh) for a in (q, k, v))
        to_prefix = matmul("bcqhe,bkhe->bchqk", qc, kp, self.dtype) / scale  # [B, K, H, S, T]
        to_prefix = jnp.where(mask.prefix_mask[:, None, None, None, :], to_prefix, neg)
        to_own = matmul("bcqhe,bckhe->bchqk", qc, kc, self.dtype) / scale  # [B, K, H, S, S]
        to_own = jnp.where(jnp.tril(jnp.ones((S, S), bool))[None, None, None], to_own, neg)
        probs = jax.nn.softmax(jnp.concatenate([to_prefix, to_own], -1), axis=-1)  # [B, K, H, S, T + S]
        cont_heads = (matmul("bchqk,bkhe->bcqhe", probs[..., :T], vp, self.dtype)
                      + matmul("bchqk,bckhe->bcqhe", probs[..., T:], vc, self.dtype))  # [B, K, S, H, Dh]
        heads = jnp.concatenate([prefix_heads, cont_heads.reshape(B, K * S, H, Dh)], 1)
        return dense(heads, self.out[...], self.dtype, contract=2), k, v

    def _decode_step(self, q, k, v, mask, kv_cache):
        """Attention of one new token per row over the cache; arguments as in ``__call__``."""
        keys, values, write_at = kv_cache
        rows = jnp.arange(q.shape[0])
        keys = keys.at[rows, :, write_at].set(k[:, 0].astype(keys.dtype), mode="drop")  # in place
        values = values.at[rows, :, write_at].set(v[:, 0].astype(values.dtype), mode="drop")
        scores = matmul("bhe,bhse->bhs", q[:, 0], keys, self.dtype) / math.sqrt(q.shape[-1])  # [B, H, S]
        scores = jnp.where(mask[:, 0, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        heads = matmul("bhs,bhse->bhe", probs, values, self.dtype)[:, None]  # [B, 1, H, Dh]
        return dense(heads, self.out[...], self.dtype, contract=2), keys, values

    def _chunk_step(self, q, k, v, mask, kv_cache):
        """Attention of a chunk of ``C`` new tokens per row over the cache (the chunk written at each row's
        ``start`` first; slots past the cache's end are dropped); arguments as in ``__call__``."""
        keys, values, start = kv_cache
        slots = start[:, None] + jnp.arange(q.shape[1])  # [B, C]
        rows = jnp.arange(q.shape[0])[:, None]
        keys = keys.at[rows, :, slots].set(k.astype(keys.dtype), mode="drop")  # [B, C, H, Dh] into [B, H, S, Dh]
        values = values.at[rows, :, slots].set(v.astype(values.dtype), mode="drop")
        scores = matmul("bqhe,bhse->bhqs", q, keys, self.dtype) / math.sqrt(q.shape[-1])  # [B, H, C, S]
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        heads = matmul("bhqs,bhse->bqhe", probs, values, self.dtype)  # [B, C, H, Dh]
        return dense(heads, self.out[...], self.dtype, contract=2), keys, values

    def _branch_step(self, q, k, v, kv: "BranchKV"):
        """One token of each of K continuations (the ``T`` axis) of every row's shared prefix.

        The prefix's keys are read, never written; each continuation's token
        goes to slot ``kv.slot`` of its own arrays, and it attends to the
        prefix's first ``lengths`` positions and its continuation's slots up
        to ``slot``, in one softmax.
        """
        neg = jnp.finfo(jnp.float32).min
        slot = kv.slot
        branch_k = jax.lax.dynamic_update_slice_in_dim(kv.branch_k, k[:, :, :, None].astype(kv.branch_k.dtype), slot, 3)
        branch_v = jax.lax.dynamic_update_slice_in_dim(kv.branch_v, v[:, :, :, None].astype(kv.branch_v.dtype), slot, 3)
        scale = math.sqrt(q.shape[-1])
        to_prefix = matmul("bkhe,bhse->bkhs", q, kv.prefix_k, self.dtype) / scale  # [B, K, H, Sp]
        to_branch = matmul("bkhe,bkhse->bkhs", q, branch_k, self.dtype) / scale  # [B, K, H, Sb]
        to_prefix = jnp.where(kv.prefix_mask[:, None, None, :], to_prefix, neg)
        to_branch = jnp.where((jnp.arange(branch_k.shape[3]) <= slot)[None, None, None, :], to_branch, neg)
        probs = jax.nn.softmax(jnp.concatenate([to_prefix, to_branch], -1), axis=-1)
        sp = to_prefix.shape[-1]
        heads = (matmul("bkhs,bhse->bkhe", probs[..., :sp], kv.prefix_v, self.dtype)
                 + matmul("bkhs,bkhse->bkhe", probs[..., sp:], branch_v, self.dtype))  # [B, K, H, Dh]
        return dense(heads, self.out[...], self.dtype, contract=2), branch_k, branch_v


class MLP(nnx.Module):
    """``gelu(x W1) W2``: [B, T, D] -> [B, T, D]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.up = normal(rngs, (config.d_model, config.d_ff), _INIT_STD, ("embed", "mlp"))  # [D, F]
        self.down = normal(rngs, (config.d_ff, config.d_model), _INIT_STD / math.sqrt(2 * config.num_layers),
                           ("mlp", "embed"))  # [F, D]
        self.dtype = config.dtype

    def __call__(self, x):
        h = jax.nn.gelu(dense(x, self.up[...], self.dtype))
        return dense(h, self.down[...], self.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, kv_cache=None):
        """x: [B, T, D] -> ``(x [B, T, D], k, v)``; see ``Attention`` for the rest."""
        y, k, v = self.attn(self.attn_norm(x), positions, mask, kv_cache)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, k, v


# ------------------------------------------------------------ the network
class Transformer(nnx.Module):
    """Decoder-only transformer with a policy (next-token) head and a value head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = normal(rngs, (config.vocab_size, config.d_model), _INIT_STD, ("vocab", "embed"))  # [V, D]
        if config.positions == "learned":
            self.pos_embed = normal(rngs, (config.max_len, config.d_model), _INIT_STD,
                                    ("position", "embed"))  # [max_len, D]
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model)
        self.policy_head = normal(rngs, (config.d_model, config.vocab_size), _INIT_STD, ("embed", "vocab"))  # [D, V]
        self.value_head = param(jnp.asarray(np.zeros((config.d_model,), np.float32)), ("embed",))  # [D]
        self.value_bias = param(jnp.asarray(np.zeros((), np.float32)), ())

    # -- pieces shared by the entry points
    def _embed(self, tokens, positions):
        """tokens, positions: int32[B, T] -> [B, T, D] float32."""
        x = self.embed[...][tokens]
        if self.config.positions == "learned":
            x = x + self.pos_embed[...][positions]
        return x

    def _heads(self, x):
        """x: [B, T, D] residual stream -> (logits [B, T, V], value_logits [B, T])."""
        h = self.final_norm(x)
        logits = dense(h, self.policy_head[...], self.config.dtype)
        return logits, self._value_head(h)

    def _value_head(self, h):
        """h: [B, T, D] normalised -> value_logits [B, T]."""
        return matmul("btd,d->bt", h, self.value_head[...], self.config.dtype) + self.value_bias[...]

    def _run_blocks(self, tokens, positions, mask):
        """Full causal pass over ``T`` tokens: -> (x [B, T, D], keys, values: L arrays [B, T, H, Dh] each)."""
        x = self._embed(tokens, positions)
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block(x, positions, mask)
            keys.append(k)
            values.append(v)
        return x, keys, values

    # -- entry points
    def __call__(self, tokens):
        """Full causal forward.

        Args:
          tokens: int32[B, T]; right padding (PAD) does not affect earlier positions.
        Returns:
          logits f32[B, T, V] (position t predicts token t+1), value_logits f32[B, T].
        """
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        mask = jnp.tril(jnp.ones((length, length), bool))[None]  # [1, T, T]
        x, _, _ = self._run_blocks(tokens, positions, mask)
        return self._heads(x)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (default config.max_len)."""
        c = self.config
        max_len = c.max_len if max_len is None else max_len
        if c.positions == "learned" and max_len > c.max_len:
            raise ValueError(f"cache max_len={max_len} exceeds the learned position table "
                             f"(config.max_len={c.max_len}); use a shorter cache or a larger max_len")
        shape = (batch_size, c.num_heads, max_len, c.head_dim)
        return KVCache(k=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.num_layers)),
                       v=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.num_layers)),
                       lengths=jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, tokens, lengths, cache: KVCache, active=None):
        """Fills ``cache`` from scratch with ragged, right-padded prompts.

        The cache's previous contents are overwritten: rows start at position 0.

        Args:
          tokens: int32[B, T], row b's prompt in ``tokens[b, :lengths[b]]``,
            anything after it is ignored (T <= cache.max_len).
          lengths: int32[B], 1 <= lengths[b] <= T.
          cache: a cache with B rows (e.g. ``init_cache(B)``).
          active: bool[B] or None: the rows whose results are used (the others
            are computed all the same; for compute accounting only).
        Returns:
          ``(last_logits f32[B, V], last_value_logits f32[B], cache)``: the
          outputs at position ``lengths[b] - 1`` of each row, and the cache
          with ``cache.lengths == lengths``.
        """
        batch, length = tokens.shape
        if length > cache.max_len:
            raise ValueError(f"prefill of {length} tokens does not fit a cache of {cache.max_len}")
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        mask = jnp.tril(jnp.ones((length, length), bool))[None]
        x, keys, values = self._run_blocks(tokens, positions, mask)
        lengths = jnp.asarray(lengths, jnp.int32)
        last = x[jnp.arange(batch), lengths - 1][:, None]  # [B, 1, D]
        logits, value_logits = self._heads(last)
        def fill(layers, new):  # each layer's new [B, T, H, Dh] -> its cache [B, H, :T, Dh]
            return tuple(a.at[:, :, :length].set(n.transpose(0, 2, 1, 3).astype(a.dtype))
                         for a, n in zip(layers, new))

        cache = KVCache(k=fill(cache.k, keys), v=fill(cache.v, values),
                        lengths=lengths)
        return logits[:, 0], value_logits[:, 0], cache

    def decode(self, tokens, cache: KVCache, active=None):
        """Pushes one token per row through the network.

        Row b's token goes to position ``cache.lengths[b]`` and attends to
        positions ``<= cache.lengths[b]``.

        Args:
          tokens: int32[B].
          cache: the cache holding each row's prefix.
          active: bool[B] or None (all rows). Inactive rows write nothing and
            keep their length; their outputs are meaningless.
        Returns:
          ``(logits f32[B, V], value_logits f32[B], cache)`` with the lengths
          of active rows increased by one.
        """
        batch = tokens.shape[0]
        active = jnp.ones((batch,), bool) if active is None else jnp.asarray(active, bool)
        positions = cache.lengths[:, None]  # [B, 1]
        write_at = jnp.where(active, cache.lengths, cache.max_len)  # out of range: dropped
        mask = (jnp.arange(cache.max_len)[None, :] <= cache.lengths[:, None])[:, None]  # [B, 1, S]
        x = self._embed(tokens[:, None], jnp.minimum(positions, self._max_position()))
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache.k, cache.v):
            x, k, v = block(x, positions, mask, DecodeKV(k, v, write_at))
            keys.append(k)
            values.append(v)
        logits, value_logits = self._heads(x)
        cache = KVCache(k=tuple(keys), v=tuple(values), lengths=cache.lengths + active.astype(jnp.int32))
        return logits[:, 0], value_logits[:, 0], cache

    def extend(self, tokens, cache: KVCache, num_new):
        """Pushes a chunk of new tokens per row through the network after its cached prefix (KV reuse).

        Row b's ``tokens[b, :num_new[b]]`` go to positions ``cache.lengths[b]
        ...``; each attends to the cached prefix and to the chunk's tokens up
        to itself, so the outputs equal a prefill of prefix + chunk. The
        chunk has a static width C: its tokens after ``num_new[b]`` are pushed
        through too and written beyond the new length, where nothing attends
        to them (slots past the cache's end are dropped).

        Args:
          tokens: int32[B, C].
          cache: the prefixes.
          num_new: int32[B], 0 <= num_new[b] <= C.
        Returns:
          ``(logits f32[B, V], value_logits f32[B], cache)``: the outputs at
          each row's last new token (meaningless where ``num_new`` is 0) and
          the cache with ``lengths + num_new``.
        """
        batch, width = tokens.shape
        num_new = jnp.asarray(num_new, jnp.int32)
        positions = cache.lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None]  # [B, C]
        mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]  # [B, C, S]
        x = self._embed(tokens, jnp.minimum(positions, self._max_position()))
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache.k, cache.v):
            x, k, v = block(x, positions, mask, ChunkKV(k, v, cache.lengths))
            keys.append(k)
            values.append(v)
        last = x[jnp.arange(batch), jnp.maximum(num_new - 1, 0)][:, None]  # [B, 1, D]
        logits, value_logits = self._heads(last)
        cache = KVCache(k=tuple(keys), v=tuple(values), lengths=cache.lengths + num_new)
        return logits[:, 0], value_logits[:, 0], cache

    def init_branches(self, batch_size: int, num_branches: int, length: int) -> BranchCache:
        """Empty keys/values for ``num_branches`` continuations of ``length`` tokens per row."""
        c = self.config
        shape = (batch_size, num_branches, c.num_heads, length, c.head_dim)
        return BranchCache(k=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.num_layers)),
                           v=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.num_layers)))

    def decode_branches(self, tokens, prefix: KVCache, branches: BranchCache, slot, active=None):
        """Pushes one token of each of K continuations of every row's prefix through the network.

        The K continuations share their prefix's cache (read, never written
        or copied); continuation k's token is its ``slot``-th, at position
        ``prefix.lengths[b] + slot``, and attends to the prefix and to its
        own slots ``0 .. slot``. The outputs equal a decode step of a cache
        holding prefix + that continuation.

        Args:
          tokens: int32[B, K].
          prefix: the prefixes (``B`` rows).
          branches: the continuations' keys/values so far (``init_branches``).
          slot: int32[], the same for every row.
          active: bool[B, K] or None: the continuations that take a token (the
            others' outputs are meaningless and their slot is written all the
            same; for compute accounting only).
        Returns:
          ``(logits f32[B, K, V], value_logits f32[B, K], branches)`` with
          slot ``slot`` written.
        """
        batch, num = tokens.shape
        slot = jnp.asarray(slot, jnp.int32)
        positions = jnp.broadcast_to(prefix.lengths[:, None] + slot, (batch, num))  # [B, K]
        prefix_mask = jnp.arange(prefix.max_len)[None, :] < prefix.lengths[:, None]  # [B, Sp]
        x = self._embed(tokens, jnp.minimum(positions, self._max_position()))  # [B, K, D]
        keys, values = [], []
        for block, pk, pv, bk, bv in zip(self.blocks, prefix.k, prefix.v, branches.k, branches.v):
            x, bk, bv = block(x, positions, None, BranchKV(pk, pv, prefix_mask, bk, bv, slot))
            keys.append(bk)
            values.append(bv)
        logits, value_logits = self._heads(x)
        return logits, value_logits, BranchCache(k=tuple(keys), v=tuple(values))

    def score_continuations(self, tokens, lengths, continuations, *, continuation_values: bool = False):
        """Scores K continuations of each prefix in ONE parallel pass (prefix shared, no cache).

        The sequence fed through the blocks is ``[prefix (T) | cont_0 (S) | ...
        | cont_{K-1} (S)]`` per row, with positions and an attention mask that
        make it equivalent to K separate forwards of ``prefix[:lengths[b]] +
        cont_k``: prefix tokens attend causally within the prefix; token s of
        continuation k sits at position ``lengths[b] + s`` and attends to the
        prefix's first ``lengths[b]`` tokens and to tokens ``0..s`` of its own
        continuation. This is what the learner differentiates (policy loss over
        candidate steps) and what enumerated candidates are scored with; it
        costs ``T + K * S`` token forwards per row instead of ``K * (T + S)``.

        Args:
          tokens: int32[B, T] prefixes, row b's in ``tokens[b, :lengths[b]]``.
          lengths: int32[B], 1 <= lengths[b] <= T.
          continuations: int32[B, K, S].
          continuation_values: also return the value after every continuation
            token.
        Returns:
          ``(logits f32[B, K, S, V], value_logits f32[B])``: ``logits[b, k, s]``
          is the distribution of ``continuations[b, k, s]`` given everything
          before it; ``value_logits`` is the value at each prefix's last token;
          with ``continuation_values`` a third output f32[B, K, S], the value
          at token s of continuation k.
        """
        batch, length = tokens.shape
        _, K, S = continuations.shape
        lengths = jnp.asarray(lengths, jnp.int32)
        x, _, _ = self._run_blocks(*self.continuation_inputs(tokens, lengths, continuations))
        last = x[jnp.arange(batch), lengths - 1]  # [B, D]
        cont = x[:, length:].reshape(batch, K, S, -1)
        # The output before continuation token s: the prefix's last token for s = 0.
        before = jnp.concatenate([jnp.broadcast_to(last[:, None, None], (batch, K, 1, last.shape[-1])),
                                  cont[:, :, :-1]], 2)  # [B, K, S, D]
        logits, _ = self._heads(before.reshape(batch, K * S, -1))
        _, value_logits = self._heads(last[:, None])
        if not continuation_values:
            return logits.reshape(batch, K, S, -1), value_logits[:, 0]
        cont_values = self._value_head(self.final_norm(cont.reshape(batch, K * S, -1)))
        return logits.reshape(batch, K, S, -1), value_logits[:, 0], cont_values.reshape(batch, K, S)

    def continuation_inputs(self, tokens, lengths, continuations):
        """``score_continuations``'s pass: (sequence int32[B, T + K*S], positions int32[B, T + K*S],
        ``ContinuationMask``); token s of continuation k sits at position ``lengths[b] + s``."""
        batch, length = tokens.shape
        _, K, S = continuations.shape
        idx = jnp.arange(length)
        cont_pos = jnp.broadcast_to(lengths[:, None, None] + jnp.arange(S)[None, None, :], (batch, K, S))
        positions = jnp.concatenate([jnp.broadcast_to(idx, (batch, length)), cont_pos.reshape(batch, K * S)], 1)
        seq = jnp.concatenate([tokens, continuations.reshape(batch, K * S)], 1)
        return (seq, jnp.minimum(positions, self._max_position()),
                ContinuationMask(length, K, idx[None, :] < lengths[:, None]))

    def _max_position(self) -> int:
        return self.config.max_len - 1


# --------------------------------------------------------------- accounting
def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls per token: everything except the embedding
    tables (which are lookups), the norm scales and the value bias."""
    d, f, L = config.d_model, config.d_ff, config.num_layers
    return L * (4 * d * d + 2 * d * f) + d * config.vocab_size + d


def flops_per_token(config: ModelConfig, context_len: int) -> float:
    """Forward FLOPs of one token attending to ``context_len`` positions.

    ``2 * matmul_params`` (a multiply-add per weight) plus attention:
    ``QK^T`` and ``probs @ V`` each cost ``2 * D * context_len`` per layer, so
    ``4 * L * D * context_len`` (the PaLM convention: in a full causal forward
    of length T pass ``context_len = T``, since the whole ``T x T`` score
    matrix is computed). Training costs about three times this (backward ~ 2x
    forward): ``6 N + 12 L D T``. Norms, softmax and the optimizer are not
    counted.
    """
    return 2.0 * matmul_params(config) + 4.0 * config.num_layers * config.d_model * context_len
