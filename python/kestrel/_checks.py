"""Argument predicates shared by the ops and modules: Python ints and numbers as a caller means them (a bool is
not an int, a tensor is not a Python number)."""

import math
import numbers

import torch


def is_int(value):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value):
    return is_number(value) and math.isfinite(value)


def require_int(name, label, value):
    """TypeError unless `value` is an int (a bool is not): the type half of an int argument's check."""
    if not is_int(value):
        raise TypeError(f"{name}: {label} must be an int, got {type(value).__name__} {value!r}")


def require_number(name, label, value):
    """TypeError unless `value` is a real number (not a bool, not a tensor)."""
    if not is_number(value):
        raise TypeError(f"{name}: {label} must be a number, got {type(value).__name__} {value!r}")


def require_bool(name, label, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {label} must be a bool, got {type(value).__name__} {value!r}")


def check_cache_seqlens(name, cache_seqlens, B, Lq, Lk, q):
    """The per-sequence cache lengths of an attention op: None or an int32/int64 tensor (B,) with values in
    [Lq, Lk]. The values are checked unless the lengths and q are both on a GPU, where reading them would be a host
    sync each decoding step (the ops clamp them on the device there: a bad length cannot read past the keys)."""
    if cache_seqlens is None:
        return
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(
            f"{name}: cache_seqlens must be None or an int32/int64 tensor of shape ({B},), got "
            f"{type(cache_seqlens).__name__}"
        )
    if cache_seqlens.shape != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: cache_seqlens must be an int32/int64 tensor of shape ({B},), got "
            f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}"
        )
    if B > 0 and not (cache_seqlens.is_cuda and q.is_cuda) and not torch.compiler.is_compiling():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < Lq or hi > Lk:
            raise ValueError(f"{name}: cache_seqlens must lie in [Lq={Lq}, Lk={Lk}], got values in [{lo}, {hi}]")


def check_tree_mask_bits(name, tree_mask_bits, prefix_lens, B, T, Lk, q):
    """A draft-tree forward's packed ancestor bits, int32 (B, T, ceil(T/32)), and its prefix lengths (the
    cache_seqlens argument: required, int32/int64 (B,), values in [0, Lk - T], read unless on a GPU as for
    check_cache_seqlens)."""
    words = (T + 31) // 32
    if (
        not isinstance(tree_mask_bits, torch.Tensor)
        or tree_mask_bits.dtype != torch.int32
        or tuple(tree_mask_bits.shape) != (B, T, words)
    ):
        raise ValueError(
            f"{name}: tree_mask_bits must be an int32 tensor of shape (B={B}, T={T}, "
            f"ceil(T/32)={words}), got {getattr(tree_mask_bits, 'dtype', type(tree_mask_bits).__name__)}"
            f" of shape {tuple(getattr(tree_mask_bits, 'shape', ()))}"
        )
    if tree_mask_bits.device != q.device:
        raise ValueError(f"{name}: tree_mask_bits is on {tree_mask_bits.device} but q on {q.device}")
    if prefix_lens is None:
        raise ValueError(f"{name}: a tree forward (tree_mask_bits) needs cache_seqlens, the prefix lengths (B={B},)")
    if (
        not isinstance(prefix_lens, torch.Tensor)
        or prefix_lens.shape != (B,)
        or prefix_lens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"{name}: cache_seqlens must be an int32/int64 tensor of shape ({B},), got "
            f"{getattr(prefix_lens, 'dtype', type(prefix_lens).__name__)} of shape "
            f"{tuple(getattr(prefix_lens, 'shape', ()))}"
        )
    if B > 0 and not (prefix_lens.is_cuda and q.is_cuda) and not torch.compiler.is_compiling():
        lo, hi = int(prefix_lens.min()), int(prefix_lens.max())
        if lo < 0 or hi > Lk - T:
            raise ValueError(
                f"{name}: cache_seqlens (the tree's prefix lengths) must lie in [0, Lk - T = {Lk - T}] "
                f"(T={T} tree rows follow the prefix among Lk={Lk} keys), got values in [{lo}, {hi}]"
            )


__all__ = [
    "check_cache_seqlens",
    "check_tree_mask_bits",
    "is_finite_number",
    "is_int",
    "is_number",
    "require_bool",
    "require_int",
    "require_number",
]
