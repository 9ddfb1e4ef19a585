"""Tree attention: verify a draft tree in one forward pass (docs/tree_verification.md).

`tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, *, softmax_scale=None)`: q (B, Hq, T, D), the
queries of the T tree nodes; k_cache, v_cache (B, Hkv, Lmax, D), Hq a multiple of Hkv, in which the tree's K/V rows
have already been written at [len, len+T) (len = cache_seqlens[b], the prefix length, tree excluded; rows may have
different lengths); tree_mask_bits (B, T, ceil(T/32)) int32, bit j of row i set iff node j is an ancestor of node i
or i itself (kestrel.reference.tree). Tree node i attends the whole prefix [0, len) and its ancestors-or-self:
out_i = softmax(scale · q_i kᵀ) v over those keys, scale 1/sqrt(D) unless given. Out (B, Hq, T, D) in q's dtype.

Unused (padded) nodes have no bits: they attend the prefix only, and give zeros when the prefix is empty too.
K/V slots of unused nodes and everything past len+T are never read into the output (they may hold garbage).

Forward only (it is used for decoding); the op has no autograd formula.

Backends: on CUDA the Triton kernel (kestrel/kernels/tree_attention.py: every K/V tile read once per (batch,
kv-head) for all T queries of a GQA group, split-K over the prefix, fp32 online softmax), for float16, bfloat16 and
float32, head dims up to 256. On the CPU a chunked PyTorch formulation in float32 (float64 for float64 inputs): the
prefix is processed in chunks of keys, merged with an online softmax, so memory stays at one chunk of scores and
no (T x Lmax) mask is built.

Checks: shapes, dtypes, devices, Hq % Hkv == 0 and the bits' shape, everywhere (no data read). The values of
cache_seqlens (0 <= len and len + T <= Lmax) are checked on the CPU path only: checking them on a GPU would need a
host sync. The CUDA kernel clamps each length to [0, Lmax - T] so that a bad length cannot read outside the cache
(the result for such a row is then meaningless, but memory-safe). The bits themselves are not validated (a row is
whatever set of tree keys its bits name).
"""

import math

import torch

from .._checks import is_number
from ._library import triton_kernel_op

KERNEL_MAX_HEAD_DIM = 256
CPU_CHUNK_ELEMENTS = 1 << 22  # scores per CPU step: B x Hq x T x chunk


def _describe(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale):
    name = "tree_attention"
    for label, t, layout in (
        ("q", q, "(B, Hq, T, D)"),
        ("k_cache", k_cache, "(B, Hkv, Lmax, D)"),
        ("v_cache", v_cache, "(B, Hkv, Lmax, D)"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {label} must be {layout}, got {_describe(t)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name}: {label} must be float16, bfloat16 or float32 (float64 on the CPU), got {t.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"{name}: q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    B, Hq, T, D = q.shape
    if T == 0 or D == 0:
        raise ValueError(f"{name}: q must have at least one tree node and a head dim, got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{name}: k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"{name}: k_cache must be (B={B}, Hkv, Lmax, D={D}), got {tuple(k_cache.shape)}")
    Hkv, l_max = k_cache.shape[1], k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: the query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    if l_max < T:
        raise ValueError(f"{name}: the cache holds Lmax={l_max} positions, fewer than the T={T} tree nodes")
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or cache_seqlens.shape != (B,)
        or cache_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"{name}: cache_seqlens must be an int32 (or int64) tensor of shape ({B},), got "
            f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} of shape "
            f"{_describe(cache_seqlens)}"
        )
    words = (T + 31) // 32
    if (
        not isinstance(tree_mask_bits, torch.Tensor)
        or tree_mask_bits.dtype != torch.int32
        or tuple(tree_mask_bits.shape) != (B, T, words)
    ):
        raise ValueError(
            f"{name}: tree_mask_bits must be an int32 tensor of shape (B={B}, T={T}, "
            f"ceil(T/32)={words}), got {getattr(tree_mask_bits, 'dtype', '')} of shape "
            f"{_describe(tree_mask_bits)}"
        )
    for label, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("cache_seqlens", cache_seqlens),
        ("tree_mask_bits", tree_mask_bits),
    ):
        if t.device != q.device:
            raise ValueError(f"{name}: {label} is on {t.device} but q on {q.device}")
    if softmax_scale is not None and not is_number(softmax_scale):
        raise TypeError(
            f"{name}: softmax_scale must be None or a number, got {type(softmax_scale).__name__} {softmax_scale!r}"
        )
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"{name}: softmax_scale must be None or a finite positive number, got {softmax_scale!r}")
    if q.is_cuda:
        if q.dtype == torch.float64:
            raise TypeError(
                f"{name}: float64 runs on the CPU path only; the CUDA kernel takes float16, bfloat16 and float32"
            )
        if D > KERNEL_MAX_HEAD_DIM:
            raise ValueError(f"{name}: the CUDA kernel takes head dims up to {KERNEL_MAX_HEAD_DIM}, got D={D}")


