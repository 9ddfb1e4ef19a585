"""Attention layers backed by kestrel's kernels.

The attention cores, one per kind, share one interface for the three uses of a decoder's attention:
`core(q, k, v, context)` with q (B, Hq, L, D) after RoPE and an AttentionContext that says which use it is:
- "block": k, v (B, Hkv, L, D) of the same tokens, causal attention over the block (training, scoring);
- "decode": k, v the layer's cache rows [0, context.Lk) (B, Hkv, Lk, D) with the L new rows already written at
  [len_b, len_b + L); context.key_lens = len_b + L valid keys per sequence (prefix_lens = len_b), row i at
  position len_b + i; rows
  past a sequence's length may hold anything (they are never read into the output);
- "tree": k, v the layer's cache rows with the T draft-tree rows written at [len_b, len_b + T) after the prefix
  (context.prefix_lens = len_b); row i sees the prefix and its ancestors-or-self (context.tree_mask_bits, the packed
  bits of kestrel.decoding.build_tree), handed to the kernels as they are.
SoftmaxCore (FlashAttention-style softmax through SDPA and kestrel.ops.tree_attention), SoftplusCore (LSSA/LSSAR
through kestrel.ops.softplus_attention) and PowerLawGraphCore (PLGA: the metric learner, the G-builder and the
G-cache, then kestrel.ops.plga_attention). kestrel.models.KestrelLM picks one by its config; SoftplusAttention and
PowerLawGraphAttention (kestrel.nn.plga) are standalone layers with their own projections and caches.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_finite_number, require_bool, require_int, require_number
from .._masks import causal_visible, keys_seen_zeroed, tree_visible
from ..ops.plga_attention import plga_attention
from ..ops.softplus_attention import MAX_REWEIGHT_P, softplus_attention
from ..ops.tree_attention import tree_attention
from .plga import PLGALayer, ResLayerA, metric_learner

MODES = ("block", "decode", "tree")


class AttentionContext:
    """What every layer of one forward shares: the use (`mode`, one of MODES), the lengths, the tree bits, the
    number of cache rows read (`Lk`, the longest sequence after the write) and, built once on first use and only on
    a path that needs one, the dense visibility mask (B, 1, L, Lk) bool.

    valid (B, L) bool or None: the rows that are real tokens (a right-padded prefill). g_cache / g_built: the
    PLGA G-cache of the KVCache (None for other kinds)."""

    def __init__(
        self,
        mode,
        B,
        L,
        *,
        valid=None,
        key_lens=None,
        prefix_lens=None,
        tree_mask_bits=None,
        Lk=None,
        g_cache=None,
        g_built=False,
    ):
        if mode not in MODES:
            raise ValueError(f"AttentionContext: mode must be one of {MODES}, got {mode!r}")
        self.mode, self.B, self.L = mode, B, L
        self.valid, self.key_lens, self.prefix_lens = valid, key_lens, prefix_lens
        self.tree_mask_bits = tree_mask_bits
        self.Lk = L if Lk is None else Lk
        self.g_cache, self.g_built = g_cache, g_built
        self._visible = None
        self._one_node_bits = None

    def one_node_bits(self, device):
        """(B, 1, 1) int32 ones: a one-token decode step as a one-node tree (the node sees itself), made once per
        forward."""
        if self._one_node_bits is None:
            self._one_node_bits = torch.ones((self.B, 1, 1), dtype=torch.int32, device=device)
        return self._one_node_bits

    @property
    def visible(self):
        """(B, 1, L, Lk) bool, built once per forward (decode and tree only)."""
        if self._visible is None:
            if self.mode == "tree":
                self._visible = tree_visible(self.prefix_lens, self.tree_mask_bits, self.Lk)
            elif self.mode == "decode":
                device = self.key_lens.device
                self._visible = causal_visible(self.B, self.L, self.Lk, True, self.key_lens, device)
            else:
                raise ValueError("AttentionContext: a block forward has no mask (it is causal)")
        return self._visible


class SoftmaxCore(nn.Module):
    """softmax(q kᵀ / √D) v with GQA. Block: SDPA, causal. Tree: kestrel.ops.tree_attention (its Triton kernel on
    a GPU). Decode: on a GPU a one-token step is a one-node tree through the same kernel; otherwise SDPA with the
    context's mask (the keys no row sees replaced by zeros)."""

    @staticmethod
    def one_node_tree(q, context):
        """Whether a decode step runs as a one-node tree through kestrel.ops.tree_attention: one token, on a GPU
        (on the CPU masked SDPA is the faster path)."""
        return q.is_cuda and context.L == 1

    def forward(self, q, k, v, context):
        gqa = q.shape[1] != k.shape[1]
        if context.mode == "block":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if context.mode == "tree":
            return tree_attention(q, k, v, context.prefix_lens, context.tree_mask_bits)
        if self.one_node_tree(q, context):
            return tree_attention(q, k, v, context.prefix_lens, context.one_node_bits(q.device))
        k, v = keys_seen_zeroed(k, v, context.visible)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=context.visible, enable_gqa=gqa)


