"""Power-law graph attention with its metric learner and the G-cache (PLDR-LLM; docs/plga.md).

Per layer and head (d the head dim): after RoPE, A0 = qᵀq summed over the prompt's positions; A = LayerNorm(A0)
and 8 residual units A = LN(A + GLU2(GLU1(A))) (the residual metric learner); A_LM = iSwiGLU(W·A + b) + 1e-9;
A_P = A_LM ** pw (element-wise, learnable exponents that may be negative); G = a·A_P + b_a; attention
softmax((q·G)·kᵀ/√d)·v through kestrel.ops.plga_attention. The G-cache: G (with A and A_LM) is built once from the
prompt and reused at every decoding step, so the metric learner and the G-builder are skipped while decoding.

Module and parameter names follow the public PLDR-LLM implementation, so that its per-layer tensors load by name:
wq, wk, wv, dense (linear, with bias), layernorm1 (LayerNorm over d, eps 1e-6), reslayerAs.<i>.denseAs.<j>.gluw1/
gluw2/gluw3 (SwiGLU: gluw3(silu(gluw1 x) * gluw2 x)), reslayerAs.<i>.layernormA, and plgatt_layer.Wlst, blst, pwlst,
alst, balst (each (H, d, d)). RoPE pairs adjacent features (x[2i], x[2i+1]), base 10000. The metric learner and
the G-builder run in float32 (keep the module in float32, or at least these parameters).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_finite_number, require_bool, require_int, require_number
from ..ops.plga_attention import plga_attention
from .rope import apply_rope, rope_tables


def rope(x, positions, base=10000.0):
    """PLDR-LLM's rotary embedding of x (B, L, H, d) at integer positions (L,): adjacent feature pairs
    (kestrel.nn.rope with interleaved=True)."""
    cos, sin = rope_tables(positions, x.shape[-1], base)
    return apply_rope(x, cos[None, :, None, :], sin[None, :, None, :], interleaved=True)


def i_swiglu(x):
    """iSwiGLU(x) = x * silu(x) (SwiGLU with identity weights)."""
    return x * F.silu(x)


class GLUVariant(nn.Module):
    """SwiGLU layer: gluw3(silu(gluw1 x) * gluw2 x), d_in -> dff -> d_out."""

    def __init__(self, d_in, dff, d_out, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.gluw1 = nn.Linear(d_in, dff, bias=True, **factory)
        self.gluw2 = nn.Linear(d_in, dff, bias=True, **factory)
        self.gluw3 = nn.Linear(dff, d_out, bias=True, **factory)
        for layer in (self.gluw1, self.gluw2, self.gluw3):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.gluw3(F.silu(self.gluw1(x)) * self.gluw2(x))


class ResLayerA(nn.Module):
    """One residual unit of the metric learner: LN(A + GLU_n(...GLU_1(A)))."""

    def __init__(self, depth, A_dff, num_denseA, device=None, dtype=None):
        super().__init__()
        self.denseAs = nn.ModuleList(
            [GLUVariant(depth, A_dff, depth, device=device, dtype=dtype) for _ in range(num_denseA)]
        )
        self.layernormA = nn.LayerNorm(depth, eps=1e-6, device=device, dtype=dtype)

    def forward(self, A):
        out = A
        for glu in self.denseAs:
            out = glu(out)
        return self.layernormA(out + A)


def metric_learner(layernorm, units, q, valid=None):
    """The metric A (B, H, d, d) from the queries after RoPE q (B, H, L, d): A0 = Σ_l q_lᵀ q_l over the real rows
    (valid (B, L) bool, or all), then LayerNorm and the residual units, in the norm's dtype (float32)."""
    qf = q.float()
    if valid is not None:
        qf = qf * valid[:, None, :, None]
    A = layernorm((qf.transpose(-1, -2) @ qf).to(layernorm.weight.dtype))
    for unit in units:
        A = unit(A)
    return A


class PLGALayer(nn.Module):
    """The G-builder's parameters W, b, pw, a, b_a (each (H, d, d)) and G = a·(iSwiGLU(W·A + b) + 1e-9)**pw + b_a."""

    def __init__(self, depth, num_heads, device=None):
        super().__init__()
        shape = (num_heads, depth, depth)
        self.Wlst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape, device=device)))
        self.blst = nn.Parameter(torch.zeros(shape, device=device))
        self.pwlst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape, device=device)))
        self.alst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape, device=device)))
        self.balst = nn.Parameter(torch.zeros(shape, device=device))

    def forward(self, A):
        """(A_LM, G) from the metric A (B, H, d, d), in float32."""
        A = A.float()
        a_lm = i_swiglu(torch.matmul(self.Wlst.float(), A) + self.blst.float()) + 1e-9
        a_p = torch.pow(a_lm, self.pwlst.float())
        return a_lm, torch.matmul(self.alst.float(), a_p) + self.balst.float()


@dataclass
class PLGACache:
    """A layer's decoding state: keys and values after RoPE (B, H, L, d), the metric A (B, H, d, d), and the
    G-cache (A_LM and G, None when not kept)."""

    k: torch.Tensor
    v: torch.Tensor
    A: torch.Tensor | None
    a_lm: torch.Tensor | None = None
    G: torch.Tensor | None = None

    @property
    def length(self):
        return self.k.shape[2]


