"""Tree verification (greedy and sampling) and KV-cache compaction beside plain-PyTorch formulations.

Verification: a 64-node tree (root with 4 children, then 3, 2, 2, 1 children per node: depth 5), V = 32000 and
128256, bs 1 and 32 (CPU: bs 1 and 8). Baselines: greedy, the Medusa-style vectorised formulation (compare every
root-to-leaf path with the targets, keep the longest accepted prefix); sampling, the usual eager walk (per row, per
child: torch ops on the vocabulary row and a host read of each decision). Compaction: every layer's cache in one
(NL, B, H, Lmax, D) tensor, 5 accepted of 64 tree rows; baseline a gather and a scatter along the sequence axis.
GB/s: verification counts the probability rows it reads (visited nodes plus the final residual, measured), compaction
the moved rows read and written.
"""

import torch

from .harness import compare


def _tree(B, device):
    from kestrel.decoding import build_tree

    parents, frontier = [-1], [0]
    for fanout in (4, 3, 2, 2, 1):
        nxt = []
        for node in frontier:
            for _ in range(fanout):
                if len(parents) < 64:
                    parents.append(node)
                    nxt.append(len(parents) - 1)
        frontier = nxt
    parents += [0] * (64 - len(parents))
    return build_tree(torch.tensor([parents] * B, device=device))


def _greedy_baseline(candidates, target_ids, tree):
    paths = tree.leaf_paths.long()  # (B, L, D + 1)
    valid = paths >= 0
    safe = paths.clamp(min=0)
    tokens = torch.gather(candidates[:, None, :].expand(-1, paths.shape[1], -1), 2, safe)
    wanted = torch.gather(target_ids[:, None, :].expand(-1, paths.shape[1], -1), 2, safe)
    match = (tokens[:, :, 1:] == wanted[:, :, :-1]) & valid[:, :, 1:]
    accepted = torch.cumprod(match.int(), dim=-1).sum(-1)  # (B, L)
    best = accepted.argmax(-1)
    rows = torch.arange(paths.shape[0], device=paths.device)
    accept_len = accepted[rows, best]
    last = paths[rows, best].gather(1, accept_len[:, None].long())[:, 0]
    return paths[rows, best], accept_len, target_ids[rows, last]


def _sample_baseline(candidates, probs, tree, uniform, uniform_final):
    """Eager recursive rejection sampling with deterministic drafts, one row at a time."""
    B = candidates.shape[0]
    first_child, next_sibling = tree.first_child.tolist(), tree.next_sibling.tolist()
    out = []
    for b in range(B):
        node, path = 0, [0]
        while True:
            p = probs[b, node].clone()
            child, accepted = first_child[b][node], None
            while child >= 0:
                x = candidates[b, child]
                if bool(uniform[b, child] * p.sum() < p[x]):
                    accepted = child
                    break
                p[x] = 0
                child = next_sibling[b][child]
            if accepted is None:
                token = torch.searchsorted(torch.cumsum(p, 0), uniform_final[b] * p.sum())
                out.append((path, token))
                break
            node = accepted
            path.append(node)
    return out


def _verify_inputs(B, V, device, g):
    """(tree, candidates, probs, target_ids, uniform, uniform_final): each node proposes its parent's argmax, so
    that greedy accepts a full path and sampling accepts some."""
    tree = _tree(B, device)
    T = tree.num_nodes
    logits = torch.randn(B, T, V, generator=g) * 3
    parents = tree.parents.long().cpu().clamp(min=0)
    candidates = torch.gather(logits.argmax(-1), 1, parents).to(device)
    candidates[:, 0] = 0
    probs = torch.softmax(logits, -1).to(device)
    uniform, uniform_final = torch.rand(B, T, generator=g).to(device), torch.rand(B, generator=g).to(device)
    return tree, candidates, probs, logits.argmax(-1).to(device), uniform, uniform_final


