"""Fused top-k codebook lookup (docs/codebook.md).

`vq_topk(x, codebook, k, *, metric="cosine", banned=None) -> (scores, ids)`: x (N, d) or (H, N, d), codebook
(C, d) or (H, C, d) (one codebook per head, all heads in one launch), banned bool (C,) or (H, C). Scores float32,
ids int64, (N, k) or (H, N, k), best first, ties to the lower index. Metrics: "l2" (score −‖x−c‖²), "ip" (x·c),
"cosine" (x·c / (‖x‖‖c‖)). The N×C score matrix is never built: on CUDA the Triton kernel keeps a running top-k per
row over codebook tiles; on the CPU the same ranking runs over chunks of codes (memory O(N·(k + chunk))).
A NaN score ranks last (like −inf). `banned` must leave at least k codes in every head: checked on the CPU; on a
GPU (where the check would be a host sync) the ranks past the allowed codes are undefined.

Ties go to the lower index whatever the rounding of the score computation: a matrix product may round the same
x·c differently in different columns of a tile (BLAS kernels on the CPU, and the Triton interpreter, take other
paths at a tile's edge), so identical codes could get scores one ulp apart. Identical codes (equal values, -0 == +0)
are therefore grouped first (`duplicate_groups`): only each group's first code is searched, and the selection is
then expanded to the copies by a k-way merge on (score, id), so copies share one score and follow the lower-index
rule exactly.
"""

import torch

from .. import _ext
from .._checks import is_int
from ._library import triton_kernel_op

METRICS = ("l2", "ip", "cosine")
CPU_TILE_ELEMENTS = 1 << 20  # scores per CPU step (heads x rows x codes): about 4 MB, cache-resident
CPU_CODE_CHUNK = 16384  # codes per CPU step by default


