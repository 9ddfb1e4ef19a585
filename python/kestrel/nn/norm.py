"""RMSNorm as transformers' Llama-family models compute it (converted checkpoints: kestrel.models.hf).

`Float32RMSNorm(dim, eps)`: x / sqrt(mean(x²) + eps), computed in float32 whatever x's dtype (float64 included),
cast back to x's dtype, then times the weight: transformers' LlamaRMSNorm (and Mistral's, Qwen2's, Qwen3's), so a
converted model computes the same logits. KestrelLM's own models use torch.nn.RMSNorm (x's dtype throughout).
"""

import torch
from torch import nn


class Float32RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.to(torch.float32)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


__all__ = ["Float32RMSNorm"]
