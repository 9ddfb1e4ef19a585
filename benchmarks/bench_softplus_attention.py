"""Softplus attention (LSSA / LSSAR) beside softmax attention through SDPA and the FlexAttention formulation of LSSA.

GPU: B4 H16 L4096 D128 and B8 H16 L2048 D64, causal, bf16 (the anchor shapes, docs/softplus_attention.md): forward for
LSSA and LSSAR, forward+backward for LSSA. CPU: B1 H4 L512 D64 fp32, kestrel's CPU path beside SDPA's math kernel. GB/s
counts q, k, v and out once (attention is compute-bound; the column is for reference only).
"""

import torch
import torch.nn.functional as F

from .harness import attention_cases, compare


def _inputs(B, H, L, D, dtype, device, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g).to(dtype).to(device).requires_grad_(grad) for _ in range(3)]


def _flex_lssa(device):
    """LSSA as FlexAttention: softmax(log f) = f / sum f with f = softplus(c_i qn.kn) (eps aside)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if device.type != "cuda":
        return None
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        L, D = q.shape[-2], q.shape[-1]
        log_d = torch.log(torch.tensor(float(D), device=q.device))
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)

        def score_mod(score, b, h, i, j):
            c = log_d * torch.log((i + 1).to(torch.float32).clamp_min(1.0))
            return torch.log(F.softplus(c * score))

        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, L, L, device=q.device)
        return compiled(qn, kn, v, score_mod=score_mod, block_mask=mask, scale=1.0)

    return run


def run(device, quick=False):
    from kestrel.ops import softplus_attention

    device = torch.device(device)
    cases, dtype = attention_cases(device, quick)
    flex = _flex_lssa(device)
    rows = []
    for B, H, L, D in cases:
        q, k, v = _inputs(B, H, L, D, dtype, device)
        nbytes = 4 * q.numel() * q.element_size()
        case = f"B{B} H{H} L{L} D{D} causal {str(dtype).replace('torch.', '')}"
        sdpa = (
            "SDPA softmax (flash)" if device.type == "cuda" else "SDPA softmax (math)",
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        )
        baselines = [sdpa] + ([("FlexAttention LSSA", lambda: flex(q, k, v))] if flex else [])
        rows += compare("LSSA forward", case, device, lambda: softplus_attention(q, k, v), baselines, nbytes, repeats=5)
        rows += compare(
            "LSSAR forward (p=15)",
            case,
            device,
            lambda: softplus_attention(q, k, v, reweight_p=15.0),
            [sdpa],
            nbytes,
            repeats=5,
        )
        qg, kg, vg = _inputs(B, H, L, D, dtype, device, grad=True)
        do = torch.randn_like(qg)

        def ours_fb():
            torch.autograd.grad(softplus_attention(qg, kg, vg), (qg, kg, vg), do)

        def sdpa_fb():
            torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), do)

        rows += compare(
            "LSSA forward+backward", case, device, ours_fb, [("SDPA softmax", sdpa_fb)], 2 * nbytes, repeats=5
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
