"""Attention layers backed by kestrel's kernels."""

import torch
from torch import nn

from ..ops.softplus_attention import softplus_attention


class SoftplusAttention(nn.Module):
    """Multi-head softplus attention (LSSA, or LSSAR with reweight_p): q/k/v/output projections around
    kestrel.ops.softplus_attention, GQA with num_kv_heads, and an optional KV cache for decoding.

    forward(x, kv_cache=None) with x (B, L, embed_dim) returns (y, (k, v)): y (B, L, embed_dim) and the keys and
    values so far, (B, num_kv_heads, L_total, head_dim) each; pass them back as kv_cache to decode the next tokens
    (the new rows sit at the end of the cache, so prefill and token-by-token decode give the same rows).
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, *, causal=True, reweight_p=None, eps=1e-8,
                 bias=False, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"SoftplusAttention: embed_dim ({embed_dim}) must be a multiple of num_heads "
                             f"({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"SoftplusAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.reweight_p, self.eps = causal, reweight_p, eps
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **factory)

    def _heads(self, t, heads):
        B, L, _ = t.shape
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, kv_cache=None):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"SoftplusAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        out = softplus_attention(q, k, v, causal=self.causal, reweight_p=self.reweight_p, eps=self.eps)
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim)), (k, v)
