"""KestrelLM: a decoder-only transformer whose layers compose kestrel's kernels (spec decoding.md §3).

One forward serves three uses:
- training / scoring (`cache=None`): causal attention over the whole (B, L) block;
- cached decoding (`cache` a kestrel.decoding.KVCache): the L new tokens of sequence b are written to the cache at
  positions [seqlens[b], seqlens[b] + L) and attend to everything before them; afterwards seqlens grows by L (or by
  `lengths[b]` when the block is right-padded: a prompt prefill with mixed lengths);
- a draft-tree forward (`tree_depth` and `tree_mask_bits` given): the T tree tokens are written at
  [seqlens[b], seqlens[b] + T) with RoPE positions seqlens[b] + depth, each attends to the prefix and to its own
  ancestors (packed bits as in kestrel.reference.tree); seqlens is left alone (kestrel.ops.compact_kv_cache moves
  the accepted rows and advances it).

On CUDA the "softmax" tree forward and one-token decode go through kestrel.ops.tree_attention (a one-token decode is
a one-node tree); on the CPU, masked SDPA. "lssa", "lssar" and "plga" trees use an explicit-mask PyTorch formulation
of the same math (their one-token decode runs the kernels). So a one-token decode and a tree forward compute the
same logits by different numerics (other kernels or formulations, other matmul shapes): equal in exact arithmetic
(the tests check float64), but in float32 / bfloat16 they differ by rounding, and where two logits nearly tie the
greedy token can differ; on the GPU more likely than on the CPU.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.plga_attention import plga_attention
from ..ops.softplus_attention import softplus_attention
from ..reference import attention as _softplus_ref
from .config import KestrelConfig


def rope_tables(positions, head_dim, base, dtype=torch.float32):
    """(cos, sin), each (B, 1, L, head_dim / 2) float32, for integer positions (B, L)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    """Rotate x (B, H, L, D) by the tables (halves rotated together: x[:D/2] with x[D/2:]), float32 math."""
    half = x.shape[-1] // 2
    xf = x.float()
    first, second = xf[..., :half], xf[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def unpack_tree_bits(bits, T):
    """Packed ancestor-or-self bits (B, T, W) int32 -> bool (B, T, T)."""
    j = torch.arange(T, device=bits.device)
    words = bits.gather(2, (j // 32).expand(bits.shape[0], bits.shape[1], T))
    return ((words >> (j % 32)) & 1).bool()


def masked_softplus_attention(q, k, v, visible, reweight_p, eps):
    """LSSA / LSSAR of q (B, Hq, T, D) over k, v (B, Hkv, Lk, D) with an explicit visibility mask (B, 1, T, Lk):
    N_i is the number of keys row i sees (the same math as kestrel.reference.attention, whose combine it uses)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    D = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    counts = visible.sum(-1, keepdim=True).to(dtype)
    scale = math.log(D) * torch.log(counts.clamp_min(1.0))
    x = scale * (F.normalize(qf, dim=-1) @ F.normalize(kf, dim=-1).transpose(-1, -2))
    f = torch.where(visible, F.softplus(x), torch.zeros_like(x))
    s = f.sum(-1, keepdim=True)
    return _softplus_ref._combine(f, s, vf, counts, visible, x, reweight_p, eps, dtype).to(q.dtype)


class _Plan:
    """What every layer of one forward shares: RoPE tables, where the new K/V go, what each row sees."""

    def __init__(self, model, input_ids, cache, lengths, tree_depth, tree_mask_bits):
        config = model.config
        B, L = input_ids.shape
        device = input_ids.device
        self.cache, self.L = cache, L
        self.tree = tree_depth is not None
        steps = torch.arange(L, device=device)
        if lengths is not None:
            self.valid = steps[None, :] < lengths.to(device)[:, None]  # (B, L) rows that are real tokens
        else:
            self.valid = None
        if cache is None:
            positions = steps[None, :].expand(B, L)
            self.visible = None
        else:
            seqlens = cache.seqlens.to(torch.long)
            start = cache.longest()  # the host mirror when known: no device read per decoding step
            self.Lk = start + L
            if self.Lk > cache.max_len:
                raise ValueError(f"KestrelLM: the cache holds {cache.max_len} positions per sequence, this forward "
                                 f"needs {self.Lk} (longest sequence {start} + {L} new)")
            slots = seqlens[:, None] + steps[None, :]  # (B, L) cache rows written
            H, D = cache.k.shape[2], cache.k.shape[4]
            self.write_index = slots[:, None, :, None].expand(B, H, L, D)
            keys = torch.arange(self.Lk, device=device)
            if self.tree:
                positions = seqlens[:, None] + tree_depth.to(device=device, dtype=torch.long)
                ancestors = unpack_tree_bits(tree_mask_bits.to(device), L)  # (B, T, T)
                rel = keys[None, :] - seqlens[:, None]  # (B, Lk) index into the tree, if in it
                in_tree = (rel >= 0) & (rel < L)
                tree_part = ancestors.gather(2, rel.clamp(0, L - 1)[:, None, :].expand(B, L, self.Lk))
                prefix = keys[None, None, :] < seqlens[:, None, None]
                self.visible = (prefix | (tree_part & in_tree[:, None, :]))[:, None]
                self.prefix_lens = cache.seqlens.to(torch.int32)
                self.tree_mask_bits = tree_mask_bits
            else:
                positions = slots
                self.key_lens = (seqlens + L).to(torch.int32)  # valid keys per sequence after the write
                self.prefix_lens = cache.seqlens.to(torch.int32)
                self.self_bits = torch.ones((B, 1, 1), dtype=torch.int32, device=device)  # used when L == 1
                self.visible = (keys[None, None, :] <= slots[:, :, None])[:, None]  # (B, 1, L, Lk)
        if cache is not None:
            # (B, 1, Lk, 1): keys some row of this forward sees; the others (stale tree rows, a shorter sequence's
            # tail) may hold anything, and a masked score alone still multiplies their values by 0
            self.key_seen = self.visible.any(dim=2)[..., None]
        self.positions = positions  # (B, L) absolute token positions (tree nodes: len + depth)
        self.cos, self.sin = rope_tables(positions, config.head_dim, config.rope_base)


class Attention(nn.Module):
    """GQA attention of one layer: q/k/v/o projections, RoPE, and the configured attention kind."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.config, self.layer_index = config, layer_index
        H, Hkv, D, d = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model
        self.qkv_proj = nn.Linear(d, (H + 2 * Hkv) * D, bias=False)  # q, k, v in one product
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # one codebook per attention head (codebook features' per-head placement), all heads in one lookup
        self.codebook = _codebook(config, D, heads=H) if config.codebook_attn else None
        if config.attention == "plga":
            from ..nn.plga import PLGALayer, ResLayerA

            self.metric_norm = nn.LayerNorm(D, eps=1e-6)
            self.metric_units = nn.ModuleList([ResLayerA(D, config.plga_a_dff, config.plga_num_dense)
                                               for _ in range(config.plga_num_reslayer)])
            self.g_builder = PLGALayer(D, H)

    def build_G(self, q, valid):
        """PLGA's G (B, H, D, D) float32 from the queries after RoPE (B, H, L, D) of the real rows (valid (B, L))."""
        qf = q.float()
        if valid is not None:
            qf = qf * valid[:, None, :, None]
        metric_dtype = self.metric_norm.weight.dtype
        A = self.metric_norm((qf.transpose(-1, -2) @ qf).to(metric_dtype))
        for unit in self.metric_units:
            A = unit(A)
        return self.g_builder(A)[1]

    def forward(self, x, plan):
        config = self.config
        B, L, _ = x.shape
        H, Hkv, D = config.n_heads, config.n_kv_heads, config.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, L, H, D).transpose(1, 2), plan.cos, plan.sin)
        k = apply_rope(k.view(B, L, Hkv, D).transpose(1, 2), plan.cos, plan.sin)
        v = v.view(B, L, Hkv, D).transpose(1, 2)
        cache = plan.cache
        if cache is not None:
            k_cache, v_cache = cache.k[self.layer_index], cache.v[self.layer_index]
            k_cache.scatter_(2, plan.write_index, k.to(k_cache.dtype))
            v_cache.scatter_(2, plan.write_index, v.to(v_cache.dtype))
            if q.is_cuda and config.attention in ("lssa", "lssar") and not plan.tree:
                k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)  # the kernel reads rows < cache_seqlens: no slice copy
            else:
                k, v = k_cache[:, :, :plan.Lk].to(q.dtype), v_cache[:, :, :plan.Lk].to(q.dtype)
        out = self._attend(q, k, v, plan)
        out = out.transpose(1, 2).reshape(B, L, H * D)
        if self.codebook is not None:
            out = self.codebook(out, positions=plan.positions)  # absolute positions: forced codes work in decoding
        return self.o_proj(out)

    def _plga_G(self, q, plan):
        cache = plan.cache
        if cache is None:
            return self.build_G(q, plan.valid)
        if cache.g_built:
            return cache.G[self.layer_index]
        if plan.tree:
            raise ValueError("KestrelLM: a plga tree forward needs the G-cache; prefill the prompt first")
        G = self.build_G(q, plan.valid)
        cache.G[self.layer_index].copy_(G)
        return G

    def _attend(self, q, k, v, plan):
        kind, config = self.config.attention, self.config
        gqa = q.shape[1] != k.shape[1]
        reweight_p = config.lssar_p if kind == "lssar" else None
        if plan.cache is None:  # training: plain causal attention over the block
            if kind == "softmax":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            if kind in ("lssa", "lssar"):
                return softplus_attention(q, k, v, causal=True, reweight_p=reweight_p, eps=config.softplus_eps)
            return plga_attention(q, k, v, self._plga_G(q, plan), causal=True)
        if plan.tree:
            if kind == "softmax":
                tree_attention = _tree_attention_op(q)
                if tree_attention is not None:
                    k_cache, v_cache = plan.cache.k[self.layer_index], plan.cache.v[self.layer_index]
                    return tree_attention(q, k_cache, v_cache, plan.prefix_lens, plan.tree_mask_bits)
                k, v = _seen_keys(k, v, plan)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.visible, enable_gqa=gqa)
            k, v = _seen_keys(k, v, plan)
            if kind in ("lssa", "lssar"):
                return masked_softplus_attention(q, k, v, plan.visible, reweight_p, config.softplus_eps)
            G = self._plga_G(q, plan)
            wide = torch.promote_types(q.dtype, torch.float32)
            q_metric = torch.matmul(q.to(wide), G.to(wide)).to(q.dtype)
            return F.scaled_dot_product_attention(q_metric, k, v, attn_mask=plan.visible, enable_gqa=gqa)
        if kind == "softmax":
            tree_attention = _tree_attention_op(q) if plan.L == 1 else None
            if tree_attention is not None:  # one-token decode: a one-node tree (the prefix and the token itself)
                k_cache, v_cache = plan.cache.k[self.layer_index], plan.cache.v[self.layer_index]
                return tree_attention(q, k_cache, v_cache, plan.prefix_lens, plan.self_bits)
            k, v = _seen_keys(k, v, plan)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.visible, enable_gqa=gqa)
        if kind in ("lssa", "lssar"):
            return softplus_attention(q, k, v, causal=True, reweight_p=reweight_p, eps=config.softplus_eps,
                                      cache_seqlens=plan.key_lens)
        return plga_attention(q, k, v, self._plga_G(q, plan), causal=True, cache_seqlens=plan.key_lens)


