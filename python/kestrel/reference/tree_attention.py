"""Tree attention written from the formula (docs/tree_verification.md), with an explicit mask: the tests' oracle.

q (B, Hq, T, D); k_cache, v_cache (B, Hkv, Lmax, D) with the tree's K/V at [len, len+T), len = cache_seqlens[b];
tree_mask_bits (B, T, ceil(T/32)) int32 in the layout of kestrel.reference.tree. Row i of sequence b attends key
position p iff p < len, or p = len + j with bit j of row i set: out = softmax(scale · q kᵀ + mask) v over those keys.
A row that may attend no key (an unused node with an empty prefix) is zero.
"""

import math

import torch


def unpack_tree_bits(tree_mask_bits, num_nodes):
    """(B, T, T) bool from packed int32 words: [b, i, j] iff bit j % 32 of word j // 32 of row i is set."""
    cols = torch.arange(num_nodes, device=tree_mask_bits.device)
    words = tree_mask_bits[:, :, cols // 32].to(torch.int64) & 0xFFFFFFFF
    return ((words >> (cols % 32)) & 1).bool()


def visible_keys(cache_seqlens, tree_mask_bits, num_nodes, l_max):
    """(B, T, Lmax) bool: the keys each tree row attends (the prefix, then its ancestors-or-self)."""
    lengths = cache_seqlens.to(torch.int64).cpu()
    tree = unpack_tree_bits(tree_mask_bits.cpu(), num_nodes)
    B = tree.shape[0]
    mask = torch.zeros((B, num_nodes, l_max), dtype=torch.bool)
    for b in range(B):
        length = int(lengths[b])
        mask[b, :, :length] = True
        mask[b, :, length : length + num_nodes] = tree[b]
    return mask


def tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask_bits, softmax_scale=None, dtype=torch.float64):
    """out (B, Hq, T, D) in `dtype` (float64 by default), on the CPU."""
    B, Hq, T, D = q.shape
    Hkv, l_max = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qf = q.detach().cpu().to(dtype)
    kf = k_cache.detach().cpu().to(dtype).repeat_interleave(Hq // Hkv, dim=1)
    vf = v_cache.detach().cpu().to(dtype).repeat_interleave(Hq // Hkv, dim=1)
    mask = visible_keys(cache_seqlens, tree_mask_bits, T, l_max)[:, None]  # (B, 1, T, Lmax)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)  # a row with no key: softmax gives NaN
    vf = vf.masked_fill(~mask.any(dim=2)[..., None], 0.0)  # keys nobody attends: garbage there must not leak
    return weights @ vf


__all__ = ["tree_attention", "unpack_tree_bits", "visible_keys"]