def _check(x, codebook, k, metric, banned):
    name = "vq_topk"
    if metric not in METRICS:
        raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(
            f"{name}: x must be (N, d) or (H, N, d), got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != x.dim():
        raise ValueError(
            f"{name}: codebook must be {'(C, d)' if x.dim() == 2 else '(H, C, d)'} like x, got "
            f"{tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__}"
        )
    for label, t in (("x", x), ("codebook", codebook)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name}: {label} must be a float tensor, got {t.dtype}")
    if codebook.device != x.device:
        raise ValueError(f"{name}: x is on {x.device} but codebook on {codebook.device}")
    if codebook.shape[-1] != x.shape[-1] or (x.dim() == 3 and codebook.shape[0] != x.shape[0]):
        raise ValueError(f"{name}: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} must share d (and H)")
    C = codebook.shape[-2]
    if not is_int(k) or not 1 <= k <= C:
        raise ValueError(f"{name}: k must be an integer in [1, C={C}], got {k!r}")
    if banned is not None:
        expected = tuple(codebook.shape[:-1])
        if not isinstance(banned, torch.Tensor):
            raise TypeError(
                f"{name}: banned must be None or a bool tensor of shape {expected}, got {type(banned).__name__}"
            )
        if banned.dtype != torch.bool or tuple(banned.shape) != expected:
            raise ValueError(
                f"{name}: banned must be a bool tensor of shape {expected}, got {banned.dtype} of "
                f"shape {tuple(banned.shape)}"
            )
        if banned.device != codebook.device:
            raise ValueError(f"{name}: banned is on {banned.device} but codebook on {codebook.device}")
        # a host read: done on the CPU only (on a GPU it would sync each call), never inside compiled graphs
        if not banned.is_cuda and not torch.compiler.is_compiling() and banned.numel() > 0:
            allowed = int((~banned).sum(-1).min())
            if allowed < k:
                raise ValueError(f"{name}: banned leaves {allowed} codes, fewer than k={k}")


def _neg_squared_norms(cb):
    """-(cb * cb).sum(-1), the same bits, through a cache-sized buffer a few heads at a time on the CPU (the whole
    product is a tensor as large as the codebook: allocating and faulting it in cost more than the sums)."""
    H, C, d = cb.shape
    if cb.device.type != "cpu" or H <= 1 or C * d == 0:
        return -(cb * cb).sum(-1)
    step = max(1, CPU_TILE_ELEMENTS // (4 * C * d))
    out = torch.empty((H, C), dtype=cb.dtype)
    buf = torch.empty((min(step, H), C, d), dtype=cb.dtype)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        torch.mul(cb[h0:h1], cb[h0:h1], out=buf[: h1 - h0])
        torch.sum(buf[: h1 - h0], -1, out=out[h0:h1])
    return out.neg_()


def _code_terms(codebook, metric, banned):
    """(scale, bias) per code, float32 (H, C): ranking score = scale * x·c + bias."""
    cb = codebook.float()
    if metric == "l2":
        scale = torch.full(cb.shape[:-1], 2.0, device=cb.device)
        bias = _neg_squared_norms(cb)
    elif metric == "cosine":
        scale = 1.0 / cb.norm(dim=-1).clamp_min(1e-12)
        bias = torch.zeros(cb.shape[:-1], device=cb.device)
    else:
        scale = torch.ones(cb.shape[:-1], device=cb.device)
        bias = torch.zeros(cb.shape[:-1], device=cb.device)
    if banned is not None:
        bias = bias.masked_fill(banned.to(cb.device), float("-inf"))
    return scale, bias


_HASH_PRIMES = (2147483647, 2147483629)  # two 31-bit primes: the row hash is a pair of sums modulo each


def _hash_weights(d, device):
    """Fixed pseudo-random weights (d, 2) in [1, prime) for the row hash: the same on every call and device,
    made on the host from integers (splitmix64), so that a traced graph holds them as a constant."""
    state, rows = 0x6B657374, []
    for _ in range(d):
        row = []
        for q in _HASH_PRIMES:
            state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
            z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
            row.append(1 + (z ^ (z >> 31)) % (q - 1))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(d, 2)


def duplicate_groups(codebook, banned=None):
    """Groups of identical codes per head, found with fixed shapes and no host sync.

    codebook (H, C, d), banned (H, C) bool or None. Returns (alias, members, start, size), (H, C) each:
    `alias` marks every code that equals a lower-index allowed code (compared by value, so -0 == +0; a code holding
    NaN equals nothing; banned codes are never grouped); `members` lists the code ids group by group, ids ascending
    within a group; for a group's first code c, `start[c]` is the position of its group in `members` and `size[c]`
    the number of copies (alias codes hold no meaning there). On the CPU a C++ kernel computes the same (groups
    possibly in another order in `members`: it hashes differently). Rows are bucketed by a hash of their bits (two sums
    modulo 31-bit primes) and a bucket's neighbours are compared in full, so a hash collision never merges
    different codes (at worst, with probability about C^2 / 2^62, it leaves two copies ungrouped).
    """
    if codebook.device.type == "cpu" and _ext.available():  # one pass per head in C++ (csrc/cpu/codebook.cpp)
        return torch.ops.kestrel.duplicate_groups(codebook, banned)
    return _duplicate_groups_torch(codebook, banned)


if _ext.available():

    @torch.library.register_fake("kestrel::duplicate_groups")
    def _duplicate_groups_fake(codebook, banned):
        H, C = codebook.shape[:2]
        ints = dict(dtype=torch.int32, device=codebook.device)
        return (
            codebook.new_empty((H, C), dtype=torch.bool),
            codebook.new_empty((H, C), **ints),
            codebook.new_empty((H, C), **ints),
            codebook.new_empty((H, C), **ints),
        )


def _duplicate_groups_torch(codebook, banned=None):
    """duplicate_groups in PyTorch ops (the CUDA path; the CPU without kestrel._C)."""
    H, C, d = codebook.shape
    device = codebook.device
    values = codebook + 0.0  # -0 -> +0: equal values get equal bits
    int_dtype = {torch.float64: torch.int64, torch.float32: torch.int32}.get(values.dtype, torch.int16)
    bits = values.view(int_dtype).to(torch.int64)
    if int_dtype == torch.int64:  # hash both 32-bit halves
        bits = torch.cat([bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF], -1)
    else:
        bits = bits & (0xFFFFFFFF if int_dtype == torch.int32 else 0xFFFF)
    weights = _hash_weights(bits.shape[-1], device)
    key = torch.zeros((H, C), dtype=torch.int64, device=device)
    for j, q in enumerate(_HASH_PRIMES):
        partial = ((bits % q) * weights[:, j]) % q  # < 2^62 before the modulo; the sum below stays < 2^63
        key = key * q + partial.sum(-1) % q
    ids = torch.arange(C, device=device).expand(H, C)
    if banned is not None:  # a unique negative key each: banned codes are never grouped
        key = torch.where(banned.to(device), -1 - ids, key)
    key_sorted, order = torch.sort(key, dim=-1, stable=True)  # equal keys keep ascending ids
    rows = values.gather(1, order[..., None].expand(H, C, d))
    same = (key_sorted[:, 1:] == key_sorted[:, :-1]) & (rows[:, 1:] == rows[:, :-1]).all(-1)
    first = torch.cat([torch.ones((H, 1), dtype=torch.bool, device=device), ~same], 1)
    positions = torch.arange(C, device=device).expand(H, C)
    group_pos = torch.cummax(torch.where(first, positions, 0), dim=1).values  # each position's group start
    leader = order.gather(1, group_pos)
    canonical = torch.empty_like(order).scatter_(1, order, leader)
    alias = canonical != ids
    start = torch.empty_like(order).scatter_(1, order, positions)  # where each code sits in `members`
    size = torch.zeros_like(order).scatter_add_(1, canonical, torch.ones_like(order))
    return alias, order.to(torch.int32), start.to(torch.int32), size.to(torch.int32)


def _expand_groups(scores, ids, members, start, size, k):
    """The k best (score, id) of the merged copies of the selected group leaders `ids` (H, N, K), ties to the lower
    id: a k-way merge (each group's copies ascend in `members`, so a group's next copy is its lowest unused id).
    Leaders outside [0, C) (no code) have no copies. The CPU-path twin of the Triton kernel's epilogue."""
    C = members.shape[-1]
    valid = (ids >= 0) & (ids < C)
    leaders = ids.clamp(0, C - 1).flatten(1)
    g_size = torch.where(valid, size.gather(1, leaders).view_as(ids).long(), 0)
    g_start = start.gather(1, leaders).view_as(ids).long()
    taken = torch.zeros_like(ids)
    out_s = scores.new_full(scores.shape[:-1] + (k,), float("-inf"))
    out_i = ids.new_full(ids.shape[:-1] + (k,), C)
    big = torch.iinfo(torch.int64).max
    for r in range(k):
        live = taken < g_size
        slot = (g_start + taken).clamp(max=C - 1).flatten(1)
        cand = torch.where(live, members.gather(1, slot).view_as(ids).long(), big)
        live_s = torch.where(live, scores, float("-inf"))
        best = live_s.amax(-1, keepdim=True)
        pick = torch.where(live & (live_s == best), cand, big).amin(-1, keepdim=True)
        out_s[..., r : r + 1] = best
        out_i[..., r : r + 1] = torch.where(pick == big, C, pick)
        taken = taken + (live & (cand == pick)).long()
    return out_s, out_i


def ranked_topk_cuda(x, codebook, scale, bias, k, banned=None, values=None):
    """The k best codes per row by ranking score `scale * x·c + bias`, ties to the lower id (identical codes
    grouped, see the module docstring): (ranked scores, ids int64) (H, N, k), and with `values` (H, C, dv) the mean
    of the selected value rows (H, N, dv). One Triton launch (kernels/vq_topk.py) after the grouping; no host read."""
    from ..kernels.vq_topk import vq_topk_triton  # triton: a Linux-only dependency

    found = vq_topk_triton(x, codebook, bias, scale, k, duplicate_groups(codebook, banned), values=values)
    ranked, ids = found[0][..., :k], found[1][..., :k].long()
    return (ranked, ids, found[2]) if values is not None else (ranked, ids)


def ranked_topk_cpu(x, codebook, scale, bias, k, banned=None, chunk=None, values=None):
    """ranked_topk_cuda's results by the chunked PyTorch path (any dtype, float64 included)."""
    alias, members, start, size = duplicate_groups(codebook, banned)
    ranked, ids = _topk_chunked(x, codebook, scale, bias.masked_fill(alias, float("-inf")), k, chunk)
    # a host read is free on the CPU: expand only the rows whose selection holds a group of copies
    C = codebook.shape[1]
    has_copies = size.gather(1, ids.clamp(max=C - 1).flatten(1)).view_as(ids).gt(1).any(-1)
    if bool(has_copies.any()):
        heads, rows = has_copies.nonzero(as_tuple=True)
        sub_s, sub_i = _expand_groups(
            ranked[heads, rows][:, None], ids[heads, rows][:, None], members[heads], start[heads], size[heads], k
        )
        ranked, ids = ranked.clone(), ids.clone()
        ranked[heads, rows], ids[heads, rows] = sub_s[:, 0], sub_i[:, 0]
    if values is None:
        return ranked, ids
    H, N = ids.shape[:2]
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    rows = torch.gather(values.to(acc), 1, ids.reshape(H, N * k, 1).expand(-1, -1, values.shape[-1]))
    return ranked, ids, rows.reshape(H, N, k, -1).mean(2).to(values.dtype)


def _chunk_topk_exact(tile, ids, k):
    """The k best of each row, ties to the lower id, in id order: every score above the k-th best value, then the
    first of those equal to it (ids ascend along the row)."""
    kth = torch.topk(tile, k, dim=-1).values[..., -1:]
    above = tile > kth
    equal = tile == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=-1) <= room))
    cols = chosen.nonzero()[:, -1].reshape(*tile.shape[:-1], k)  # row-major: per row, ascending columns
    return torch.gather(tile, -1, cols), torch.gather(ids, -1, cols)