def _seen_keys(k, v, plan):
    """k and v with the cache rows no row of this forward sees replaced by zeros (selected, not multiplied)."""
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(plan.key_seen, k, zero), torch.where(plan.key_seen, v, zero)


def _tree_attention_op(q):
    """kestrel.ops.tree_attention for CUDA tensors (its Triton kernel). On the CPU the masked SDPA above is the
    faster path (the op's CPU fallback is a chunked PyTorch loop written as the kernel's oracle)."""
    if not q.is_cuda:
        return None
    from ..ops.tree_attention import tree_attention

    return tree_attention


def _codebook(config, dim, heads=1):
    from ..nn import CodebookLayer

    return CodebookLayer(dim, config.num_codes, k=config.codebook_k, heads=heads)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x) (gate and up in one product), then the optional codebook."""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.codebook = _codebook(config, config.d_model) if config.codebook_mlp else None

    def forward(self, x, positions=None):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return self.codebook(out, positions=positions) if self.codebook is not None else out


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, plan):
        x = x + self.attn(self.attn_norm(x), plan)
        return x + self.mlp(self.mlp_norm(x), plan.positions)


class DraftHead(nn.Module):
    """A Medusa head: a residual SiLU block h + silu(W h + b) whose output goes through the shared LM head. W starts
    at zero, so an untrained head repeats the LM head's prediction."""

    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, hidden):
        return hidden + F.silu(self.proj(hidden))