class PowerLawGraphAttention(nn.Module):
    """Multi-head power-law graph attention with the metric learner and the G-cache.

    forward(x, cache=None) with x (B, L, d_model) returns (y, cache). The first call (cache=None) is the prompt: it
    builds A from the prompt's queries and, with use_g_cache=True, keeps G; later calls decode the next tokens
    against the cache and reuse G (use_g_cache=False rebuilds G from the cached A each step; the metric learner
    runs on the prompt only). G="identity" or a tensor (H, d, d) gives a predefined G: no metric learner (with
    the identity the layer is ordinary scaled dot-product attention with RoPE).
    """

    def __init__(
        self,
        d_model,
        num_heads,
        A_dff=170,
        num_reslayerA=8,
        num_denseA=2,
        *,
        use_g_cache=True,
        G=None,
        rope_base=10000.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "PowerLawGraphAttention"
        for label, value, low in (
            ("d_model", d_model, 1),
            ("num_heads", num_heads, 1),
            ("A_dff", A_dff, 1),
            ("num_reslayerA", num_reslayerA, 0),
            ("num_denseA", num_denseA, 1),
        ):
            require_int(name, label, value)
            if value < low:
                raise ValueError(f"{name}: {label} must be >= {low}, got {value}")
        require_bool(name, "use_g_cache", use_g_cache)
        require_number(name, "rope_base", rope_base)
        if not (is_finite_number(rope_base) and rope_base > 0):
            raise ValueError(f"{name}: rope_base must be a finite number > 0, got {rope_base!r}")
        if d_model % num_heads != 0:
            raise ValueError(
                f"PowerLawGraphAttention: d_model ({d_model}) must be a multiple of num_heads ({num_heads})"
            )
        if (d_model // num_heads) % 2 != 0:  # RoPE rotates pairs of features
            raise ValueError(
                f"{name}: the head dim d_model / num_heads must be even for RoPE, got "
                f"{d_model // num_heads} (d_model={d_model}, num_heads={num_heads})"
            )
        self.d_model, self.num_heads = d_model, num_heads
        self.depth = d_model // num_heads
        self.use_g_cache, self.rope_base = use_g_cache, rope_base
        factory = dict(device=device, dtype=dtype)
        self.wq = nn.Linear(d_model, d_model, bias=True, **factory)
        self.wk = nn.Linear(d_model, d_model, bias=True, **factory)
        self.wv = nn.Linear(d_model, d_model, bias=True, **factory)
        self.dense = nn.Linear(d_model, d_model, bias=True, **factory)
        if G is None:
            self.plgatt_layer = PLGALayer(self.depth, num_heads, device=device)
            self.reslayerAs = nn.ModuleList(
                [ResLayerA(self.depth, A_dff, num_denseA, device=device) for _ in range(num_reslayerA)]
            )
            self.layernorm1 = nn.LayerNorm(self.depth, eps=1e-6, device=device)
            self.register_buffer("fixed_G", None)
        else:
            if isinstance(G, str):
                if G != "identity":
                    raise ValueError(f"PowerLawGraphAttention: G must be None, 'identity' or a tensor, got {G!r}")
                G = torch.eye(self.depth, device=device).expand(num_heads, self.depth, self.depth).clone()
            if not isinstance(G, torch.Tensor) or not G.is_floating_point():
                raise TypeError(
                    f"{name}: G must be None, 'identity' or a float tensor (num_heads, d, d), got "
                    f"{getattr(G, 'dtype', type(G).__name__)}"
                )
            if tuple(G.shape) != (num_heads, self.depth, self.depth):
                raise ValueError(
                    f"PowerLawGraphAttention: a predefined G must be (num_heads={num_heads}, "
                    f"d={self.depth}, d={self.depth}), got {tuple(G.shape)}"
                )
            self.plgatt_layer = None
            self.register_buffer("fixed_G", G.detach().float().clone())

    def metric(self, q):
        """The metric learner: A = learner(LayerNorm(qᵀq)) from the prompt's queries q (B, H, L, d), float32."""
        return metric_learner(self.layernorm1, self.reslayerAs, q)

    def forward(self, x, cache=None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"PowerLawGraphAttention: x must be (B, L, {self.d_model}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if cache is not None:
            if not isinstance(cache, PLGACache):
                raise TypeError(
                    f"PowerLawGraphAttention: cache must be None or the PLGACache a previous call "
                    f"returned, got {type(cache).__name__}"
                )
            if cache.k.shape[0] != B:
                raise ValueError(f"PowerLawGraphAttention: the cache holds {cache.k.shape[0]} sequences, x has {B}")
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + L, device=x.device)
        split = lambda t: t.view(B, L, self.num_heads, self.depth)  # noqa: E731
        q = rope(split(self.wq(x)), positions, self.rope_base).transpose(1, 2)
        k = rope(split(self.wk(x)), positions, self.rope_base).transpose(1, 2)
        v = split(self.wv(x)).transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        if self.fixed_G is not None:
            G, A, a_lm = self.fixed_G[None], None, None
        elif cache is None:  # the prompt: the metric learner and the G-builder
            A = self.metric(q)
            a_lm, G = self.plgatt_layer(A)
        elif self.use_g_cache and cache.G is not None:  # decoding with the G-cache: nothing to build
            A, a_lm, G = cache.A, cache.a_lm, cache.G
        else:  # decoding without it: G rebuilt from the cached metric
            A = cache.A
            a_lm, G = self.plgatt_layer(A)
        keep = self.use_g_cache and self.fixed_G is None
        new_cache = PLGACache(k, v, A, a_lm if keep else None, G if keep else None)
        out = plga_attention(q, k, v, G, causal=True)  # q·G in float32 inside
        return self.dense(out.transpose(1, 2).reshape(B, L, self.d_model)), new_cache
