"""Triton kernels of softplus attention (LSSA and LSSAR), forward and backward (docs/softplus_attention.md).

Forward: one program per (block of BLOCK_M query rows, batch x query head). The query rows are normalised and scaled by
c_i = ln(D) ln(N_i) once; each key block is normalised as it is loaded. LSSA keeps only running sums (the softplus
weights are non-negative: no running max), LSSAR reads the keys twice: pass 1 gets s_i = sum f and m_i = max x,
pass 2 accumulates (relu(r) / r_max)^p with r_max = N_i softplus(m_i) / (s_i + eps) - o_i, so that r^p never
overflows. fp32 accumulation; the second matrix product takes the weights in the value dtype (fp16/bf16), as flash
attention does, or in fp32 for fp32 inputs. Decode: query row i sits at absolute position len_b - Lq + i.
Backward: a dq kernel per block of query rows (LSSAR: two passes over the keys, the first for a row reduction) and a
dk/dv kernel per block of keys (looping over the query heads of its GQA group), both recomputing the scores from the
forward's row statistics; the formulas are above the backward kernels.

The float32 matrix products (the scores, and the backward's) use "tf32x3": three TF32 tensor-core products per
float32 product (hi·hi + hi·lo + lo·hi), float32 accuracy at tensor-core speed. IEEE float32 dots are FMA loops
whose operand tiles do not fit in registers (the sm_90 build spilled kilobytes per thread). The tile sizes of a GPU
launch (cuda_config) were chosen from sm_90 builds compiled ahead of time (tests/test_softplus_attention.py).
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _softplus(x):
    # softplus(x) = log(1 + e^x); x itself past 20 (the difference is below float32's resolution)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_keys_normed(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length):
    """A block of keys, normalised, with their norms, the values (input dtype) and the valid-key mask."""
    kmask = offs_n < length
    k = tl.load(K + base_k + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + base_v + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    kf = k.to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), 1e-12)
    return kf / norm[:, None], norm, v, kmask


@triton.jit
def _load_keys(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length):
    kn, knorm_unused, v, kmask = _load_keys_normed(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length)
    return kn, v, kmask


@triton.jit
def _tree_bits(BITS, bits_base, stride_bm, offs_m, row_ok, rel, T):
    """(BLOCK_M, BLOCK_N) bool: node `rel` (a tree index; outside [0, T) gives False) is an ancestor-or-self of the
    row's node, read from the packed bits (bit rel % 32 of word rel // 32 of the row)."""
    in_tree = (rel >= 0) & (rel < T)
    node = tl.where(in_tree, rel, 0)
    words = tl.load(
        BITS + bits_base + offs_m[:, None] * stride_bm + (node // 32)[None, :],
        mask=row_ok[:, None] & in_tree[None, :],
        other=0,
    )
    return ((words >> (node % 32)[None, :]) & 1) != 0


@triton.jit
def _scores(
    K,
    V,
    base_k,
    base_v,
    start,
    offs_d,
    stride_kn,
    stride_vn,
    length,
    qs,
    pos,
    BITS,
    bits_base,
    stride_bm,
    offs_m,
    row_ok,
    prefix,
    T,
    CAUSAL: tl.constexpr,
    TREE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward's key block at `start`: scores x = qs · kn (BLOCK_M, BLOCK_N), the values, and which keys each
    row sees (valid, and causal; a tree row: the prefix and its ancestors-or-self)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kn, v, kmask = _load_keys(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length)
    x = tl.dot(qs, tl.trans(kn), input_precision="tf32x3")
    visible = kmask[None, :]
    if TREE:
        visible = visible & (
            (offs_n < prefix)[None, :] | _tree_bits(BITS, bits_base, stride_bm, offs_m, row_ok, offs_n - prefix, T)
        )
        # a tree slot no row here sees (an unused node) may hold anything: its weight 0 times NaN is still NaN
        v = tl.where((tl.sum(visible.to(tl.int32), 0) > 0)[:, None], v, 0.0)
    elif CAUSAL:
        visible = visible & (offs_n[None, :] <= pos[:, None])
    return x, v, visible


@triton.jit
def softplus_attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    S,
    M,
    W,
    LENS,
    BITS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_bb,
    stride_bm,
    H_Q,
    GROUP,
    Lq,
    Lk,
    log_d,
    eps,
    power,
    CAUSAL: tl.constexpr,
    REWEIGHT: tl.constexpr,
    HAS_LENS: tl.constexpr,
    TREE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    bits_base = b.to(tl.int64) * stride_bb
    if TREE:  # LENS holds the prefix lengths; the Lq = T tree rows sit at [prefix, prefix + T) of the cache
        prefix = tl.load(LENS + b).to(tl.int32)
        length = prefix + Lq
    elif HAS_LENS:
        prefix = 0
        length = tl.load(LENS + b).to(tl.int32)
    else:
        prefix = 0
        length = Lk
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    qn = q / tl.maximum(tl.sqrt(tl.sum(q * q, 1)), 1e-12)[:, None]
    pos = length - Lq + offs_m  # absolute positions of the rows
    if TREE:  # N_i = the prefix + the row's ancestors-or-self (the bits set in its row)
        seen = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start in range(0, Lq, BLOCK_N):
            rel = start + tl.arange(0, BLOCK_N)
            seen += tl.sum(_tree_bits(BITS, bits_base, stride_bm, offs_m, row_ok, rel, Lq).to(tl.int32), 1)
        count = (prefix + seen).to(tl.float32)
        hi = length
    elif CAUSAL:
        count = tl.maximum(pos + 1, 0).to(tl.float32)
        hi = tl.minimum(length, pid_m * BLOCK_M + BLOCK_M + length - Lq)
    else:
        count = tl.zeros([BLOCK_M], dtype=tl.float32) + length
        hi = length
    scale = log_d * tl.log(tl.maximum(count, 1.0))  # c_i = ln(D) ln(N_i)
    qs = qn * scale[:, None]
    base_k = b * stride_kb + hk * stride_kh
    base_v = b * stride_vb + hk * stride_vh

    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        x, v, visible = _scores(
            K,
            V,
            base_k,
            base_v,
            start,
            offs_d,
            stride_kn,
            stride_vn,
            length,
            qs,
            pos,
            BITS,
            bits_base,
            stride_bm,
            offs_m,
            row_ok,
            prefix,
            Lq,
            CAUSAL,
            TREE,
            BLOCK_N,
        )
        f = tl.where(visible, _softplus(x), 0.0)
        s += tl.sum(f, 1)
        if REWEIGHT:
            m = tl.maximum(m, tl.max(tl.where(visible, x, float("-inf")), 1))
        else:
            if FP32_DOT:
                acc += tl.dot(f, v.to(tl.float32), input_precision="tf32x3")
            else:
                acc += tl.dot(f.to(v.dtype), v)

    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    stat = pid_bh * Lq + offs_m
    tl.store(S + stat, s, mask=row_ok)
    if not REWEIGHT:
        out = acc / (s + eps)[:, None]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(M + stat, m, mask=row_ok)
        offset = tl.where(count > 3.0, 1.0, 0.0)
        inv = 1.0 / (s + eps)
        r_max = count * _softplus(m) * inv - offset
        positive = r_max > 0.0
        safe = tl.where(positive, r_max, 1.0)
        sw = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, hi, BLOCK_N):
            x, v, visible = _scores(
                K,
                V,
                base_k,
                base_v,
                start,
                offs_d,
                stride_kn,
                stride_vn,
                length,
                qs,
                pos,
                BITS,
                bits_base,
                stride_bm,
                offs_m,
                row_ok,
                prefix,
                Lq,
                CAUSAL,
                TREE,
                BLOCK_N,
            )
            r = count[:, None] * _softplus(x) * inv[:, None] - offset[:, None]
            ratio = tl.where(visible & (r > 0.0), r / safe[:, None], 1.0)
            w = tl.where(visible & (r > 0.0), tl.exp2(power * tl.log2(ratio)), 0.0)
            sw += tl.sum(w, 1)
            if FP32_DOT:
                acc += tl.dot(w, v.to(tl.float32), input_precision="tf32x3")
            else:
                acc += tl.dot(w.to(v.dtype), v)
        # eps / r_max^p in the log domain, capped below float32's overflow (2^115): a near-uniform row's tiny r_max
        # would otherwise give eps / 0 = inf in the denominator the backward divides by
        scaled_eps = tl.exp2(tl.minimum(tl.log2(eps + 0.0 * safe) - power * tl.log2(safe), 115.0))
        tl.store(W + stat, sw + scaled_eps, mask=row_ok)  # the scaled denominator, for the backward
        out = tl.where(positive[:, None], acc / (sw + scaled_eps)[:, None], 0.0)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def cuda_config(kernel, D):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a GPU launch of "fwd", "fwd_tree" (the draft-tree mode), "dq" or
    "dkdv" at head dim D, from sm_90 builds compiled ahead of time: the forward keeps everything in registers (the
    tree mode's bit tiles take smaller row blocks: a tree has tens of rows); the backward kernels, whose LSSAR terms
    hold several BLOCK_M x BLOCK_N tiles at once, spill the least at these sizes (tens of bytes at D 64, hundreds at
    D 128)."""
    table = {
        ("fwd", 64): (64, 64, 4, 2),
        ("fwd", 128): (64, 32, 4, 2),
        ("fwd_tree", 64): (32, 32, 4, 2),
        ("fwd_tree", 128): (16, 32, 4, 2),
        ("dq", 64): (64, 32, 4, 2),
        ("dq", 128): (64, 32, 8, 2),
        ("dkdv", 64): (32, 32, 8, 2),
        ("dkdv", 128): (16, 32, 8, 2),
    }
    return table[(kernel, 64 if D <= 64 else 128)]


def softplus_attention_forward(
    q, k, v, causal, reweight_p, eps, cache_seqlens=None, block_m=None, block_n=None, tree_mask_bits=None
):
    """Launch the forward kernel: (out, s, m, w), fp32 (B, Hq, Lq) row statistics: s = sum f; for LSSAR also m = max x
    and w = sum (relu(r)/r_max)^p + eps / r_max^p (the scaled denominator). CUDA, or CPU under TRITON_INTERPRET=1.
    tree_mask_bits (B, Lq, ceil(Lq/32)) int32: the tree mode (cache_seqlens then holds the prefix lengths, the Lq
    tree rows sit at [prefix, prefix + Lq) of the keys; row i sees the prefix and the nodes of its bits)."""

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    s = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    m = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    w = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # no query rows (B, Hq or Lq is 0): launch no empty grid
        return out, s, m, w
    unused = torch.zeros(1, dtype=torch.int32, device=q.device)  # unused pointers: no alias of an output (for
    # torch.compile's functional view of the launch, where every argument may count as written)
    lens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous() if cache_seqlens is not None else unused
    bits = tree_mask_bits.contiguous() if tree_mask_bits is not None else unused
    kind = "fwd_tree" if tree_mask_bits is not None else "fwd"
    cfg_m, cfg_n, num_warps, num_stages = cuda_config(kind, D) if q.is_cuda else (16, 16, 4, 1)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    grid = (triton.cdiv(Lq, block_m), B * Hq)
    wrap_triton(softplus_attention_fwd_kernel)[grid](
        q,
        k,
        v,
        out,
        s,
        m,
        w,
        lens,
        bits,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        bits.stride(0) if tree_mask_bits is not None else 0,
        bits.stride(1) if tree_mask_bits is not None else 0,
        Hq,
        Hq // Hkv,
        Lq,
        Lk,
        math.log(D),
        eps,
        float(reweight_p or 0.0),
        CAUSAL=bool(causal),
        REWEIGHT=reweight_p is not None,
        HAS_LENS=cache_seqlens is not None,
        TREE=tree_mask_bits is not None,
        FP32_DOT=q.dtype == torch.float32,
        D=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, s, m, w


# ------------------------------------------------------------------------------------------------------- backward
# LSSA: out_i = sum_j f_ij v_j / (s_i + eps), f = softplus(x), x = c_i qn_i . kn_j. With delta_i = dO_i . out_i:
# dx_ij = (dO_i . v_j - delta_i) / (s_i + eps) * sigmoid(x_ij) (visible only), dv_j = sum_i f_ij dO_i / (s_i + eps).
# LSSAR (REWEIGHT, power p): a = f / (s + eps), r = N a - o, w = relu(r)^p, out = sum w v / (sum w + eps). With the
# forward's scaling (w' = (r / r_max)^p, W' = sum w' + eps / r_max^p): dv_j = sum_i w'_ij dO_i / W'_i;
# dr_ij = (dO_i . v_j - delta_i) p (r_ij / r_max_i)^(p-1) / (r_max_i W'_i) for r_ij > 0 (bounded: no overflow);
# da = N dr; dx_ij = (da_ij - gamma_i) / (s_i + eps) * sigmoid(x_ij) with gamma_i = sum_j da_ij a_ij (a row
# reduction: a first pass of the dq kernel, stored for the dk/dv kernel).
# Both: dqn_i = c_i sum_j dx_ij kn_j, dkn_j = sum_i c_i dx_ij qn_i, then the normalisations' Jacobians
# dq = (dqn - qn (qn . dqn)) / |q| (likewise for k); dk and dv sum over the query heads of each GQA group.


@triton.jit
def _rows(
    Q,
    DO,
    O,
    S,
    M,
    W,
    LENS,
    b,
    h,
    pid_bh,
    offs_m,
    offs_d,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_ob,
    stride_oh,
    stride_om,
    Lq,
    Lk,
    log_d,
    eps,
    CAUSAL: tl.constexpr,
    HAS_LENS: tl.constexpr,
    REWEIGHT: tl.constexpr,
):
    """A block of query rows: (qs = qn c, qn, |q|, c, dO, delta, 1/(s+eps), positions, length, rows ok, stat index,
    N, o, r_max, dr coefficient, dv scale)."""
    if HAS_LENS:
        length = tl.load(LENS + b).to(tl.int32)
    else:
        length = Lk
    row_ok = offs_m < Lq
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(q * q, 1)), 1e-12)
    qn = q / norm[:, None]
    pos = length - Lq + offs_m
    if CAUSAL:
        count = tl.maximum(pos + 1, 0).to(tl.float32)
    else:
        count = tl.zeros([offs_m.shape[0]], dtype=tl.float32) + length
    scale = log_d * tl.log(tl.maximum(count, 1.0))
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    do = tl.load(DO + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = tl.load(O + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * out, 1)
    stat = pid_bh * Lq + offs_m
    inv = 1.0 / (tl.load(S + stat, mask=row_ok, other=1.0) + eps)
    if REWEIGHT:
        m = tl.load(M + stat, mask=row_ok, other=0.0)
        wden = tl.load(W + stat, mask=row_ok, other=1.0)
        offset = tl.where(count > 3.0, 1.0, 0.0)
        r_max = count * _softplus(m) * inv - offset
        positive = (r_max > 0.0) & row_ok
        safe = tl.where(positive, r_max, 1.0)
        coef = tl.where(positive, 1.0 / (safe * wden), 0.0)
        dv_scale = tl.where(positive, 1.0 / wden, 0.0)
    else:
        offset = tl.zeros_like(inv)
        safe = tl.zeros_like(inv) + 1.0
        coef = tl.zeros_like(inv)
        dv_scale = inv
    return (
        qn * scale[:, None],
        qn,
        norm,
        scale,
        do,
        delta,
        inv,
        pos,
        length,
        row_ok,
        stat,
        count,
        offset,
        safe,
        coef,
        dv_scale,
    )


@triton.jit
def _lssar_terms(x, visible, count, inv, offset, safe, coef, dov, delta, power):
    """(a, w', da) of a tile: attention weights, scaled re-weights and d(loss)/da."""
    a = tl.where(visible, _softplus(x), 0.0) * inv[:, None]
    r = count[:, None] * a - offset[:, None]
    live = visible & (r > 0.0)
    log_ratio = tl.log2(tl.where(live, r / safe[:, None], 1.0))
    w = tl.where(live, tl.exp2(power * log_ratio), 0.0)
    dr = tl.where(live, (dov - delta[:, None]) * coef[:, None] * power * tl.exp2((power - 1.0) * log_ratio), 0.0)
    return a, w, count[:, None] * dr


@triton.jit
def _tile(
    qs,
    kn,
    v,
    offs_n,
    kmask,
    row_ok,
    pos,
    do,
    delta,
    inv,
    count,
    offset,
    safe,
    coef,
    gamma,
    power,
    CAUSAL: tl.constexpr,
    REWEIGHT: tl.constexpr,
):
    """(weight for dv, dx, a, da) of one (rows x keys) tile; a and da feed LSSAR's row reduction."""
    x = tl.dot(qs, tl.trans(kn), input_precision="tf32x3")
    visible = kmask[None, :] & row_ok[:, None]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= pos[:, None])
    dov = tl.dot(do, tl.trans(v), input_precision="tf32x3")
    if REWEIGHT:
        a, weight, da = _lssar_terms(x, visible, count, inv, offset, safe, coef, dov, delta, power)
        dx = tl.where(visible, (da - gamma[:, None]) * inv[:, None] * tl.sigmoid(x), 0.0)
    else:
        weight = tl.where(visible, _softplus(x), 0.0)
        dx = tl.where(visible, (dov - delta[:, None]) * inv[:, None] * tl.sigmoid(x), 0.0)
        a = weight
        da = weight
    return weight, dx, a, da


@triton.jit
def softplus_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    S,
    M,
    W,
    LENS,
    DQ,
    GAMMA,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H_Q,
    GROUP,
    Lq,
    Lk,
    log_d,
    eps,
    power,
    CAUSAL: tl.constexpr,
    HAS_LENS: tl.constexpr,
    REWEIGHT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    # (compiled Triton treats `_` as a variable like any other: each unused result gets its own name)
    qs, qn, norm, scale, do, delta, inv, pos, length, row_ok, stat, count, offset, safe, coef, dv_scale_unused = _rows(
        Q,
        DO,
        O,
        S,
        M,
        W,
        LENS,
        b,
        h,
        pid_bh,
        offs_m,
        offs_d,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_ob,
        stride_oh,
        stride_om,
        Lq,
        Lk,
        log_d,
        eps,
        CAUSAL,
        HAS_LENS,
        REWEIGHT,
    )
    if CAUSAL:
        hi = tl.minimum(length, pid_m * BLOCK_M + BLOCK_M + length - Lq)
    else:
        hi = length
    base_k = b * stride_kb + hk * stride_kh
    base_v = b * stride_vb + hk * stride_vh
    gamma = tl.zeros([BLOCK_M], dtype=tl.float32)
    if REWEIGHT:  # pass 1: gamma_i = sum_j da_ij a_ij
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            kn, v, kmask = _load_keys(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length)
            weight_unused, dx_unused, a, da = _tile(
                qs,
                kn,
                v.to(tl.float32),
                offs_n,
                kmask,
                row_ok,
                pos,
                do,
                delta,
                inv,
                count,
                offset,
                safe,
                coef,
                gamma,
                power,
                CAUSAL,
                REWEIGHT,
            )
            gamma += tl.sum(da * a, 1)
        tl.store(GAMMA + stat, gamma, mask=row_ok)
    dqn = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kn, v, kmask = _load_keys(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length)
        weight_unused2, dx, a_unused, da_unused = _tile(
            qs,
            kn,
            v.to(tl.float32),
            offs_n,
            kmask,
            row_ok,
            pos,
            do,
            delta,
            inv,
            count,
            offset,
            safe,
            coef,
            gamma,
            power,
            CAUSAL,
            REWEIGHT,
        )
        dqn += tl.dot(dx, kn, input_precision="tf32x3")
    dqn = dqn * scale[:, None]
    dq = (dqn - qn * tl.sum(qn * dqn, 1)[:, None]) / norm[:, None]
    tl.store(
        DQ + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def softplus_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    O,
    DO,
    S,
    M,
    W,
    LENS,
    GAMMA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H_Q,
    H_KV,
    GROUP,
    Lq,
    Lk,
    log_d,
    eps,
    power,
    CAUSAL: tl.constexpr,
    HAS_LENS: tl.constexpr,
    REWEIGHT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    if HAS_LENS:
        length = tl.load(LENS + b).to(tl.int32)
    else:
        length = Lk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    base_k = b * stride_kb + hk * stride_kh
    base_v = b * stride_vb + hk * stride_vh
    kn, knorm, v, kmask = _load_keys_normed(K, V, base_k, base_v, offs_n, offs_d, stride_kn, stride_vn, length)
    v = v.to(tl.float32)
    dkn = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query rows before this key block see none of it
        lo = (tl.maximum(pid_n * BLOCK_N - (length - Lq), 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H_Q + h
        for start in range(lo, Lq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            (
                qs,
                qn_unused,
                norm_unused,
                scale_unused,
                do,
                delta,
                inv,
                pos,
                length_unused,
                row_ok,
                stat,
                count,
                offset,
                safe,
                coef,
                dv_scale,
            ) = _rows(
                Q,
                DO,
                O,
                S,
                M,
                W,
                LENS,
                b,
                h,
                bh,
                offs_m,
                offs_d,
                stride_qb,
                stride_qh,
                stride_qm,
                stride_ob,
                stride_oh,
                stride_om,
                Lq,
                Lk,
                log_d,
                eps,
                CAUSAL,
                HAS_LENS,
                REWEIGHT,
            )
            if REWEIGHT:
                gamma = tl.load(GAMMA + stat, mask=row_ok, other=0.0)
            else:
                gamma = tl.zeros([BLOCK_M], dtype=tl.float32)
            weight, dx, a_unused, da_unused = _tile(
                qs,
                kn,
                v,
                offs_n,
                kmask,
                row_ok,
                pos,
                do,
                delta,
                inv,
                count,
                offset,
                safe,
                coef,
                gamma,
                power,
                CAUSAL,
                REWEIGHT,
            )
            dv += tl.dot(tl.trans(weight), do * dv_scale[:, None], input_precision="tf32x3")
            dkn += tl.dot(tl.trans(dx), qs, input_precision="tf32x3")
    dk = (dkn - kn * tl.sum(kn * dkn, 1)[:, None]) / knorm[:, None]
    tl.store(
        DK + base_k + offs_n[:, None] * stride_kn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask[:, None]
    )
    tl.store(
        DV + base_v + offs_n[:, None] * stride_vn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask[:, None]
    )


def softplus_attention_backward(
    q, k, v, out, stats, grad_out, causal, reweight_p, eps, cache_seqlens=None, block_m=None, block_n=None
):
    """(dq, dk, dv) from the forward's out and row statistics stats = (s, m, w) (m and w are read for LSSAR only).
    CUDA, or CPU under TRITON_INTERPRET=1. Keys past a sequence's cache length get zero gradients."""

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    s, m, w = (t.contiguous() for t in stats)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() == 0:  # no query rows (B, Hq or Lq is 0): zero dk and dv, and no empty grid launched
        return dq, dk, dv
    gamma = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    unused = torch.zeros(1, dtype=torch.int32, device=q.device)  # an unused pointer: no alias of an output
    lens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous() if cache_seqlens is not None else unused
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    flags = dict(CAUSAL=bool(causal), HAS_LENS=cache_seqlens is not None, REWEIGHT=reweight_p is not None, D=D)
    power = float(reweight_p or 0.0)
    dq_m, dq_n, dq_warps, dq_stages = cuda_config("dq", D) if q.is_cuda else (16, 16, 4, 1)
    wrap_triton(softplus_attention_bwd_dq_kernel)[(triton.cdiv(Lq, block_m or dq_m), B * Hq)](
        q,
        k,
        v,
        out,
        grad_out,
        s,
        m,
        w,
        lens,
        dq,
        gamma,
        *strides,
        Hq,
        Hq // Hkv,
        Lq,
        Lk,
        math.log(D),
        eps,
        power,
        BLOCK_M=block_m or dq_m,
        BLOCK_N=block_n or dq_n,
        num_warps=dq_warps,
        num_stages=dq_stages,
        **flags,
    )
    kv_m, kv_n, kv_warps, kv_stages = cuda_config("dkdv", D) if q.is_cuda else (16, 16, 4, 1)
    wrap_triton(softplus_attention_bwd_dkdv_kernel)[(triton.cdiv(Lk, block_n or kv_n), B * Hkv)](
        q,
        k,
        v,
        out,
        grad_out,
        s,
        m,
        w,
        lens,
        gamma,
        dk,
        dv,
        *strides,
        Hq,
        Hkv,
        Hq // Hkv,
        Lq,
        Lk,
        math.log(D),
        eps,
        power,
        BLOCK_M=block_m or kv_m,
        BLOCK_N=block_n or kv_n,
        num_warps=kv_warps,
        num_stages=kv_stages,
        **flags,
    )
    return dq, dk, dv
