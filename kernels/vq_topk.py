"""Triton kernel of the fused top-k codebook lookup (docs/codebook.md): codebook tiles stream through a
matrix-multiply tile and each row keeps a running top-k in registers, so the N×C score matrix never exists.

One program per (block of BLOCK_N rows, head). fp16/bf16 inputs of one dtype go through the tensor cores as they
are (their products are exact in float32, accumulated in float32); float32 inputs use "tf32x3" dots (three TF32
tensor-core products per float32 product: float32 accuracy at tensor-core speed). The vector
dimension is processed in chunks of BLOCK_D (one chunk, kept in registers, when d fits; otherwise x's chunks are
re-read per codebook tile), so any d compiles within the shared-memory budget. A tile's scores are x·c adjusted per
code (l2: 2 x·c − ‖c‖²; cosine: x·c / ‖c‖; ip: x·c; banned codes, codes past C and NaN scores: −inf), then merged
with the running top-k by K rounds of "take the best of the union, the lowest id among equal scores". A tile whose
best score cannot enter any row's top-k is skipped after one reduction. The caller adds the per-row term (−‖x‖² for
l2, 1/‖x‖ for cosine).

Identical codes: the caller searches only the first code of each group of copies (the others banned through
BIAS) and passes the groups (MEMBERS, GSTART, GSIZE: kestrel.ops.vq_topk.duplicate_groups); the epilogue expands
the running top-k into the copies by a K-way merge on (score, id). A matrix product may round the same x·c
differently in different columns of a tile, so searching copies separately could order them by rounding rather
than by index; grouped, they share one score and the lower-index rule holds exactly.

With GATHER (the discrete key-value bottleneck, docs/kv_bottleneck.md) the same program then reads the value rows of
its k ids and writes their mean, so the nearest-key search and the value gather are one launch (an id that is not a
code, as when banned codes leave fewer than k, reads nothing).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BIG_ID = tl.constexpr(2**30)  # "no code yet": above every real id (a constexpr: compiled kernels read no globals)


@triton.jit
def _score_tile(
    x_rows,
    row_ok,
    cb_rows,
    code_ok,
    x_resident,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    LOWP: tl.constexpr,
):
    """x·c for BLOCK_N rows and BLOCK_C codes, float32, summed over the chunks of d."""
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_CHUNK:
        d_ok = offs_d < D
        cb = tl.load(cb_rows + offs_d[None, :], mask=code_ok[:, None] & d_ok[None, :], other=0.0)
        if LOWP:
            tile = tl.dot(x_resident, tl.trans(cb), out_dtype=tl.float32)
        else:
            tile = tl.dot(x_resident, tl.trans(cb.to(tl.float32)), input_precision="tf32x3")
    else:
        tile = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            xc = tl.load(x_rows + d0 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            cb = tl.load(cb_rows + d0 + offs_d[None, :], mask=code_ok[:, None] & d_ok[None, :], other=0.0)
            if LOWP:
                tile += tl.dot(xc, tl.trans(cb), out_dtype=tl.float32)
            else:
                tile += tl.dot(xc.to(tl.float32), tl.trans(cb.to(tl.float32)), input_precision="tf32x3")
    return tile


@triton.jit
def vq_topk_kernel(
    X,
    CB,
    BIAS,
    SCALE,
    MEMBERS,
    GSTART,
    GSIZE,
    OUT_S,
    OUT_I,
    VALUES,
    OUT_V,
    N,
    C,
    D,
    DV,
    stride_xh,
    stride_xn,
    stride_ch,
    stride_cc,
    stride_bh,
    stride_gh,
    stride_oh,
    stride_on,
    stride_vh,
    stride_vc,
    stride_ovh,
    stride_ovn,
    K: tl.constexpr,
    K_USED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    LOWP: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)  # offsets in int64: H·N·d may pass 2^31 elements
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    row_ok = offs_n < N
    x_rows = X + head * stride_xh + offs_n[:, None].to(tl.int64) * stride_xn  # (BLOCK_N, 1) row starts
    x_resident = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if ONE_CHUNK:
        offs_d = tl.arange(0, BLOCK_D)
        x_resident = tl.load(x_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if not LOWP:
            x_resident = x_resident.to(tl.float32)
    best_s = tl.full([BLOCK_N, K], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_N, K], BIG_ID, dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        code_ok = offs_c < C
        cb_rows = CB + head * stride_ch + offs_c[:, None].to(tl.int64) * stride_cc  # (BLOCK_C, 1) row starts
        tile = _score_tile(x_rows, row_ok, cb_rows, code_ok, x_resident, D, BLOCK_N, BLOCK_C, BLOCK_D, ONE_CHUNK, LOWP)
        bias = tl.load(BIAS + head * stride_bh + offs_c, mask=code_ok, other=float("-inf"))
        scale = tl.load(SCALE + head * stride_bh + offs_c, mask=code_ok, other=0.0)
        tile = tile * scale[None, :] + bias[None, :]
        tile = tl.where(tile == tile, tile, float("-inf"))  # NaN ranks last, as on the CPU path
        ids = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32) + offs_c[None, :]
        worst = tl.min(best_s, 1)
        # some row may take a code of this tile (>=, not a difference: -inf - -inf would be NaN)
        if tl.max((tl.max(tile, 1) >= worst).to(tl.int32), 0) > 0:
            new_s = tl.full([BLOCK_N, K], float("-inf"), dtype=tl.float32)
            new_i = tl.full([BLOCK_N, K], BIG_ID, dtype=tl.int32)
            for r in tl.static_range(K):
                m = tl.maximum(tl.max(best_s, 1), tl.max(tile, 1))
                pick = tl.minimum(
                    tl.min(tl.where(best_s == m[:, None], best_i, BIG_ID), 1),
                    tl.min(tl.where(tile == m[:, None], ids, BIG_ID), 1),
                )
                new_s = tl.where(offs_k[None, :] == r, m[:, None], new_s)
                new_i = tl.where(offs_k[None, :] == r, pick[:, None], new_i)
                best_s = tl.where(best_i == pick[:, None], float("-inf"), best_s)
                tile = tl.where(ids == pick[:, None], float("-inf"), tile)
                best_i = tl.where(best_i == pick[:, None], BIG_ID + 1, best_i)  # taken: never matches again
                ids = tl.where(ids == pick[:, None], BIG_ID + 1, ids)
            best_s, best_i = new_s, new_i
    # expand the group leaders into their copies: K rounds of "the best live head, the lowest id among equals"
    groups = head * stride_gh
    lead_ok = row_ok[:, None] & (best_i < C)
    g_size = tl.load(GSIZE + groups + best_i, mask=lead_ok, other=0)
    g_start = tl.load(GSTART + groups + best_i, mask=lead_ok, other=0)
    taken = tl.zeros([BLOCK_N, K], dtype=tl.int32)
    out_s = tl.full([BLOCK_N, K], float("-inf"), dtype=tl.float32)
    out_i = tl.full([BLOCK_N, K], BIG_ID, dtype=tl.int32)
    for r in tl.static_range(K):
        live = taken < g_size
        cand = tl.load(MEMBERS + groups + g_start + taken, mask=live, other=BIG_ID)
        live_s = tl.where(live, best_s, float("-inf"))
        m = tl.max(live_s, 1)
        pick = tl.min(tl.where(live & (live_s == m[:, None]), cand, BIG_ID), 1)
        out_s = tl.where(offs_k[None, :] == r, m[:, None], out_s)
        out_i = tl.where(offs_k[None, :] == r, pick[:, None], out_i)
        taken += (live & (cand == pick[:, None])).to(tl.int32)
    best_s, best_i = out_s, out_i
    out = head * stride_oh + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(OUT_S + out, best_s, mask=row_ok[:, None])
    tl.store(OUT_I + out, best_i, mask=row_ok[:, None])
    if GATHER:  # mean of the value rows of the K_USED best ids, accumulated in float32
        offs_v = tl.arange(0, BLOCK_DV)
        acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for r in tl.static_range(K_USED):
            ids_r = tl.sum(tl.where(offs_k[None, :] == r, best_i, 0), 1)
            v_ok = row_ok[:, None] & (offs_v[None, :] < DV) & (ids_r < C)[:, None]
            acc += tl.load(
                VALUES + head * stride_vh + ids_r[:, None].to(tl.int64) * stride_vc + offs_v[None, :],
                mask=v_ok,
                other=0.0,
            ).to(tl.float32)
        acc = acc / K_USED
        tl.store(
            OUT_V + head * stride_ovh + offs_n[:, None].to(tl.int64) * stride_ovn + offs_v[None, :],
            acc.to(OUT_V.dtype.element_ty),
            mask=row_ok[:, None] & (offs_v[None, :] < DV),
        )


def cuda_config(D, K, lowp):
    """(BLOCK_N, BLOCK_C, BLOCK_D, num_warps, num_stages) for a GPU launch: d in chunks of at most 64 (128 for
    fp16/bf16), fewer rows per program when the running top-k is wide (it keeps 2·K scores per row in registers
    through K unrolled rounds: 32 rows for K = 32, 16 for K = 64, so that the sm_90 build does not spill)."""
    block_d = max(16, min(triton.next_power_of_2(D), 128 if lowp else 64))
    block_n = 64 if K < 32 else 32 if K < 64 else 16
    return block_n, 64, block_d, 4, 2


def vq_topk_triton(x, codebook, bias, scale, k, groups, block_n=None, block_c=None, values=None):
    """Ranking scores and ids (H, N, K) of the k best codes per row (K = k rounded up to a power of two; the caller
    slices). x (H, N, d), codebook (H, C, d), bias and scale (H, C) float32 per-code terms, groups = (alias,
    members, start, size) from kestrel.ops.vq_topk.duplicate_groups (the copies are banned here). With `values`
    (H, C, dv) also returns the mean of the k selected value rows, (H, N, dv) in values' dtype (accumulated in
    float32). CUDA, or CPU under TRITON_INTERPRET=1."""

    H, N, D = x.shape
    C = codebook.shape[1]
    alias, members, g_start, g_size = groups
    members, g_start, g_size = (
        t.to(device=x.device, dtype=torch.int32).contiguous() for t in (members, g_start, g_size)
    )
    bias = bias.masked_fill(alias.to(bias.device), float("-inf"))  # only a group's first code is searched
    K = max(triton.next_power_of_2(k), 2)
    x, codebook = x.contiguous(), codebook.contiguous()
    bias, scale = bias.contiguous(), scale.contiguous()
    out_s = torch.empty((H, N, K), dtype=torch.float32, device=x.device)
    out_i = torch.empty((H, N, K), dtype=torch.int32, device=x.device)
    gather = values is not None
    if H == 0 or N == 0:  # nothing to search: no empty grid
        empty_v = values.new_empty((H, N, values.shape[-1])) if gather else None
        return (out_s, out_i, empty_v) if gather else (out_s, out_i)
    if gather:
        values = values.contiguous()
        DV = values.shape[-1]
        out_v = torch.empty((H, N, DV), dtype=values.dtype, device=x.device)
    else:
        # unused pointers, each its own tensor: no alias of an output (for torch.compile's functional view)
        DV, values, out_v = 1, x.new_empty((1, 1, 1)), x.new_empty((1, 1, 1))
    lowp = x.dtype == codebook.dtype and x.dtype in (torch.float16, torch.bfloat16)
    if x.is_cuda:
        cfg_n, cfg_c, block_d, num_warps, num_stages = cuda_config(D, K, lowp)
    else:  # the interpreter: small tiles; d in chunks of at most 32, so the tests cover the multi-chunk loop
        cfg_n, cfg_c, block_d, num_warps, num_stages = 16, 32, min(max(16, triton.next_power_of_2(D)), 32), 4, 1
    block_n, block_c = block_n or cfg_n, block_c or cfg_c
    wrap_triton(vq_topk_kernel)[(triton.cdiv(N, block_n), H)](
        x,
        codebook,
        bias,
        scale,
        members,
        g_start,
        g_size,
        out_s,
        out_i,
        values,
        out_v,
        N,
        C,
        D,
        DV,
        x.stride(0),
        x.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        bias.stride(0),
        members.stride(0),
        out_s.stride(0),
        out_s.stride(1),
        values.stride(0),
        values.stride(1),
        out_v.stride(0),
        out_v.stride(1),
        K=K,
        K_USED=k,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        GATHER=gather,
        BLOCK_DV=max(2, triton.next_power_of_2(DV)),
        LOWP=lowp,
        ONE_CHUNK=block_d >= D,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return (out_s, out_i, out_v) if gather else (out_s, out_i)
