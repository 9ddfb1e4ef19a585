"""Draft trees for speculative decoding (docs/tree_verification.md): `build_tree` turns `parents` into the buffers that
tree attention and the verify ops read; `static_tree` (Medusa "choices") and `dynamic_tree` (EAGLE-2 style, by
cumulative draft log-probability) produce the trees.

Conventions (as kestrel.reference.tree): `parents (B, T)`, node 0 the root with parent -1, every other used node's
parent has a smaller index, padding nodes have parent -2. The root is the last emitted token; the tree's T tokens go
to cache rows [len, len + T) in one target forward, node i at RoPE position len + depth[i].
"""

from dataclasses import dataclass, field

import torch

from .._checks import is_int


@dataclass
class TreeBuffers:
    """Everything about a batch of draft trees that the decoding step needs, on parents' device.

    parents       (B, T) int32  parent per node (-1 root, -2 padding)
    depth         (B, T) int32  the root has depth 0 (padding: 0); RoPE positions are cache_seqlens[:, None] + depth
    ancestor_bits (B, T, W) int32, W = ceil(T / 32): bit j % 32 of word j // 32 of row i is set iff node j is an
                  ancestor of i or i itself (bit 31 is the sign bit); padding rows are 0 (the tree-attention mask)
    first_child   (B, T) int32  the lowest-index child, -1 if none
    next_sibling  (B, T) int32  the next child (by index) of the same parent, -1 if none
    leaf_paths    (B, num_leaves_max, max_depth + 1) int32: root-to-leaf node lists, leaves in increasing index,
                  -1 padded (rows past a tree's leaf count are all -1)
    num_leaves    (B,) int32
    max_depth     int: the accept_index width of the verify ops is max_depth + 1
    """

    parents: torch.Tensor
    depth: torch.Tensor
    ancestor_bits: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor
    leaf_paths: torch.Tensor
    num_leaves: torch.Tensor
    max_depth: int

    @property
    def num_nodes(self):
        return self.parents.shape[1]

    def positions(self, cache_seqlens):
        """RoPE positions (B, T) of the tree's tokens: cache_seqlens[:, None] + depth (int64)."""
        return cache_seqlens.long()[:, None] + self.depth.long()


def _ancestor_or_self(parents):
    """reach (B, T, T) bool, reach[b, i, j] iff j is an ancestor-or-self of used node i: pointer doubling, so
    ceil(log2(T)) gathers whatever the depth."""
    B, T = parents.shape
    idx = torch.arange(T, device=parents.device)
    up = torch.where(parents >= 0, parents.long(), idx)  # one step up; the root and padding point at themselves
    reach = (idx[:, None] == idx[None, :]) | (idx[None, None, :] == up[:, :, None])
    for _ in range(max(1, (T - 1).bit_length())):  # reach covers distances 0 .. 2**k, `up` jumps 2**k
        reach = reach | torch.gather(reach, 1, up[:, :, None].expand(B, T, T))
        up = torch.gather(up, 1, up)
    return reach & (parents != -2)[:, :, None]


