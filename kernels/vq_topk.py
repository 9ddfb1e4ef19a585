"""Triton kernel of the fused top-k codebook lookup (spec retrieval.md §1): codebook tiles stream through a
matrix-multiply tile and each row keeps a running top-k in registers, so the N×C score matrix never exists.

One program per (block of BLOCK_N rows, head). fp16/bf16 inputs of one dtype go through the tensor cores as they
are (their products are exact in float32, accumulated in float32); float32 inputs use IEEE float32 dots. A tile's scores are x·c adjusted per code (l2: 2 x·c − ‖c‖²; cosine:
x·c / ‖c‖; ip: x·c; banned codes and codes past C: −inf), then merged with the running top-k by K rounds of
"take the best of the union, the lowest id among equal scores". A tile whose best score cannot enter any row's
top-k is skipped after one reduction. The caller adds the per-row term (−‖x‖² for l2, 1/‖x‖ for cosine).

With GATHER (the discrete key-value bottleneck, spec §3) the same program then reads the value rows of its k ids
and writes their mean, so the nearest-key search and the value gather are one launch.
"""

import triton
import triton.language as tl

BIG_ID = 2 ** 30


@triton.jit
def vq_topk_kernel(X, CB, BIAS, SCALE, OUT_S, OUT_I, VALUES, OUT_V, N, C, D, DV,
                   stride_xh, stride_xn, stride_ch, stride_cc, stride_bh, stride_oh, stride_on,
                   stride_vh, stride_vc, stride_ovh, stride_ovn,
                   K: tl.constexpr, K_USED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, GATHER: tl.constexpr, BLOCK_DV: tl.constexpr, LOWP: tl.constexpr):
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, K)
    row_ok = offs_n < N
    d_ok = offs_d < D
    x = tl.load(X + head * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    best_s = tl.full([BLOCK_N, K], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_N, K], BIG_ID, dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        code_ok = offs_c < C
        cb = tl.load(CB + head * stride_ch + offs_c[:, None] * stride_cc + offs_d[None, :],
                     mask=code_ok[:, None] & d_ok[None, :], other=0.0)
        bias = tl.load(BIAS + head * stride_bh + offs_c, mask=code_ok, other=float("-inf"))
        scale = tl.load(SCALE + head * stride_bh + offs_c, mask=code_ok, other=0.0)
        if LOWP:  # fp16/bf16 products are exact in float32: tensor cores, float32 accumulation
            tile = tl.dot(x, tl.trans(cb), out_dtype=tl.float32)
        else:
            tile = tl.dot(x, tl.trans(cb.to(tl.float32)), input_precision="ieee")
        tile = tile * scale[None, :] + bias[None, :]
        ids = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32) + offs_c[None, :]
        worst = tl.min(best_s, 1)
        if tl.max(tl.max(tile, 1) - worst, 0) >= 0.0:  # some row may take a code of this tile
            new_s = tl.full([BLOCK_N, K], float("-inf"), dtype=tl.float32)
            new_i = tl.full([BLOCK_N, K], BIG_ID, dtype=tl.int32)
            for r in tl.static_range(K):
                m = tl.maximum(tl.max(best_s, 1), tl.max(tile, 1))
                pick = tl.minimum(tl.min(tl.where(best_s == m[:, None], best_i, BIG_ID), 1),
                                  tl.min(tl.where(tile == m[:, None], ids, BIG_ID), 1))
                new_s = tl.where(offs_k[None, :] == r, m[:, None], new_s)
                new_i = tl.where(offs_k[None, :] == r, pick[:, None], new_i)
                best_s = tl.where(best_i == pick[:, None], float("-inf"), best_s)
                tile = tl.where(ids == pick[:, None], float("-inf"), tile)
            best_s, best_i = new_s, new_i
    out = head * stride_oh + offs_n[:, None] * stride_on + offs_k[None, :]
    tl.store(OUT_S + out, best_s, mask=row_ok[:, None])
    tl.store(OUT_I + out, best_i, mask=row_ok[:, None])
    if GATHER:  # mean of the value rows of the K_USED best ids, accumulated in float32
        offs_v = tl.arange(0, BLOCK_DV)
        v_ok = row_ok[:, None] & (offs_v[None, :] < DV)
        acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for r in tl.static_range(K_USED):
            ids_r = tl.sum(tl.where(offs_k[None, :] == r, best_i, 0), 1)
            acc += tl.load(VALUES + head * stride_vh + ids_r[:, None].to(tl.int64) * stride_vc + offs_v[None, :],
                           mask=v_ok, other=0.0).to(tl.float32)
        acc = acc / K_USED
        tl.store(OUT_V + head * stride_ovh + offs_n[:, None] * stride_ovn + offs_v[None, :],
                 acc.to(OUT_V.dtype.element_ty), mask=v_ok)


def vq_topk_triton(x, codebook, bias, scale, k, block_n=None, block_c=None, values=None):
    """Ranking scores and ids (H, N, K) of the k best codes per row (K = k rounded up to a power of two; the caller
    slices). x (H, N, d), codebook (H, C, d), bias and scale (H, C) float32 per-code terms. With `values`
    (H, C, dv) also returns the mean of the k selected value rows, (H, N, dv) in values' dtype. CUDA, or CPU under
    TRITON_INTERPRET=1."""
    import torch

    H, N, D = x.shape
    C = codebook.shape[1]
    K = max(triton.next_power_of_2(k), 2)
    x, codebook = x.contiguous(), codebook.contiguous()
    bias, scale = bias.contiguous(), scale.contiguous()
    out_s = torch.empty((H, N, K), dtype=torch.float32, device=x.device)
    out_i = torch.empty((H, N, K), dtype=torch.int32, device=x.device)
    gather = values is not None
    if gather:
        values = values.contiguous()
        DV = values.shape[-1]
        out_v = torch.empty((H, N, DV), dtype=values.dtype, device=x.device)
    else:
        DV, values, out_v = 1, out_s, out_s  # unused pointers
    block_n = block_n or (64 if x.is_cuda else 16)
    block_c = block_c or (64 if x.is_cuda else 32)
    vq_topk_kernel[(triton.cdiv(N, block_n), H)](
        x, codebook, bias, scale, out_s, out_i, values, out_v, N, C, D, DV,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), bias.stride(0), out_s.stride(0),
        out_s.stride(1), values.stride(0), values.stride(1), out_v.stride(0), out_v.stride(1),
        K=K, K_USED=k, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, BLOCK_C=block_c,
        GATHER=gather, BLOCK_DV=max(2, triton.next_power_of_2(DV)),
        LOWP=x.dtype == codebook.dtype and x.dtype in (torch.float16, torch.bfloat16))
    return (out_s, out_i, out_v) if gather else (out_s, out_i)
