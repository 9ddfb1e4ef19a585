"""tree_attention (a draft tree of T tokens verified in one pass) beside a plain one-token decode and the dense-mask
SDPA that Medusa/EAGLE-style code runs.

GPU: bs 1, 32 heads (MHA), D 128, fp16, T = 64 tree tokens (a 4-ary tree), prefixes 2048 and 8192: the anchor
(docs/tree_verification.md; H200: dense-mask SDPA 0.092 / 0.228 ms, one-token decode 0.047 / 0.056 ms; goal: within 1.3x
of the one-token decode, i.e. a speedup column >= 0.77 against it). CPU: bs 1, 8 heads, D 64, fp32, T 16, prefix 512
(quick: 4 heads, prefix 128). GB/s counts the bytes a tree step must move: the K/V of the prefix and the tree read once,
q read and the output written (the step is memory-bound: that is its roofline).
"""

import torch
import torch.nn.functional as F

from .harness import compare


def four_ary_parents(T):
    """(1, T) parents of a complete 4-ary tree in breadth-first order (node i's parent is (i - 1) // 4)."""
    return torch.tensor([[-1] + [(i - 1) // 4 for i in range(1, T)]], dtype=torch.int32)


def make_case(heads, D, T, ctx, dtype, device):
    """One tree step: (inputs, {name: callable}) for ours, the one-token decode and the dense-mask SDPA."""
    from kestrel.ops import tree_attention
    from kestrel.reference.tree import ancestor_bits, ancestor_mask

    g = torch.Generator().manual_seed(0)
    l_max = ctx + T
    q = torch.randn(1, heads, T, D, generator=g).to(dtype).to(device)
    k_cache = torch.randn(1, heads, l_max, D, generator=g).to(dtype).to(device)
    v_cache = torch.randn(1, heads, l_max, D, generator=g).to(dtype).to(device)
    parents = four_ary_parents(T)
    bits = ancestor_bits(parents).to(device)
    lens = torch.tensor([ctx], dtype=torch.int32, device=device)
    dense_mask = torch.cat([torch.ones(T, ctx, dtype=torch.bool), ancestor_mask(parents)[0]], dim=1).to(device)
    q_one, k_one, v_one = q[:, :, :1], k_cache[:, :, : ctx + 1], v_cache[:, :, : ctx + 1]
    return q, {
        "kestrel": lambda: tree_attention(q, k_cache, v_cache, lens, bits),
        "SDPA one-token decode": lambda: F.scaled_dot_product_attention(q_one, k_one, v_one),
        "SDPA dense tree mask": lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=dense_mask),
    }


def run(device, quick=False):
    device = torch.device(device)
    if device.type == "cuda":
        heads, D, T, dtype = 32, 128, 64, torch.float16
        contexts = [2048, 8192] if not quick else [2048]
    else:
        heads, D, T, dtype = (8, 64, 16, torch.float32) if not quick else (4, 64, 16, torch.float32)
        contexts = [512] if not quick else [128]
    rows = []
    for ctx in contexts:
        q, fns = make_case(heads, D, T, ctx, dtype, device)
        nbytes = (2 * heads * (ctx + T) * D + 2 * q.numel()) * q.element_size()
        case = f"bs1 H{heads} ctx{ctx} T{T} D{D} {str(dtype).replace('torch.', '')}"
        with torch.no_grad():
            rows += compare(
                f"tree_attention T{T}",
                case,
                device,
                fns["kestrel"],
                [(name, fn) for name, fn in fns.items() if name != "kestrel"],
                nbytes,
                repeats=21 if device.type == "cuda" else 9,
            )
    return rows


try:  # pytest-benchmark microbenchmarks (CPU); only when pytest is around
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "SDPA dense tree mask", "SDPA one-token decode"])
    def test_tree_attention_cpu(benchmark, impl):
        _, fns = make_case(8, 64, 16, 512, torch.float32, "cpu")
        benchmark.group = "tree_attention bs1 H8 ctx512 T16 D64 fp32"
        benchmark.pedantic(fns[impl], rounds=20, warmup_rounds=2)
