"""Which keys each query row sees, as a dense bool mask, for the PyTorch paths that need one (the kernels read the
lengths and the packed tree bits themselves). One helper for every attention op and for kestrel.nn's layers.

Two layouts of the keys, both (B, H, Lk, D) with per-sequence lengths:
- a causal block or a cached decode: query row i of sequence b sits at absolute position len_b - Lq + i, with
  len_b = cache_seqlens[b] (the valid keys) or Lk; it sees keys [0, len_b - Lq + i] (all valid keys if not causal);
- a draft tree: the Lq = T tree rows sit at [prefix_b, prefix_b + T) (prefix_b = cache_seqlens[b], the prefix
  length); row i sees the prefix and the tree nodes j of its packed ancestor-or-self bits (bit j % 32 of word
  j // 32 of tree_mask_bits[b, i], int32 (B, T, ceil(T / 32)); docs/tree_verification.md).
"""

import torch


def unpack_tree_bits(tree_mask_bits, T):
    """Packed ancestor-or-self bits (B, T, W) int32 -> bool (B, T, T), [b, i, j] = node i sees node j."""
    j = torch.arange(T, device=tree_mask_bits.device)
    words = tree_mask_bits.gather(2, (j // 32).expand(tree_mask_bits.shape[0], tree_mask_bits.shape[1], T))
    return ((words >> (j % 32)) & 1).bool()


def causal_visible(B, Lq, Lk, causal, cache_seqlens, device):
    """None (a plain causal block, or full attention over all keys: no mask needed) or (B, 1, Lq, Lk) bool."""
    if cache_seqlens is None and (not causal or Lq == Lk):
        return None
    lengths = (
        cache_seqlens.to(device=device, dtype=torch.long)
        if cache_seqlens is not None
        else torch.full((B,), Lk, dtype=torch.long, device=device)
    )
    keys = torch.arange(Lk, device=device)
    visible = keys[None, None, :] < lengths[:, None, None]
    if causal:
        rows = lengths[:, None] - Lq + torch.arange(Lq, device=device)[None, :]
        visible = visible & (keys[None, None, :] <= rows[:, :, None])
    else:
        visible = visible.expand(B, Lq, Lk)
    return visible[:, None]


def tree_visible(prefix_lens, tree_mask_bits, Lk):
    """(B, 1, T, Lk) bool: tree row i sees the prefix [0, prefix_b) and its ancestors-or-self in the tree slots."""
    B, T = tree_mask_bits.shape[:2]
    device = tree_mask_bits.device
    prefix = prefix_lens.to(device=device, dtype=torch.long)
    keys = torch.arange(Lk, device=device)
    rel = keys[None, :] - prefix[:, None]  # (B, Lk): the key's index in the tree, if it is a tree slot
    in_tree = (rel >= 0) & (rel < T)
    ancestors = unpack_tree_bits(tree_mask_bits, T)
    tree_part = ancestors.gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, Lk)) & in_tree[:, None, :]
    return ((keys[None, None, :] < prefix[:, None, None]) | tree_part)[:, None]


def keys_seen_zeroed(k, v, visible):
    """k and v (B, H, Lk, D) with the keys no row of `visible` (B, 1 or H, Lq, Lk) sees replaced by zeros (selected,
    not multiplied: they may hold NaN or inf, and a masked score still multiplies the value by 0)."""
    seen = visible.any(dim=-2).any(dim=1)[:, None, :, None]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(seen, k, zero), torch.where(seen, v, zero)


__all__ = ["causal_visible", "keys_seen_zeroed", "tree_visible", "unpack_tree_bits"]
