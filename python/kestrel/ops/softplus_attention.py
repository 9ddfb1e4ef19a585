"""Softplus attention with re-weighting (LSSA / LSSAR, docs/softplus_attention.md).

`softplus_attention(q, k, v, *, causal=True, reweight_p=None, eps=1e-8, cache_seqlens=None, tree_mask_bits=None)`:
q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D), Hq a multiple of Hkv (GQA/MQA). reweight_p=None is LSSA, a number p is
LSSAR. Decode: Lq < Lk, query row i at absolute position len_b - Lq + i (len_b = cache_seqlens[b], the valid keys
of sequence b, or Lk). The output has q's dtype.

Draft-tree mode (tree_mask_bits (B, Lq, ceil(Lq/32)) int32, forward only): the Lq = T rows are the nodes of a draft
tree whose K/V rows sit at [len_b, len_b + T) of k and v after a prefix of len_b = cache_seqlens[b] keys (required,
in [0, Lk - T]); row i sees the prefix and its ancestors-or-self (the packed bits of kestrel.decoding.build_tree),
N_i = len_b + the number of its bits; `causal` does not apply. Tree slots no row sees may hold anything.

Forward: on CUDA the Triton kernel (kestrel/kernels/softplus_attention.py, head dims 64 and 128; the tree mode
reads the packed bits), on the CPU the plain-PyTorch path of kestrel.reference.attention in float32 (float64 for
float64 inputs; the tree mode through a dense mask built from the bits). Backward: on CUDA the
Triton backward kernels (LSSA and LSSAR: dq, and dk/dv summed over each GQA group; LSSAR's dq kernel reads the keys
twice for its row reduction); on the CPU, autograd through the PyTorch formulation, recomputed from q, k, v.
"""

import torch

from .._checks import check_cache_seqlens, check_tree_mask_bits, is_finite_number, is_number
from .._masks import tree_visible
from ..reference import attention as _ref
from ._library import autograd_in_kernel, triton_kernel_op

KERNEL_HEAD_DIMS = (64, 128)
MAX_REWEIGHT_P = torch.finfo(torch.float32).max  # the power is applied in float32: a larger one overflows to inf


def _check(q, k, v, reweight_p, eps, cache_seqlens, tree_mask_bits):
    name = "softplus_attention"
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name}: {label} must be a 4-D tensor (B, H, L, D), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(
                f"{name}: {label} must be float32, float16, bfloat16 (or float64 on the CPU), got {t.dtype}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    if D == 0:
        raise ValueError(f"{name}: the head dim D must be >= 1 (q.shape[-1]), got q of shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{name}: k must be (B={B}, Hkv, Lk, D={D}), got {tuple(k.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: the query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(
            f"{name}: more query rows ({Lq}) than keys ({Lk}); decode puts the rows at the end of the keys"
        )
    if reweight_p is not None:
        if not is_number(reweight_p):
            raise TypeError(
                f"{name}: reweight_p must be None (LSSA) or a number (LSSAR), got "
                f"{type(reweight_p).__name__} {reweight_p!r}"
            )
        if not (is_finite_number(reweight_p) and 0 < reweight_p <= MAX_REWEIGHT_P):
            raise ValueError(
                f"{name}: reweight_p must be None (LSSA) or a finite positive number up to "
                f"{MAX_REWEIGHT_P:.4g} (LSSAR), got {reweight_p!r}"
            )
    if not is_number(eps):
        raise TypeError(f"{name}: eps must be a number, got {type(eps).__name__} {eps!r}")
    if not (is_finite_number(eps) and eps > 0):
        raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
    if tree_mask_bits is None:
        check_cache_seqlens(name, cache_seqlens, B, Lq, Lk, q)
    else:
        check_tree_mask_bits(name, tree_mask_bits, cache_seqlens, B, Lq, Lk, q)


def _forward_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    reweight_p: float,
    eps: float,
    cache_seqlens: torch.Tensor | None,
    tree_mask_bits: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on CUDA (the Triton forward): (out, stats), the attention and the rows' statistics for the backward,
    float32 (3, B, Hq, Lq): the sum of softplus weights, and for LSSAR the largest score and the scaled re-weighting
    denominator."""
    from ..kernels.softplus_attention import softplus_attention_forward  # triton: a Linux-only dependency

    p = reweight_p if reweight_p > 0 else None
    out, s, m, w = softplus_attention_forward(q, k, v, causal, p, eps, cache_seqlens, tree_mask_bits=tree_mask_bits)
    return out, torch.stack([s, m, w])


def _forward_cpu(q, k, v, causal, reweight_p, eps, cache_seqlens, tree_mask_bits):
    """The op on the CPU: the PyTorch formulation (float32; float64 for float64), the row sums as statistics."""
    p = reweight_p if reweight_p > 0 else None
    with torch.no_grad():
        if tree_mask_bits is not None:
            visible = tree_visible(cache_seqlens, tree_mask_bits, k.shape[2])
            out = _ref.softplus_attention_masked(q, k, v, visible, p, eps)
            return out, q.new_zeros((3,) + tuple(q.shape[:3]), dtype=torch.float32)
        out, s = _ref.softplus_attention(q, k, v, causal, p, eps, cache_seqlens, return_sum=True)
        return out, torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)])


def _forward_fake(q, k, v, causal, reweight_p, eps, cache_seqlens, tree_mask_bits):
    return torch.empty_like(q), q.new_empty((3,) + tuple(q.shape[:3]), dtype=torch.float32)


_softplus_attention_op = triton_kernel_op("kestrel::softplus_attention", _forward_cuda, _forward_cpu, _forward_fake)


def _backward_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    grad_out: torch.Tensor,
    causal: bool,
    reweight_p: float,
    eps: float,
    cache_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op on CUDA: the Triton dq and dk/dv kernels, from the forward's statistics."""
    from ..kernels.softplus_attention import softplus_attention_backward  # triton: a Linux-only dependency

    p = reweight_p if reweight_p > 0 else None
    return softplus_attention_backward(q, k, v, out, stats, grad_out, causal, p, eps, cache_seqlens)


def _backward_cpu(q, k, v, out, stats, grad_out, causal, reweight_p, eps, cache_seqlens):
    """The backward op on the CPU: autograd through the PyTorch formulation, recomputed."""
    if grad_out.numel() == 0:  # no query rows (B, Hq or Lq is 0): nothing to differentiate, no graph to recompute
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p = reweight_p if reweight_p > 0 else None
    with autograd_in_kernel():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        recomputed = _ref.softplus_attention(*leaves, causal, p, eps, cache_seqlens)
        grads = torch.autograd.grad(recomputed, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))