def _chunk_topk(tile, ids, k):
    """The k best of each row of a chunk (ids ascend along the row), ties to the lower id, sorted best first with
    equal scores in id order. k = 1: torch.max (its index is the first largest). Otherwise torch.topk, whose choice
    among scores equal to the k-th is unspecified, so rows where the k-th value also occurs outside the selection (the
    (k+1)-th best equals it) are redone exactly (rare outside duplicated codes)."""
    if k == 1:  # max returns the first index of the largest score: the lower-id tie rule, in one pass
        vals, cols = tile.max(dim=-1, keepdim=True)
        return vals, torch.gather(ids, -1, cols)
    extra = 1 if tile.shape[-1] > k else 0
    vals, cols = torch.topk(tile, k + extra, dim=-1)
    # the k-th value occurs outside the selection iff the (k+1)-th best equals it
    redo = (
        vals[..., k - 1] == vals[..., k]
        if extra
        else torch.zeros(vals.shape[:-1], dtype=torch.bool, device=vals.device)
    )
    vals, cols = vals[..., :k], cols[..., :k]
    if bool(redo.any()):
        rows = redo.nonzero(as_tuple=True)
        exact_vals, exact_cols = _chunk_topk_exact(
            tile[rows], torch.arange(tile.shape[-1], device=tile.device).expand(len(rows[0]), -1), k
        )
        vals, cols = vals.clone(), cols.clone()
        vals[rows], cols[rows] = exact_vals, exact_cols
    # best first, equal scores by ascending column: a stable sort by column, then a stable sort by score
    by_col = torch.sort(cols, dim=-1, stable=True)
    vals, cols = torch.gather(vals, -1, by_col.indices), by_col.values
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    cols = torch.gather(cols, -1, order)
    return torch.gather(vals, -1, order), torch.gather(ids, -1, cols)


