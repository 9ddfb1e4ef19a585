"""Plain-Python tree facts for speculative decoding (docs/tree_verification.md): the oracle that
`kestrel.decoding.build_tree` and the tree-attention kernel are tested against.

A draft tree for one sequence has T nodes in topological order: `parents (B, T)` int, `parents[:, 0] == -1`, every
other used node's parent has a smaller index; a batch pads shorter trees with parent == -2 (unused node).

Packed ancestor bits: int32 `(B, T, W)` with W = ceil(T / 32); bit (j % 32) of word j // 32 of row i is set iff node
j is an ancestor of node i or i itself. Unused nodes (parent -2) have every bit clear and no node has them as
ancestors. Bit 31 is the sign bit of the int32 word.
"""

import torch


def words_for(num_nodes):
    return (num_nodes + 31) // 32


def ancestor_lists(parents_row):
    """For one tree (a list of ints): each node's ancestor-or-self list, root first; None for unused nodes."""
    paths = []
    for i, parent in enumerate(parents_row):
        if parent == -2:
            paths.append(None)
        elif parent == -1:
            paths.append([i])
        else:
            paths.append(paths[parent] + [i])
    return paths


def ancestor_bits(parents):
    """Packed ancestor-or-self bits (B, T, W) int32 for `parents (B, T)`, written one bit at a time."""
    parents = torch.as_tensor(parents).cpu()
    B, T = parents.shape
    W = words_for(T)
    bits = torch.zeros((B, T, W), dtype=torch.int64)
    for b in range(B):
        for i, path in enumerate(ancestor_lists(parents[b].tolist())):
            for j in path or []:
                bits[b, i, j // 32] |= 1 << (j % 32)
    # reinterpret the unsigned 32-bit words as int32 (bit 31 becomes the sign)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def ancestor_mask(parents):
    """The same relation as a bool (B, T, T) matrix: mask[b, i, j] iff j is an ancestor-or-self of i."""
    parents = torch.as_tensor(parents).cpu()
    B, T = parents.shape
    mask = torch.zeros((B, T, T), dtype=torch.bool)
    for b in range(B):
        for i, path in enumerate(ancestor_lists(parents[b].tolist())):
            for j in path or []:
                mask[b, i, j] = True
    return mask


__all__ = ["ancestor_bits", "ancestor_lists", "ancestor_mask", "words_for"]