class SoftplusCore(nn.Module):
    """LSSA (reweight_p=None) or LSSAR through kestrel.ops.softplus_attention in all three uses (the Triton kernels
    on a GPU, which read the lengths and the tree bits; the PyTorch path on the CPU)."""

    def __init__(self, reweight_p=None, eps=1e-8):
        super().__init__()
        self.reweight_p, self.eps = reweight_p, eps

    def forward(self, q, k, v, context):
        options = dict(reweight_p=self.reweight_p, eps=self.eps)
        if context.mode == "block":
            return softplus_attention(q, k, v, causal=True, **options)
        if context.mode == "tree":
            return softplus_attention(
                q, k, v, cache_seqlens=context.prefix_lens, tree_mask_bits=context.tree_mask_bits, **options
            )
        return softplus_attention(q, k, v, causal=True, cache_seqlens=context.key_lens, **options)


class PowerLawGraphCore(nn.Module):
    """PLGA: G (B, H, d, d) from the metric learner (LayerNorm, residual units) and the G-builder over the queries
    of the real rows of a block or a prefill, then softmax((q·G) kᵀ / √d) v through kestrel.ops.plga_attention (a
    tree: q·G through kestrel.ops.tree_attention). With a cache, the first cached forward (the prefill) stores G in
    the G-cache and every later one (decode, tree) reuses it. Parameter names follow PLDR-LLM's (layernorm1,
    reslayerAs, plgatt_layer), as in PowerLawGraphAttention."""

    def __init__(self, head_dim, num_heads, A_dff, num_reslayerA, num_denseA, layer_index=0):
        super().__init__()
        self.layer_index = layer_index
        self.layernorm1 = nn.LayerNorm(head_dim, eps=1e-6)
        self.reslayerAs = nn.ModuleList([ResLayerA(head_dim, A_dff, num_denseA) for _ in range(num_reslayerA)])
        self.plgatt_layer = PLGALayer(head_dim, num_heads)

    def build_G(self, q, valid=None):
        """G (B, H, d, d) float32 from the queries after RoPE (B, H, L, d) of the real rows (valid (B, L))."""
        return self.plgatt_layer(metric_learner(self.layernorm1, self.reslayerAs, q, valid))[1]

    def _G(self, q, context):
        if context.g_cache is None:
            return self.build_G(q, context.valid)
        if context.g_built:
            return context.g_cache[self.layer_index]
        if context.mode == "tree":
            raise ValueError("KestrelLM: a plga tree forward needs the G-cache; prefill the prompt first")
        G = self.build_G(q, context.valid)
        context.g_cache[self.layer_index].copy_(G)
        return G

    def forward(self, q, k, v, context):
        G = self._G(q, context)
        if context.mode == "block":
            return plga_attention(q, k, v, G, causal=True)
        if context.mode == "tree":
            return plga_attention(q, k, v, G, cache_seqlens=context.prefix_lens, tree_mask_bits=context.tree_mask_bits)
        return plga_attention(q, k, v, G, causal=True, cache_seqlens=context.key_lens)


class SoftplusAttention(nn.Module):
    """Multi-head softplus attention (LSSA, or LSSAR with reweight_p): q/k/v/output projections around
    kestrel.ops.softplus_attention, GQA with num_kv_heads, and an optional KV cache for decoding.

    forward(x, kv_cache=None) with x (B, L, embed_dim) returns (y, (k, v)): y (B, L, embed_dim) and the keys and
    values so far, (B, num_kv_heads, L_total, head_dim) each; pass them back as kv_cache to decode the next tokens
    (the new rows sit at the end of the cache, so prefill and token-by-token decode give the same rows).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_kv_heads=None,
        *,
        causal=True,
        reweight_p=None,
        eps=1e-8,
        bias=False,
        device=None,
        dtype=None,
    ):
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
                raise ValueError(
                    f"{name}: reweight_p must be None (LSSA) or a finite positive number up to "
                    f"{MAX_REWEIGHT_P:.4g} (LSSAR), got {reweight_p!r}"
                )
        require_number(name, "eps", eps)
        if not (is_finite_number(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"SoftplusAttention: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})"
            )
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"SoftplusAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
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
        if not (
            isinstance(kv_cache, (tuple, list))
            and len(kv_cache) == 2
            and all(isinstance(t, torch.Tensor) for t in kv_cache)
        ):
            raise TypeError(
                f"SoftplusAttention: kv_cache must be None or the (k, v) pair a previous call returned, "
                f"got {type(kv_cache).__name__}"
            )
        for label, t in zip(("k", "v"), kv_cache):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(f"SoftplusAttention: kv_cache's {label} must be {layout}, got {tuple(t.shape)}")
        if kv_cache[0].shape != kv_cache[1].shape:
            raise ValueError(
                f"SoftplusAttention: kv_cache's k and v must have one shape, got "
                f"{tuple(kv_cache[0].shape)} and {tuple(kv_cache[1].shape)}"
            )

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


__all__ = ["MODES", "AttentionContext", "PowerLawGraphCore", "SoftmaxCore", "SoftplusAttention", "SoftplusCore"]
