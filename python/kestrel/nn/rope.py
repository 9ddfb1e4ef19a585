"""Rotary position embedding, the one RoPE of kestrel's layers (KestrelLM and PowerLawGraphAttention).

`rope_tables(positions, head_dim, base)` gives (cos, sin) of the angles positions · base^(-2i / head_dim),
i < head_dim / 2, in float32, shaped positions.shape + (head_dim / 2,). `apply_rope(x, cos, sin, interleaved=False)`
rotates the feature pairs of x (..., head_dim) by them (the tables broadcast against x[..., :head_dim / 2]), in float32,
returning x's dtype. Two pairings, as in the public models: interleaved=False rotates x[i] with x[i + head_dim / 2]
(Llama's, KestrelLM's), interleaved=True rotates adjacent features x[2i], x[2i + 1] (PLDR-LLM's, GPT-J's).
"""

import torch


def rope_tables(positions, head_dim, base=10000.0):
    """(cos, sin), float32, of shape positions.shape + (head_dim // 2,), for integer positions."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)[: head_dim // 2] / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin, interleaved=False):
    """x (..., head_dim) rotated by the tables (broadcast against its first half), float32 math, x's dtype."""
    xf = x.float()
    if interleaved:
        pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    first, second = xf[..., :half], xf[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


__all__ = ["apply_rope", "rope_tables"]
