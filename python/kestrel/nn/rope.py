"""Rotary position embedding, the one RoPE of kestrel's layers (KestrelLM and PowerLawGraphAttention).

`rope_tables(positions, head_dim, base, scaling=None)` gives (cos, sin) of the angles positions · base^(-2i /
head_dim), i < head_dim / 2, in float32, shaped positions.shape + (head_dim / 2,); `scaling` is Llama-3's frequency
rescaling ({"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"}: long wavelengths divided by factor, short ones kept, a smooth blend between),
as transformers computes it. `apply_rope(x, cos, sin, interleaved=False)` rotates the feature pairs of x (...,
head_dim) by them (the tables broadcast against x[..., :head_dim / 2]), in float32 (float64 for float64 x, with the
float32 tables, as transformers does), returning x's dtype. Two pairings, as in the public models: interleaved=False
rotates x[i] with x[i + head_dim / 2] (Llama's, KestrelLM's), interleaved=True rotates adjacent features x[2i], x[2i
+ 1] (PLDR-LLM's, GPT-J's).
"""

import math

import torch


def inv_frequencies(head_dim, base=10000.0, scaling=None, device=None):
    """The rotation frequencies (head_dim // 2,) float32, Llama-3-rescaled when `scaling` is given."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(positions, head_dim, base=10000.0, scaling=None):
    """(cos, sin), float32, of shape positions.shape + (head_dim // 2,), for integer positions."""
    angles = positions.to(torch.float32)[..., None] * inv_frequencies(head_dim, base, scaling, positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin, interleaved=False):
    """x (..., head_dim) rotated by the tables (broadcast against its first half), float32 math (float64 for
    float64 x), x's dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    xf, cos, sin = x.to(wide), cos.to(wide), sin.to(wide)
    if interleaved:
        pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    first, second = xf[..., :half], xf[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


__all__ = ["apply_rope", "inv_frequencies", "rope_tables"]
