"""vq_topk (fused top-k codebook lookup) beside the unfused `(x @ cb.T).float().topk(k)`.

GPU: N 65536, C 10000, d 64, k 8, bf16 (the spec's anchor; the unfused path needs 3.75 GB of scratch). CPU:
N 4096, C 10000, d 64, k 8, fp32. GB/s counts x and the codebook read once.
"""

import torch

from .harness import compare


def run(device, quick=False):
    from kestrel.ops import vq_topk

    device = torch.device(device)
    if device.type == "cuda":
        N, C, dtype = (65536, 10000, torch.bfloat16) if not quick else (4096, 2000, torch.bfloat16)
    else:
        N, C, dtype = (4096, 10000, torch.float32) if not quick else (512, 1000, torch.float32)
    d, k = 64, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g).to(dtype).to(device)
    cb = torch.randn(C, d, generator=g).to(dtype).to(device)
    nbytes = (x.numel() + cb.numel()) * x.element_size()
    case = f"N{N} C{C} d{d} k{k} {str(dtype).replace('torch.', '')}"
    return compare("vq_topk (ip)", case, device, lambda: vq_topk(x, cb, k, metric="ip"),
                   [("matmul + topk", lambda: (x @ cb.T).float().topk(k))], nbytes, repeats=5)