def _pack_bits(reach):
    B, T, _ = reach.shape
    W = (T + 31) // 32
    padded = torch.nn.functional.pad(reach, (0, W * 32 - T)).view(B, T, W, 32).long()
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.long, device=reach.device), torch.arange(32, device=reach.device)
    )
    words = (padded * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def build_tree(parents, max_depth=None, num_leaves=None):
    """TreeBuffers for `parents (B, T)` (any integer dtype; the buffers live on its device), built with batched
    tensor ops (no per-node Python loop).

    max_depth / num_leaves size accept_index and leaf_paths; give them (e.g. StaticTree.max_depth, or K for a
    dynamic tree) to build without a host synchronisation; when None they are read from the data (one sync each;
    0 and 1 for an empty batch). They must be at least the trees' real maximum depth and leaf count (paths beyond
    are cut). Each used node's parent must be a used node of smaller index and node 0 the root (parent -1):
    checked for CPU tensors when build_tree reads the data anyway (max_depth or num_leaves None; outside
    torch.compile). With both given it reads nothing (as the decoding loop calls it, with trees that are valid by
    construction), and on a GPU parents outside [-2, T) are clamped, so a bad tree gives meaningless buffers but
    reads no memory outside them.
    """
    if not isinstance(parents, torch.Tensor) or parents.dim() != 2 or parents.shape[1] < 1:
        got = tuple(parents.shape) if isinstance(parents, torch.Tensor) else type(parents).__name__
        raise ValueError(f"build_tree: parents must be (B, T) with T >= 1, got {got}")
    if parents.is_floating_point() or parents.is_complex() or parents.dtype == torch.bool:
        raise TypeError(f"build_tree: parents must be an integer tensor, got {parents.dtype}")
    for label, value in (("max_depth", max_depth), ("num_leaves", num_leaves)):
        if value is not None and not is_int(value):
            raise TypeError(f"build_tree: {label} must be None or an int, got {type(value).__name__} {value!r}")
    B, T = parents.shape
    device = parents.device
    idx = torch.arange(T, device=device)
    reads_data = max_depth is None or num_leaves is None
    if reads_data and B > 0 and not parents.is_cuda and not torch.compiler.is_compiling():
        _check_parents(parents, idx)
    parents = parents.clamp(-2, T - 1).to(torch.int32)
    used = parents != -2
    reach = _ancestor_or_self(parents)
    depth = torch.where(used, reach.sum(-1) - 1, 0).to(torch.int32)

    is_child = parents[:, None, :] == idx[None, :, None]  # [b, i, j]: j is a child of i
    none = torch.full((), T, device=device)
    first_child = torch.where(is_child, idx, none).amin(-1)
    first_child = torch.where(first_child == T, -1, first_child).to(torch.int32)
    later_sibling = (
        (parents[:, None, :] == parents[:, :, None])
        & (idx[None, None, :] > idx[None, :, None])
        & (parents >= 0)[:, :, None]
    )  # [b, j, k]: k is a later sibling of j
    next_sibling = torch.where(later_sibling, idx, none).amin(-1)
    next_sibling = torch.where(next_sibling == T, -1, next_sibling).to(torch.int32)

    leaf = used & (first_child < 0)
    leaf_count = leaf.sum(-1).to(torch.int32)
    if max_depth is None:
        max_depth = int(depth.max()) if B > 0 else 0
    if num_leaves is None:
        num_leaves = int(leaf_count.max()) if B > 0 else 1
    if not isinstance(max_depth, int) or not 0 <= max_depth < T:
        raise ValueError(f"build_tree: max_depth must be an int in [0, T - 1] = [0, {T - 1}], got {max_depth!r}")
    if not isinstance(num_leaves, int) or not 1 <= num_leaves <= T:
        raise ValueError(f"build_tree: num_leaves must be an int in [1, T] = [1, {T}], got {num_leaves!r}")

    # path_of[b, i, d]: the ancestor of i at depth d (the node itself at its own depth); unreached entries land in
    # a spill column
    spill = max_depth + 1
    column = torch.where(reach, depth[:, None, :].long().clamp(max=spill), spill)
    path_of = torch.full((B, T, spill + 1), -1, dtype=torch.int64, device=device)
    path_of.scatter_reduce_(2, column, torch.where(reach, idx, -1).expand(B, T, T), "amax")
    rank = torch.where(leaf, (torch.cumsum(leaf, -1) - 1).clamp(max=num_leaves), num_leaves)
    leaf_paths = torch.full((B, num_leaves + 1, spill), -1, dtype=torch.int64, device=device)
    leaf_paths.scatter_(1, rank[:, :, None].expand(B, T, spill), path_of[:, :, :spill])
    return TreeBuffers(
        parents=parents,
        depth=depth,
        ancestor_bits=_pack_bits(reach),
        first_child=first_child,
        next_sibling=next_sibling,
        leaf_paths=leaf_paths[:, :num_leaves].to(torch.int32),
        num_leaves=leaf_count,
        max_depth=max_depth,
    )


def _check_parents(parents, idx):
    """The tree conditions on the host (CPU tensors): node 0 the root, every other node padding (-2) or a child of a
    used node of smaller index."""
    parents = parents.long()
    root_ok = parents[:, 0] == -1
    rest = parents[:, 1:]
    in_range = (rest == -2) | ((rest >= 0) & (rest < idx[1:]))
    parent_used = torch.gather(parents, 1, rest.clamp(0, parents.shape[1] - 1)) != -2
    ok = torch.cat([root_ok[:, None], in_range & ((rest == -2) | parent_used)], 1)
    if not bool(ok.all()):
        b, i = (int(v) for v in (~ok).nonzero()[0])
        raise ValueError(
            f"build_tree: parents[{b}, {i}] = {int(parents[b, i])} is not a valid parent: node 0 must "
            f"be the root (-1), node i > 0 padding (-2) or a child of a used node of smaller index "
            f"(0 <= parent < i)"
        )


@dataclass
class StaticTree:
    """A Medusa-style tree: node i > 0 proposes the rank[i]-th token of draft head head[i] (= depth - 1); node 0 is
    the root. All tensors are CPU (T,) int64 except parents (int32). The gather index of `candidates` is built once
    per (device, topk) and kept, so a decoding step copies nothing from the host."""

    choices: list
    parents: torch.Tensor
    head: torch.Tensor
    rank: torch.Tensor
    max_depth: int
    num_leaves: int
    max_rank: int  # the largest rank, so that candidates() reads no tensor
    _flat_index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def flat_index(self, topk, device):
        """(T,) int64 on `device`: node i's position head[i] * topk + rank[i] in the flattened (K * topk) top-k."""
        key = (torch.device(device), topk)
        if key not in self._flat_index:
            self._flat_index[key] = (self.head.clamp(min=0) * topk + self.rank.clamp(min=0)).to(key[0])
        return self._flat_index[key]

    @property
    def num_nodes(self):
        return self.parents.shape[0]

    def buffers(self, batch, device=None):
        """TreeBuffers of this tree for `batch` sequences on `device` (no host synchronisation)."""
        parents = self.parents.to(device)[None].expand(batch, -1).contiguous()
        return build_tree(parents, max_depth=self.max_depth, num_leaves=self.num_leaves)

    def candidates(self, root_tokens, head_tokens):
        """Candidate tokens (B, T) int64: root_tokens (B,) at node 0, head_tokens[b, head[i], rank[i]] at node i,
        from the draft heads' per-head top-k tokens head_tokens (B, K, topk)."""
        if head_tokens.dim() != 3 or root_tokens.shape != head_tokens.shape[:1]:
            raise ValueError(
                f"StaticTree.candidates: head_tokens must be (B, K, topk) and root_tokens (B,), got "
                f"{tuple(head_tokens.shape)} and {tuple(root_tokens.shape)}"
            )
        B, K, topk = head_tokens.shape
        if self.max_depth > K or self.max_rank >= topk:
            raise ValueError(
                f"StaticTree.candidates: the tree needs {self.max_depth} heads and top-"
                f"{self.max_rank + 1}, got head_tokens of shape {tuple(head_tokens.shape)}"
            )
        tokens = head_tokens.reshape(B, K * topk).long()[:, self.flat_index(topk, head_tokens.device)]
        tokens[:, 0] = root_tokens.long()
        return tokens


def static_tree(choices):
    """A StaticTree from Medusa "choices": a list of tuples of per-head top-k ranks, e.g. [(0,), (1,), (0, 0),
    (0, 1)]: choice (r0, .., r_{d-1}) is the node at depth d proposing rank r_{d-1} of head d - 1, child of the node
    (r0, .., r_{d-2}) (the root for d = 1). Every prefix of a choice must be a choice. Nodes are ordered by depth,
    then lexicographically, so parents precede children."""
    if not choices:
        raise ValueError("static_tree: choices must be a non-empty list of tuples of ranks, got an empty list")
    normalised = []
    for choice in choices:
        given = choice
        choice = tuple(choice) if isinstance(choice, (tuple, list)) else None
        if not choice or not all(is_int(r) and r >= 0 for r in choice):
            raise ValueError(f"static_tree: each choice must be a non-empty tuple of ranks >= 0, got {given!r}")
        normalised.append(tuple(int(r) for r in choice))
    if len(set(normalised)) != len(normalised):
        raise ValueError("static_tree: choices contain a duplicate")
    ordered = sorted(normalised, key=lambda c: (len(c), c))
    node_of = {(): 0}
    parents, head, rank = [-1], [-1], [-1]
    for choice in ordered:
        if choice[:-1] not in node_of:
            raise ValueError(f"static_tree: choice {choice} has no parent {choice[:-1]} among the choices")
        node_of[choice] = len(parents)
        parents.append(node_of[choice[:-1]])
        head.append(len(choice) - 1)
        rank.append(choice[-1])
    has_child = {p for p in parents if p >= 0}
    return StaticTree(
        choices=ordered,
        parents=torch.tensor(parents, dtype=torch.int32),
        head=torch.tensor(head),
        rank=torch.tensor(rank),
        max_depth=max(len(c) for c in ordered),
        num_leaves=sum(1 for i in range(len(parents)) if i not in has_child),
        max_rank=max(rank),
    )


def dynamic_tree(root_tokens, head_logprobs, head_tokens, max_nodes, topk=None):
    """An EAGLE-2 style tree from K Medusa-style draft heads: expand the best-scoring nodes by cumulative draft
    log-probability up to a node budget. Batched tensor ops, no host synchronisation.

    root_tokens (B,): the last emitted tokens (node 0). head_logprobs / head_tokens (B, K, k): per head, the top-k
    draft log-probabilities (<= 0; larger values are clamped to 0) and their tokens; head h proposes the token at
    depth h + 1 for every node at depth h (Medusa heads do not see the path). topk (default k) is the branching
    factor: each depth keeps the topk best nodes by cumulative log-probability (sum along the path) as parents of
    the next depth, each with the topk best tokens of the next head. From all generated nodes the max_nodes - 1 best
    by cumulative log-probability are kept (ties to the earlier generated node; a parent always scores at least its
    child, so the kept set is closed under parents), in generation order (depth-major, so parents precede children).

    Returns (parents (B, max_nodes) int32, candidates (B, max_nodes) int64). max_depth <= K and num_leaves <=
    max_nodes - 1, so `build_tree(parents, max_depth=K, num_leaves=max_nodes - 1)` needs no synchronisation
    (`max_depth=min(K, max_nodes - 1)`).
    """
    name = "dynamic_tree"
    if head_logprobs.dim() != 3 or head_tokens.shape != head_logprobs.shape:
        raise ValueError(
            f"{name}: head_logprobs and head_tokens must both be (B, K, k), got "
            f"{tuple(head_logprobs.shape)} and {tuple(head_tokens.shape)}"
        )
    B, K, k = head_logprobs.shape
    if K == 0 or k == 0:
        raise ValueError(
            f"{name}: head_logprobs must have at least one head and one token per head (B, K >= 1, "
            f"k >= 1), got {tuple(head_logprobs.shape)}"
        )
    if root_tokens.shape != (B,):
        raise ValueError(f"{name}: root_tokens must be ({B},), got {tuple(root_tokens.shape)}")
    topk = k if topk is None else topk
    if not is_int(topk) or not 1 <= topk <= k:
        raise ValueError(f"{name}: topk must be an int in [1, {k}], got {topk!r}")
    universe = topk + (K - 1) * topk * topk
    if not is_int(max_nodes) or not 2 <= max_nodes <= universe + 1:
        raise ValueError(
            f"{name}: max_nodes must be an int in [2, 1 + {universe}] (K={K}, topk={topk}), got {max_nodes!r}"
        )
    logprobs = head_logprobs.float().clamp(max=0.0)
    if topk < k:
        logprobs, pick = torch.sort(logprobs, dim=-1, descending=True, stable=True)  # ties: the earlier entry
        logprobs, pick = logprobs[..., :topk], pick[..., :topk]
        tokens = torch.gather(head_tokens, -1, pick)
    else:
        tokens = head_tokens
    tokens = tokens.long()
    device = logprobs.device
    # generated nodes, depth by depth: score, parent (index among generated, -1 = root), token
    scores, parents, node_tokens = [logprobs[:, 0]], [torch.full((B, topk), -1, device=device)], [tokens[:, 0]]
    frontier_scores, frontier_index = logprobs[:, 0], torch.arange(topk, device=device).expand(B, topk)
    offset = topk
    for h in range(1, K):
        level = (frontier_scores[:, :, None] + logprobs[:, h, None, :]).reshape(B, topk * topk)
        scores.append(level)
        parents.append(frontier_index[:, :, None].expand(B, topk, topk).reshape(B, topk * topk))
        node_tokens.append(tokens[:, h, None, :].expand(B, topk, topk).reshape(B, topk * topk))
        order = torch.sort(level, dim=-1, descending=True, stable=True).indices[:, :topk]
        frontier_scores = torch.gather(level, 1, order)
        frontier_index = order + offset
        offset += topk * topk
    scores, parents, node_tokens = torch.cat(scores, 1), torch.cat(parents, 1), torch.cat(node_tokens, 1)
    kept = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : max_nodes - 1]
    kept = torch.sort(kept, dim=-1).values  # generation order
    tree_index = torch.full((B, universe), -1, dtype=torch.long, device=device)
    tree_index.scatter_(1, kept, torch.arange(1, max_nodes, device=device).expand(B, max_nodes - 1))
    kept_parent = torch.gather(parents, 1, kept)
    tree_parent = torch.where(kept_parent < 0, 0, torch.gather(tree_index, 1, kept_parent.clamp(min=0)))
    out_parents = torch.cat([torch.full((B, 1), -1, device=device, dtype=torch.long), tree_parent], 1)
    candidates = torch.cat([root_tokens.long()[:, None], torch.gather(node_tokens, 1, kept)], 1)
    return out_parents.to(torch.int32), candidates


__all__ = ["StaticTree", "TreeBuffers", "build_tree", "dynamic_tree", "static_tree"]
