"""Discrete key-value bottleneck lookup (docs/kv_bottleneck.md).

`kv_bottleneck_lookup(z_proj, keys, values, k=1) -> (out, ids)`: z_proj (B, C, dk) — the input projected once per
codebook —, keys (C, P, dk), values (C, P, dv). For every row and codebook c the k keys nearest in squared L2 (ties
to the lower index), ids (B, C, k) int64 best first, and out (B, C, dv) the mean of their value rows, in values'
dtype (accumulated in float32; in float64 on the chunked path, which float64 inputs take).

Forward: on CUDA one Triton launch (kestrel/kernels/vq_topk.py with its value-gather epilogue: a running top-k
over key tiles, then the k value rows read and averaged; no B×C×P score tensor); on the CPU the chunked top-k of
kestrel.ops.vq_topk and a gather. Backward: gradient to `values` only, a scatter-add of grad_out / k into the
selected rows (every other row gets exactly zero); the keys are frozen and the lookup is not differentiable in
z_proj (DKVB's encoder is frozen), so both get no gradient.
"""

import torch

from .._checks import is_int
from ._library import triton_kernel_op
from .vq_topk import _code_terms, ranked_topk_cpu, ranked_topk_cuda


def _check(z_proj, keys, values, k):
    name = "kv_bottleneck_lookup"
    for label, t, dims in (
        ("z_proj", z_proj, "(B, C, dk)"),
        ("keys", keys, "(C, P, dk)"),
        ("values", values, "(C, P, dv)"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(
                f"{name}: {label} must be {dims}, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be a float tensor, got {t.dtype}")
        if t.device != z_proj.device:
            raise ValueError(f"{name}: {label} is on {t.device} but z_proj on {z_proj.device}")
    B, C, dk = z_proj.shape
    if tuple(keys.shape[::2]) != (C, dk):
        raise ValueError(
            f"{name}: keys must be (C={C}, P, dk={dk}) for z_proj {tuple(z_proj.shape)}, got {tuple(keys.shape)}"
        )
    if tuple(values.shape[:2]) != tuple(keys.shape[:2]):
        raise ValueError(
            f"{name}: values must be (C, P, dv) = ({keys.shape[0]}, {keys.shape[1]}, dv) like keys, "
            f"got {tuple(values.shape)}"
        )
    P = keys.shape[1]
    if not is_int(k):
        raise TypeError(f"{name}: k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= P:
        raise ValueError(f"{name}: k must be an integer in [1, P={P}], got {k!r}")


def _lookup(ranked_topk, z_proj, keys, values, k):
    B, C = z_proj.shape[:2]
    if B == 0 or C == 0:  # an empty result, and no empty grid launched
        return (
            values.new_zeros((B, C, values.shape[-1])),
            torch.zeros((B, C, k), dtype=torch.int64, device=z_proj.device),
        )
    x = z_proj.transpose(0, 1)  # (C, B, dk): one "head" per codebook
    scale, bias = _code_terms(keys, "l2", None)
    _, ids, out = ranked_topk(x, keys, scale, bias, k, values=values)  # (C, B, k), (C, B, dv)
    return out.transpose(0, 1).contiguous(), ids.transpose(0, 1).contiguous()


def _lookup_cuda(
    z_proj: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on CUDA: the vq_topk kernel with its value-gather epilogue (float64: the chunked path)."""
    if torch.float64 in (z_proj.dtype, keys.dtype):
        return _lookup(ranked_topk_cpu, z_proj, keys, values, k)
    return _lookup(ranked_topk_cuda, z_proj, keys, values, k)


def _lookup_cpu(z_proj, keys, values, k):
    """The op on the CPU: the chunked top-k and a gather."""
    return _lookup(ranked_topk_cpu, z_proj, keys, values, k)


def _lookup_fake(z_proj, keys, values, k):
    B, C = z_proj.shape[:2]
    return values.new_empty((B, C, values.shape[-1])), z_proj.new_empty((B, C, k), dtype=torch.int64)


_lookup_op = triton_kernel_op(
    "kestrel::kv_bottleneck_lookup",
    _lookup_cuda,
    _lookup_cpu,
    _lookup_fake,
    decompose=lambda z_proj, keys, *rest: torch.float64 not in (z_proj.dtype, keys.dtype),
)


def values_grad(grad_out, ids, num_pairs):
    """(C, P, dv) gradient of the values: grad_out (B, C, dv) / k scattered into the rows ids (B, C, k) select
    (plain PyTorch, which Inductor fuses; accumulated in float32, float64 for float64)."""
    B, C, k = ids.shape
    dv = grad_out.shape[-1]
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    flat = (ids + torch.arange(C, device=ids.device)[None, :, None] * num_pairs).reshape(-1)
    src = (grad_out.to(acc) / k)[:, :, None, :].expand(B, C, k, dv).reshape(B * C * k, dv)
    grad = torch.zeros((C * num_pairs, dv), dtype=acc, device=grad_out.device).index_add_(0, flat, src)
    return grad.view(C, num_pairs, dv).to(grad_out.dtype)


def _setup_context(ctx, inputs, output):
    ctx.num_pairs = inputs[1].shape[1]
    ctx.values_dtype = inputs[2].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_out, _grad_ids):
    (ids,) = ctx.saved_tensors
    return None, None, values_grad(grad_out, ids, ctx.num_pairs).to(ctx.values_dtype), None


_lookup_op.register_autograd(_backward, setup_context=_setup_context)


def kv_bottleneck_lookup(z_proj, keys, values, k=1):
    """Nearest-key search fused with the value gather; see the module docstring."""
    _check(z_proj, keys, values, k)
    return torch.ops.kestrel.kv_bottleneck_lookup(z_proj.detach(), keys.detach(), values, k)


__all__ = ["kv_bottleneck_lookup"]
