"""Plain-PyTorch softplus attention (LSSA / LSSAR, docs/softplus_attention.md): the CPU path of
kestrel.ops.softplus_attention (differentiable through autograd) and, in float64, the tests' reference.

Shapes: q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D), Hq % Hkv == 0. Query row i of sequence b sits at absolute
position len_b - Lq + i, where len_b is cache_seqlens[b] (the number of valid keys of sequence b) or Lk; keys at
positions >= len_b are ignored, whatever they hold (NaN and inf included: they are replaced by zeros before any
product).
"""

import math

import torch
import torch.nn.functional as F


def positions_and_counts(B, Lq, Lk, causal, cache_seqlens, device):
    """(visible (B, 1, Lq, Lk) bool, N (B, 1, Lq, 1) float): which keys each row sees and how many."""
    lengths = (
        cache_seqlens.to(device=device, dtype=torch.long)
        if cache_seqlens is not None
        else torch.full((B,), Lk, dtype=torch.long, device=device)
    )
    keys = torch.arange(Lk, device=device)
    rows = lengths[:, None] - Lq + torch.arange(Lq, device=device)[None, :]  # (B, Lq) absolute positions
    valid = keys[None, None, :] < lengths[:, None, None]
    if causal:
        visible = valid & (keys[None, None, :] <= rows[:, :, None])
        counts = (rows + 1).clamp_min(0)
    else:
        visible = valid.expand(B, Lq, Lk)
        counts = lengths[:, None].expand(B, Lq)
    return visible[:, None], counts[:, None, :, None].to(torch.float64)


def unused_keys_zeroed(k, v, cache_seqlens):
    """k and v (B, H, Lk, D) with the rows at positions >= cache_seqlens[b] replaced by zeros (selected, not
    multiplied: those rows may hold NaN or inf, and 0 * NaN is NaN in the products that follow)."""
    keys = torch.arange(k.shape[2], device=k.device)
    valid = (keys[None, :] < cache_seqlens.to(device=k.device, dtype=torch.long)[:, None])[:, None, :, None]
    return torch.where(valid, k, torch.zeros((), dtype=k.dtype, device=k.device)), torch.where(
        valid, v, torch.zeros((), dtype=v.dtype, device=v.device)
    )


def softplus_attention(
    q, k, v, causal=True, reweight_p=None, eps=1e-8, cache_seqlens=None, compute_dtype=None, return_sum=False
):
    """out (B, Hq, Lq, D) in q's dtype; the math in compute_dtype (default: float64 for float64 inputs, else
    float32). return_sum: also the rows' sums s_i = sum_j f_ij, float32 (B, Hq, Lq), as the kernel returns them."""
    dtype = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if Lk == 0:  # no keys, so no query rows either (Lq <= Lk): an empty result
        out, s = q.new_zeros(q.shape), torch.zeros((B, Hq, Lq), dtype=torch.float32, device=q.device)
        return (out, s) if return_sum else out
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if cache_seqlens is not None:
        kf, vf = unused_keys_zeroed(kf, vf, cache_seqlens)
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    qn, kn = F.normalize(qf, dim=-1), F.normalize(kf, dim=-1)
    visible, counts = positions_and_counts(B, Lq, Lk, causal, cache_seqlens, q.device)
    counts = counts.to(dtype)
    scale = math.log(D) * torch.log(counts.clamp_min(1.0))  # c_i = ln(D) ln(N_i); 0 for N_i <= 1
    x = scale * (qn @ kn.transpose(-1, -2))
    f = torch.where(visible, F.softplus(x), torch.zeros_like(x))
    s = f.sum(-1, keepdim=True)
    out = _combine(f, s, vf, counts, visible, x, reweight_p, eps, dtype).to(q.dtype)
    return (out, s[..., 0].float()) if return_sum else out


def softplus_attention_masked(q, k, v, visible, reweight_p=None, eps=1e-8, compute_dtype=None):
    """LSSA / LSSAR of q (B, Hq, Lq, D) over k, v (B, Hkv, Lk, D) with an explicit mask visible (B, 1 or Hq, Lq, Lk)
    bool: row i sees the keys of its mask and N_i is their number (a draft tree: the prefix and the row's
    ancestors-or-self). Keys no row sees are replaced by zeros first (they may hold anything)."""
    dtype = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    D = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    seen = visible.any(dim=-2).any(dim=1)[:, None, :, None]  # (B, 1, Lk, 1)
    zero = torch.zeros((), dtype=dtype, device=q.device)
    qf = q.to(dtype)
    kf, vf = torch.where(seen, k.to(dtype), zero), torch.where(seen, v.to(dtype), zero)
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    counts = visible.sum(-1, keepdim=True).to(dtype)
    scale = math.log(D) * torch.log(counts.clamp_min(1.0))
    x = scale * (F.normalize(qf, dim=-1) @ F.normalize(kf, dim=-1).transpose(-1, -2))
    f = torch.where(visible, F.softplus(x), torch.zeros_like(x))
    s = f.sum(-1, keepdim=True)
    return _combine(f, s, vf, counts, visible, x, reweight_p, eps, dtype).to(q.dtype)


def _combine(f, s, vf, counts, visible, x, reweight_p, eps, dtype):
    if reweight_p is None:
        return (f @ vf) / (s + eps)
    # LSSAR: w = relu(N a - o)^p with a = f / (s + eps), o = 0 for N <= 3 and 1 otherwise; divided by the row's
    # largest r before the power (r^15 overflows float32 at long context), eps scaled to match
    offset = (counts > 3).to(dtype)
    r = torch.where(visible, counts * (f / (s + eps)) - offset, torch.zeros_like(x))
    r_max = r.amax(-1, keepdim=True)
    positive = r_max > 0
    safe_max = torch.where(positive, r_max, torch.ones_like(r_max))
    w = (F.relu(r) / safe_max) ** reweight_p
    # eps / r_max^p in the log domain, capped below the dtype's overflow: a tiny r_max (a near-uniform row) would
    # underflow r_max^p to 0 and give eps / 0 = inf, whose gradient is NaN; once capped, the term is >= 1e34 times
    # Σ w (>= 1), so the output is ~0 either way and the gradient stays finite
    cap = 0.9 * math.log(torch.finfo(dtype).max)
    scaled_eps = torch.exp((math.log(eps) - reweight_p * torch.log(safe_max)).clamp_max(cap))
    out = (w @ vf) / (w.sum(-1, keepdim=True) + scaled_eps)
    return torch.where(positive, out, torch.zeros_like(out))
