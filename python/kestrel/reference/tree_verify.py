"""Plain-Python tree verification and KV-cache compaction (docs/tree_verification.md): the oracle of the kestrel.ops
verify / compact ops, written from the rules documented there with loops over Python lists.

Trees are given by `parents` (B, T) (parent -1 for the root, -2 for padding); a node's children are the nodes whose
parent it is, in increasing index. The sampling walk's float32 arithmetic follows the order that
csrc/include/kestrel/tree_verify.h documents (canonical segment sums, then the comparisons), so that with the same
random numbers the reference and the kernels take the same decisions bit for bit.
"""

import numpy as np
import torch

SEGMENTS = 256  # kestrel::tree::kSegments
f32 = np.float32


def children_lists(parents_row):
    children = [[] for _ in parents_row]
    for node, parent in enumerate(parents_row):
        if parent >= 0:
            children[parent].append(node)
    return children


def _rows(x):
    return torch.as_tensor(x).cpu().tolist()


def verify_greedy_reference(candidates, target_ids, parents, max_depth):
    """(accept_index (B, max_depth + 1), accept_len (B,), next_token (B,)) as int lists: from the root, move to the
    first child whose candidate equals the target's argmax at the current node."""
    accept_index, accept_len, next_token = [], [], []
    for cand, target, par in zip(_rows(candidates), _rows(target_ids), _rows(parents)):
        children = children_lists(par)
        path = [0]
        node = 0
        while len(path) <= max_depth:
            match = [c for c in children[node] if cand[c] == target[node]]
            if not match:
                break
            node = match[0]
            path.append(node)
        accept_index.append(path + [-1] * (max_depth + 1 - len(path)))
        accept_len.append(len(path) - 1)
        next_token.append(target[node])
    return accept_index, accept_len, next_token


def _segment_bounds(vocab):
    length = (vocab + SEGMENTS - 1) // SEGMENTS
    return [(min(s * length, vocab), min((s + 1) * length, vocab)) for s in range(SEGMENTS)]


def _canonical_sums(weights):
    """Segment sums (each in token order from 0) and their total (in segment order), all float32."""
    seg = []
    for begin, end in _segment_bounds(len(weights)):
        acc = f32(0)
        for v in range(begin, end):
            acc = f32(acc + weights[v])
        seg.append(acc)
    total = f32(0)
    for value in seg:
        total = f32(total + value)
    return seg, total


def _inverse_cdf(weights, seg, total, u):
    target = f32(f32(u) * total)
    before, chosen = f32(0), None
    for s in range(SEGMENTS):
        after = f32(before + seg[s])
        if target < after:
            chosen = s
            break
        before = after
    if chosen is None:
        chosen = SEGMENTS - 1
        while chosen > 0 and not seg[chosen] > 0:
            chosen -= 1
    begin, end = _segment_bounds(len(weights))[chosen]
    running, last_positive = before, -1
    for v in range(begin, end):
        running = f32(running + weights[v])
        if weights[v] > 0:
            if target < running:
                return v
            last_positive = v
    return last_positive if last_positive >= 0 else begin


def verify_sample_reference(
    candidates, target_probs, parents, uniform, uniform_final, draft_probs=None, max_depth=None
):
    """Lossless tree verification by recursive rejection sampling (see kestrel.ops.verify_tree_sample): returns
    (accept_index, accept_len, next_token) as int lists."""
    cands, par_rows = _rows(candidates), _rows(parents)
    probs = torch.as_tensor(target_probs).cpu().float().numpy()
    drafts = None if draft_probs is None else torch.as_tensor(draft_probs).cpu().float().numpy()
    uni = torch.as_tensor(uniform).cpu().float().numpy()
    uni_final = torch.as_tensor(uniform_final).cpu().float().numpy()
    T = len(par_rows[0])
    max_depth = T - 1 if max_depth is None else max_depth
    accept_index, accept_len, next_token = [], [], []
    for b, (cand, par) in enumerate(zip(cands, par_rows)):
        children = children_lists(par)
        vocab = probs.shape[-1]
        path, node = [0], 0
        while True:
            p = [f32(x) for x in probs[b, node]]
            q = None if drafts is None else [f32(x) for x in drafts[b, node]]
            residual = list(p)
            _, total = _canonical_sums(residual)
            accepted, seen = None, []
            for child in children[node] if len(path) <= max_depth else []:
                x = cand[child]
                tested = 0 <= x < vocab and x not in seen
                seen.append(x)
                if tested:
                    u = f32(uni[b, child])
                    bound = f32(f32(u * q[x]) * total) if q is not None else f32(u * total)
                    if bound < residual[x]:
                        accepted = child
                        break
                    if q is None:
                        total = f32(total - residual[x])
                        residual[x] = f32(0)  # the rejected token leaves the residual
                if q is not None:  # every rejected draw: p <- max(0, p - q * M)
                    residual = [max(f32(0), f32(r - f32(qv * total))) for r, qv in zip(residual, q)]
                    _, total = _canonical_sums(residual)
            if accepted is not None:
                node = accepted
                path.append(node)
                continue
            seg, total = _canonical_sums(residual)
            if total > 0:
                token = _inverse_cdf(residual, seg, total, uni_final[b])
            else:
                token = int(np.argmax(probs[b, node]))
            break
        accept_index.append(path + [-1] * (max_depth + 1 - len(path)))
        accept_len.append(len(path) - 1)
        next_token.append(token)
    return accept_index, accept_len, next_token


def compact_reference(k_cache, v_cache, cache_seqlens, accept_index):
    """New (k_cache, v_cache, cache_seqlens) with each sequence's accepted rows len + accept_index[b, j] gathered to
    len + j (j = 0 .. accept_len) and cache_seqlens + 1 + accept_len; the inputs are not modified."""
    k, v, lens = k_cache.clone(), v_cache.clone(), cache_seqlens.clone()
    layered = k.dim() == 5
    for b, row in enumerate(_rows(accept_index)):
        path = [node for node in row if node >= 0]
        start = int(cache_seqlens[b])
        for cache, source in ((k, k_cache), (v, v_cache)):
            for j, node in enumerate(path):
                if layered:
                    cache[:, b, :, start + j] = source[:, b, :, start + node]
                else:
                    cache[b, :, start + j] = source[b, :, start + node]
        lens[b] = start + len(path)
    return k, v, lens


__all__ = ["children_lists", "compact_reference", "verify_greedy_reference", "verify_sample_reference"]