def _backward_fake(q, k, v, out, stats, grad_out, causal, reweight_p, eps, cache_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_softplus_attention_backward_op = triton_kernel_op(
    "kestrel::softplus_attention_backward", _backward_cuda, _backward_cpu, _backward_fake
)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, reweight_p, eps, cache_seqlens, tree_mask_bits = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, cache_seqlens, out, stats)
    ctx.options = (causal, reweight_p, eps, tree_mask_bits is not None)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_out, _grad_s):
    q, k, v, cache_seqlens, out, stats = ctx.saved_tensors
    causal, reweight_p, eps, tree = ctx.options
    if tree:
        raise NotImplementedError("softplus_attention: the draft-tree mode (tree_mask_bits) is forward only")
    dq, dk, dv = _softplus_attention_backward_op(q, k, v, out, stats, grad_out, causal, reweight_p, eps, cache_seqlens)
    return dq, dk, dv, None, None, None, None, None


_softplus_attention_op.register_autograd(_backward, setup_context=_setup_context)


def softplus_attention(q, k, v, *, causal=True, reweight_p=None, eps=1e-8, cache_seqlens=None, tree_mask_bits=None):
    """LSSA (reweight_p=None) or LSSAR (reweight_p=p) attention; see the module docstring."""
    _check(q, k, v, reweight_p, eps, cache_seqlens, tree_mask_bits)
    if q.is_cuda and q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"softplus_attention: the CUDA kernel takes head dims {KERNEL_HEAD_DIMS}, got "
            f"{q.shape[-1]}; pad the head dim"
        )
    if q.is_cuda and q.dtype == torch.float64:
        raise TypeError(
            "softplus_attention: float64 runs on the CPU path only; the CUDA kernel takes float32, float16 and bfloat16"
        )
    if cache_seqlens is not None and q.is_cuda:  # unchecked there (no host sync): clamped, never read past the keys
        lo, hi = (0, k.shape[2] - q.shape[2]) if tree_mask_bits is not None else (q.shape[2], k.shape[2])
        cache_seqlens = cache_seqlens.to(q.device).clamp(lo, hi)
    return _softplus_attention_op(
        q, k, v, bool(causal), float(reweight_p or 0.0), float(eps), cache_seqlens, tree_mask_bits
    )[0]


__all__ = ["softplus_attention", "KERNEL_HEAD_DIMS"]