def _check_lengths(cache_seqlens, T, l_max):
    """The value checks (they read the lengths: the CPU path only)."""
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi + T > l_max:
        raise ValueError(
            f"tree_attention: cache_seqlens must lie in [0, Lmax - T = {l_max - T}] (the tree's T={T} "
            f"rows follow the prefix in a cache of Lmax={l_max}), got values in [{lo}, {hi}]"
        )


def _softmax_merge(scores, values, running):
    """Merge a chunk of scores (B, Hkv, R, C) (masked: -inf) and values (B, Hkv, C, D) into (max, sum, acc)."""
    m_i, l_i, acc = running
    m_new = torch.maximum(m_i, scores.amax(dim=-1))
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows that have seen nothing
    p = torch.exp(scores - m_safe[..., None])
    alpha = torch.exp(m_i - m_safe)
    return m_new, l_i * alpha + p.sum(dim=-1), acc * alpha[..., None] + p @ values


def tree_attention_cpu(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale, chunk=None):
    """The CPU path: the GQA group's T rows of each kv-head against chunks of the prefix (masked per sequence),
    then against the T tree slots masked by the unpacked bits, merged with an online softmax."""
    B, Hq, T, D = q.shape
    Hkv, l_max = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    _check_lengths(cache_seqlens, T, l_max)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = group * T
    qg = q.to(dtype).reshape(B, Hkv, rows, D) * softmax_scale  # head hk*group + g, node t -> row g*T + t
    lengths = cache_seqlens.to(torch.int64)
    running = (
        torch.full((B, Hkv, rows), float("-inf"), dtype=dtype),
        torch.zeros((B, Hkv, rows), dtype=dtype),
        torch.zeros((B, Hkv, rows, D), dtype=dtype),
    )
    chunk = chunk or max(64, CPU_CHUNK_ELEMENTS // max(B * Hq * T, 1))
    shortest, prefix = int(lengths.min()), int(lengths.max())
    for start in range(0, prefix, chunk):
        stop = min(start + chunk, prefix)
        keys, values = k_cache[:, :, start:stop].to(dtype), v_cache[:, :, start:stop].to(dtype)
        scores = qg @ keys.transpose(-1, -2)
        if stop > shortest:
            # positions past a shorter sequence's prefix may hold its tree or garbage (NaN): zero them, mask them
            valid = (torch.arange(start, stop) < lengths[:, None])[:, None, :, None]  # (B, 1, C, 1)
            values = values.masked_fill(~valid, 0.0)
            scores = scores.masked_fill(~valid.transpose(-1, -2), float("-inf"))
        running = _softmax_merge(scores, values, running)
    slots = (lengths[:, None] + torch.arange(T))[:, None, :, None].expand(B, Hkv, T, D)
    cols = torch.arange(T)
    seen = ((tree_mask_bits[:, :, cols // 32] >> (cols % 32)) & 1).bool()  # (B, T, T): [b, i, j] node i sees j
    seen = seen[:, None].expand(B, group, T, T).reshape(B, 1, rows, T)
    attended = seen.any(dim=2)[..., None]  # (B, 1, T, 1): tree slots some row attends
    keys = k_cache.gather(2, slots).to(dtype).masked_fill(~attended, 0.0)
    values = v_cache.gather(2, slots).to(dtype).masked_fill(~attended, 0.0)
    scores = (qg @ keys.transpose(-1, -2)).masked_fill(~seen, float("-inf"))
    _, l_i, acc = _softmax_merge(scores, values, running)
    out = acc / torch.where(l_i > 0, l_i, torch.ones_like(l_i))[..., None]  # a row that saw no key: zeros
    return out.reshape(B, Hq, T, D).to(q.dtype)


def _tree_attention_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """The op on CUDA: the Triton kernel (kernels/tree_attention.py)."""
    from ..kernels.tree_attention import tree_attention_forward  # triton: a Linux-only dependency

    if q.numel() == 0:  # no sequences or no query heads: an empty result, and no empty grid launched
        return q.new_empty(q.shape)
    return tree_attention_forward(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale)


def _tree_attention_cpu_kernel(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale):
    """The op on the CPU: the chunked PyTorch formulation (it reads the lengths on the host)."""
    if q.numel() == 0:
        return q.new_empty(q.shape)
    with torch.no_grad():
        return tree_attention_cpu(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale)


def _tree_attention_fake(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale):
    return q.new_empty(q.shape)


_tree_attention_op = triton_kernel_op(
    "kestrel::tree_attention", _tree_attention_cuda, _tree_attention_cpu_kernel, _tree_attention_fake
)


def tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, *, softmax_scale=None):
    """Attention of the T draft-tree nodes over the prefix and their ancestors-or-self; see the module docstring.
    Forward only."""
    _check(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _tree_attention_op(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, scale)


__all__ = ["tree_attention", "tree_attention_cpu", "KERNEL_MAX_HEAD_DIM"]
