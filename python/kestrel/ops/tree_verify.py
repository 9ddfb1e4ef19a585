"""Draft-tree verification and KV-cache compaction for speculative decoding (docs/tree_verification.md).

A step of tree speculative decoding: build the draft tree (`kestrel.decoding.build_tree`), run the target model once
over the tree's T nodes (cache positions [len, len + T), RoPE at len + depth), verify, then compact the cache. With a
kestrel.models.KestrelLM and its kestrel.decoding.KVCache (kestrel.decoding.speculative.SpeculativeStep does this):

    tree = build_tree(parents)                                    # TreeBuffers
    logits = model(candidates, cache, tree_depth=tree.depth, tree_mask_bits=tree.ancestor_bits)   # (B, T, V)
    accept_index, accept_len, next_token = verify_tree_greedy(candidates, logits.argmax(-1), tree)
    # or: p = sampling_probs(logits, temperature, top_k, top_p)
    #     accept_index, accept_len, next_token = verify_tree_sample(candidates, p, tree, torch.rand(B, T),
    #                                                               torch.rand(B))
    compact_kv_cache(cache.k, cache.v, cache.seqlens, accept_index)  # every layer at once; seqlens += 1 + accept_len
    # emitted: candidates[b, accept_index[b, 1 : 1 + accept_len[b]]], then next_token[b]

Outputs of both verify ops: accept_index (B, max_depth + 1) int32, the accepted path's node indices root first
(accept_index[:, 0] == 0), -1 padded; accept_len (B,) int32, the accepted nodes after the root; next_token (B,)
int64, the token that follows the last accepted node. No host synchronisation anywhere (the shapes depend only on
the inputs' shapes and tree.max_depth); one kernel launch per call on CUDA (compaction: one launch for all layers
plus one for the lengths).

Random numbers of `verify_tree_sample` (so that the CPU and CUDA kernels and kestrel.reference.tree_verify agree
bit for bit): uniform[b, c] in [0, 1) is used when node c is tried as a child of the current node (each node at
most once; the root's entry is never used, nor the entries of children that are skipped); uniform_final[b] in
[0, 1) draws next_token from the residual at the last accepted node by inverse CDF in token order. The float32
order of every sum is documented in csrc/include/kestrel/tree_verify.h.

Arguments are checked once, by the ops themselves (csrc/tree_verify_checks.h, on every backend: ValueError for
shapes and devices, TypeError for dtypes, naming the argument); these wrappers only unpack a TreeBuffers and bring
int32 ids and fp16/bf16/fp64 probabilities to the ops' int64 and float32.
"""

import torch

from .. import _ext
from .._checks import is_int, is_number, require_number

_TREE_FIELDS = ("first_child", "next_sibling", "max_depth")


def _unpack_tree(op, tree):
    """(first_child, next_sibling, max_depth) of a TreeBuffers; the op checks them (csrc/tree_verify_checks.h)."""
    for field in _TREE_FIELDS:
        if not hasattr(tree, field):
            raise TypeError(
                f"{op}: tree must be a kestrel.decoding.TreeBuffers (with first_child, next_sibling and "
                f"max_depth), got {type(tree).__name__} without {field}"
            )
    return tree.first_child, tree.next_sibling, tree.max_depth


