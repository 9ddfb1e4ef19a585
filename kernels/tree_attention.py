"""Triton kernels of tree attention (docs/tree_verification.md): the T tokens of a draft tree, already appended to the
KV cache at [len, len+T), attend the whole prefix [0, len) and their ancestors-or-self (packed int32 bits, the layout
of kestrel.reference.tree).

The rows of a program are every (query head of one GQA group, tree node) pair, GROUP*T of them (in blocks of
BLOCK_M when there are more), so each K/V tile of a (batch, kv-head) is loaded once for all T queries of all heads
that share it, not once per query. Scores and the online softmax are fp32 (base-2 exponentials with the scale folded
in); the second matrix product takes the probabilities in the value dtype (fp16/bf16), or fp32 for fp32 inputs.

Split-K (flash-decoding style): with SPLIT, grid dimension 1 holds n_prefix_splits programs that each read one slice
of the prefix (the slice length follows the sequence's own length, read on the device: no host sync) and one more
program for the tree part; each writes a normalised partial output and its log-sum-exp, and the combine kernel merges
them. Without SPLIT one program per row block reads the prefix and then the tree and writes the output directly.

Rows that see no key (an unused, padded node has no bits; with an empty prefix it sees nothing) get zeros.
Tree K/V rows that no row of the block can see are not loaded, so garbage (even NaN) in unused nodes' slots and
anywhere past len+T never reaches the output. Lengths are clamped to [0, Lmax - T] so that a bad length cannot read
outside the cache (the op checks them on the CPU only: checking on the GPU would need a host sync).
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

MIN_SPLIT = 256  # prefix keys per split at least (a multiple of every BLOCK_N used here)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT: tl.constexpr):
    """Merge a tile of base-2 scores s (masked entries -inf) and its values into the running (max, sum, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at zero
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if FP32_DOT:
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def tree_attention_fwd_kernel(
    Q,
    K,
    V,
    LENS,
    BITS,
    O,
    PART_O,
    PART_LSE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_ot,
    B,
    H_KV,
    GROUP,
    T,
    D,
    L_MAX,
    qk_scale,
    n_prefix_splits,
    min_split,
    SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    b64 = b.to(tl.int64)  # a batch offset in the caches may pass 2^31 elements
    length = tl.load(LENS + b).to(tl.int32)
    length = tl.minimum(tl.maximum(length, 0), L_MAX - T)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * T
    node = rows % T
    head = hk * GROUP + rows // T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b64 * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPLIT:
        # this sequence's prefix in n_prefix_splits slices (block multiples, min_split at least): the program with
        # split == n_prefix_splits starts past the prefix and does the tree instead
        chunk = tl.cdiv(tl.cdiv(length, n_prefix_splits), BLOCK_N) * BLOCK_N
        chunk = tl.maximum(chunk, min_split)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        do_tree = split == n_prefix_splits
    else:
        lo = 0
        hi = length
        do_tree = split == 0

    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < hi
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0
        )
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0
        )
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(kv_ok[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT)

    if do_tree:
        # tiles of 32 tree slots: one int32 word per row holds a tile's bits
        bit = tl.arange(0, 32)
        for start in range(0, T, 32):
            col = start + bit
            word = tl.load(BITS + b64 * stride_bb + node * stride_bt + start // 32, mask=row_ok, other=0)
            # arithmetic shift: bit 31 is the sign bit, & 1 still reads it
            visible = (((word[:, None] >> bit[None, :]) & 1) != 0) & (col < T)[None, :]
            seen = tl.max(visible.to(tl.int32), 0) > 0  # slots some row of the block attends: only those are read
            kv_rows = (length + col)[:, None]
            k = tl.load(k_base + kv_rows * stride_kn + offs_d[None, :], mask=seen[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + kv_rows * stride_vn + offs_d[None, :], mask=seen[:, None] & d_ok[None, :], other=0.0)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT)

    seen_any = l_i > 0.0
    out = tl.where(seen_any[:, None], acc / tl.where(seen_any, l_i, 1.0)[:, None], 0.0)  # a row that saw no key: 0
    if SPLIT:
        part_row = ((split * B + b) * (H_KV * GROUP) + head) * T + node
        tl.store(
            PART_O + part_row.to(tl.int64)[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :]
        )
        lse = tl.where(seen_any, m_i + tl.log2(tl.where(seen_any, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + part_row, lse, mask=row_ok)
    else:
        o_ptrs = O + b64 * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def tree_attention_combine_kernel(
    PART_O,
    PART_LSE,
    O,
    stride_ob,
    stride_oh,
    stride_ot,
    n_splits,
    n_rows,
    H_Q,
    T,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits' partial outputs of BLOCK_R rows (row = (b * H_Q + h) * T + t): weights 2^(lse - max)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(PART_LSE + s * n_rows + rows, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        lse = tl.load(PART_LSE + s * n_rows + rows, mask=row_ok, other=float("-inf"))
        has = lse > float("-inf")  # empty splits are neither weighted nor read
        w = tl.where(has, tl.exp2(lse - m_safe), 0.0)
        part = tl.load(
            PART_O + (s * n_rows + rows).to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=has[:, None] & d_ok[None, :],
            other=0.0,
        )
        total += w
        acc += part * w[:, None]
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]  # no split saw a key: acc is 0
    b = rows // (H_Q * T)
    h = (rows // T) % H_Q
    t = rows % T
    o_ptrs = O + b.to(tl.int64)[:, None] * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_SM_COUNT = {}


def _sm_count(device):

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_prefix_splits(programs, l_max, device):
    """Prefix slices per (row block, batch, kv-head): enough programs for about one wave of the GPU, but no slice
    shorter than MIN_SPLIT keys of the cache's capacity; 1 (no split, no combine) when the grid is already full."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(_sm_count(device), programs)
    return max(1, min(wanted, l_max // MIN_SPLIT))


def cuda_blocks(rows, head_dim, fp32):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) on a GPU for `rows` = GROUP*T query rows. Chosen so that sm_90 builds
    keep everything in registers (no spills: checked by compiling ahead for sm_90 with the launch's specialisation;
    not yet timed on a GPU); fp32 inputs take the exact (ieee) products on FMA units and need smaller tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fits = max(16, triton.next_power_of_2(rows))
    if fp32:
        if block_d <= 64:
            return min(32, fits), 32, block_d, 8
        return (min(32, fits), 16, block_d, 8) if block_d <= 128 else (16, 32, block_d, 8)
    if block_d > 128:
        return min(32, fits), 32, block_d, 4
    block_m = min(128, fits)
    return block_m, 64 if block_m * block_d <= 64 * 128 else 32, block_d, 8 if block_m * block_d >= 64 * 128 else 4


def tree_attention_forward(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    tree_mask_bits,
    softmax_scale,
    num_splits=None,
    min_split=MIN_SPLIT,
    block_m=None,
    block_n=None,
):
    """Launch the kernels: out (B, Hq, T, D) in q's dtype. num_splits: prefix slices (None: choose_prefix_splits;
    1: no split-K, a single kernel); min_split: the shortest slice in keys (rounded up to a block; the tests set
    it small to split short prefixes). CUDA, or CPU tensors under TRITON_INTERPRET=1."""

    B, Hq, T, D = q.shape
    Hkv, L_max = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    # the kernel takes any strides but a unit one on the head dim (the model's per-layer cache views have it)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    bits = tree_mask_bits.contiguous()
    lens = cache_seqlens.contiguous()
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    rows = group * T
    if q.is_cuda:
        block_m_auto, block_n_auto, block_d, num_warps = cuda_blocks(rows, D, q.dtype == torch.float32)
        block_m, block_n = block_m or block_m_auto, block_n or block_n_auto
        launch = dict(num_warps=num_warps, num_stages=2)
    else:
        block_d = max(16, triton.next_power_of_2(D))
        block_m = block_m or min(64, max(16, triton.next_power_of_2(rows)))
        block_n = block_n or 32
        launch = {}
    m_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or choose_prefix_splits(m_blocks * B * Hkv, L_max, q.device)
    split = splits > 1
    qk_scale = float(softmax_scale) * math.log2(math.e)
    if split:
        part_o = torch.empty((splits + 1, B, Hq, T, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits + 1, B, Hq, T), dtype=torch.float32, device=q.device)
    else:
        # unused pointers, each its own tensor: no alias of the output (for torch.compile's functional view of the
        # launch, where every argument may count as written)
        part_o = torch.empty(1, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(1, dtype=torch.float32, device=q.device)
    wrap_triton(tree_attention_fwd_kernel)[(m_blocks, splits + 1 if split else 1, B * Hkv)](
        q,
        k_cache,
        v_cache,
        lens,
        bits,
        out,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        bits.stride(0),
        bits.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        B,
        Hkv,
        group,
        T,
        D,
        L_max,
        qk_scale,
        splits,
        triton.cdiv(min_split, block_n) * block_n,
        SPLIT=split,
        FP32_DOT=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        **launch,
    )
    if split:
        n_rows = B * Hq * T
        block_r = 16
        wrap_triton(tree_attention_combine_kernel)[(triton.cdiv(n_rows, block_r),)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            splits + 1,
            n_rows,
            Hq,
            T,
            D,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    return out