def _may_be_nan(xf, cb, scale):
    """Whether a ranking score could be NaN: only when an input is NaN/inf or scale * x·c could overflow (bias is
    finite or -inf). A bound on |scale * x·c| (and on every partial sum) from the inputs' largest magnitudes."""
    if xf.numel() == 0 or cb.numel() == 0:
        return False
    limit = 1e300 if xf.dtype == torch.float64 else 1e37
    largest = [float(torch.linalg.vector_norm(t, ord=float("inf"))) for t in (xf, cb, scale)]  # one pass each
    bound = largest[0] * largest[1] * cb.shape[-1] * largest[2]
    return not bound < limit  # NaN/inf inputs make the bound NaN or inf


def _topk_chunked(x, codebook, scale, bias, k, chunk=None):
    """The CPU path, in cache-sized tiles of heads x rows x codes (the scores by the BLAS): per tile the k best of its
    codes (ties to the lower id), merged with the running best of its rows by a stable sort of 2k candidates (the
    running best hold lower ids than the tile, so equal scores keep id order). `chunk` caps the codes per tile."""
    H, N, _ = x.shape
    C = codebook.shape[1]
    codes = chunk or min(C, CPU_CODE_CHUNK)
    rows = max(1, min(N, CPU_TILE_ELEMENTS // codes))
    heads = max(1, min(H, CPU_TILE_ELEMENTS // (codes * rows)))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dtype)
    cbt = codebook.to(dtype).transpose(1, 2)  # (H, d, C)
    scale, bias = scale.to(dtype), bias.to(dtype)
    plain_bias = bool((bias == 0).all())
    # one scale for every code (l2: 2, ip: 1): folded into the matmul as its alpha (a power of two scales exactly)
    first_scale = float(scale.reshape(-1)[0]) if scale.numel() else 1.0
    uniform_scale = bool((scale == first_scale).all()) and first_scale in (1.0, 2.0)
    nan_possible = _may_be_nan(xf, codebook, scale)
    kk = min(k, C)
    out_s = torch.empty((H, N, kk), dtype=dtype, device=x.device)
    out_i = torch.empty((H, N, kk), dtype=torch.long, device=x.device)
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            xr = xf[h0:h1, r0:r1]
            best_s = best_i = None
            for c0 in range(0, C, codes):
                c1 = min(C, c0 + codes)
                if uniform_scale and not plain_bias:  # bias + scale * x.c in one pass
                    tile = torch.baddbmm(bias[h0:h1, None, c0:c1], xr, cbt[h0:h1, :, c0:c1], alpha=first_scale)
                else:
                    tile = torch.matmul(xr, cbt[h0:h1, :, c0:c1])
                    if not uniform_scale:
                        tile.mul_(scale[h0:h1, None, c0:c1])
                    elif first_scale != 1.0:
                        tile.mul_(first_scale)
                    if not plain_bias:
                        tile.add_(bias[h0:h1, None, c0:c1])
                if nan_possible:
                    tile.masked_fill_(torch.isnan(tile), float("-inf"))  # NaN ranks last, as in the Triton kernel
                ids = torch.arange(c0, c1, device=x.device).expand(h1 - h0, r1 - r0, -1)
                tile_s, tile_i = _chunk_topk(tile, ids, min(k, c1 - c0))
                if best_s is None:
                    best_s, best_i = tile_s, tile_i
                    continue
                scores = torch.cat([best_s, tile_s], dim=-1)
                order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
                best_s = torch.gather(scores, -1, order)
                best_i = torch.gather(torch.cat([best_i, tile_i], dim=-1), -1, order)
            out_s[h0:h1, r0:r1] = best_s
            out_i[h0:h1, r0:r1] = best_i
    return out_s, out_i


def _scores(ranked, x, metric):
    """The metric's scores from the ranking scores: l2 -‖x−c‖² = ranked − ‖x‖², cosine = ranked / ‖x‖."""
    xf = x.to(ranked.dtype)
    if metric == "l2":
        scores = ranked - (xf * xf).sum(-1, keepdim=True)
    elif metric == "cosine":
        scores = ranked / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        scores = ranked
    return (scores.float() if scores.dtype != torch.float64 else scores).contiguous()


def _vq_topk_cuda(
    x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, banned: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on CUDA: x (H, N, d), codebook (H, C, d), banned (H, C) or None; the Triton kernel (float64, which
    it does not take, runs the chunked path on the device)."""
    if x.dtype == torch.float64 or codebook.dtype == torch.float64:
        return _vq_topk_cpu(x, codebook, k, metric, banned, chunk)
    scale, bias = _code_terms(codebook, metric, banned)
    ranked, ids = ranked_topk_cuda(x, codebook, scale, bias, k, banned)
    return _scores(ranked, x, metric), ids.contiguous()


def _vq_topk_cpu(x, codebook, k, metric, banned, chunk):
    """The op on the CPU: the chunked path; chunk > 0 caps the codes per step."""
    scale, bias = _code_terms(codebook, metric, banned)
    ranked, ids = ranked_topk_cpu(x, codebook, scale, bias, k, banned, chunk or None)
    return _scores(ranked, x, metric), ids.contiguous()


def _vq_topk_fake(x, codebook, k, metric, banned, chunk):
    H, N, _ = x.shape
    scores_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((H, N, k), dtype=scores_dtype), x.new_empty((H, N, k), dtype=torch.int64)


_vq_topk_op = triton_kernel_op(
    "kestrel::vq_topk",
    _vq_topk_cuda,
    _vq_topk_cpu,
    _vq_topk_fake,
    decompose=lambda x, codebook, *rest: x.dtype != torch.float64,
)


def vq_topk(x, codebook, k, *, metric="cosine", banned=None, chunk=None):
    """The k best codes of each row of x; see the module docstring. `chunk` (CPU path) caps the codes per step
    (None or 0: the default). Not differentiable: selection only (kestrel.nn.CodebookLayer and kv_bottleneck_lookup
    carry the gradients)."""
    if chunk is not None and not is_int(chunk):
        raise TypeError(f"vq_topk: chunk must be None or an int, got {type(chunk).__name__} {chunk!r}")
    if chunk is not None and chunk < 0:
        raise ValueError(f"vq_topk: chunk must be None, 0 (the default) or a positive int, got {chunk}")
    _check(x, codebook, k, metric, banned)
    squeeze = x.dim() == 2
    xs, cbs = (x[None], codebook[None]) if squeeze else (x, codebook)
    bans = banned if banned is None or not squeeze else banned[None]
    scores, ids = torch.ops.kestrel.vq_topk(xs.detach(), cbs.detach(), k, metric, bans, int(chunk or 0))
    return (scores[0], ids[0]) if squeeze else (scores, ids)


__all__ = ["vq_topk", "METRICS"]