def _as(t, dtype, accepted):
    """t in the op's dtype when it is a tensor of an accepted one (int32 ids, fp16/bf16/fp64 probabilities);
    anything else goes to the op as it is, whose checks name it."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in accepted else t


_IDS = (torch.int32,)
_PROBS = (torch.float16, torch.bfloat16, torch.float64)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _device(t):
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def verify_tree_greedy(candidates, target_ids, tree):
    """Greedy verification of a draft tree.

    candidates (B, T) int64: each node's token (node 0, the root, is the last emitted token); target_ids (B, T)
    int64: the target's argmax at each node (the token it predicts after that node); tree: the TreeBuffers of the
    tree (first_child, next_sibling, max_depth). From the root, repeatedly move to the first child (lowest node
    index) whose candidate equals target_ids at the current node. Returns (accept_index, accept_len, next_token);
    next_token = target_ids at the last accepted node. Padded nodes (parent -2) are never children.
    """
    op = "verify_tree_greedy"
    first_child, next_sibling, max_depth = _unpack_tree(op, tree)
    _ext.require(op, _device(candidates))
    return torch.ops.kestrel.verify_tree_greedy(
        _as(candidates, torch.int64, _IDS), _as(target_ids, torch.int64, _IDS), first_child, next_sibling, max_depth
    )


def verify_tree_sample(candidates, target_probs, tree, uniform, uniform_final, draft_probs=None):
    """Lossless verification of a draft tree by recursive rejection sampling.

    candidates (B, T) int64; target_probs (B, T, V): the target's distribution after each node, with temperature /
    top-k / top-p already applied (see `sampling_probs`; rows are nonnegative weights, normalised inside); tree:
    TreeBuffers; uniform (B, T) and uniform_final (B,) float32 in [0, 1) (e.g. torch.rand); draft_probs: None for
    deterministic drafts (every child proposed with probability 1, e.g. top-k of draft heads), or (B, T, V) float32:
    the draft distribution q at each node, from which that node's children were drawn independently.

    At the current node with residual p (total M), the children are tried in order, child c with uniform[c]:
    deterministic drafts accept x iff uniform[c] * M < p(x), else p(x) <- 0; sampled drafts accept iff
    uniform[c] * q(x) * M < p(x) (probability min(1, p(x) / (M q(x)))), else p <- max(0, p - q M). A child whose
    token equals an earlier sibling's is rejected without using its uniform (sampled drafts still take the
    residual step, as for any rejected draw). When no child is accepted, next_token is drawn from the residual with
    uniform_final. The emitted tokens are distributed exactly as sampling from target_probs token by token.
    Returns (accept_index, accept_len, next_token).
    """
    op = "verify_tree_sample"
    first_child, next_sibling, max_depth = _unpack_tree(op, tree)
    _ext.require(op, _device(candidates))
    return torch.ops.kestrel.verify_tree_sample(
        _as(candidates, torch.int64, _IDS),
        _as(target_probs, torch.float32, _PROBS),
        first_child,
        next_sibling,
        uniform,
        uniform_final,
        _as(draft_probs, torch.float32, _PROBS),
        max_depth,
    )


def compact_kv_cache(k_cache, v_cache, cache_seqlens, accept_index):
    """Keep only the accepted tree nodes in the KV cache, in place.

    k_cache, v_cache: (B, H, Lmax, D) or (NL, B, H, Lmax, D) (every layer in one tensor; the head dims of k and v
    may differ); cache_seqlens (B,) int32: the prefix lengths, the tree's K/V at rows [len, len + T);
    accept_index (B, W) int32 from a verify op. The rows len + accept_index[b, j] move to len + j for
    j = 0 .. accept_len[b], where accept_len[b] = (number of entries >= 0) - 1; then cache_seqlens += 1 + accept_len.
    Rows past the new length keep stale values (never read again). Every row is checked before any is moved, in
    64-bit index arithmetic (root first, ascending, -1 padded, source rows and the new length inside the cache and
    int32): the CPU raises, naming the row, and changes nothing; CUDA (which cannot report without a host sync)
    leaves an invalid row and its length untouched. K and V may not share memory (their rows would move twice).
    """
    op = "compact_kv_cache"
    _ext.require(op, _device(k_cache))
    torch.ops.kestrel.compact_kv_cache(k_cache, v_cache, cache_seqlens, accept_index)


def check_sampling_options(name, temperature, top_k, top_p):
    """The checks of temperature (a number >= 0, inf allowed), top_k (None or an int >= 1) and top_p (None or a
    number in (0, 1]), shared by sampling_probs and kestrel.decoding.generate; errors name `name`."""
    require_number(name, "temperature", temperature)
    if not temperature >= 0:
        raise ValueError(f"{name}: temperature must be >= 0, got {temperature}")
    if top_k is not None:
        if not is_int(top_k):
            raise TypeError(f"{name}: top_k must be None or an int >= 1, got {type(top_k).__name__} {top_k!r}")
        if top_k < 1:
            raise ValueError(f"{name}: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None:
        if not is_number(top_p):
            raise TypeError(f"{name}: top_p must be None or a number in (0, 1], got {type(top_p).__name__} {top_p!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"{name}: top_p must be None or in (0, 1], got {top_p!r}")


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The target distribution p for `verify_tree_sample` (and for plain sampling): float32 (..., V).

    temperature 0 gives the one-hot of the argmax (lowest index among equal logits: sampling then equals greedy
    decoding); otherwise softmax(logits / temperature) restricted to, in this order, the top_k largest logits
    (every token tied with the k-th largest is kept; top_k >= V keeps all) and the smallest set of most likely
    tokens whose probability sums to at least top_p (the most likely token always stays; ties in the sort keep the
    lower index first), then renormalised. The logits are shifted by their row max before the division, so a tiny
    temperature (down to the smallest float) gives the greedy distribution (split evenly among tied maxima) instead
    of overflowing, and temperature=inf gives the uniform distribution over the kept tokens. temperature, top_k and
    top_p are Python numbers. Works under torch.compile (no host synchronisation).
    """
    name = "sampling_probs"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"{name}: logits must be a float tensor (..., V), got {_shape(logits)}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"{name}: logits must have at least one token (V >= 1), got shape {_shape(logits)}")
    check_sampling_options(name, temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # (logits - max) / temperature only underflows where logits / temperature overflowed to inf (softmax: NaN);
    # the max stays 0 and masked tokens -inf, even where the division is 0/0 or inf/inf
    top = logits.amax(-1, keepdim=True)
    shifted = logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    live = (shifted < 0) & (shifted > float("-inf"))
    probs = torch.softmax(torch.where(live, shifted / temperature, shifted), dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


if _ext.available():

    @torch.library.register_fake("kestrel::verify_tree_greedy")
    def _verify_tree_greedy_fake(candidates, target_ids, first_child, next_sibling, max_depth):
        B = candidates.shape[0]
        return (
            candidates.new_empty((B, max_depth + 1), dtype=torch.int32),
            candidates.new_empty((B,), dtype=torch.int32),
            candidates.new_empty((B,), dtype=torch.int64),
        )

    @torch.library.register_fake("kestrel::verify_tree_sample")
    def _verify_tree_sample_fake(
        candidates, target_probs, first_child, next_sibling, uniform, uniform_final, draft_probs, max_depth
    ):
        B = candidates.shape[0]
        return (
            candidates.new_empty((B, max_depth + 1), dtype=torch.int32),
            candidates.new_empty((B,), dtype=torch.int32),
            candidates.new_empty((B,), dtype=torch.int64),
        )

    @torch.library.register_fake("kestrel::compact_kv_cache")
    def _compact_kv_cache_fake(k_cache, v_cache, cache_seqlens, accept_index):
        return None


__all__ = ["compact_kv_cache", "sampling_probs", "verify_tree_greedy", "verify_tree_sample"]
