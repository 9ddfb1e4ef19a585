"""Attention layers backed by kestrel's kernels."""

import torch
from torch import nn

from .._checks import is_finite_number, require_bool, require_int, require_number
from ..ops.softplus_attention import MAX_REWEIGHT_P, softplus_attention


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
        name = "SoftplusAttention"
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for label, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            require_int(name, label, value)
            if value < 1:
                raise ValueError(f"{name}: {label} must be >= 1, got {value}")
        require_bool(name, "causal", causal)
        if reweight_p is not None:
            require_number(name, "reweight_p", reweight_p)
            if not (is_finite_number(reweight_p) and 0 < reweight_p <= MAX_REWEIGHT_P):
                raise ValueError(f"{name}: reweight_p must be None (LSSA) or a finite positive number up to "
                                 f"{MAX_REWEIGHT_P:.4g} (LSSAR), got {reweight_p!r}")
        require_number(name, "eps", eps)
        if not (is_finite_number(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
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

    def _check_cache(self, kv_cache, B):
        layout = f"(B={B}, num_kv_heads={self.num_kv_heads}, L, head_dim={self.head_dim})"
        if not (isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2
                and all(isinstance(t, torch.Tensor) for t in kv_cache)):
            raise TypeError(f"SoftplusAttention: kv_cache must be None or the (k, v) pair a previous call returned, "
                            f"got {type(kv_cache).__name__}")
        for label, t in zip(("k", "v"), kv_cache):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(f"SoftplusAttention: kv_cache's {label} must be {layout}, got {tuple(t.shape)}")
        if kv_cache[0].shape != kv_cache[1].shape:
            raise ValueError(f"SoftplusAttention: kv_cache's k and v must have one shape, got "
                             f"{tuple(kv_cache[0].shape)} and {tuple(kv_cache[1].shape)}")

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
            self._check_cache(kv_cache, x.shape[0])
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        out = softplus_attention(q, k, v, causal=self.causal, reweight_p=self.reweight_p, eps=self.eps)
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim)), (k, v)
