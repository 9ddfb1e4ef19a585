"""Power-law graph attention (PLGA, PLDR-LLM; docs/plga.md).

`plga_attention(q, k, v, G, *, causal=True, cache_seqlens=None, tree_mask_bits=None)` = softmax((q·G)·kᵀ/√d)·v
with G of shape (B or 1, Hq, d, d) multiplying the query (after RoPE) on the query side, q (B, Hq, Lq, d), k and v
(B, Hkv, Lk, d), Hq a multiple of Hkv (GQA: G belongs to the query heads). Decode: Lq < Lk puts the rows at the end
of the keys (cache_seqlens (B,) gives each sequence its own number of valid keys; the rows past it are never read
into the output or the gradients, whatever they hold). Draft-tree mode (tree_mask_bits (B, Lq, ceil(Lq/32)) int32,
forward only): cache_seqlens holds the prefix lengths, the tree's rows sit at [len_b, len_b + Lq) of k and v, and
row i sees the prefix and its ancestors-or-self: q' = q·G, then kestrel.ops.tree_attention (its Triton kernel on a
GPU) with the scale 1/√d.

The kernel plan ("a GEMM then flash attention"; docs/plga.md): q' = q·G as one batched matrix product in float32
(2·L·d² FLOPs per head, a few % of the attention), cast back to q's dtype, then PyTorch's fused
scaled_dot_product_attention (on a GPU FlashAttention may serve fp16/bf16 when no mask is needed: no cache_seqlens
and Lq == Lk or causal=False; with a mask SDPA takes a backend that accepts one). Autograd gives dq = dq'·Gᵀ and
dG = Σ_l q_lᵀ dq'_l through the product.
"""

import math

import torch
import torch.nn.functional as F

from .._checks import check_cache_seqlens, check_tree_mask_bits
from .._masks import causal_visible, keys_seen_zeroed
from .tree_attention import tree_attention


def _check(q, k, v, G, cache_seqlens, tree_mask_bits):
    name = "plga_attention"
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name}: {label} must be a 4-D tensor (B, H, L, d), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Lq, d = q.shape
    if d == 0:
        raise ValueError(f"{name}: the head dim d must be >= 1 (q.shape[-1]), got q of shape {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(
            f"{name}: k and v must both be (B={B}, Hkv, Lk, d={d}), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: the query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(f"{name}: more query rows ({Lq}) than keys ({Lk})")
    if not isinstance(G, torch.Tensor) or G.dim() != 4 or G.shape[0] not in (1, B) or G.shape[1:] != (Hq, d, d):
        raise ValueError(
            f"{name}: G must be (B={B} or 1, Hq={Hq}, d={d}, d={d}), got "
            f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}"
        )
    if not G.is_floating_point():
        raise TypeError(f"{name}: G must be a floating-point tensor, got {G.dtype}")
    if G.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"{name}: q, k, v and G must be on one device, got {q.device}, {k.device}, {v.device}, {G.device}"
        )
    if tree_mask_bits is None:
        check_cache_seqlens(name, cache_seqlens, B, Lq, Lk, q)
    else:
        check_tree_mask_bits(name, tree_mask_bits, cache_seqlens, B, Lq, Lk, q)


def plga_attention(q, k, v, G, *, causal=True, cache_seqlens=None, tree_mask_bits=None):
    """softmax((q·G)·kᵀ/√d + mask)·v; see the module docstring."""
    _check(q, k, v, G, cache_seqlens, tree_mask_bits)
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    wide = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
    q_metric = torch.matmul(q.to(wide), G.to(wide)).to(q.dtype)  # q' = q·G (query side)
    if tree_mask_bits is not None:
        return tree_attention(q_metric, k, v, cache_seqlens, tree_mask_bits, softmax_scale=1.0 / math.sqrt(d))
    if cache_seqlens is not None and q.is_cuda:
        cache_seqlens = cache_seqlens.to(q.device).clamp(Lq, Lk)  # unchecked there: no host sync
    mask = causal_visible(B, Lq, Lk, causal, cache_seqlens, q.device)
    if cache_seqlens is not None:  # rows past a length may hold NaN/inf: a -inf score alone would still give 0 * NaN
        k, v = keys_seen_zeroed(k, v, mask)
    if Hq != Hkv:
        group = Hq // Hkv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q_metric, k, v, attn_mask=mask, is_causal=bool(causal) and mask is None and Lq > 1, scale=1.0 / math.sqrt(d)
    )


__all__ = ["plga_attention"]
