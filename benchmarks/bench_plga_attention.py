"""Power-law graph attention (q·G then fused softmax attention) beside plain softmax attention through SDPA.

GPU: B4 H16 L4096 D128 and B8 H16 L2048 D64, causal, bf16, forward and forward+backward (the goal, docs/plga.md: within
1.1x of SDPA flash). CPU: B1 H4 L512 D64 fp32. GB/s counts q, k, v, G and out once (compute-bound; for reference).
"""

import torch
import torch.nn.functional as F

from .harness import attention_cases, compare


def run(device, quick=False):
    from kestrel.ops import plga_attention

    device = torch.device(device)
    cases, dtype = attention_cases(device, quick)
    rows = []
    for B, H, L, D in cases:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).to(device).requires_grad_(True) for _ in range(3))
        G = (torch.eye(D) + 0.01 * torch.randn(1, H, D, D, generator=g)).to(device).requires_grad_(True)
        do = torch.randn_like(q)
        nbytes = 4 * q.numel() * q.element_size() + G.numel() * 4
        case = f"B{B} H{H} L{L} D{D} causal {str(dtype).replace('torch.', '')}"
        with torch.no_grad():
            rows += compare(
                "PLGA forward",
                case,
                device,
                lambda: plga_attention(q, k, v, G),
                [("SDPA softmax", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))],
                nbytes,
                repeats=5,
            )

        def ours_fb():
            torch.autograd.grad(plga_attention(q, k, v, G), (q, k, v, G), do)

        def sdpa_fb():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)

        rows += compare(
            "PLGA forward+backward", case, device, ours_fb, [("SDPA softmax", sdpa_fb)], 2 * nbytes, repeats=5
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