def _verify_rows(device, quick):
    from kestrel.ops import verify_tree_greedy, verify_tree_sample

    rows = []
    cuda = device.type == "cuda"
    vocabs = (32000, 128256) if not quick else (32000,)
    batches = (1, 32) if cuda else (1, 8)
    g = torch.Generator().manual_seed(0)
    for V in vocabs:
        for B in batches:
            tree, candidates, probs, target_ids, uniform, uniform_final = _verify_inputs(B, V, device, g)
            T = tree.num_nodes
            case = f"T{T} V{V} bs{B}"
            rows += compare(
                "verify_tree_greedy",
                case,
                device,
                lambda: verify_tree_greedy(candidates, target_ids, tree),
                [("torch leaf-path compare", lambda: _greedy_baseline(candidates, target_ids, tree))],
                nbytes=candidates.numel() * 16,
                repeats=9,
            )
            accept_len = verify_tree_sample(candidates, probs, tree, uniform, uniform_final)[1]
            nbytes = int((accept_len.long() + 2).sum()) * V * 4
            rows += compare(
                "verify_tree_sample",
                case,
                device,
                lambda: verify_tree_sample(candidates, probs, tree, uniform, uniform_final),
                [("eager torch walk", lambda: _sample_baseline(candidates, probs, tree, uniform, uniform_final))],
                nbytes=nbytes,
                repeats=5,
            )
    return rows


def _compact_baseline(k, v, lens, accept_index):
    W = accept_index.shape[1]
    NL, B, H, _, D = k.shape
    valid = accept_index >= 0
    src = lens[:, None].long() + accept_index.long().clamp(min=0)
    dst = torch.where(valid, lens[:, None].long() + torch.arange(W, device=k.device), lens[:, None].long())
    src = torch.where(valid, src, lens[:, None].long())
    for cache in (k, v):
        s = src[None, :, None, :, None].expand(NL, B, H, W, D)
        d = dst[None, :, None, :, None].expand(NL, B, H, W, D)
        cache.scatter_(3, d, torch.gather(cache, 3, s))
    lens += valid.sum(1).int()


def _compact_rows(device, quick):
    from kestrel.ops import compact_kv_cache

    cuda = device.type == "cuda"
    if cuda:
        NL, B, H, L, D, dtype = (
            (16, 8, 8, 2048, 128, torch.bfloat16) if not quick else (4, 4, 8, 1024, 128, torch.bfloat16)
        )
    else:
        NL, B, H, L, D, dtype = (4, 4, 4, 512, 64, torch.float32) if not quick else (2, 2, 4, 256, 64, torch.float32)
    k = torch.randn(NL, B, H, L, D, device=device).to(dtype)
    v = torch.randn(NL, B, H, L, D, device=device).to(dtype)
    lens0 = torch.full((B,), L // 2, dtype=torch.int32, device=device)
    accept_index = torch.tensor([[0, 3, 9, 20, 41, 60]] * B, dtype=torch.int32, device=device)
    lens = lens0.clone()

    def ours():
        lens.copy_(lens0)
        compact_kv_cache(k, v, lens, accept_index)

    def baseline():
        lens.copy_(lens0)
        _compact_baseline(k, v, lens, accept_index)

    moved = 2 * NL * B * H * 5 * D * k.element_size() * 2  # k and v, read + write
    case = f"NL{NL} B{B} H{H} Lmax{L} D{D} accept 5 {str(dtype).replace('torch.', '')}"
    return compare("compact_kv_cache", case, device, ours, [("torch gather + scatter", baseline)], moved, repeats=9)


def run(device, quick=False):
    device = torch.device(device)
    return _verify_rows(device, quick) + _compact_rows(device, quick)


try:  # pytest-benchmark microbenchmarks (CPU); only when pytest is around
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "eager torch walk"])
    def test_verify_tree_sample_cpu(benchmark, impl):
        from kestrel.ops import verify_tree_sample

        tree, candidates, probs, _, uniform, uniform_final = _verify_inputs(
            8, 32000, torch.device("cpu"), torch.Generator().manual_seed(0)
        )
        run = verify_tree_sample if impl == "kestrel" else _sample_baseline
        benchmark.group = "verify_tree_sample T64 V32000 bs8"
        benchmark.pedantic(lambda: run(candidates, probs, tree, uniform, uniform_final), rounds=5, warmup_rounds=1)

    @pytest.mark.parametrize("impl", ["kestrel", "torch gather + scatter"])
    def test_compact_kv_cache_cpu(benchmark, impl):
        from kestrel.ops import compact_kv_cache

        k, v = torch.randn(4, 4, 4, 512, 64), torch.randn(4, 4, 4, 512, 64)
        lens0 = torch.full((4,), 256, dtype=torch.int32)
        lens = lens0.clone()
        accept_index = torch.tensor([[0, 3, 9, 20, 41, 60]] * 4, dtype=torch.int32)
        compact = compact_kv_cache if impl == "kestrel" else _compact_baseline

        def step():
            lens.copy_(lens0)
            compact(k, v, lens, accept_index)

        benchmark.group = "compact_kv_cache NL4 B4 H4 Lmax512 D64 fp32"
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
