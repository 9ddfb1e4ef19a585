"""kv_bottleneck_lookup (nearest key + value gather in one launch) beside the unfused bmm + topk(1) + gather.

GPU: the paper's sizes, 256 codebooks x 4096 pairs, dim_key 14, dim_value 10, batch 256, fp32 (the anchor,
docs/kv_bottleneck.md: bmm + topk 5.4 ms with 1.5 GB of scratch; goal <= 0.3 ms). CPU: batch 64. GB/s counts the keys,
values and inputs read once.
"""

import torch

from .harness import compare


def unfused(z, keys, values, k=1):
    """The PyTorch formulation: a (C, B, P) score tensor, topk, gather."""
    zt = z.transpose(0, 1)
    scores = torch.baddbmm(-(keys * keys).sum(-1)[:, None, :], zt, keys.transpose(1, 2), alpha=2.0)
    ids = scores.topk(k, dim=-1).indices  # (C, B, k)
    C, B = ids.shape[:2]
    rows = torch.gather(values, 1, ids.reshape(C, B * k, 1).expand(-1, -1, values.shape[-1]))
    return rows.reshape(C, B, k, -1).mean(2).transpose(0, 1), ids.transpose(0, 1)


def run(device, quick=False):
    from kestrel.ops import kv_bottleneck_lookup

    device = torch.device(device)
    C, P, dk, dv = (256, 4096, 14, 10) if not quick else (32, 1024, 14, 10)
    B = (256 if device.type == "cuda" else 64) if not quick else 32
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, C, dk, generator=g).to(device)
    keys = torch.randn(C, P, dk, generator=g).to(device)
    values = torch.randn(C, P, dv, generator=g).to(device)
    nbytes = (z.numel() + keys.numel() + values.numel()) * 4
    case = f"C{C} P{P} dk{dk} dv{dv} B{B} k1 fp32"
    return compare(
        "kv_bottleneck_lookup",
        case,
        device,
        lambda: kv_bottleneck_lookup(z, keys, values, 1),
        [("bmm + topk + gather", lambda: unfused(z, keys, values, 1))],
        nbytes,
        repeats=9,
    )


try:  # pytest-benchmark microbenchmark (CPU)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "bmm + topk + gather"])
    def test_kv_bottleneck_lookup_cpu(benchmark, impl):
        from kestrel.ops import kv_bottleneck_lookup

        g = torch.Generator().manual_seed(0)
        z, keys, values = (
            torch.randn(64, 64, 14, generator=g),
            torch.randn(64, 4096, 14, generator=g),
            torch.randn(64, 4096, 10, generator=g),
        )
        fn = (
            (lambda: kv_bottleneck_lookup(z, keys, values, 1))
            if impl == "kestrel"
            else (lambda: unfused(z, keys, values, 1))
        )
        benchmark.group = "kv_bottleneck_lookup C64 P4096 dk14 B64"
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