class KestrelLM(nn.Module):
    """The decoder-only LM of KestrelConfig; see the module docstring for the three kinds of forward.

    `model(input_ids)` with input_ids (B, L) int64 returns logits (B, L, vocab_size).
    `model(input_ids, cache, lengths=None, tree_depth=None, tree_mask_bits=None, return_hidden=False)`: the cached
    and tree forwards; return_hidden also returns the final hidden states (B, L, d_model) (after the last norm:
    what the LM head and the draft heads read). lengths (B,), a tensor or a list of ints (a list keeps the cache's
    host mirror of its lengths known, see kestrel.decoding.KVCache): the real tokens of each right-padded row; the
    padding positions may hold any id (e.g. -1), they are embedded as token 0 and never attended to.
    """

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = KestrelConfig.from_dict(config)
        self.config = config
        if config.stable_embedding:
            from ..nn.embedding import StableEmbedding

            self.embed = StableEmbedding(config.vocab_size, config.d_model)
        else:
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.draft_heads = nn.ModuleList([DraftHead(config.d_model) for _ in range(config.num_draft_heads)])
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("draft_heads"):
                if ".attn.metric_units" in name:
                    continue  # the PLGA metric learner keeps its own initialisation
                out_proj = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, std=residual_std if out_proj else std)
        if not self.config.stable_embedding:
            nn.init.normal_(self.embed.weight, std=std)
        for head in self.draft_heads:
            nn.init.zeros_(head.proj.weight)
            nn.init.zeros_(head.proj.bias)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def forward(self, input_ids, cache=None, *, lengths=None, tree_depth=None, tree_mask_bits=None,
                return_hidden=False):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("KestrelLM: input_ids must be an int64 tensor (B, L), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        B, L = input_ids.shape
        if (tree_depth is None) != (tree_mask_bits is None):
            raise ValueError("KestrelLM: a tree forward needs both tree_depth and tree_mask_bits")
        if tree_depth is not None and cache is None:
            raise ValueError("KestrelLM: a tree forward needs a cache (the prefix lives there)")
        if cache is not None and cache.k.shape[1] != B:
            raise ValueError(f"KestrelLM: the cache holds {cache.k.shape[1]} sequences, input_ids has {B}")
        if cache is None and L > self.config.max_seq_len:
            raise ValueError(f"KestrelLM: input_ids has {L} positions, max_seq_len is {self.config.max_seq_len}")
        if lengths is not None and tree_depth is not None:
            raise ValueError("KestrelLM: lengths applies to a plain or cached forward, not to a tree forward")
        host_lengths = None
        if isinstance(lengths, (list, tuple)):
            host_lengths = [int(n) for n in lengths]
            if len(host_lengths) != B:
                raise ValueError(f"KestrelLM: lengths must have B={B} entries, got {len(host_lengths)}")
            lengths = torch.tensor(host_lengths, dtype=torch.int64, device=input_ids.device)
        plan = _Plan(self, input_ids, cache, lengths, tree_depth, tree_mask_bits)
        if plan.valid is not None:  # padding rows may hold any id (e.g. -1): embed a valid one, never read
            input_ids = torch.where(plan.valid, input_ids, torch.zeros((), dtype=input_ids.dtype,
                                                                       device=input_ids.device))
        try:  # before anything is written to the cache; no read when the ids are valid
            x = self.embed(input_ids)
        except IndexError as error:  # the CPU lookup's "index out of range in self" (a GPU asserts instead)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise ValueError(f"KestrelLM: input_ids must hold token ids in [0, vocab_size={self.config.vocab_size}), "
                             f"got {lo if lo < 0 else hi}") from error
        for block in self.layers:
            x = block(x, plan)
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        if cache is not None and tree_depth is None:
            if self.config.attention == "plga":
                cache.g_built = True
            mirror = cache.host_seqlens  # read before the write below (which leaves it unknown until set again)
            cache.seqlens += (lengths.to(cache.seqlens) if lengths is not None else L)
            if mirror is not None and lengths is None:
                cache.host_seqlens = [n + L for n in mirror]
            elif mirror is not None and host_lengths is not None:
                cache.host_seqlens = [n + m for n, m in zip(mirror, host_lengths)]
            else:
                cache.host_seqlens = None  # device lengths: unknown on the host until someone reads them
        return (logits, hidden) if return_hidden else logits

    def draft_logits(self, hidden):
        """The draft heads' logits for hidden states (..., d_model): (..., num_draft_heads, vocab_size)."""
        if not len(self.draft_heads):
            raise ValueError("KestrelLM: this model has no draft heads (config.num_draft_heads == 0)")
        return torch.stack([self.lm_head(head(hidden)) for head in self.draft_heads], dim=-2)

    def num_parameters(self, include_draft_heads=True):
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if not include_draft_heads and name.startswith("draft_heads"):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def save(self, path):
        """Write {"config": ..., "state_dict": ...} with torch.save; KestrelLM.load(path) restores it."""
        torch.save({"config": self.config.to_dict(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        payload = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(KestrelConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model


__all__ = ["KestrelLM", "DraftHead", "apply_rope", "masked_softplus_attention", "rope_tables", "unpack_tree_bits"]
