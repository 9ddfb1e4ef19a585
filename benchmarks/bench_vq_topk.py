"""vq_topk (fused top-k codebook lookup) beside the unfused `(x @ cb.T).float().topk(k)`, and faiss-cpu's exact
inner-product search on the CPU when faiss is installed.

GPU: N 65536, d 64, k 8, bf16, C 10000 and 100000 (the anchors, docs/codebook.md: the unfused path needs 3.75 GB and
37.5 GB of scratch). CPU: N 4096, C 10000, d 64, k 8, fp32. GB/s counts x and the codebook read once.
"""

import torch

from .harness import compare


def _faiss_search(x, cb, k):
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatIP(cb.shape[1])
    index.add(cb.numpy())
    xs = x.numpy()
    return lambda: index.search(xs, k)


def run(device, quick=False):
    from kestrel.ops import vq_topk

    device = torch.device(device)
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(65536, 10000), (65536, 100000)] if not quick else [(4096, 2000)]
    else:
        dtype = torch.float32
        shapes = [(4096, 10000)] if not quick else [(512, 1000)]
    d, k = 64, 8
    rows = []
    for N, C in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, d, generator=g).to(dtype).to(device)
        cb = torch.randn(C, d, generator=g).to(dtype).to(device)
        nbytes = (x.numel() + cb.numel()) * x.element_size()
        case = f"N{N} C{C} d{d} k{k} {str(dtype).replace('torch.', '')}"
        baselines = [("matmul + topk", lambda x=x, cb=cb: (x @ cb.T).float().topk(k))]
        if device.type == "cpu":
            baselines.append(("faiss IndexFlatIP", _faiss_search(x, cb, k)))
        rows += compare(
            "vq_topk (ip)",
            case,
            device,
            lambda x=x, cb=cb: vq_topk(x, cb, k, metric="ip"),
            baselines,
            nbytes,
            repeats=9,
        )
    return rows


try:  # pytest-benchmark microbenchmark (CPU)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["kestrel", "matmul + topk"])
    def test_vq_topk_cpu(benchmark, impl):
        from kestrel.ops import vq_topk

        g = torch.Generator().manual_seed(0)
        x, cb = torch.randn(2048, 64, generator=g), torch.randn(10000, 64, generator=g)
        fn = (lambda: vq_topk(x, cb, 8, metric="ip")) if impl == "kestrel" else (lambda: (x @ cb.T).topk(8))
        benchmark.group = "vq_topk N2048 C10000 d64 k8 fp32"
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
